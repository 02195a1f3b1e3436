"""Gated residual (adaLN-Zero): out = x + gate[:, None] * y; and its fusion with the next
modulated LayerNorm: (x_new, h) = (x + gate*y, LN(x + gate*y) * (1 + scale) + shift).

x, y (N, T, D); gate, shift, scale (N, D) any row stride, or shared (D,) / (1, D).
Reductions (d_gate, d_shift, d_scale, LN statistics) in fp32; x_new in x.dtype, h in y.dtype.

Branch dtype: y (the attention / MLP output) may be float16/bfloat16 while the residual stream x
is float32 (bf16 autocast training keeps an fp32 residual and bf16 Linears); h then comes out in
y's dtype, ready for the next bf16 Linear. This saves the two cast passes (and the fp32 copy of y
kept for backward) that a same-dtype kernel would need.
"""
import torch

from .._checks import (check_branch_dtype, check_float, check_mod_dtypes, check_rank, check_same_device, is_branch_dtype,
                       per_sample)
from .._ext import HAS_EXT, use_ext
from ._forward_ad import compiled_forward_ad, forward_ad_active, ln_tangent
from .modulated_layer_norm import _check_mod_fake, _forbid_double_backward, modulated_layer_norm_ref

__all__ = [
    "gated_residual",
    "gated_residual_ref",
    "gated_residual_modulated_layer_norm",
    "gated_residual_modulated_layer_norm_ref",
]


def gated_residual_ref(x, y, gate, upcast=True):
    """Reference: x + gate[:, None] * y in x.dtype, computed in fp32 for half inputs when upcast."""
    dtype = x.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        x, y, gate = x.float(), y.float(), gate.float()
    if gate.dim() == 1:
        gate = gate.unsqueeze(0)
    return (x + gate.to(x.dtype)[:, None, :] * y.to(x.dtype)).to(dtype)


def gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale, eps=1e-6, upcast=True):
    """Reference: x_new = x + gate*y (rounded to x.dtype, as the residual stream is stored);
    h = modulated_layer_norm_ref(x_new, shift, scale) in y.dtype."""
    x_new = gated_residual_ref(x, y, gate, upcast=upcast)
    return x_new, modulated_layer_norm_ref(x_new, shift, scale, eps, upcast=upcast, out_dtype=y.dtype)


def _validate_pair(x, y):
    check_float("x", x)
    check_float("y", y)
    check_rank("x", x, (3,), "(N, T, D)")
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    check_branch_dtype("y", y.dtype, x.dtype)
    if x.numel() and x.stride(2) != 1:
        x = x.contiguous()
    if y.numel() and y.stride(2) != 1:
        y = y.contiguous()
    return x, y


def gated_residual(x, y, gate, impl="auto"):
    """out = x + gate[:, None] * y.

    Args:
        x, y: (N, T, D); y in x.dtype, or float16/bfloat16 with a float32 x.
        gate: (N, D) any row stride, or (D,) / (1, D); float32 allowed with half x.
        impl: "auto" | "ext" | "ref".
    Returns:
        (N, T, D) in x.dtype.
    """
    check_same_device(x=x, y=y, gate=gate)
    x, y = _validate_pair(x, y)
    gate_nd = per_sample("gate", gate, x.shape[0], x.shape[2])
    if not use_ext("gated_residual", impl, x.device) or compiled_forward_ad():
        return gated_residual_ref(x, y, gate)
    check_mod_dtypes(x.dtype, gate=gate_nd)
    if forward_ad_active():  # torch.func.jvp (ops/_forward_ad.py)
        return _GatedResidualFn.apply(x, y, gate_nd)
    return torch.ops.dit_kernels.gated_residual(x, y, gate_nd)


