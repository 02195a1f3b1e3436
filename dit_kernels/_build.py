"""Build helpers shared by setup.py and anything else that compiles dit_kernels._C.

Standalone on purpose (imports only the standard library and, inside functions, torch): setup.py
loads this file by path before the package is importable.
"""
import glob
import os
import shlex
import subprocess
import sys


def cxx_compiler():
    """The C++ compiler torch.utils.cpp_extension builds and links with: $CXX, else `c++`."""
    return shlex.split(os.environ.get("CXX") or "c++")


def loaded_libstdcxx():
    """Path of the libstdc++ this process has loaded (the one torch runs with), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return os.path.realpath(path)
    except OSError:
        pass
    return None


def shared_libstdcxx_link_args(cxx=None):
    """Linker flags that keep libstdc++ shared, where the compiler would otherwise link it statically.

    Some toolchains ship only libstdc++.a in their own library directories (seen on the GPU
    machine's image: CXX=/opt/gcc/bin/g++, a wrapper around a relocated GCC 13). `g++ -shared` then
    copies a private libstdc++ into dit_kernels._C. Exceptions thrown by libtorch (the process's
    libstdc++) unwind through our frames, whose personality routine and exception globals are the
    private copy: the first failed TORCH_CHECK in a kernel's host code segfaulted the process there,
    and truncated the error message here (GCC 12, emulated with -static-libstdc++). When the
    compiler reports no shared libstdc++ (`-print-file-name` echoes the bare name), link the one
    the running torch has loaded; torch itself is imported first so that it is mapped.
    """
    if not sys.platform.startswith("linux"):
        return []
    cxx = cxx or cxx_compiler()
    try:
        found = subprocess.run(cxx + ["-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found):
        return []  # the compiler has a shared libstdc++: its default link is fine
    import torch  # noqa: F401  (maps the libstdc++ torch runs with)

    lib = loaded_libstdcxx()
    if lib is None:
        return []
    return [f"-L{os.path.dirname(lib)}", f"-l:{os.path.basename(lib)}"]


def wheel_cuda_include_dirs():
    """The CUDA library headers pip's torch wheel ships (site-packages/nvidia/*/include: cusparse.h,
    cublas_v2.h, ...), which an install with only nvcc lacks."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def add_wheel_cuda_headers_to_cpath():
    """Append wheel_cuda_include_dirs() to CPATH: searched after every -I path, so a full CUDA
    toolkit's own headers keep precedence and a bare nvcc install still compiles ATen's CUDA headers."""
    found = wheel_cuda_include_dirs()
    if found:
        current = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
        os.environ["CPATH"] = os.pathsep.join(current + [d for d in found if d not in current])

