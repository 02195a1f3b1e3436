"""How dit_kernels._C is compiled: sources, flags and the CUDA decision, in one place for both
paths that build it.

- setup.py (ahead of time, `pip install --no-build-isolation`, or `python setup.py build_ext`),
- build_jit() (on first import, against the running torch, when no prebuilt library loads: a
  plain `pip install -e .` builds in an isolated environment without torch, so it ships no library).

Standalone on purpose (imports only the standard library at module level): setup.py loads this
file by path before the package is importable.
"""
import glob
import hashlib
import logging
import os
import shlex
import subprocess
import sys
import time

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def csrc_dir():
    """The C++/CUDA sources: `_csrc` inside an installed wheel (setup.py copies them there), else
    the source checkout's `csrc` beside the package (editable installs)."""
    for path in (os.path.join(PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(path, "ops.cpp")):
            return path
    return None


def sources(csrc, cuda):
    """C++ sources (always), plus the CUDA sources when `cuda`."""
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files


def debug_build():
    return os.environ.get("DEBUG", "0") == "1"


def cxx_flags(cuda):
    opt = ["-O0", "-g"] if debug_build() else ["-O3"]
    return opt + ["-fopenmp"] + (["-DWITH_CUDA"] if cuda else [])


def nvcc_flags():
    opt = ["-O0", "-g"] if debug_build() else ["-O3"]
    return opt + ["--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo", "--threads=2"] + \
        os.environ.get("NVCC_FLAGS", "").split()


def link_flags():
    return ["-fopenmp"] + shared_libstdcxx_link_args()


def want_cuda():
    """(build the CUDA kernels?, why). FORCE_CPU=1 / FORCE_CUDA=1 decide; otherwise only where it can
    succeed and is useful: a CUDA build of torch, nvcc (CUDA_HOME) and a visible GPU. A CUDA torch
    with nvcc on a GPU-less host (a CPU laptop with `pip install torch`) builds the CPU kernels."""
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False, "FORCE_CPU=1"
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    cuda_home = cpp_extension().CUDA_HOME
    if cuda_home is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if not torch.cuda.is_available():
        return False, "no visible GPU (FORCE_CUDA=1 builds the CUDA kernels anyway)"
    return True, f"CUDA torch {torch.version.cuda}, nvcc in {cuda_home}, a visible GPU"


class _DropNoCudaRuntime(logging.Filter):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is first
    imported on a machine with nvcc but no GPU: on every command of a CPU user, and it says nothing they
    can act on (want_cuda() gives the decision and the reason in `python -m dit_kernels.info`)."""

    def filter(self, record):
        return "No CUDA runtime is found" not in record.getMessage()


def cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    drop = _DropNoCudaRuntime()
    logger.addFilter(drop)
    try:
        from torch.utils import cpp_extension as module
    finally:
        logger.removeFilter(drop)
    return module


# ---- libstdc++ ---------------------------------------------------------------------------------

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


# ---- CUDA headers of the torch wheel -------------------------------------------------------------

def wheel_cuda_include_dirs():
    """The CUDA library headers pip's torch wheel ships (site-packages/nvidia/*/include: cusparse.h,
    cublas_v2.h, ...), which an install with only nvcc lacks."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def add_wheel_cuda_headers_to_cpath():
    """Append wheel_cuda_include_dirs() to CPATH (DIT_WHEEL_CUDA_HEADERS=0: don't): searched after every
    -I path, so a full CUDA toolkit's own headers keep precedence and a bare nvcc install still
    compiles ATen's CUDA headers."""
    if os.environ.get("DIT_WHEEL_CUDA_HEADERS", "1") != "1":
        return
    found = wheel_cuda_include_dirs()
    if found:
        current = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
        os.environ["CPATH"] = os.pathsep.join(current + [d for d in found if d not in current])


# ---- build on first import -----------------------------------------------------------------------

def sources_digest(csrc=None):
    """A short hash of every C++/CUDA source and header: a library built from other sources is stale."""
    csrc = csrc or csrc_dir()
    digest = hashlib.sha256()
    for path in sources(csrc, True) + sorted(glob.glob(os.path.join(csrc, "**", "*.h*"), recursive=True)):
        digest.update(os.path.relpath(path, csrc).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def jit_cache_dir(cuda):
    """Per torch build, Python and source contents: another torch or edited sources get their own build."""
    import torch

    root = os.environ.get("DIT_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dit_kernels")
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if cuda else 'cpu'}"
    # Two checkouts of the same sources get two folders: ninja's build file names the source paths, so
    # sharing one folder made each checkout's import rebuild everything the other had built.
    where = hashlib.sha256(os.path.realpath(csrc_dir()).encode()).hexdigest()[:6]
    return os.path.join(root, f"{tag}-{sources_digest()}-{where}".replace("+", "_"))


def build_jit(verbose=True):
    """Compile dit_kernels._C against the running torch with ninja (cached; torch's FileBaton lock in
    the build folder keeps two processes from building at once) and load it. Returns the library path."""
    load = cpp_extension().load
    csrc = csrc_dir()
    if csrc is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed beside dit_kernels")
    cuda, why = want_cuda()
    if cuda:
        add_wheel_cuda_headers_to_cpath()
    build_dir = jit_cache_dir(cuda)
    os.makedirs(build_dir, exist_ok=True)
    _remove_stale_lock(os.path.join(build_dir, "lock"))
    first = not glob.glob(os.path.join(build_dir, "*.so"))
    if verbose and first:
        print(f"dit_kernels: compiling the {'C++ and CUDA' if cuda else 'C++'} kernels for this torch ({why}); "
              f"first import only, about 2 minutes on 2 cores (4-8 with CUDA) -> {build_dir}",
              file=sys.stderr, flush=True)
    start = time.time()
    # The compiler's own lines stay quiet (DIT_KERNELS_VERBOSE=1 shows them); a failed build still
    # raises with ninja's whole output in the message.
    path = load(name="dit_kernels_C", sources=sources(csrc, cuda), extra_cflags=cxx_flags(cuda),
                extra_cuda_cflags=nvcc_flags() if cuda else None, extra_ldflags=link_flags(),
                build_directory=build_dir, verbose=os.environ.get("DIT_KERNELS_VERBOSE", "0") == "1",
                with_cuda=cuda, is_python_module=False)
    if verbose and first:
        print(f"dit_kernels: kernels compiled in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return path


def _remove_stale_lock(path, max_age_s=3600):
    """torch's build lock is a plain file: a build killed while holding it would make every later import
    wait forever. No build takes an hour (CUDA on 2 cores: under 10 minutes)."""
    try:
        if time.time() - os.path.getmtime(path) > max_age_s:
            os.remove(path)
            print(f"dit_kernels: removed a stale build lock {path}", file=sys.stderr)
    except OSError:
        pass
