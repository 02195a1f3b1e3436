"""Forward-mode AD (JVP) for the compiled ops.

The ops are torch.library custom ops whose autograd comes from ``register_autograd``, which gives
reverse mode only. Under ``torch.func.jvp`` (or ``torch.autograd.forward_ad.dual_level``) the public
wrappers therefore route the compiled path through a ``torch.autograd.Function`` per op (below, and
one per op module): ``forward`` calls the same compiled kernel for the primal (identical values to
the plain call), ``jvp`` computes the tangent from the reference formulas in PyTorch (fp32 for half
inputs), and ``backward`` is the op's registered backward, so reverse mode through a JVP's primal
output (the MeanFlow loss) stays on the kernels. Outside forward AD nothing changes.

Under torch.compile, dynamo traces an autograd.Function's forward and backward but not its jvp: the
tangent would silently come out as zeros. While compiling a forward-AD region the wrappers therefore
take the pure-PyTorch reference (compiled_forward_ad), which dynamo differentiates and Inductor fuses.
"""
import torch
from torch.autograd import forward_ad

__all__ = ["forward_ad_active", "compiled_forward_ad", "ln_tangent"]


def forward_ad_active():
    """True inside a forward-AD level (torch.func.jvp / jacfwd, or forward_ad.dual_level).

    A plain Python global that torch.func.jvp sets through forward_ad.dual_level: cheap, and a
    guarded constant under torch.compile (no graph break)."""
    return forward_ad._current_level >= 0


def _mod(t, dtype):
    """(N, D) or shared modulation tangent as (N, 1, D) in dtype; None stays None."""
    return None if t is None else t.to(dtype).unsqueeze(1)


def compiled_forward_ad():
    """True while torch.compile traces a forward-AD region: use the reference (module docstring)."""
    return forward_ad_active() and torch.compiler.is_compiling()


def ln_tangent(x, mean, rstd, dx, scale, dshift, dscale, out_dtype):
    """Tangent of y = LN(x) * (1 + scale) + shift from the saved fp32 statistics.

    h = (x - mean) * rstd,  dh = rstd * (dx - mean(dx) - h * mean(h * dx)),
    dy = dh * (1 + scale) + h * dscale + dshift.   x, dx (N, T, D); scale, dscale, dshift (N, D).
    Computed in fp32 (fp64 for fp64 x); dx / dshift / dscale may be None (no tangent).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = (x.to(acc) - mean.to(acc)[..., None]) * rstd.to(acc)[..., None]  # (N, T, D)
    dy = torch.zeros_like(h)
    if dx is not None:
        dx = dx.to(acc)
        dh = rstd.to(acc)[..., None] * (dx - dx.mean(-1, keepdim=True) - h * (h * dx).mean(-1, keepdim=True))
        dy = dy + dh * (1 + _mod(scale, acc))
    if dscale is not None:
        dy = dy + h * _mod(dscale, acc)
    if dshift is not None:
        dy = dy + _mod(dshift, acc)
    return dy.to(out_dtype)
