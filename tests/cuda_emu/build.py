"""Build the CUDA sources of dit_kernels as a CPU library that emulates the GPU (tests only).

Why: CI and most development machines have no GPU, and a CUDA kernel that only ever compiled can
still index wrongly, race, or skip a barrier. Here every ``csrc/cuda`` source is compiled as host
C++ against ``tests/cuda_emu/include`` (fake CUDA / ATen-CUDA headers and a fiber scheduler, see
``dit_emu_runtime.h``) after a few mechanical rewrites, and its ``TORCH_LIBRARY_IMPL(dit_kernels,
CUDA)`` registrations become ``dit_emu`` ops on CPU tensors with the same schemas. Tests then call
``torch.ops.dit_emu.<op>`` and compare with the CPU kernels and the references.

Rewrites (text, on copies under build/cuda_emu/src):
  kernel<<<grid, block, smem, stream>>>(args)  ->  ::dit_emu::launch(kernel, grid, block, smem, stream)(args)
  extern __shared__ T name[];                   ->  T* name = (T*)::dit_emu::dynamic_smem();
  __shared__ T name[..];                        ->  static T name[..]; ::dit_emu::poison_shared(name, sizeof(name));
  .is_cuda()                                    ->  .is_cpu()   (the emulated device is the host)
  reinterpret_cast<To>(p)                       ->  ::dit_emu::checked_cast<To>(p) (faults on a misaligned
                                                    pointer cast inside a kernel, as a vector access would)
  CUDA_KERNEL_ASSERT[_MSG]                      ->  DIT_EMU_KERNEL_ASSERT[_MSG] (raises instead of aborting)
  TORCH_LIBRARY[_FRAGMENT](dit_kernels, ...)    ->  ...(dit_emu, ...)
  TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m)      ->  TORCH_LIBRARY_IMPL(dit_emu, CPU, m)
  TORCH_LIBRARY_IMPL(dit_kernels, CPU, m)       ->  an unused function (the CPU kernels are not part of it)

What it does not check: speed, memory coalescing, the real compiler's code generation, fast-math
precision, and races that do not change the result under the three schedules (ascending,
descending, random). Out-of-bounds accesses are caught only when they corrupt a checked value;
misaligned vector accesses only where the kernel forms the pointer with reinterpret_cast (all
current vector paths do).

Usage: ``load()`` builds once (ninja, cached under build/cuda_emu) and loads the library;
``python tests/cuda_emu/build.py`` does the same from the command line. ``DIT_EMULATE_CUDA=1
pytest tests/...`` (see tests/conftest.py) also makes the emulated CUDA kernels the CPU kernels of
``dit_kernels`` for that run (``override_cpu_kernels``), so every existing CPU test of the ops and
models runs the CUDA code.
"""
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
BUILD = REPO / "build" / "cuda_emu"
SRC = BUILD / "src"

# CPU sources that define helpers the CUDA files call (their CPU registrations are dropped).
CPU_HELPER_SOURCES = ["cpu/tokens_kernel.cpp"]


