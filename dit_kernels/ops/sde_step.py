"""One Euler-Maruyama step of the SiT SDE with fused classifier-free guidance.

Per element (b, c, ...), with out = [cond; uncond] (2B rows) when guiding:
    o = out[b, c]                                   if no CFG or c >= guided_channels
      = out[B+b, c] + w * (out[b, c] - out[B+b, c]) otherwise
    x_mean = coef_x * x + coef_out * o
    x_next = x_mean + noise_std * z,   z ~ N(0, 1)
Only the first C = x.shape[1] channels of out are read (out may carry learned-sigma channels
and may be any channel slice with a contiguous spatial block). Math in fp32 (fp64 for fp64 x);
outputs in x.dtype; out may have another float dtype than x (e.g. bf16 out with fp32 x).

Noise when `noise` is None:
- CPU: z = torch.randn(x.shape, dtype=acc, generator=generator), exactly like the reference,
  so equal generator state gives equal results.
- CUDA: in-kernel Philox4x32-10 keyed by the CUDA generator's (seed, offset); each call
  reserves a fixed offset increment of 4. Element e (flat index in x) uses counter
  (offset // 4, e // 4) and output lane e % 4 (Box-Muller on lanes (0, 1) and (2, 3)), so the
  noise does not depend on the launch configuration and CUDA-graph replays draw fresh noise
  (graph-safe philox state). The stream differs from torch.randn; fp64 x gets fp32 normals.

`sde_euler_maruyama_step_table` takes the scalars from a device table `coeffs` (steps, 3)
= [coef_x, coef_out, noise_std] indexed by a one-element int64 device tensor `step` read inside
the kernel, so a whole sampling loop (including `step += 1`) can be captured in one CUDA graph.
A step outside [0, steps) raises on the CPU and yields NaN outputs on CUDA (no host sync).

Inference only: the ops have no derivative; backward through them raises.
"""
import torch

from .._checks import check_float, check_same_device
from .._ext import HAS_EXT, use_ext

__all__ = [
    "sde_euler_maruyama_step",
    "sde_euler_maruyama_step_ref",
    "sde_euler_maruyama_step_table",
    "sde_euler_maruyama_step_table_ref",
]


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sde_euler_maruyama_step_ref(x, out, coef_x, coef_out, noise_std, cfg_scale=1.0, guided_channels=None,
                                noise=None, generator=None):
    """Reference (returns (x_next, x_mean) in x.dtype); draws z with torch.randn when noise is None.

    coef_x, coef_out, noise_std may be Python floats or 0-d tensors of the accumulation dtype.
    """
    b, c = x.shape[:2]
    acc = _acc_dtype(x)
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


def sde_euler_maruyama_step_table_ref(x, out, coeffs, step, cfg_scale=1.0, guided_channels=None, noise=None,
                                      generator=None):
    """Reference of the table variant: coeffs[step] = (coef_x, coef_out, noise_std), read without a host sync."""
    row = coeffs.index_select(0, step.reshape(1)).reshape(3).to(_acc_dtype(x))  # (3,)
    return sde_euler_maruyama_step_ref(x, out, row[0], row[1], row[2], cfg_scale, guided_channels, noise, generator)


def _validate(x, out, guided_channels, noise, generator):
    """Check inputs; return the guided channel count for the op (C when None)."""
    check_float("x", x)
    check_float("out", out)
    check_same_device(x=x, out=out, noise=noise)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, C, ...), got {tuple(x.shape)}")
    b, c = x.shape[:2]
    if out.dim() != x.dim() or out.shape[0] not in (b, 2 * b) or out.shape[1] < c or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"out must have shape ({b} or {2 * b}, >= {c}, {tuple(x.shape[2:])}), got {tuple(out.shape)}")
    if noise is not None:
        check_float("noise", noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if guided_channels is not None and int(guided_channels) < 0:
        raise ValueError(f"guided_channels must be >= 0 or None, got {guided_channels}")
    if generator is not None and noise is None and torch.device(generator.device).type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}")
    return c if guided_channels is None else int(guided_channels)


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
    g = _validate(x, out, guided_channels, noise, generator)
    if not use_ext("sde_euler_maruyama_step", impl, x.device):
        return sde_euler_maruyama_step_ref(x, out, coef_x, coef_out, noise_std, cfg_scale, guided_channels,
                                           noise, generator)
    return torch.ops.dit_kernels.sde_euler_maruyama_step(
        x, out, float(coef_x), float(coef_out), float(noise_std), float(cfg_scale), g, noise, generator
    )


def sde_euler_maruyama_step_table(x, out, coeffs, step, cfg_scale=1.0, guided_channels=None, noise=None,
                                  generator=None, impl="auto"):
    """Euler-Maruyama update with per-step scalars read on the device (CUDA-graph friendly).

    Args:
        x, out, cfg_scale, guided_channels, noise, generator: as `sde_euler_maruyama_step`.
        coeffs: (steps, 3) float32/float64 table, row k = [coef_x, coef_out, noise_std] of step k.
        step: one-element int64 tensor on x's device holding the current step; the kernel reads
            it, the caller advances it (e.g. ``step += 1`` inside the captured loop).
    Returns:
        (x_next, x_mean), each like x.
    """
    g = _validate(x, out, guided_channels, noise, generator)
    check_same_device(x=x, coeffs=coeffs, step=step)
    if coeffs.dim() != 2 or coeffs.shape[1] != 3 or coeffs.shape[0] < 1:
        raise ValueError(f"coeffs must have shape (steps, 3), got {tuple(coeffs.shape)}")
    if coeffs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coeffs must be float32 or float64, got {coeffs.dtype}")
    if step.numel() != 1 or step.dtype != torch.int64:
        raise TypeError(f"step must be a one-element int64 tensor, got {step.dtype} of shape {tuple(step.shape)}")
    if not use_ext("sde_euler_maruyama_step_table", impl, x.device):
        return sde_euler_maruyama_step_table_ref(x, out, coeffs, step, cfg_scale, guided_channels, noise, generator)
    return torch.ops.dit_kernels.sde_euler_maruyama_step_table(
        x, out, coeffs, step, float(cfg_scale), g, noise, generator
    )


if HAS_EXT:

    def _fake_outputs(x, out):
        torch._check(x.dim() >= 2, lambda: "x must be (B, C, ...)")
        torch._check(out.dim() == x.dim(), lambda: "out must have the rank of x")
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

    @torch.library.register_fake("dit_kernels::sde_euler_maruyama_step")
    def _(x, out, coef_x, coef_out, noise_std, cfg_scale, guided_channels, noise, generator):
        return _fake_outputs(x, out)

    @torch.library.register_fake("dit_kernels::sde_euler_maruyama_step_table")
    def _(x, out, coeffs, step, cfg_scale, guided_channels, noise, generator):
        return _fake_outputs(x, out)

    def _no_backward(ctx, *grads):
        raise RuntimeError(
            "dit_kernels.sde_euler_maruyama_step is inference-only and has no derivative; "
            "compose the update from differentiable torch ops (sde_euler_maruyama_step_ref) to backpropagate"
        )

    for _op in ("sde_euler_maruyama_step", "sde_euler_maruyama_step_table"):
        torch.library.register_autograd(f"dit_kernels::{_op}", _no_backward)
