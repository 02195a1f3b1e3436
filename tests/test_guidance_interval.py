"""Guidance interval (dit_models/guidance_interval.py): the per-step choice, its count, and a sampler using it."""
import math

import pytest
import torch

from dit_models.diffusion import create_diffusion
from dit_models.guidance_interval import GuidanceCount, GuidanceInterval, check_guidance_interval, count_guided
from dit_models.transport.analytic import DiffusionGaussianTarget


def test_check_guidance_interval():
    assert check_guidance_interval(None) is None
    assert check_guidance_interval([0.3, 1]) == (0.3, 1.0)
    assert check_guidance_interval((0.5, 0.5)) == (0.5, 0.5)
    for bad in ((0.7, 0.3), (0.1,), (0.1, 0.2, 0.3), (math.nan, 1.0)):
        with pytest.raises(ValueError, match="guidance interval"):
            check_guidance_interval(bad)


def test_choice_is_inclusive_and_cfg_one_never_guides():
    gi = GuidanceInterval(2.0, (0.3, 0.7))
    assert [gi.guided(v) for v in (0.0, 0.3, 0.5, 0.7, 0.71)] == [False, True, True, True, False]
    assert all(GuidanceInterval(2.0).guided(v) for v in (0.0, 1e9))  # no interval: guide everywhere
    assert not any(GuidanceInterval(1.0, (0.0, 1.0)).guided(v) for v in (0.0, 0.5))
    assert count_guided([0.1, 0.5, 0.9], 1.0) == GuidanceCount(0, 3)


def test_call_runs_one_branch_and_counts():
    gi = GuidanceInterval(3.0, (10.0, 20.0))
    out = [gi(v, lambda a, k=0: ("guided", a + k), lambda a, k=0: ("cond", a - k), 5, k=1) for v in (5.0, 10.0, 25.0)]
    assert out == [("cond", 4), ("guided", 6), ("cond", 4)]
    assert gi.count == GuidanceCount(1, 2) and gi.count.nfe == 3 and gi.count.batch_nfe == 4
    gi.reset()
    assert gi.count == GuidanceCount(0, 0)


def test_count_guided_on_a_sampler_grid():
    """REPA's high-noise-only guidance on SiT's UniPC / DPM-Solver++ grid (t = 0 noise here): [0.3, 1] in SiT's t."""
    from dit_models.transport import Sampler, create_transport

    fn = Sampler(create_transport("Linear", "velocity")).sample_unipc(20)
    c = count_guided(fn.times, 4.0, (0.3, 1.0))
    assert len(fn.times) == 20 and c.nfe == 20
    assert c.guided == sum(t >= 0.3 for t in fn.times) == 14 and c.batch_nfe == 34  # 40 with guidance everywhere


def test_ddpm_sampler_with_guidance_interval():
    """One call per step: the 2B batch inside the interval (in DDPM's t), the B batch outside; the samples equal
    those of a model that guides exactly inside the interval, and the two limits (everywhere, nowhere)."""
    d = create_diffusion("")
    mu = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # 3 classes + null
    target = DiffusionGaussianTarget(d, mu, 0.3)
    z = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, s = torch.arange(6) % 3, 2.5
    ts = d.solver_timesteps(10, "time_uniform")

    def forward_guided(x, t, y):  # DiT's forward_guided: one network call on [x; x] with [y; null]
        out = target(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 3)]))
        cond, uncond = out[:, :4].chunk(2)
        return torch.cat([uncond + s * (cond - uncond), out[: len(x), 4:]], 1)

    def run(interval):
        gi, steps = GuidanceInterval(s, interval), iter(ts)
        target.calls, target.batch_sizes = 0, []

        def net(x, t, y):  # the sampler's host grid value of this step decides (no device read)
            return gi(next(steps), forward_guided, target, x, t, y)

        x = d.unipc_sample_loop(net, z.shape, noise=z, clip_denoised=False, timesteps=ts, model_kwargs=dict(y=y))
        return x, gi.count, list(target.batch_sizes)

    x, count, sizes = run((0.0, 600.0))
    assert sizes == [12 if t <= 600 else 6 for t in ts] and count == count_guided(ts, s, (0.0, 600.0))
    assert 0 < count.guided < 10 and count.nfe == 10

    def reference(x, t, y):  # the same choice, made per row from the model time
        g = forward_guided(x, t, y)[:, :4]
        return torch.where((t <= 600).reshape(-1, 1, 1, 1), g, target(x, t, y)[:, :4])

    ref = d.unipc_sample_loop(reference, z.shape, noise=z, clip_denoised=False, timesteps=ts, model_kwargs=dict(y=y))
    torch.testing.assert_close(x, ref, atol=1e-12, rtol=1e-12)
    everywhere, c_all, _ = run(None)
    nowhere, c_none, _ = run((2000.0, 3000.0))
    assert c_all == GuidanceCount(10, 0) and c_none == GuidanceCount(0, 10)
    plain = d.unipc_sample_loop(target, z.shape, noise=z, clip_denoised=False, timesteps=ts, model_kwargs=dict(y=y))
    torch.testing.assert_close(nowhere, plain, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(everywhere, x) and not torch.allclose(nowhere, x)