def gated_residual_modulated_layer_norm(x, y, gate, shift, scale, eps=1e-6, impl="auto"):
    """(x_new, h): x_new = x + gate*y, h = LN(x_new) * (1 + scale) + shift, in one pass.

    The DiT block's attention -> MLP hand-off (and MLP -> next block / final layer).
    Args as `gated_residual` and `modulated_layer_norm`. Returns two (N, T, D) tensors:
    x_new in x.dtype and h in y.dtype.
    """
    check_same_device(x=x, y=y, gate=gate, shift=shift, scale=scale)
    x, y = _validate_pair(x, y)
    n, _, d = x.shape
    gate_nd = per_sample("gate", gate, n, d)
    shift_nd = per_sample("shift", shift, n, d)
    scale_nd = per_sample("scale", scale, n, d)
    if not use_ext("gated_residual_modulated_layer_norm", impl, x.device) or compiled_forward_ad():
        return gated_residual_modulated_layer_norm_ref(x, y, gate, shift, scale, eps)
    check_mod_dtypes(x.dtype, gate=gate_nd, shift=shift_nd, scale=scale_nd)
    if forward_ad_active():  # torch.func.jvp (ops/_forward_ad.py)
        return _GatedResidualModulatedLayerNormFn.apply(x, y, gate_nd, shift_nd, scale_nd, float(eps))[:2]
    x_new, h, _, _ = torch.ops.dit_kernels.gated_residual_modulated_layer_norm(
        x, y, gate_nd, shift_nd, scale_nd, float(eps)
    )
    return x_new, h


def _residual_tangent(x_dtype, y, gate, dx, dy, dgate):
    """Tangent of x + gate[:, None] * y, in fp32 (fp64 for an fp64 x); any tangent may be None."""
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32
    d = y.new_zeros(y.shape, dtype=acc) if dx is None else dx.to(acc)  # (N, T, D)
    if dgate is not None:
        d = d + dgate.to(acc)[:, None] * y.to(acc)
    if dy is not None:
        d = d + gate.to(acc)[:, None] * dy.to(acc)
    return d


def _grad(g):
    """Upstream gradient as the kernels read it (unit inner stride; expanded grads materialised)."""
    return None if g is None else g.contiguous()


