"""Modulated LayerNorm (adaLN): y = LayerNorm(x, no affine) * (1 + scale) + shift.

x (N, T, D); shift, scale (N, D) per sample (any row stride, e.g. views from
``Linear(c, 6D)(c).chunk(6, dim=1)``) or shared (D,) / (1, D). Statistics and
reductions in fp32; y in x.dtype, or in out_dtype = float16/bfloat16 for a float32 x (the
fp32 residual stream of bf16 autocast feeding a bf16 Linear: no separate cast pass); saved
for backward: fp32 mean and rstd (N, T).
"""
import torch

from .._checks import (check_branch_dtype, check_float, check_mod_dtypes, check_rank, check_same_device, is_branch_dtype,
                       per_sample)
from .._ext import HAS_EXT, use_ext
from ._forward_ad import compiled_forward_ad, forward_ad_active, ln_tangent

__all__ = ["modulated_layer_norm", "modulated_layer_norm_ref"]


def modulated_layer_norm_ref(x, shift, scale, eps=1e-6, upcast=True, out_dtype=None):
    """Readable reference. x (N, T, D); shift, scale (N, D) or (D,). Returns y (N, T, D) in
    out_dtype (default x.dtype), rounded once from the x.dtype (fp32 for half x) computation."""
    dtype = x.dtype if out_dtype is None else out_dtype
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        x, shift, scale = x.float(), shift.float(), scale.float()
    if shift.dim() == 1:
        shift, scale = shift.unsqueeze(0), scale.unsqueeze(0)
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)  # (N, T, D)
    y = h * (1 + scale.to(h.dtype)[:, None, :]) + shift.to(h.dtype)[:, None, :]
    return y.to(dtype)


def _validate(x, shift, scale, out_dtype=None):
    check_float("x", x)
    if out_dtype is not None:
        check_branch_dtype("out_dtype", out_dtype, x.dtype)
    check_rank("x", x, (3,), "(N, T, D)")
    check_same_device(x=x, shift=shift, scale=scale)
    n, _, d = x.shape
    shift = per_sample("shift", shift, n, d)
    scale = per_sample("scale", scale, n, d)
    if x.numel() and x.stride(2) != 1:
        x = x.contiguous()  # the kernel reads rows as contiguous vectors
    return x, shift, scale


def modulated_layer_norm(x, shift, scale, eps=1e-6, out_dtype=None, impl="auto"):
    """y = LN(x) * (1 + scale[:, None]) + shift[:, None].

    Args:
        x: (N, T, D) float32/float16/bfloat16/float64.
        shift, scale: (N, D) (any row stride) or (D,) / (1, D); may be float32 with half x.
        eps: LayerNorm epsilon (DiT uses 1e-6).
        out_dtype: dtype of y: None (x.dtype), or float16/bfloat16 for a float32 x.
        impl: "auto" (compiled kernel when available), "ext" (require it), "ref".
    Returns:
        y: (N, T, D) in out_dtype (default x.dtype).
    """
    x, shift_nd, scale_nd = _validate(x, shift, scale, out_dtype)
    if out_dtype == x.dtype:
        out_dtype = None
    if not use_ext("modulated_layer_norm", impl, x.device) or compiled_forward_ad():
        return modulated_layer_norm_ref(x, shift, scale, eps, out_dtype=out_dtype)
    check_mod_dtypes(x.dtype, shift=shift_nd, scale=scale_nd)
    if forward_ad_active():  # torch.func.jvp: the same kernel, with a tangent rule (ops/_forward_ad.py)
        return _ModulatedLayerNormFn.apply(x, shift_nd, scale_nd, float(eps), out_dtype)[0]
    y, _, _ = torch.ops.dit_kernels.modulated_layer_norm(x, shift_nd, scale_nd, float(eps), out_dtype)
    return y


