"""Input validation shared by the public wrappers: clear Python errors before any kernel runs."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


BRANCH_DTYPES = (torch.float16, torch.bfloat16)


def is_branch_dtype(dtype, x_dtype):
    """The dtype of a block's branch (y, h, their grads): x's own dtype, or float16/bfloat16 with a
    float32 residual stream x (the layout of bf16 autocast training)."""
    return dtype == x_dtype or (x_dtype == torch.float32 and dtype in BRANCH_DTYPES)


def check_branch_dtype(name, dtype, x_dtype):
    if not is_branch_dtype(dtype, x_dtype):
        raise TypeError(
            f"{name} must have the dtype of x ({x_dtype}), or be float16/bfloat16 with a float32 x; got {dtype}"
        )


def check_rank(name, t, ranks, layout):
    if t.dim() not in ranks:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def check_same_device(**tensors):
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def per_sample(name, t, n, d):
    """Return a modulation tensor as an (N, D) view (stride 0 over N when shared).

    Accepts (N, D) with any row stride, and shared (D,) or (1, D). Never copies, except
    when the inner stride is not 1 (then a small (N, D) copy is made).
    """
    check_float(name, t)
    if t.dim() == 1 and t.shape[0] == d:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != d or t.shape[0] not in (1, n):
        raise ValueError(f"{name} must have shape (N, D) = ({n}, {d}), (1, {d}) or ({d},), got {tuple(t.shape)}")
    if t.shape[0] == 1 and n != 1:
        t = t.expand(n, d)
    if d > 1 and t.stride(1) != 1:
        # not .contiguous(): an empty (0, D) view counts as contiguous and would keep its inner stride
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def check_mod_dtypes(x_dtype, **mods):
    """The compiled kernels' modulation rule, checked before dispatch so that the error names the argument:
    each modulation tensor in x's dtype or float32, and all of them in one dtype."""
    for name, t in mods.items():
        if t.dtype not in (x_dtype, torch.float32):
            raise TypeError(f"{name} must have the dtype of x ({x_dtype}) or be float32, got {t.dtype}")
    if len({t.dtype for t in mods.values()}) > 1:
        desc = ", ".join(f"{k} {t.dtype}" for k, t in mods.items())
        raise TypeError(f"the modulation tensors must share one dtype, got {desc}")
