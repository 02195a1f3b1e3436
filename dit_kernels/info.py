"""What dit_kernels runs with, and why: `python -m dit_kernels.info`.

Importing dit_kernels loads the prebuilt library, or compiles it once against the running torch
(then cached), so running this right after `pip install -e .` also does that first build visibly.
"""
import argparse
import os
import sys

import torch


def report():
    import dit_kernels
    from dit_kernels import _build, _ext

    cuda_build, why = _build.want_cuda()
    lines = [
        f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'}), Python {sys.version.split()[0]}",
        f"GPU            {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
        f"kernels        {'loaded: ' + _ext.EXT_SOURCE if dit_kernels.HAS_EXT else 'NOT loaded: every op runs its PyTorch reference'}",
    ]
    if _ext.EXT_PATH:
        lines.append(f"library        {_ext.EXT_PATH}")
    for note in _ext.EXT_NOTES:
        lines.append(f"note           {note}")
    if _ext.EXT_ERROR:
        lines.append(f"error          {_ext.EXT_ERROR}")
    lines += [
        f"cpu kernels    {', '.join(sorted(k for k in _ext.KERNELS['cpu'] if not k.startswith('_'))) or '-'}",
        f"cuda kernels   {', '.join(sorted(k for k in _ext.KERNELS['cuda'] if not k.startswith('_'))) or '-'}",
        f"CUDA build     {'yes' if cuda_build else 'no'} ({why})",
        f"sources        {_build.csrc_dir() or 'not found'}",
        f"compiler       {' '.join(_build.cxx_compiler())}",
        f"build cache    {os.path.dirname(_build.jit_cache_dir(cuda_build)) if _build.csrc_dir() else '-'}",
        "settings       FORCE_CPU / FORCE_CUDA (CUDA kernels or not), DIT_KERNELS_JIT=0 (never compile on import), "
        "DIT_KERNELS_CACHE (build cache folder)",
    ]
    return "\n".join(lines)


def main(argv=None):
    argparse.ArgumentParser(
        prog="python -m dit_kernels.info",
        description="Say what dit_kernels runs with: the torch build, the GPU, whether the compiled kernels "
                    "loaded (compiling them on first use), which ops have CPU / CUDA kernels, and the settings "
                    "that change it. Exit status 0 when the compiled kernels loaded, 1 when every op runs its "
                    "PyTorch reference.").parse_args(argv)
    print(report())
    import dit_kernels

    return 0 if dit_kernels.HAS_EXT else 1


if __name__ == "__main__":
    sys.exit(main())
