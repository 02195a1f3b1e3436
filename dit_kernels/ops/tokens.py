"""Masked-token ops for MaskDiT / SD-DiT: random masks, row gather and row scatter.

Convention (MaskDiT): ids_keep (N, K) int64 holds K distinct token positions per sample;
ids_restore (N, T) is the inverse of the per-sample shuffle, so position t is kept iff
ids_restore[n, t] < K; mask (N, T) is 1 for removed tokens.
"""
import torch

from .._checks import check_float, check_rank, check_same_device
from .._ext import use_ext

__all__ = [
    "random_token_mask",
    "gather_tokens",
    "gather_tokens_ref",
    "scatter_tokens",
    "scatter_tokens_ref",
]


def random_token_mask(batch, length, keep, generator=None, device=None):
    """Per-sample uniform random subsets of `keep` of `length` tokens, drawn on the device.

    Returns:
        ids_keep (N, K) int64, ids_restore (N, T) int64, mask (N, T) float32 (1 = removed).
    """
    if not 0 <= keep <= length:
        raise ValueError(f"keep must be in [0, length={length}], got {keep}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch, length, generator=generator, device=device)  # (N, T)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = (ids_restore >= keep).to(torch.float32)
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
    if fill.dim() == 3 and fill.shape[0] == n and fill.shape[1] != 1:
        t = fill.shape[1]
        base = fill.to(kept.dtype)
    else:
        if length is None:
            raise ValueError("length (T) is required with a broadcast fill token")
        t = length
        base = fill.reshape(1, 1, d).to(kept.dtype).expand(n, t, d)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, d)  # (N, K, D)
    return base.scatter(1, index, kept)  # (N, T, D)


def _check_ids(ids_keep, n, length):
    if not isinstance(ids_keep, torch.Tensor) or ids_keep.dtype != torch.int64:
        raise TypeError(f"ids_keep must be an int64 tensor, got {getattr(ids_keep, 'dtype', type(ids_keep))}")
    if ids_keep.dim() != 2 or ids_keep.shape[0] != n:
        raise ValueError(f"ids_keep must have shape (N, K) with N = {n}, got {tuple(ids_keep.shape)}")
    if ids_keep.shape[1] > length:
        raise ValueError(f"ids_keep has K = {ids_keep.shape[1]} > T = {length} ids per sample")


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
    if not use_ext("gather_tokens", impl, x.device):
        return gather_tokens_ref(x, ids_keep)
    return torch.ops.dit_kernels.gather_tokens(x.contiguous(), ids_keep.contiguous())


def scatter_tokens(kept, ids_keep, fill, length=None, impl="auto"):
    """Merge kept rows back into a full sequence.

    Args:
        kept: (N, K, D) float. ids_keep: (N, K) int64, distinct per row.
        fill: (D,) / (1, 1, D) token broadcast to every removed position (MaskDiT mask token;
            pass `length` = T), or (N, T, D) whose rows at removed positions are used (SD-DiT).
    Returns:
        (N, T, D) in kept.dtype. Gradients reach kept and fill (summed over the positions it
        filled for the broadcast form).
    """
    check_float("kept", kept)
    check_float("fill", fill)
    check_rank("kept", kept, (3,), "(N, K, D)")
    check_same_device(kept=kept, ids_keep=ids_keep, fill=fill)
    n, _, d = kept.shape
    per_token = fill.dim() == 3 and fill.shape[0] == n and fill.shape[1] != 1
    if per_token:
        if fill.shape[2] != d:
            raise ValueError(f"fill must be (N, T, D) with D = {d}, got {tuple(fill.shape)}")
        t = fill.shape[1]
    else:
        if fill.numel() != d or fill.dim() not in (1, 3):
            raise ValueError(f"fill must have shape ({d},), (1, 1, {d}) or (N, T, {d}), got {tuple(fill.shape)}")
        if length is None:
            raise ValueError("scatter_tokens: pass length=T with a broadcast fill token")
        t = int(length)
    _check_ids(ids_keep, n, t)
    if not use_ext("scatter_tokens", impl, kept.device):
        return scatter_tokens_ref(kept, ids_keep, fill, t)
    fill_arg = fill.contiguous() if per_token else fill.reshape(d)
    if not per_token:
        fill_arg = fill_arg.unsqueeze(0).unsqueeze(0).expand(n, t, d)  # stride-0 view: no copy
    return torch.ops.dit_kernels.scatter_tokens(kept.contiguous(), ids_keep.contiguous(), fill_arg)
