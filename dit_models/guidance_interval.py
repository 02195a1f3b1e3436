"""Guidance interval: classifier-free guidance only where the noise level lies in [lo, hi].

Kynkaanniemi et al. 2024 ("Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in
Diffusion Models", arXiv 2404.07724) guide only in a middle range of noise levels; REPA / LightningDiT guide
only at high noise. Outside the interval the sampler needs only the conditional prediction, so it runs the
network once on the B-row conditional batch instead of on the 2B-row [cond; uncond] batch.

The interval is given in the process's OWN noise variable, the one its sampler grid is written in:
    DDPM (DiT)   t, the model's step number (0 = data, T - 1 = noise; real-valued on the DPM-Solver++ / UniPC grids);
    SiT          t of the interpolant (0 = noise, 1 = data in this package; REPA's "t <= 0.7", written with
                 t = 1 at the noise end, is [0.3, 1] here);
    EDM          sigma.
Both ends are inclusive. The decision reads host floats only (the samplers' host grids), so a captured CUDA
graph bakes it in; count_guided gives the numbers for a whole grid without running anything.

Counting: one network call is one NFE whatever its batch (as dit_models.generation.sampler_nfe counts); a
GuidanceCount also says how many of them ran the 2B batch, and batch_nfe counts the work in B-row
evaluations (a guided call = 2).
"""
import math
from typing import NamedTuple

__all__ = ["GuidanceCount", "GuidanceInterval", "check_guidance_interval", "count_guided"]


def check_guidance_interval(interval):
    """None (guide everywhere) or a (lo, hi) pair of floats with lo <= hi, as a tuple; else ValueError.

    For a `--guidance-interval LO HI` flag (argparse nargs=2, type=float): pass its value here.
    """
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"a guidance interval is two numbers LO HI, got {interval!r}")
    lo, hi = (float(v) for v in interval)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"guidance interval needs LO <= HI, got ({lo}, {hi})")
    return lo, hi


class GuidanceCount(NamedTuple):
    """Network calls of one sampling run: guided ones on the 2B batch, conditional-only ones on the B batch."""

    guided: int
    conditional: int

    @property
    def nfe(self):
        """Network calls (one call on the 2B batch counts once)."""
        return self.guided + self.conditional

    @property
    def batch_nfe(self):
        """Work in B-row evaluations: a guided call counts 2."""
        return 2 * self.guided + self.conditional


class GuidanceInterval:
    """Per-step choice between the guided call and the conditional-only call, with a count of each.

    Args:
        cfg_scale: guidance scale; 1 means no guidance anywhere (every call conditional-only).
        interval: None (guide at every noise level) or (lo, hi) in the process's own noise variable.
    """

    def __init__(self, cfg_scale=1.0, interval=None):
        self.cfg_scale = float(cfg_scale)
        self.interval = check_guidance_interval(interval)
        self.count = GuidanceCount(0, 0)

    def guided(self, noise):
        """Whether the call at noise level `noise` (host float) runs the guided 2B batch."""
        if self.cfg_scale == 1.0:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo <= float(noise) <= hi

    def __call__(self, noise, guided_fn, conditional_fn, *args, **kwargs):
        """Run guided_fn(*args, **kwargs) (the 2B call) or conditional_fn(*args, **kwargs) (the B call), and count."""
        if self.guided(noise):
            self.count = self.count._replace(guided=self.count.guided + 1)
            return guided_fn(*args, **kwargs)
        self.count = self.count._replace(conditional=self.count.conditional + 1)
        return conditional_fn(*args, **kwargs)

    def reset(self):
        """Start a new count (call before each sampling run)."""
        self.count = GuidanceCount(0, 0)


def count_guided(noise_levels, cfg_scale=1.0, interval=None):
    """GuidanceCount of a fixed grid: one network call at each of noise_levels (host floats), e.g. a sampler's
    evaluation points (DPM-Solver++ / UniPC: its K evaluation times; EDM Heun: every sigma it evaluates at)."""
    choose = GuidanceInterval(cfg_scale, interval)
    guided = sum(choose.guided(v) for v in noise_levels)
    return GuidanceCount(guided, len(noise_levels) - guided)