if HAS_EXT:

    def _check_pair_fake(x, y, y_name="y", branch=False):
        """y like x; with branch=True y may also be in a branch dtype of x (see module docstring)."""
        torch._check(x.dim() == 3, lambda: "x must be (N, T, D)")
        torch._check(y.shape == x.shape, lambda: f"{y_name} must have the shape of x")
        ok = is_branch_dtype(y.dtype, x.dtype) if branch else y.dtype == x.dtype
        torch._check(ok, lambda: f"{y_name} dtype {y.dtype} is not allowed with x {x.dtype}")
        torch._check(y.device == x.device, lambda: f"{y_name} is on {y.device} but x is on {x.device}")

    def _rows_like(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    # ---- gated_residual ------------------------------------------------------------------

    @torch.library.register_fake("dit_kernels::gated_residual")
    def _(x, y, gate):
        _check_pair_fake(x, y, branch=True)
        _check_mod_fake(x, "gate", gate)
        return _rows_like(x)

    @torch.library.register_fake("dit_kernels::_gated_residual_backward")
    def _(grad_out, y, gate):
        _check_pair_fake(grad_out, y, branch=True)
        _check_mod_fake(grad_out, "gate", gate)
        return _rows_like(y), gate.new_empty((y.shape[0], y.shape[2]))

    def _gr_setup_context(ctx, inputs, output):
        _, y, gate = inputs
        ctx.save_for_backward(y, gate)

    def _gr_backward(ctx, grad_out):
        need_x, need_y, need_gate = ctx.needs_input_grad
        if grad_out is None:
            return None, None, None
        dy = dgate = None
        if need_y or need_gate:
            y, gate = ctx.saved_tensors
            dy, dgate = torch.ops.dit_kernels._gated_residual_backward(_grad(grad_out), y, gate)
        return (grad_out if need_x else None, dy if need_y else None, dgate if need_gate else None)

    torch.library.register_autograd("dit_kernels::gated_residual", _gr_backward, setup_context=_gr_setup_context)
    _forbid_double_backward("dit_kernels::_gated_residual_backward")

    class _GatedResidualFn(torch.autograd.Function):
        """The compiled op with forward-mode AD (ops/_forward_ad.py)."""

        @staticmethod
        def forward(x, y, gate):
            return torch.ops.dit_kernels.gated_residual(x, y, gate)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _gr_setup_context(ctx, inputs, output)
            x, y, gate = inputs
            ctx.save_for_forward(y, gate)
            ctx.x_dtype = x.dtype

        @staticmethod
        def jvp(ctx, dx, dy, dgate):
            y, gate = ctx.saved_tensors
            return _residual_tangent(ctx.x_dtype, y, gate, dx, dy, dgate).to(ctx.x_dtype)

        backward = staticmethod(_gr_backward)

    # ---- gated_residual_modulated_layer_norm -------------------------------------------------

    @torch.library.register_fake("dit_kernels::gated_residual_modulated_layer_norm")
    def _(x, y, gate, shift, scale, eps):
        _check_pair_fake(x, y, branch=True)
        _check_mod_fake(x, "gate", gate)
        _check_mod_fake(x, "shift", shift, like=gate)
        _check_mod_fake(x, "scale", scale, like=gate)
        n, t, _ = x.shape
        stats = x.new_empty((n, t), dtype=torch.float32)
        return _rows_like(x), _rows_like(y), stats, torch.empty_like(stats)

    @torch.library.register_fake("dit_kernels::_gated_residual_modulated_layer_norm_backward")
    def _(grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd):
        _check_pair_fake(x_new, y, branch=True)
        if grad_x_new is not None:
            _check_pair_fake(x_new, grad_x_new, "grad_x_new")
        if grad_h is not None:
            _check_pair_fake(y, grad_h, "grad_h")
        _check_mod_fake(x_new, "gate", gate)
        _check_mod_fake(x_new, "scale", scale, like=gate)
        nd = (x_new.shape[0], x_new.shape[2])
        return _rows_like(x_new), _rows_like(y), gate.new_empty(nd), gate.new_empty(nd), gate.new_empty(nd)

    def _grmln_setup_context(ctx, inputs, output):
        _, y, gate, _, scale, _ = inputs
        x_new, _, mean, rstd = output
        ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # an unused h gives grad_h None, not zeros (see _grmln_backward)

    def _grmln_backward(ctx, grad_x_new, grad_h, _grad_mean, _grad_rstd):
        need = ctx.needs_input_grad  # (x, y, gate, shift, scale, eps)
        if (grad_x_new is None and grad_h is None) or not any(need[:5]):
            return None, None, None, None, None, None
        x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
        if grad_h is None:  # h unused: only the residual path (no LN backward, whose 0 * NaN would leak NaN)
            dy = dgate = None
            if need[1] or need[2]:
                dy, dgate = torch.ops.dit_kernels._gated_residual_backward(_grad(grad_x_new), y, gate)
            nd = (y.shape[0], y.shape[2])  # dshift = dscale = 0 (N, D), as the kernel gives them
            return (grad_x_new if need[0] else None, dy if need[1] else None, dgate if need[2] else None,
                    gate.new_zeros(nd) if need[3] else None, gate.new_zeros(nd) if need[4] else None, None)
        grads = torch.ops.dit_kernels._gated_residual_modulated_layer_norm_backward(
            _grad(grad_x_new), _grad(grad_h), x_new, y, gate, scale, mean, rstd
        )  # dx, dy, dgate, dshift, dscale
        return tuple(g if n else None for g, n in zip(grads, need[:5])) + (None,)

    torch.library.register_autograd(
        "dit_kernels::gated_residual_modulated_layer_norm", _grmln_backward, setup_context=_grmln_setup_context
    )
    _forbid_double_backward("dit_kernels::_gated_residual_modulated_layer_norm_backward")

    class _GatedResidualModulatedLayerNormFn(torch.autograd.Function):
        """The compiled fused op with forward-mode AD (ops/_forward_ad.py)."""

        @staticmethod
        def forward(x, y, gate, shift, scale, eps):
            return torch.ops.dit_kernels.gated_residual_modulated_layer_norm(x, y, gate, shift, scale, eps)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _grmln_setup_context(ctx, inputs, output)
            x_new, _, mean, rstd = output
            _, y, gate, _, scale, _ = inputs
            ctx.save_for_forward(x_new, y, gate, scale, mean, rstd)

        @staticmethod
        def jvp(ctx, dx, dy, dgate, dshift, dscale, _deps):
            x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
            dx_new = _residual_tangent(x_new.dtype, y, gate, dx, dy, dgate)  # (N, T, D) fp32
            dh = ln_tangent(x_new, mean, rstd, dx_new, scale, dshift, dscale, y.dtype)
            return dx_new.to(x_new.dtype), dh, None, None

        backward = staticmethod(_grmln_backward)
