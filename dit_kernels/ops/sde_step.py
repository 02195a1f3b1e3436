"""One Euler-Maruyama step of the SiT SDE with fused classifier-free guidance.

Per element (b, c, ...), with out = [cond; uncond] (2B rows) when guiding:
    o = out[b, c]                                   if no CFG or c >= guided_channels
      = out[B+b, c] + w * (out[b, c] - out[B+b, c]) otherwise
    x_mean = coef_x * x + coef_out * o
    x_next = x_mean + noise_std * z,   z ~ N(0, 1)
Only the first C = x.shape[1] channels of out are read. Math in fp32 (fp64 for fp64 x).
"""
import torch

from .._checks import check_float, check_same_device
from .._ext import use_ext

__all__ = ["sde_euler_maruyama_step", "sde_euler_maruyama_step_ref"]


def sde_euler_maruyama_step_ref(x, out, coef_x, coef_out, noise_std, cfg_scale=1.0, guided_channels=None,
                                noise=None, generator=None):
    """Reference (returns (x_next, x_mean) in x.dtype); draws z with torch.randn when noise is None."""
    b, c = x.shape[:2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    o = out[:, :c].to(acc)
    if out.shape[0] == 2 * b:
        cond, uncond = o[:b], o[b:]
        g = c if guided_channels is None else min(int(guided_channels), c)
        guided = uncond + cfg_scale * (cond - uncond)
        o = torch.cat([guided[:, :g], cond[:, g:]], dim=1)
    x_mean = coef_x * x.to(acc) + coef_out * o
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=acc)
    x_next = x_mean + noise_std * noise.to(acc)
    return x_next.to(x.dtype), x_mean.to(x.dtype)


def sde_euler_maruyama_step(x, out, coef_x, coef_out, noise_std, cfg_scale=1.0, guided_channels=None,
                            noise=None, generator=None, impl="auto"):
    """Fused Euler-Maruyama update (see module docstring).

    Args:
        x: (B, C, ...) state. out: (B or 2B, C_out >= C, ...) network output, [cond; uncond]
            when it has 2B rows. coef_x, coef_out, noise_std, cfg_scale: Python floats.
        guided_channels: how many leading channels CFG applies to (None = all C; 3 = the
            public DiT/SiT quirk). noise: optional explicit z (B, C, ...); else drawn from
            `generator` (in-kernel Philox on CUDA).
    Returns:
        (x_next, x_mean), each like x.
    """
    check_float("x", x)
    check_float("out", out)
    check_same_device(x=x, out=out, noise=noise)
    b, c = x.shape[:2]
    if out.dim() != x.dim() or out.shape[0] not in (b, 2 * b) or out.shape[1] < c or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"out must have shape ({b} or {2 * b}, >= {c}, {tuple(x.shape[2:])}), got {tuple(out.shape)}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if not use_ext("sde_euler_maruyama_step", impl, x.device):
        return sde_euler_maruyama_step_ref(x, out, coef_x, coef_out, noise_std, cfg_scale, guided_channels,
                                           noise, generator)
    g = c if guided_channels is None else int(guided_channels)
    return torch.ops.dit_kernels.sde_euler_maruyama_step(
        x.contiguous(), out.contiguous(), float(coef_x), float(coef_out), float(noise_std), float(cfg_scale), g,
        None if noise is None else noise.contiguous(), generator,
    )
