"""Loading of the compiled extension and the impl="auto"|"ext"|"ref" dispatch rule."""
import importlib.machinery
import json
import os
import warnings

import torch

from . import _build

HAS_EXT = False
HAS_CUDA_KERNELS = False
EXT_ERROR = None  # why no library loaded (None when one did)
EXT_SOURCE = None  # "prebuilt" (setup.py) or "built on import" (_build.build_jit), when one loaded
EXT_PATH = None
EXT_NOTES = []  # what was tried before the library that loaded, and why it was passed over


def _prebuilt_stamp():
    """What a prebuilt _C was compiled from (setup.py writes _C.build.json): {"torch", "sources"}, or {}."""
    try:
        with open(os.path.join(_build.PACKAGE_DIR, "_C.build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _prebuilt_exists():
    return any(os.path.exists(os.path.join(_build.PACKAGE_DIR, "_C" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _load_prebuilt():
    stamp = _prebuilt_stamp()
    if stamp.get("torch", torch.__version__) != torch.__version__:
        raise ImportError(f"prebuilt library was compiled against torch {stamp['torch']}, this is torch {torch.__version__}")
    if _build.csrc_dir() and stamp.get("sources", _build.sources_digest()) != _build.sources_digest():
        raise ImportError("prebuilt library was compiled from other sources than csrc/ holds now (rebuild with "
                          "`python setup.py build_ext --inplace`, or let import compile them)")
    from . import _C  # importing runs the TORCH_LIBRARY registrars

    return _C.__file__


def _load():
    """Prebuilt library if it matches this torch, else compile it now (cached), else None + one warning."""
    global HAS_EXT, EXT_ERROR, EXT_SOURCE, EXT_PATH
    try:
        if not _prebuilt_exists():  # an isolated install (plain `pip install -e .`) ships none
            raise FileNotFoundError
        EXT_PATH, EXT_SOURCE = _load_prebuilt(), "prebuilt"
    except (ImportError, OSError) as e:  # not built, or built against another torch (ABI mismatch)
        if not isinstance(e, FileNotFoundError):
            EXT_NOTES.append(f"prebuilt library not used: {e}")
        if os.environ.get("DIT_KERNELS_JIT", "1") == "0":
            EXT_ERROR = EXT_NOTES[-1] if EXT_NOTES else "no prebuilt library and DIT_KERNELS_JIT=0"
        else:
            try:
                EXT_PATH, EXT_SOURCE = _build.build_jit(), "built on import"
            except Exception as e:  # noqa: BLE001  (a compiler error must not make the package unusable)
                tail = "\n".join(str(e).strip().splitlines()[-12:])
                EXT_ERROR = f"compiling on import failed: {type(e).__name__}: {tail}"
    HAS_EXT = EXT_PATH is not None
    if not HAS_EXT:
        warnings.warn(f"dit_kernels: no compiled kernels ({EXT_ERROR}); every op runs its PyTorch reference. "
                      f"`python -m dit_kernels.info` says more.", stacklevel=3)


_load()

IMPLS = ("auto", "ext", "ref")

# {"cpu": {op names}, "cuda": {op names}} with a compiled kernel, read once at import so
# that the dispatch decision is a constant under torch.compile (no graph break).
KERNELS = {
    dev: {
        r.split("::", 1)[1]
        for r in (torch._C._dispatch_get_registrations_for_dispatch_key(key) if HAS_EXT else [])
        if r.startswith("dit_kernels::")
    }
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}
HAS_CUDA_KERNELS = bool(KERNELS["cuda"])


def has_kernel(op_name, device):
    """True when op `dit_kernels::<op_name>` has a compiled kernel for `device`."""
    return op_name in KERNELS.get(torch.device(device).type, ())


def use_ext(op_name, impl, device):
    """Decide whether a public function runs the compiled op or the reference.

    impl="auto": the compiled op when it exists for `device`, else the reference.
    impl="ext": the compiled op, or a RuntimeError saying why it is unavailable.
    impl="ref": always the pure-PyTorch reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return False
    ok = has_kernel(op_name, device)
    if impl == "ext" and not ok:
        why = f"extension not loaded ({EXT_ERROR})" if not HAS_EXT else f"no kernel for device {device}"
        raise RuntimeError(f"dit_kernels.{op_name}(impl='ext'): {why}")
    return ok
