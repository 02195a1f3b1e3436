"""The compiled extension links and raises like torch: C++ errors reach Python intact.

On the GPU machine (2026-11-30, H200 image, CXX=/opt/gcc/bin/g++) the extension linked a private
static libstdc++ and every failed TORCH_CHECK in its host code segfaulted the process; here the same
mistake truncated the error message. dit_kernels/_build.py now keeps libstdc++ shared.
"""
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from dit_kernels import _build
from dit_kernels._ext import HAS_EXT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_cpp_error_reaches_python_whole():
    # A subprocess, so that a crash is reported as this test's failure instead of ending the session.
    code = textwrap.dedent("""
        import torch, dit_kernels
        x = torch.randn(2, 4, 8)
        try:
            torch.ops.dit_kernels.gated_residual(x, x, torch.zeros(3, 8))
        except RuntimeError as e:
            print(str(e).splitlines()[0])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"a C++ error crashed the process (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert "gate must have shape (N, D) = (2, 8), got [3, 8]" in proc.stdout, proc.stdout


def _fake_compiler(tmp_path, answer):
    path = tmp_path / "fake-g++"
    path.write_text(f"#!/bin/sh\necho '{answer}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return [str(path)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux toolchains only")
def test_static_only_libstdcxx_is_linked_shared(tmp_path):
    # A compiler that finds no libstdc++.so echoes the bare name: link the one torch runs with.
    args = _build.shared_libstdcxx_link_args(_fake_compiler(tmp_path, "libstdc++.so"))
    assert len(args) == 2 and args[0].startswith("-L") and args[1].startswith("-l:libstdc++.so"), args
    assert os.path.exists(os.path.join(args[0][2:], args[1][3:]))
    # A compiler with a shared libstdc++ keeps its default link.
    assert _build.shared_libstdcxx_link_args(_fake_compiler(tmp_path, "/usr/lib/gcc/x/13/libstdc++.so")) == []


def test_extension_is_loaded():
    # Every op test skips without the library; this one says so loudly instead (CI, the README command).
    import dit_kernels

    assert dit_kernels.HAS_EXT, f"dit_kernels compiled library not loaded: {dit_kernels._ext.EXT_ERROR}"


def test_library_of_another_torch_is_not_loaded(monkeypatch):
    from dit_kernels import _ext

    monkeypatch.setattr(_ext, "_prebuilt_stamp", lambda: {"torch": "0.0.0"})
    with pytest.raises(ImportError, match="compiled against torch 0.0.0"):
        _ext._load_prebuilt()
    import torch

    monkeypatch.setattr(_ext, "_prebuilt_stamp", lambda: {"torch": torch.__version__, "sources": "000000000000"})
    with pytest.raises(ImportError, match="other sources"):
        _ext._load_prebuilt()


def test_info_report_names_what_runs():
    from dit_kernels.info import report

    text = report()
    for key in ("torch ", "kernels ", "cpu kernels", "CUDA build", "build cache"):
        assert key in text, text


def test_two_checkouts_build_in_two_cache_folders(monkeypatch, tmp_path):
    # Same sources, other paths: ninja's build file names the paths, so one shared folder rebuilt
    # everything on every switch between the two checkouts.
    monkeypatch.setattr(_build, "sources_digest", lambda csrc=None: "same-sources")
    here = _build.jit_cache_dir(False)
    copy = tmp_path / "csrc"
    copy.mkdir()
    monkeypatch.setattr(_build, "csrc_dir", lambda: str(copy))
    assert _build.jit_cache_dir(False) != here
    assert os.path.dirname(_build.jit_cache_dir(False)) == os.path.dirname(here)


def test_import_is_quiet_about_a_missing_cuda_runtime():
    # Where nvcc exists without a GPU, torch.utils.cpp_extension warns "No CUDA runtime is found" when it
    # is imported: on every command of a CPU user. The library loads prebuilt (setup.py) or from the JIT
    # cache; either way the product's first import of cpp_extension is _build.cpp_extension(), which
    # must be quiet (a bare `import torch.utils.cpp_extension` here would warn in a prebuilt install,
    # where dit_kernels never imports it: that is torch's warning, not ours).
    code = ("import dit_kernels; from dit_kernels import _build; "
            "print('CUDA_HOME', _build.cpp_extension().CUDA_HOME, dit_kernels._ext.EXT_SOURCE)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No CUDA runtime" not in proc.stderr, proc.stderr[-2000:]


def test_info_help():
    from dit_kernels.info import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
