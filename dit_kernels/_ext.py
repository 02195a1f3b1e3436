"""Loading of the compiled extension and the impl="auto"|"ext"|"ref" dispatch rule."""
import warnings

import torch

HAS_EXT = False
HAS_CUDA_KERNELS = False
EXT_ERROR = None

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrars)

    HAS_EXT = True
except ImportError as e:  # not built, or built against another torch (ABI mismatch)
    EXT_ERROR = e
    if "No module named" not in str(e):
        warnings.warn(f"dit_kernels: compiled extension failed to load ({e}); using the PyTorch references")
except OSError as e:
    EXT_ERROR = e
    warnings.warn(f"dit_kernels: compiled extension failed to load ({e}); using the PyTorch references")

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