def strip_line_comments(text):
    """Remove // comments (outside string and char literals) so statement scanning sees only code."""
    out, i, n = [], 0, len(text)
    quote = None
    while i < n:
        c = text[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
            out.append(c)
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def rewrite_launches(text):
    """kernel<<<cfg>>>(args) -> ::dit_emu::launch(kernel, cfg)(args); the kernel expression is
    everything between the previous ';', '{', '}' or label ':' and the '<<<'."""
    pieces, pos = [], 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            pieces.append(text[pos:])
            return "".join(pieces)
        end = text.find(">>>", start)
        if end < 0:
            raise ValueError("unterminated <<< launch")
        stmt = max(text.rfind(c, pos, start) for c in ";{}") + 1
        label = re.search(r"(?<!:):(?!:)", text[stmt:start][::-1])  # a `case x:` / `default:` label
        if label:
            stmt = start - label.start()
        segment = text[stmt:start]
        kernel = segment.strip()
        if not kernel:
            raise ValueError(f"no kernel name before <<< at offset {start}")
        lead = segment[: len(segment) - len(segment.lstrip())]
        pieces.append(text[pos:stmt])
        pieces.append(f"{lead}::dit_emu::launch({kernel}, {text[start + 3:end].strip()})")
        pos = end + 3


def patch_source(text):
    text = strip_line_comments(text)
    text = rewrite_launches(text)
    text = re.sub(
        r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;",
        r"\1* \2 = reinterpret_cast<\1*>(::dit_emu::dynamic_smem());",
        text,
    )
    text = re.sub(
        r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([^;]*?)\s+(\w+)\s*((?:\[[^\]]*\])+)\s*;",
        r"static \1 \2\3; ::dit_emu::poison_shared(\2, sizeof(\2));",
        text,
    )
    if "__shared__" in text:
        raise ValueError("a __shared__ declaration the emulation cannot rewrite")
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = re.sub(r"\breinterpret_cast<", "::dit_emu::checked_cast<", text)
    text = re.sub(r"\bCUDA_KERNEL_ASSERT(_MSG)?\b", r"DIT_EMU_KERNEL_ASSERT\1", text)
    text = re.sub(r"TORCH_LIBRARY(_FRAGMENT)?\(\s*dit_kernels\s*,", r"TORCH_LIBRARY\1(dit_emu,", text)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(\s*dit_kernels\s*,\s*CUDA\s*,", "TORCH_LIBRARY_IMPL(dit_emu, CPU,", text)
    counter = iter(range(1000))
    text = re.sub(
        r"TORCH_LIBRARY_IMPL\(\s*dit_kernels\s*,\s*CPU\s*,\s*(\w+)\s*\)",
        lambda m: f"[[maybe_unused]] static void dit_emu_dropped_cpu_registration_{next(counter)}(torch::Library& {m.group(1)})",
        text,
    )
    return text


def _write_if_changed(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate_sources():
    """Writes the patched tree under build/cuda_emu/src; returns the translation units."""
    units = []
    for header in CSRC.glob("*.h"):
        _write_if_changed(SRC / header.name, header.read_text())
    for f in sorted((CSRC / "cuda").iterdir()):
        if f.suffix in (".cuh", ".h"):
            _write_if_changed(SRC / "cuda" / f.name, patch_source(f.read_text()))
        elif f.suffix == ".cu":
            out = SRC / "cuda" / (f.stem + "_cu.cpp")  # unique object names
            _write_if_changed(out, patch_source(f.read_text()))
            units.append(out)
    for rel in ["ops.cpp", "sde_step.cpp"] + CPU_HELPER_SOURCES:
        out = SRC / rel.replace(".cpp", "_host.cpp")
        _write_if_changed(out, patch_source((CSRC / rel).read_text()))
        units.append(out)
    selftest = SRC / "emu_selftest_cu.cpp"
    _write_if_changed(selftest, patch_source((HERE / "selftest.cu").read_text()))
    units += [selftest, HERE / "emu_runtime.cpp"]
    return units


def load(verbose=False):
    """Builds (if needed) and loads the emulation library; returns its path."""
    import torch
    from torch.utils import cpp_extension

    units = generate_sources()
    include = HERE / "include"
    cflags = [
        "-O1",  # the emulation is dominated by fiber switches; -O1 keeps the build short
        "-ffp-contract=off",  # no FMA contraction: __fadd_rn & co. stay single roundings
        "-Wno-unknown-pragmas",  # #pragma unroll
        "-include",
        str(include / "dit_emu_runtime.h"),
        "-DDIT_CUDA_EMULATION=1",
        # The stand-ins reuse torch's CUDA names (at::CUDAGeneratorImpl, getDefaultCUDAGenerator); with
        # a CUDA build of torch in the process the real ones exist too, so keep ours private and bound here.
        "-fvisibility=hidden",
    ]
    ldflags = ["-Wl,-Bsymbolic"]
    name, build_dir = "dit_cuda_emu", BUILD
    if os.environ.get("DIT_EMU_SANITIZE") == "address":
        # Out-of-bounds kernel accesses to tensor memory: run the process with the sanitizer runtime
        # preloaded (LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0), so that
        # torch's CPU allocations get red zones; see .ci/run.
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
        name, build_dir = "dit_cuda_emu_asan", BUILD / "asan"
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = cpp_extension.load(
        name=name,
        sources=[str(u) for u in units],
        extra_cflags=cflags,
        extra_include_paths=[str(include), str(SRC)],
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )
    return lib


_override_library = None


def emulated_op_names():
    """The dit_kernels ops that have an emulated CUDA kernel (schemas from csrc/ops.cpp and sde_step.cpp)."""
    names = []
    for rel in ("ops.cpp", "sde_step.cpp"):
        names += re.findall(r'"(\w+)\(', (CSRC / rel).read_text())
    return sorted(set(names))


def override_cpu_kernels():
    """Registers each emulated CUDA kernel as the CPU kernel of its dit_kernels op (for this process)."""
    global _override_library
    import warnings

    import torch

    import dit_kernels  # noqa: F401  (the op schemas)

    load()
    if _override_library is not None:
        return
    lib = torch.library.Library("dit_kernels", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel" is the point
        for name in emulated_op_names():
            lib.impl(name, getattr(torch.ops.dit_emu, name).default, "CPU")
    _override_library = lib


if __name__ == "__main__":
    import torch  # noqa: F401

    load(verbose=True)
    print("dit_emu ops:", sorted(n for n in dir(torch.ops.dit_emu) if not n.startswith("__")))
    sys.exit(0)
