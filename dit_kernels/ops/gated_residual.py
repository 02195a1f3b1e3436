"""Gated residual (adaLN-Zero): out = x + gate[:, None] * y; and its fusion with the next
modulated LayerNorm: (x_new, h) = (x + gate*y, LN(x + gate*y) * (1 + scale) + shift).

x, y (N, T, D); gate, shift, scale (N, D) any row stride, or shared (D,) / (1, D).
Reductions (d_gate, d_shift, d_scale, LN statistics) in fp32; outputs in x.dtype.
"""
import torch

from .._checks import check_float, check_rank, check_same_device, per_sample
from .._ext import use_ext
from .modulated_layer_norm import modulated_layer_norm_ref

__all__ = [
    "gated_residual",
    "gated_residual_ref",
    "gated_residual_modulated_layer_norm",
    "gated_residual_modulated_layer_norm_ref",
]


def gated_residual_ref(x, y, gate, upcast=True):
    """Reference: x + gate[:, None] * y, computed in fp32 for half inputs when upcast."""
    dtype = x.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        x, y, gate = x.float(), y.float(), gate.float()
    if gate.dim() == 1:
        gate = gate.unsqueeze(0)
    return (x + gate.to(x.dtype)[:, None, :] * y.to(x.dtype)).to(dtype)


def gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale, eps=1e-6, upcast=True):
    """Reference: x_new = x + gate*y (rounded to x.dtype, as the residual stream is stored);
    h = modulated_layer_norm_ref(x_new, shift, scale)."""
    x_new = gated_residual_ref(x, y, gate, upcast=upcast)
    return x_new, modulated_layer_norm_ref(x_new, shift, scale, eps, upcast=upcast)


def _validate_pair(x, y):
    check_float("x", x)
    check_float("y", y)
    check_rank("x", x, (3,), "(N, T, D)")
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
    if x.numel() and x.stride(2) != 1:
        x = x.contiguous()
    if y.numel() and y.stride(2) != 1:
        y = y.contiguous()
    return x, y


def gated_residual(x, y, gate, impl="auto"):
    """out = x + gate[:, None] * y.

    Args:
        x, y: (N, T, D), same float dtype.
        gate: (N, D) any row stride, or (D,) / (1, D); float32 allowed with half x.
        impl: "auto" | "ext" | "ref".
    Returns:
        (N, T, D) in x.dtype.
    """
    check_same_device(x=x, y=y, gate=gate)
    x, y = _validate_pair(x, y)
    gate_nd = per_sample("gate", gate, x.shape[0], x.shape[2])
    if not use_ext("gated_residual", impl, x.device):
        return gated_residual_ref(x, y, gate)
    return torch.ops.dit_kernels.gated_residual(x, y, gate_nd)


def gated_residual_modulated_layer_norm(x, y, gate, shift, scale, eps=1e-6, impl="auto"):
    """(x_new, h): x_new = x + gate*y, h = LN(x_new) * (1 + scale) + shift, in one pass.

    The DiT block's attention -> MLP hand-off (and MLP -> next block / final layer).
    Args as `gated_residual` and `modulated_layer_norm`. Returns two (N, T, D) tensors.
    """
    check_same_device(x=x, y=y, gate=gate, shift=shift, scale=scale)
    x, y = _validate_pair(x, y)
    n, _, d = x.shape
    gate_nd = per_sample("gate", gate, n, d)
    shift_nd = per_sample("shift", shift, n, d)
    scale_nd = per_sample("scale", scale, n, d)
    if not use_ext("gated_residual_modulated_layer_norm", impl, x.device):
        return gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale, eps)
    x_new, h, _, _ = torch.ops.dit_kernels.gated_residual_modulated_layer_norm(
        x, y, gate_nd, shift_nd, scale_nd, float(eps)
    )
    return x_new, h
