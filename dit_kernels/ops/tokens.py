"""Masked-token ops for MaskDiT / SD-DiT: random masks, row gather and row scatter.

Convention (MaskDiT): ids_keep (N, K) int64 holds K distinct token positions per sample;
ids_restore (N, T) is the inverse of the per-sample shuffle, so position t is kept iff
ids_restore[n, t] < K; mask (N, T) is 1 for removed tokens.

Compiled ops: rows are copied whole (no (N, K, D) int64 index tensor), every
output row has exactly one writer (no atomics, deterministic), and the broadcast mask-token
gradient is an fp32 sum over removed rows in a fixed order.

Bad ids: on the CPU an id outside [0, T) raises, and a repeated id raises in every op that
scatters (the check is free while building the inverse map). CUDA kernels never synchronize
with the host: an out-of-range id trips a device-side assert (like torch.gather); repeated ids
are not detected (which duplicate wins is unspecified; no crash, no hang). Set the environment
variable DIT_KERNELS_DEBUG=1 to validate range and uniqueness in Python on every call (a host
sync; for debugging only).
"""
import os

import torch

from .._checks import check_float, check_rank, check_same_device
from .._ext import HAS_EXT, use_ext
from ._forward_ad import compiled_forward_ad, forward_ad_active

__all__ = [
    "random_token_mask",
    "gather_tokens",
    "gather_tokens_ref",
    "scatter_tokens",
    "scatter_tokens_ref",
]

# Read once: a constant under torch.compile. Tests may set tokens._DEBUG directly.
_DEBUG = os.environ.get("DIT_KERNELS_DEBUG", "0") == "1"


def random_token_mask(batch, length, keep, generator=None, device=None):
    """Per-sample uniform random subsets of `keep` of `length` tokens, drawn on the device.

    No host synchronization: noise, argsorts and the mask stay on `device`.

    Returns:
        ids_keep (N, K) int64 contiguous, ids_restore (N, T) int64, mask (N, T) float32 (1 = removed).
    """
    if not 0 <= keep <= length:
        raise ValueError(f"keep must be in [0, length={length}], got {keep}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch, length, generator=generator, device=device)  # (N, T)
    ids_shuffle = torch.argsort(noise, dim=1)  # (N, T) a permutation per row: ids are distinct
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, T) inverse permutation
    ids_keep = ids_shuffle[:, :keep].contiguous()  # (N, K); contiguous so the ops need no copy
    mask = (ids_restore >= keep).to(torch.float32)  # (N, T)
    return ids_keep, ids_restore, mask


def gather_tokens_ref(x, ids_keep):
    """out[n, k] = x[n, ids_keep[n, k]]: (N, T, D) -> (N, K, D)."""
    index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (N, K, D) int64
    return torch.gather(x, 1, index)


def scatter_tokens_ref(kept, ids_keep, fill, length=None):
    """(N, T, D): kept rows at ids_keep, every other row from fill.

    fill: (D,) or (1, 1, D) broadcast token (then `length` = T is required), or (N, T, D).
    """
    n, k, d = kept.shape
    if _is_per_token(fill, n, length):
        t = fill.shape[1]
        base = fill.to(kept.dtype)
    else:
        if length is None:
            raise ValueError("length (T) is required with a broadcast fill token")
        t = length
        base = fill.reshape(1, 1, d).to(kept.dtype).expand(n, t, d)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, d)  # (N, K, D)
    return base.scatter(1, index, kept)  # (N, T, D)


def _is_per_token(fill, n, length=None):
    """(N, T, D) per-token fill vs (D,) / (1, 1, D) broadcast token."""
    if fill.dim() != 3 or fill.shape[0] != n:
        return False
    if tuple(fill.shape[:2]) != (1, 1):
        return True
    # N = 1 and a (1, 1, D) fill: per-token iff T = 1 (both readings then give the same result).
    return length is None or int(length) == 1


