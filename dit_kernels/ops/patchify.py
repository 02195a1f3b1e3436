"""Patchify / unpatchify: exact permutations between images and token sequences.

patchify (conv layout, matches Conv2d(C, D, p, stride=p).weight.view(D, C*p*p)):
    P[n, i*w + j, c*p*p + a*p + b] = x[n, c, i*p + a, j*p + b]
unpatchify (output layout, as the DiT final linear emits features (a, b, c)):
    out[n, c, i*p + a, j*p + b] = y[n, i*w + j, (a*p + b)*C_all + c],  c < channels
"""
import torch

from .._checks import check_float, check_rank
from .._ext import HAS_EXT, use_ext
from ._forward_ad import compiled_forward_ad, forward_ad_active
from .modulated_layer_norm import _forbid_double_backward

__all__ = ["patchify", "patchify_ref", "unpatchify", "unpatchify_ref"]


def patchify_ref(x, patch_size):
    """(N, C, H, W) -> (N, T, C*p*p), T row-major over the (H/p, W/p) grid."""
    n, c, hh, ww = x.shape
    p = patch_size
    h, w = hh // p, ww // p
    x = x.reshape(n, c, h, p, w, p)  # (N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
    return x.reshape(n, h * w, c * p * p)  # (N, T, C*p*p)


def unpatchify_ref(y, patch_size, height, width, channels=None):
    """(N, T, p*p*C_all) -> (N, C, H, W); keeps the first `channels` of C_all."""
    n, t, f = y.shape
    p = patch_size
    c_all = f // (p * p)
    h, w = height // p, width // p
    y = y.reshape(n, h, w, p, p, c_all)  # (N, h, w, p, p, C_all)
    y = y.permute(0, 5, 1, 3, 2, 4)  # (N, C_all, h, p, w, p)
    out = y.reshape(n, c_all, h * p, w * p)  # (N, C_all, H, W)
    if channels is not None and channels != c_all:
        out = out[:, :channels]
    return out


def _check_patch(patch_size):
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")


def patchify(x, patch_size, impl="auto"):
    """Split images into patch tokens in Conv2d-weight feature order.

    Args:
        x: (N, C, H, W) float; H and W divisible by patch_size.
        patch_size: p.
    Returns:
        (N, T, C*p*p) with T = (H/p)*(W/p), row-major, in x.dtype (a new tensor).
    """
    check_float("x", x)
    check_rank("x", x, (4,), "(N, C, H, W)")
    _check_patch(patch_size)
    _, _, hh, ww = x.shape
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide H and W, got x of shape {tuple(x.shape)}")
    if not use_ext("patchify", impl, x.device) or compiled_forward_ad():
        return patchify_ref(x, patch_size).contiguous()
    if forward_ad_active():  # torch.func.jvp (ops/_forward_ad.py)
        return _PatchifyFn.apply(x.contiguous(), patch_size)
    return torch.ops.dit_kernels.patchify(x.contiguous(), patch_size)