def _forbid_double_backward(qualname):
    """Give backward op `qualname` an autograd formula that raises: the first backward may run
    with create_graph=True, but differentiating through it again fails loudly instead of
    silently returning no (or wrong) second-order gradients."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{qualname}: double backward (differentiating a gradient of a dit_kernels op) is not "
            "supported; use impl='ref' for higher-order gradients"
        )

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def _check_mod_fake(x, name, t, like=None):
    """Fake-tensor checks of an (N, D) modulation tensor against x (N, T, D)."""
    n, _, d = x.shape
    torch._check(t.dim() == 2 and t.shape[0] == n and t.shape[1] == d, lambda: f"{name} must be (N, D) = ({n}, {d})")
    torch._check(t.device == x.device, lambda: f"{name} is on {t.device} but x is on {x.device}")
    torch._check(
        t.dtype in (x.dtype, torch.float32), lambda: f"{name} must have x's dtype {x.dtype} or float32, got {t.dtype}"
    )
    if like is not None:
        torch._check(t.dtype == like.dtype, lambda: f"modulation tensors must share a dtype, got {t.dtype}, {like.dtype}")


if HAS_EXT:

    @torch.library.register_fake("dit_kernels::modulated_layer_norm")
    def _(x, shift, scale, eps, out_dtype=None):
        torch._check(x.dim() == 3, lambda: "x must be (N, T, D)")
        _check_mod_fake(x, "shift", shift)
        _check_mod_fake(x, "scale", scale, like=shift)
        y_dtype = x.dtype if out_dtype is None else out_dtype
        torch._check(is_branch_dtype(y_dtype, x.dtype), lambda: f"out_dtype {y_dtype} is not allowed with x {x.dtype}")
        n, t, _ = x.shape
        stats = x.new_empty((n, t), dtype=torch.float32)
        y = torch.empty_like(x, dtype=y_dtype, memory_format=torch.contiguous_format)
        return y, stats, torch.empty_like(stats)

    @torch.library.register_fake("dit_kernels::_modulated_layer_norm_backward")
    def _(grad_y, x, scale, mean, rstd):
        torch._check(x.dim() == 3 and grad_y.shape == x.shape, lambda: "grad_y must match x (N, T, D)")
        torch._check(is_branch_dtype(grad_y.dtype, x.dtype), lambda: f"grad_y dtype {grad_y.dtype} with x {x.dtype}")
        _check_mod_fake(x, "scale", scale)
        n, _, d = x.shape
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            scale.new_empty((n, d)),
            scale.new_empty((n, d)),
        )

    def _setup_context(ctx, inputs, output):
        x, shift, scale = inputs[:3]
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.out_dtype = inputs[4] if len(inputs) > 4 else None

    def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
        need_x, need_shift, need_scale = ctx.needs_input_grad[:3]
        if grad_y is None or not (need_x or need_shift or need_scale):
            return None, None, None, None, None
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.dit_kernels._modulated_layer_norm_backward(
            grad_y.contiguous(), x, scale, mean, rstd
        )
        return (dx if need_x else None, dshift if need_shift else None, dscale if need_scale else None, None, None)

    torch.library.register_autograd(
        "dit_kernels::modulated_layer_norm", _backward, setup_context=_setup_context
    )

    class _ModulatedLayerNormFn(torch.autograd.Function):
        """The compiled op with forward-mode AD: primal from the kernel, tangent from ln_tangent,
        backward = the registered backward above."""

        @staticmethod
        def forward(x, shift, scale, eps, out_dtype):
            return torch.ops.dit_kernels.modulated_layer_norm(x, shift, scale, eps, out_dtype)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _setup_context(ctx, inputs, output)
            x, _, scale = inputs[:3]
            _, mean, rstd = output
            ctx.save_for_forward(x, scale, mean, rstd)

        @staticmethod
        def jvp(ctx, dx, dshift, dscale, _deps, _dout_dtype):
            x, scale, mean, rstd = ctx.saved_tensors
            y_dtype = x.dtype if ctx.out_dtype is None else ctx.out_dtype
            return ln_tangent(x, mean, rstd, dx, scale, dshift, dscale, y_dtype), None, None

        backward = staticmethod(_backward)
    _forbid_double_backward("dit_kernels::_modulated_layer_norm_backward")