def _check_ids(ids_keep, n, length):
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.dtype != torch.int64:
        raise TypeError(f"ids_keep must be an int64 tensor, got {getattr(ids_keep, 'dtype', type(ids_keep))}")
    if ids_keep.dim() != 2 or ids_keep.shape[0] != n:
        raise ValueError(f"ids_keep must have shape (N, K) with N = {n}, got {tuple(ids_keep.shape)}")
    if ids_keep.shape[1] > length:
        raise ValueError(f"ids_keep has K = {ids_keep.shape[1]} > T = {length} ids per sample")


def _debug_check_ids(ids_keep, length):
    """Range and per-row uniqueness of ids (host sync; only with DIT_KERNELS_DEBUG=1)."""
    if ids_keep.numel() == 0:
        return
    lo, hi = int(ids_keep.min()), int(ids_keep.max())
    if lo < 0 or hi >= length:
        raise ValueError(f"ids_keep values must lie in [0, {length}), got min {lo}, max {hi}")
    s = ids_keep.sort(dim=1).values  # (N, K)
    dup = (s[:, 1:] == s[:, :-1]).any(dim=1)  # (N,)
    if bool(dup.any()):
        raise ValueError(f"ids_keep repeats a position in sample(s) {dup.nonzero().flatten().tolist()[:8]}")