def unpatchify(y, patch_size, height, width, channels=None, impl="auto"):
    """Reassemble (N, T, p*p*C_all) tokens with (a, b, c) feature order into images.

    Args:
        y: (N, T, p*p*C_all) float, T = (height/p)*(width/p).
        patch_size: p. height, width: output image size H, W.
        channels: keep the first C <= C_all channels (e.g. drop the learned-sigma half);
            None keeps all.
    Returns:
        (N, C, H, W) in y.dtype (a new contiguous tensor).
    """
    check_float("y", y)
    check_rank("y", y, (3,), "(N, T, p*p*C)")
    _check_patch(patch_size)
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"patch_size {p} must divide height {height} and width {width}")
    n, t, f = y.shape
    if t != (height // p) * (width // p):
        raise ValueError(f"y has {t} tokens but a {height}x{width} image with patch {p} has {(height // p) * (width // p)}")
    if f % (p * p):
        raise ValueError(f"y's last dim {f} must be a multiple of p*p = {p * p}")
    c_all = f // (p * p)
    c = c_all if channels is None else int(channels)
    if not 1 <= c <= c_all:
        raise ValueError(f"channels must be in [1, {c_all}], got {channels}")
    if not use_ext("unpatchify", impl, y.device) or compiled_forward_ad():
        return unpatchify_ref(y, p, height, width, c).contiguous()
    if forward_ad_active():
        return _UnpatchifyFn.apply(y.contiguous(), p, height, width, c)
    return torch.ops.dit_kernels.unpatchify(y.contiguous(), p, height, width, c)


if HAS_EXT:

    @torch.library.register_fake("dit_kernels::patchify")
    def _(x, patch_size):
        p = patch_size
        torch._check(x.dim() == 4, lambda: "x must be (N, C, H, W)")
        torch._check(p >= 1, lambda: f"patch_size must be >= 1, got {p}")
        n, c, hh, ww = x.shape
        torch._check(hh % p == 0 and ww % p == 0, lambda: f"patch_size {p} must divide H and W")
        return x.new_empty((n, (hh // p) * (ww // p), c * p * p))

    @torch.library.register_fake("dit_kernels::_patchify_backward")
    def _(grad, patch_size, height, width):
        p = patch_size
        torch._check(grad.dim() == 3, lambda: "grad must be (N, T, C*p*p)")
        torch._check(p >= 1 and height % p == 0 and width % p == 0, lambda: "patch_size must divide height and width")
        torch._check(grad.shape[1] == (height // p) * (width // p), lambda: "grad has the wrong number of tokens")
        torch._check(grad.shape[2] % (p * p) == 0, lambda: "grad's last dim must be a multiple of p*p")
        return grad.new_empty((grad.shape[0], grad.shape[2] // (p * p), height, width))

    @torch.library.register_fake("dit_kernels::unpatchify")
    def _(y, patch_size, height, width, channels):
        p = patch_size
        torch._check(y.dim() == 3, lambda: "y must be (N, T, p*p*C)")
        torch._check(p >= 1 and height % p == 0 and width % p == 0, lambda: "patch_size must divide height and width")
        torch._check(y.shape[1] == (height // p) * (width // p), lambda: "y has the wrong number of tokens")
        torch._check(y.shape[2] % (p * p) == 0, lambda: "y's last dim must be a multiple of p*p")
        torch._check(1 <= channels and channels <= y.shape[2] // (p * p), lambda: "channels out of range")
        return y.new_empty((y.shape[0], channels, height, width))

    @torch.library.register_fake("dit_kernels::_unpatchify_backward")
    def _(grad, patch_size, all_channels):
        p = patch_size
        torch._check(grad.dim() == 4, lambda: "grad must be (N, C, H, W)")
        n, c, hh, ww = grad.shape
        torch._check(p >= 1 and hh % p == 0 and ww % p == 0, lambda: "patch_size must divide H and W")
        torch._check(all_channels >= c, lambda: "all_channels must be >= grad's channels")
        return grad.new_empty((n, (hh // p) * (ww // p), p * p * all_channels))

    def _patchify_setup_context(ctx, inputs, output):
        x, patch_size = inputs
        ctx.patch_size = patch_size
        ctx.hw = (x.shape[2], x.shape[3])

    def _patchify_backward(ctx, grad):
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None
        dx = torch.ops.dit_kernels._patchify_backward(grad.contiguous(), ctx.patch_size, *ctx.hw)
        return dx, None

    def _unpatchify_setup_context(ctx, inputs, output):
        y, patch_size, _, _, _ = inputs
        ctx.patch_size = patch_size
        ctx.all_channels = y.shape[2] // (patch_size * patch_size)

    def _unpatchify_backward(ctx, grad):
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dy = torch.ops.dit_kernels._unpatchify_backward(grad.contiguous(), ctx.patch_size, ctx.all_channels)
        return dy, None, None, None, None

    torch.library.register_autograd("dit_kernels::patchify", _patchify_backward, setup_context=_patchify_setup_context)
    torch.library.register_autograd(
        "dit_kernels::unpatchify", _unpatchify_backward, setup_context=_unpatchify_setup_context
    )
    _forbid_double_backward("dit_kernels::_patchify_backward")
    _forbid_double_backward("dit_kernels::_unpatchify_backward")

    # Forward-mode AD (ops/_forward_ad.py): both ops are linear, so a tangent goes through the same kernel.

    class _PatchifyFn(torch.autograd.Function):
        @staticmethod
        def forward(x, patch_size):
            return torch.ops.dit_kernels.patchify(x, patch_size)

        setup_context = staticmethod(_patchify_setup_context)

        @staticmethod
        def jvp(ctx, dx, _dp):
            return torch.ops.dit_kernels.patchify(dx.contiguous(), ctx.patch_size)

        backward = staticmethod(_patchify_backward)

    class _UnpatchifyFn(torch.autograd.Function):
        @staticmethod
        def forward(y, patch_size, height, width, channels):
            return torch.ops.dit_kernels.unpatchify(y, patch_size, height, width, channels)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _unpatchify_setup_context(ctx, inputs, output)
            ctx.args = inputs[1:]

        @staticmethod
        def jvp(ctx, dy, *_):
            return torch.ops.dit_kernels.unpatchify(dy.contiguous(), *ctx.args)

        backward = staticmethod(_unpatchify_backward)