def _rows(t):
    """The kernels take any (N, rows) strides but need a dense last dimension."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def gather_tokens(x, ids_keep, impl="auto"):
    """Gather kept token rows: out[n, k] = x[n, ids_keep[n, k]].

    Args:
        x: (N, T, D) float. ids_keep: (N, K) int64, distinct ids in [0, T) per row.
    Returns:
        (N, K, D) in x.dtype.
    """
    check_float("x", x)
    check_rank("x", x, (3,), "(N, T, D)")
    check_same_device(x=x, ids_keep=ids_keep)
    _check_ids(ids_keep, x.shape[0], x.shape[1])
    if _DEBUG:
        _debug_check_ids(ids_keep, x.shape[1])
    if not use_ext("gather_tokens", impl, x.device) or compiled_forward_ad():
        return gather_tokens_ref(x, ids_keep)
    if forward_ad_active():  # torch.func.jvp (ops/_forward_ad.py)
        return _GatherTokensFn.apply(_rows(x), ids_keep.contiguous())
    return torch.ops.dit_kernels.gather_tokens(_rows(x), ids_keep.contiguous())


def scatter_tokens(kept, ids_keep, fill, length=None, impl="auto"):
    """Merge kept rows back into a full sequence.

    Args:
        kept: (N, K, D) float. ids_keep: (N, K) int64, distinct per row.
        fill: (D,) / (1, 1, D) token broadcast to every removed position (MaskDiT mask token;
            pass `length` = T), or (N, T, D) whose rows at removed positions are used (SD-DiT).
            Its dtype may differ from kept's (e.g. an fp32 mask token with bf16 tokens).
    Returns:
        (N, T, D) in kept.dtype. Gradients reach kept and fill (summed over the positions it
        filled for the broadcast form, accumulated in fp32).
    """
    check_float("kept", kept)
    check_float("fill", fill)
    check_rank("kept", kept, (3,), "(N, K, D)")
    check_same_device(kept=kept, ids_keep=ids_keep, fill=fill)
    n, _, d = kept.shape
    per_token = _is_per_token(fill, n, length)
    if per_token:
        if fill.shape[2] != d:
            raise ValueError(f"fill must be (N, T, D) with D = {d}, got {tuple(fill.shape)}")
        t = fill.shape[1]
        if length is not None and int(length) != t:
            raise ValueError(f"length = {length} does not match fill of shape {tuple(fill.shape)}")
    else:
        if fill.numel() != d or fill.dim() not in (1, 3):
            raise ValueError(f"fill must have shape ({d},), (1, 1, {d}) or (N, T, {d}), got {tuple(fill.shape)}")
        if length is None:
            raise ValueError("scatter_tokens: pass length=T with a broadcast fill token")
        t = int(length)
    _check_ids(ids_keep, n, t)
    if _DEBUG:
        _debug_check_ids(ids_keep, t)
    if not use_ext("scatter_tokens", impl, kept.device) or compiled_forward_ad():
        return scatter_tokens_ref(kept, ids_keep, fill, t)
    if fill.dtype not in (kept.dtype, torch.float32):
        fill = fill.to(kept.dtype)  # the kernels read fill as kept.dtype or fp32
    fill_arg = _rows(fill) if per_token else fill.reshape(d)  # (N, T, D) strided, or (D,)
    if forward_ad_active():
        return _ScatterTokensFn.apply(_rows(kept), ids_keep.contiguous(), fill_arg, t)
    return torch.ops.dit_kernels.scatter_tokens(_rows(kept), ids_keep.contiguous(), fill_arg, t)


if HAS_EXT:

    @torch.library.register_fake("dit_kernels::gather_tokens")
    def _(x, ids_keep):
        torch._check(x.dim() == 3, lambda: "gather_tokens: x must be (N, T, D)")
        torch._check(ids_keep.dim() == 2 and ids_keep.dtype == torch.int64, lambda: "ids_keep must be (N, K) int64")
        torch._check(ids_keep.shape[0] == x.shape[0], lambda: "ids_keep must have N rows")
        return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))

    @torch.library.register_fake("dit_kernels::_gather_tokens_backward")
    def _(grad, ids_keep, length):
        torch._check(grad.dim() == 3 and ids_keep.dim() == 2, lambda: "grad (N, K, D), ids_keep (N, K)")
        torch._check(length >= ids_keep.shape[1], lambda: "length must be >= K")
        return grad.new_empty((grad.shape[0], length, grad.shape[2]))

    @torch.library.register_fake("dit_kernels::scatter_tokens")
    def _(kept, ids_keep, fill, length):
        torch._check(kept.dim() == 3, lambda: "scatter_tokens: kept must be (N, K, D)")
        torch._check(ids_keep.dim() == 2 and ids_keep.dtype == torch.int64, lambda: "ids_keep must be (N, K) int64")
        torch._check(fill.dim() in (1, 3), lambda: "fill must be (D,) or (N, T, D)")
        torch._check(fill.dtype in (kept.dtype, torch.float32), lambda: "fill dtype must be kept.dtype or float32")
        torch._check(length >= kept.shape[1], lambda: "length must be >= K")
        return kept.new_empty((kept.shape[0], length, kept.shape[2]))

    @torch.library.register_fake("dit_kernels::_scatter_tokens_backward")
    def _(grad, ids_keep, fill_per_token, fill_dtype):
        torch._check(grad.dim() == 3 and ids_keep.dim() == 2, lambda: "grad (N, T, D), ids_keep (N, K)")
        torch._check(fill_dtype in (grad.dtype, torch.float32), lambda: "fill dtype must be grad.dtype or float32")
        n, t, d = grad.shape
        dkept = grad.new_empty((n, ids_keep.shape[1], d))
        dfill = grad.new_empty((n, t, d) if fill_per_token else (d,), dtype=fill_dtype)
        return dkept, dfill

    # ---- autograd: gather and scatter are each other's adjoint, so all four ops are differentiable
    # (double backward works and stays on the kernels).

    def _gather_setup(ctx, inputs, output):
        x, ids_keep = inputs
        ctx.save_for_backward(ids_keep)
        ctx.length = x.shape[1]

    def _gather_backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return torch.ops.dit_kernels._gather_tokens_backward(grad, ids_keep, ctx.length), None

    torch.library.register_autograd("dit_kernels::gather_tokens", _gather_backward, setup_context=_gather_setup)

    def _gather_bwd_setup(ctx, inputs, output):
        _, ids_keep, _ = inputs
        ctx.save_for_backward(ids_keep)

    def _gather_bwd_backward(ctx, grad_dx):
        (ids_keep,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return torch.ops.dit_kernels.gather_tokens(grad_dx, ids_keep), None, None

    torch.library.register_autograd(
        "dit_kernels::_gather_tokens_backward", _gather_bwd_backward, setup_context=_gather_bwd_setup
    )

    def _scatter_setup(ctx, inputs, output):
        _, ids_keep, fill, _ = inputs
        ctx.save_for_backward(ids_keep)
        ctx.fill_per_token = fill.dim() == 3
        ctx.fill_dtype = fill.dtype

    def _scatter_backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        need_kept, _, need_fill, _ = ctx.needs_input_grad
        dkept = dfill = None
        if need_fill:
            dkept, dfill = torch.ops.dit_kernels._scatter_tokens_backward(
                grad, ids_keep, ctx.fill_per_token, ctx.fill_dtype
            )
        elif need_kept:
            dkept = torch.ops.dit_kernels.gather_tokens(grad, ids_keep)  # reads only the kept rows
        return (dkept if need_kept else None), None, dfill, None

    torch.library.register_autograd("dit_kernels::scatter_tokens", _scatter_backward, setup_context=_scatter_setup)

    def _scatter_bwd_setup(ctx, inputs, output):
        grad, ids_keep, fill_per_token, fill_dtype = inputs
        ctx.save_for_backward(ids_keep)
        ctx.shape = grad.shape
        ctx.grad_dtype = grad.dtype
        ctx.fill_per_token = fill_per_token
        ctx.fill_dtype = fill_dtype

    def _scatter_bwd_backward(ctx, g_dkept, g_dfill):
        # (dkept, dfill) = (gather(grad), masked part of grad [summed]) is linear in grad; its adjoint
        # is a scatter of (g_dkept, g_dfill).
        (ids_keep,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        n, t, d = ctx.shape
        if g_dkept is None:
            g_dkept = ids_keep.new_zeros((n, ids_keep.shape[1], d), dtype=ctx.grad_dtype)
        if g_dfill is None:
            g_dfill = ids_keep.new_zeros((n, t, d) if ctx.fill_per_token else (d,), dtype=ctx.fill_dtype)
        return torch.ops.dit_kernels.scatter_tokens(g_dkept, ids_keep, g_dfill, t), None, None, None

    torch.library.register_autograd(
        "dit_kernels::_scatter_tokens_backward", _scatter_bwd_backward, setup_context=_scatter_bwd_setup
    )

    # Forward-mode AD (ops/_forward_ad.py): gather and scatter are linear in (x) and (kept, fill), so
    # tangents go through the same kernels.

    class _GatherTokensFn(torch.autograd.Function):
        @staticmethod
        def forward(x, ids_keep):
            return torch.ops.dit_kernels.gather_tokens(x, ids_keep)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _gather_setup(ctx, inputs, output)
            ctx.save_for_forward(inputs[1])

        @staticmethod
        def jvp(ctx, dx, _dids):
            (ids_keep,) = ctx.saved_tensors
            return torch.ops.dit_kernels.gather_tokens(_rows(dx), ids_keep)

        backward = staticmethod(_gather_backward)

    class _ScatterTokensFn(torch.autograd.Function):
        @staticmethod
        def forward(kept, ids_keep, fill, length):
            return torch.ops.dit_kernels.scatter_tokens(kept, ids_keep, fill, length)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _scatter_setup(ctx, inputs, output)
            kept, ids_keep, fill, length = inputs
            ctx.save_for_forward(ids_keep)
            ctx.kept_meta = (kept.shape, kept.dtype)
            ctx.fill_shape = fill.shape
            ctx.length = length

        @staticmethod
        def jvp(ctx, dkept, _dids, dfill, _dlength):
            (ids_keep,) = ctx.saved_tensors
            shape, dtype = ctx.kept_meta
            dkept = ids_keep.new_zeros(shape, dtype=dtype) if dkept is None else _rows(dkept)
            dfill = ids_keep.new_zeros(ctx.fill_shape, dtype=ctx.fill_dtype) if dfill is None else _rows(dfill)
            return torch.ops.dit_kernels.scatter_tokens(dkept, ids_keep, dfill, ctx.length)

        backward = staticmethod(_scatter_backward)
