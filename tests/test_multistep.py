"""DPM-Solver++ multistep samplers (dit_models/multistep.py) for DiT's DDPM, SiT transports and EDM.

Each family is checked against an analytic Gaussian target (dit_models/transport/analytic.py), whose
probability-flow ODE has an exact solution: the global error must fall with the solver's order as the
number of steps doubles (errors at 20 and 40 steps, DDPM 40 and 80, in the asymptotic range; orders 1/2/3 must
gain at least 1.7x / 3x / 6x). Order 1 must equal the existing first-order sampler on the same grid (DDIM,
Euler on SiT's Linear path, EDM's Euler). Guidance: one network evaluation per step, on the 2B batch.
Host syncs: every loop runs on the "meta" device, where any read of a tensor value on the host raises.
"""
import math

import numpy as np
import pytest
import torch

from conftest import needs_cuda
from dit_models.diffusion import create_diffusion
from dit_models.edm import edm_dpm_solver_sampler, edm_sigma_steps
from dit_models.multistep import dpm_solver_plan
from dit_models.transport import Sampler, create_transport
from dit_models.transport.analytic import DiffusionGaussianTarget, EDMGaussianTarget, GaussianTarget

MIN_GAIN = {1: 1.7, 2: 3.0, 3: 6.0}  # error(K steps) / error(2K steps) for orders 1, 2, 3


def _z(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- core


def test_plan_order_one_is_ddim_and_orders_reduce_at_the_ends():
    alphas = [0.0, 0.3, 0.6, 0.8, 0.95, 1.0]
    sigmas = [1.0, 0.9, 0.7, 0.5, 0.2, 0.0]
    plan = dpm_solver_plan(alphas, sigmas, order=3)
    for i, (c_x, cs) in enumerate(plan):
        assert c_x == pytest.approx(sigmas[i + 1] / sigmas[i])
        # derivative terms vanish on a constant prediction: sum(c) = alpha_{i+1} (1 - e^-h) (the DDIM weight)
        assert sum(cs) == pytest.approx(alphas[i + 1] - sigmas[i + 1] * alphas[i] / sigmas[i])
    # Step 0 starts at alpha = 0 (lambda = -inf), step 1 sees h_0 = inf, step 4 ends at sigma = 0: first order.
    for i in (0, 1, 4):
        assert plan[i][1][1:] == (0.0, 0.0)
    assert plan[2][1][1] != 0 and plan[2][1][2] == 0  # two finite steps of history: second order
    assert plan[3][1][2] != 0                         # third order
    with pytest.raises(ValueError, match="order"):
        dpm_solver_plan(alphas, sigmas, order=4)
    with pytest.raises(ValueError, match="noise to data"):
        dpm_solver_plan(alphas[1:-1][::-1], sigmas[1:-1][::-1])


def test_3m_takes_the_2m_update_on_a_much_longer_step():
    """A step more than MAX_3M_STEP_RATIO times the previous (in log-SNR) uses the 2M coefficients."""
    from dit_models.multistep import MAX_3M_STEP_RATIO

    lams = [-2.0, -1.5, -1.0, -0.5, -0.5 + 0.5 * MAX_3M_STEP_RATIO * 0.99, 3.0]  # last step 4.5 / 0.5 = 9x
    alphas = [1 / math.sqrt(1 + math.exp(-2 * lam)) for lam in lams]
    sigmas = [a * math.exp(-lam) for a, lam in zip(alphas, lams)]
    p3, p2 = dpm_solver_plan(alphas, sigmas, order=3), dpm_solver_plan(alphas, sigmas, order=2)
    assert p3[2][1][2] != 0 and p3[3][1][2] != 0  # equal steps, and a step just under the ratio: 3M
    assert p3[4] == p2[4] and p3[4][1][2] == 0     # 9x the previous step: 2M


@pytest.mark.parametrize("order", [1, 3])
def test_plan_step_is_exact_for_polynomial_predictions(order):
    """With its full history, an order-k step integrates x_hat = a polynomial of degree k - 1 in lambda exactly.

    (Order 2 is the paper's 2M, which replaces phi_2 by phi_1 h / 2: second order but not exact for a line.)
    """
    coef = [0.7, -0.3, 0.05][:order]
    p = lambda lam: sum(c * lam ** j for j, c in enumerate(coef))  # noqa: E731
    sig = [3.0, 1.7, 0.8, 0.45]  # EDM view: alpha = 1, lambda = -log sigma
    lam = [-math.log(s) for s in sig]
    plan = dpm_solver_plan([1.0] * 4, sig, order=3)
    i = order - 1  # the first step that has order - 1 earlier predictions
    c_x, cs = plan[i]
    x_i = 1.25
    step = c_x * x_i + sum(c * p(lam[i - j]) for j, c in enumerate(cs))
    grid = torch.linspace(lam[i], lam[i + 1], 200001, dtype=torch.float64)
    exact = sig[i + 1] * (x_i / sig[i] + torch.trapezoid(torch.exp(grid) * p(grid), grid).item())
    assert step == pytest.approx(exact, rel=1e-9)


# ---------------------------------------------------------------------------------------------- DDPM (DiT)

MU4 = [0.5, -0.3, 0.0, 1.0]


def _ddpm_errors(order, spacing, steps=(40, 80), denoise_final=False):
    d = create_diffusion("")
    target = DiffusionGaussianTarget(d, MU4, 0.3)
    z = _z((64, 4, 2, 2))
    errs = []
    for k in steps:
        ts = d.solver_timesteps(k, spacing, denoise_final=denoise_final)
        x = d.dpm_solver_sample_loop(target, z.shape, noise=z, clip_denoised=False, num_steps=k, order=order,
                                     time_spacing=spacing, denoise_final=denoise_final)
        errs.append((x - target.ode_solution(z, ts[0], None if denoise_final else ts[-1])).abs().max().item())
    return errs


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["time_uniform", "logSNR", "karras"])
def test_ddpm_dpm_solver_order_of_convergence(order, spacing):
    if spacing == "time_uniform":
        # Uniform in t on the linear schedule puts its largest log-SNR steps at the noise end: the error
        # reaches its asymptotic order only from about 100 steps (40 -> 80 gains 3.1x at order 2, 2.4x at
        # order 3; 160 -> 320: 4.0x and 6.6x). The sampler's default nonetheless: on real models what matters
        # is the sample quality at 10-20 steps, where it scored best (docs/results.md).
        e160, e320 = _ddpm_errors(order, spacing, steps=(160, 320))
        assert e160 / e320 > MIN_GAIN[order], (e160, e320)
        assert e320 < {1: 0.02, 2: 5e-3, 3: 5e-3}[order]
        return
    e40, e80 = _ddpm_errors(order, spacing)
    assert e40 / e80 > MIN_GAIN[order], (e40, e80)
    assert e80 < {1: 0.05, 2: 5e-3, 3: 5e-4}[order]


def test_ddpm_dpm_solver_with_denoise_step_reaches_the_data():
    """The default grid ends with a step to sigma = 0: compared with the exact map to clean data."""
    e20, e40 = _ddpm_errors(2, "logSNR", denoise_final=True)
    assert e40 < 5e-3 and e20 / e40 > 3.0, (e20, e40)


def test_ddpm_order_one_equals_ddim_on_the_same_grid():
    d = create_diffusion("ddim10", learn_sigma=False)
    target = DiffusionGaussianTarget(d, MU4, 0.3, learn_sigma=False)
    z = _z((8, 4, 2, 2))
    ddim = d.ddim_sample_loop(target, z.shape, noise=z, clip_denoised=False)  # calls with the original steps
    dpm = d.dpm_solver_sample_loop(target, z.shape, noise=z, clip_denoised=False, order=1,
                                   timesteps=sorted(d.timestep_map, reverse=True))
    # DDIM reads float32 copies of its tables; the solver uses float64 host coefficients.
    torch.testing.assert_close(dpm, ddim, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dpm, d.dpm_solver_sample_loop(target, z.shape, noise=z, clip_denoised=False, order=2,
                                                            timesteps=sorted(d.timestep_map, reverse=True)))


def test_ddpm_timesteps_and_respacing_independence():
    base, spaced = create_diffusion(""), create_diffusion("25")
    for spacing in ("logSNR", "karras", "time_uniform"):
        ts = base.solver_timesteps(10, spacing)
        assert len(ts) == 10 and ts[0] == 999.0 and ts[-1] == 0.0
        assert all(a > b for a, b in zip(ts[:-1], ts[1:]))
        assert spaced.solver_timesteps(10, spacing) == ts  # the solver always uses the base schedule
    assert len(base.solver_timesteps(10, denoise_final=False)) == 11
    assert base.continuous_alphas_cumprod(17.0) == pytest.approx(base.alphas_cumprod[17])
    # lambda is uniform on the logSNR grid
    abar = base.continuous_alphas_cumprod(np.array(base.solver_timesteps(6, "logSNR")))
    lam = 0.5 * (torch.tensor(abar).log() - torch.tensor(-abar).log1p())
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(5), atol=1e-9, rtol=1e-9)


def test_ddpm_cfg_one_evaluation_per_step_on_the_2b_batch():
    """DiT's forward_guided pattern: the loop calls the model once per step; the model runs [x; x] with [y; null]."""
    d = create_diffusion("")
    mu = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # 3 classes + null
    target = DiffusionGaussianTarget(d, mu, 0.3)
    z, y, s = _z((6, 4, 2, 2)), torch.arange(6) % 3, 2.5

    def forward_guided(x, t, y):
        out = target(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 3)]))
        cond, uncond = out[:, :4].chunk(2)
        return torch.cat([uncond + s * (cond - uncond), out[: len(x), 4:]], 1)

    x = d.dpm_solver_sample_loop(forward_guided, z.shape, noise=z, clip_denoised=False, num_steps=7,
                                 model_kwargs=dict(y=y))
    assert target.calls == 7 and target.batch_sizes == [12] * 7

    def guided_rows(x, t, y):  # the same guided epsilon computed on B rows
        e_c, e_u = target(x, t, y)[:, :4], target(x, t, torch.full_like(y, 3))[:, :4]
        return e_u + s * (e_c - e_u)

    ref = d.dpm_solver_sample_loop(guided_rows, z.shape, noise=z, clip_denoised=False, num_steps=7,
                                   model_kwargs=dict(y=y))
    torch.testing.assert_close(x, ref, atol=1e-12, rtol=1e-12)
    # Guidance moves the samples toward the conditional mean and past it.
    plain = d.dpm_solver_sample_loop(lambda x, t, y: target(x, t, y), z.shape, noise=z, clip_denoised=False,
                                     num_steps=7, model_kwargs=dict(y=y))
    assert not torch.allclose(plain, x)


def test_ddpm_x0_prediction_and_clipping():
    d = create_diffusion("", predict_xstart=True, learn_sigma=False)
    z = _z((4, 1, 2, 2))
    x = d.dpm_solver_sample_loop(lambda x, t: torch.full_like(x, 3.0), z.shape, noise=z, num_steps=5)
    torch.testing.assert_close(x, torch.ones_like(x))  # clip_denoised=True clamps x0_hat to [-1, 1]


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddpm_matches_diffusers_dpm_solver_on_its_time_steps(spacing):
    """Optional anchor (diffusers installed): on diffusers' own integer time steps and final step to sigma = 0,
    our 2M reproduces DPMSolverMultistepScheduler (same paper, independent code). (Karras grids differ by
    construction: diffusers evaluates the network at rounded steps but uses the unrounded sigmas.)"""
    diffusers = pytest.importorskip("diffusers")
    d = create_diffusion("")
    target = DiffusionGaussianTarget(d, MU4, 0.3, learn_sigma=False)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                                  timestep_spacing=spacing)
    sched.set_timesteps(12)
    z = _z((8, 4, 2, 2))
    x = z.clone()
    for t in sched.timesteps:
        x = sched.step(target(x, torch.full((8,), float(t))), t, x).prev_sample
    ours = d.dpm_solver_sample_loop(target, z.shape, noise=z, clip_denoised=False, order=2,
                                    timesteps=[float(t) for t in sched.timesteps])
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddpm_reference_3m_matches_diffusers(spacing):
    """third_order="reference" reproduces diffusers' DPM-Solver++(3M) samples (16 steps: diffusers'
    lower_order_final leaves only the last step, to sigma = 0, at first order, as ours), and the default
    Taylor form does not: diffusers weights x_hat'' by phi_3 / 2."""
    diffusers = pytest.importorskip("diffusers")
    d = create_diffusion("")
    target = DiffusionGaussianTarget(d, MU4, 0.3, learn_sigma=False)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                                  timestep_spacing=spacing, solver_order=3)
    sched.set_timesteps(16)
    z = _z((8, 4, 2, 2))
    x = z.clone()
    for t in sched.timesteps:
        x = sched.step(target(x, torch.full((8,), float(t))), t, x).prev_sample
    run = lambda form: d.dpm_solver_sample_loop(target, z.shape, noise=z, clip_denoised=False, order=3,
                                                timesteps=[float(t) for t in sched.timesteps], third_order=form)
    torch.testing.assert_close(run("reference"), x, atol=1e-5, rtol=1e-5)
    assert (run("taylor") - x).abs().max() > 1e-4


def test_reference_3m_is_second_order_and_taylor_third():
    """The two 3M forms on the analytic DDPM target (logSNR grid): halving the step gains about 4x with the
    reference form and 8x with the Taylor form."""
    d = create_diffusion("")
    target = DiffusionGaussianTarget(d, MU4, 0.3)
    z = _z((64, 4, 2, 2))
    gains = {}
    for form in ("reference", "taylor"):
        errs = []
        for k in (40, 80):
            ts = d.solver_timesteps(k, "logSNR", denoise_final=False)
            x = d.dpm_solver_sample_loop(target, z.shape, noise=z, clip_denoised=False, num_steps=k, order=3,
                                         time_spacing="logSNR", denoise_final=False, third_order=form)
            errs.append((x - target.ode_solution(z, ts[0], ts[-1])).abs().max().item())
        gains[form] = errs[0] / errs[1]
    assert 3.0 < gains["reference"] < 5.5 and gains["taylor"] > 6.0, gains
    with pytest.raises(ValueError, match="third_order"):
        dpm_solver_plan([0.5, 1.0], [0.5, 0.0], 3, third_order="k-diffusion")


# ---------------------------------------------------------------------------------------------- SiT


def _sit_errors(path, prediction, order, spacing, steps=(20, 40)):
    tr = create_transport(path, prediction)
    target = GaussianTarget(tr, [1.0, -0.5], 0.5)
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps, eval=True)
    z = _z((64, 2))
    errs = []
    for k in steps:
        x = Sampler(tr).sample_dpm_solver(k, order, spacing, denoise_final=False)(z, target)[-1]
        errs.append((x - target.ode_solution(z, t0, t1)).abs().max().item())
    return errs


@pytest.mark.parametrize("path,prediction", [("Linear", "velocity"), ("GVP", "score"), ("VP", "noise"),
                                             ("VP", "velocity"), ("Linear", "noise")])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sit_dpm_solver_order_of_convergence(path, prediction, order):
    e20, e40 = _sit_errors(path, prediction, order, "logSNR")
    assert e20 / e40 > MIN_GAIN[order], (e20, e40)
    assert e40 < {1: 0.15, 2: 0.01, 3: 0.002}[order]


def test_sit_order_one_on_the_linear_path_is_euler():
    tr = create_transport("Linear", "velocity")
    target = GaussianTarget(tr, [1.0, -0.5], 0.5)
    z = _z((16, 2))
    sampler = Sampler(tr)
    dpm = sampler.sample_dpm_solver(10, order=1, time_spacing="time_uniform")
    x = dpm(z, target)[-1]
    torch.testing.assert_close(x, sampler.sample_ode("euler", num_steps=11)(z, target)[-1], atol=1e-12, rtol=1e-12)
    assert dpm.nfe == 10


def test_sit_grids():
    from dit_models.transport.sampler import dpm_solver_grid

    tr = create_transport("Linear", "velocity")
    times, alphas, sigmas = dpm_solver_grid(tr, 0.0, 1.0, 5, "time_uniform")
    assert times == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8]) and sigmas[-1] == 0 and len(alphas) == 6
    for spacing in ("logSNR", "karras"):
        times, alphas, sigmas = dpm_solver_grid(tr, 0.0, 1.0, 6, spacing)
        assert times[0] == 0.0 and sigmas[-1] == 0.0 and all(a < b for a, b in zip(times[:-1], times[1:]))
    times, _, sigmas = dpm_solver_grid(create_transport("GVP", "velocity"), 0.0, 1.0, 4, "logSNR")
    assert sigmas[-1] == 0.0 and len(times) == 4  # cos(pi / 2) = 6e-17 counts as clean data
    # VP ends at t1 = 1 - eps (sigma > 0): num_steps points over [t0, t1], then the step to clean data.
    vp = create_transport("VP", "velocity")
    times, alphas, sigmas = dpm_solver_grid(vp, 0.0, 0.999, 5, "logSNR")
    assert times[-1] == 0.999 and (alphas[-1], sigmas[-1]) == (1.0, 0.0) and len(sigmas) == 6
    times, _, sigmas = dpm_solver_grid(vp, 0.0, 0.999, 5, "logSNR", denoise_final=False)
    assert len(times) == 5 and len(sigmas) == 6 and sigmas[-1] > 0
    with pytest.raises(ValueError, match="spacing"):
        dpm_solver_grid(tr, 0.0, 1.0, 5, "linear")


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_sit_cfg_one_evaluation_per_step_on_the_2b_batch(guided_channels):
    tr = create_transport("Linear", "velocity")
    mu = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = GaussianTarget(tr, mu, 0.5)
    target.num_classes = 3  # null label 3
    z, y = _z((8, 4, 1, 1)), torch.arange(8) % 3
    sampler = Sampler(tr)
    fn = sampler.sample_dpm_solver(9, cfg_scale=2.0, guided_channels=guided_channels)
    x = fn(z, target, y=y)[-1]
    assert fn.nfe == 9 and target.calls == 9 and target.batch_sizes == [16] * 9

    def public(x2, t, y, cfg_scale):  # the public forward_with_cfg on a 2B state
        half = x2[: len(x2) // 2]
        out = target(torch.cat([half, half]), t, y)
        g = out.shape[1] if guided_channels is None else guided_channels
        cond, uncond = out[:, :g].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, g:]], 1)

    ref = sampler.sample_dpm_solver(9)(torch.cat([z, z]), public, y=torch.cat([y, torch.full_like(y, 3)]),
                                       cfg_scale=2.0)[-1][:8]
    torch.testing.assert_close(x, ref, atol=1e-12, rtol=1e-12)


def test_sit_trajectory_and_public_samplers_unchanged():
    tr = create_transport("GVP", "velocity")
    target = GaussianTarget(tr, [1.0, -0.5], 0.5)
    traj = Sampler(tr).sample_dpm_solver(6, return_trajectory=True)(_z((4, 2)), target)
    assert len(traj) == 7 and traj[0].equal(_z((4, 2)))
    # the existing samplers still see the tweedie coefficients they saw before (finite, same values)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    a, b = tr.tweedie_coeffs(t)
    al, si = tr.path.alpha_t(t), tr.path.sigma_t(t)
    a_s, b_s = tr.score_coeffs(t)
    torch.testing.assert_close(a, 1 / al + si ** 2 / al * a_s)
    torch.testing.assert_close(b, si ** 2 / al * b_s)


# ---------------------------------------------------------------------------------------------- EDM


@pytest.mark.parametrize("order", [1, 2, 3])
def test_edm_dpm_solver_order_of_convergence(order):
    target = EDMGaussianTarget([0.3, -0.2], 0.5)
    z = _z((64, 2, 1, 1))
    exact = target.ode_solution(z * 80.0, 80.0, 0.0)
    e20, e40 = ((edm_dpm_solver_sampler(target, z, num_steps=k, order=order) - exact).abs().max().item()
                for k in (20, 40))
    assert e20 / e40 > MIN_GAIN[order] * (0.9 if order == 3 else 1.0), (e20, e40)


def test_edm_order_one_is_euler_and_nfe():
    target = EDMGaussianTarget([0.3], 0.5)
    z = _z((8, 1, 2, 2))
    x, nfe = edm_dpm_solver_sampler(target, z, num_steps=12, order=1, return_nfe=True)
    assert nfe == 12 and target.calls == 12
    t = edm_sigma_steps(12)
    ref = z * t[0]
    for i in range(12):
        ref = ref + (t[i + 1] - t[i]) * (ref - target(ref, t[i])) / t[i]
    torch.testing.assert_close(x, ref, atol=1e-12, rtol=1e-12)


def test_edm_cfg_one_evaluation_per_step_on_the_2b_batch():
    mu = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = EDMGaussianTarget(mu, 0.5)
    z, y = _z((6, 2, 1, 1)), torch.arange(6) % 3
    x = edm_dpm_solver_sampler(target, z, y, cfg_scale=1.5, num_steps=8)
    assert target.calls == 8 and target.batch_sizes == [12] * 8
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="forward_with_cfg"):
        edm_dpm_solver_sampler(lambda x, s, y: x, z, y, cfg_scale=1.5, num_steps=4)


# ---------------------------------------------------------------------------------------------- no host syncs


class _MetaNet(torch.nn.Module):
    """Any read of a meta tensor's value on the host raises, so these loops prove they never sync."""

    num_classes = 3

    def forward(self, x, t, y=None):
        return torch.tanh(x) * t.reshape(-1, *([1] * (x.dim() - 1))) + y.reshape(-1, *([1] * (x.dim() - 1)))


def test_loops_never_read_device_values_on_the_host():
    net = _MetaNet()
    meta = torch.device("meta")
    y = torch.arange(4, device=meta) % 3
    x = torch.empty(4, 2, 2, 2, device=meta)
    d = create_diffusion("")
    out = d.dpm_solver_sample_loop(lambda x, t, y: torch.cat([net(x, t, y), x], 1), x.shape, noise=x,
                                   clip_denoised=False, num_steps=5, order=3, model_kwargs=dict(y=y))
    assert out.device == meta
    fn = Sampler(create_transport("VP", "noise")).sample_dpm_solver(5, order=3, cfg_scale=2.0)
    assert fn(x, net, y=y)[-1].device == meta

    class Denoiser:
        def __call__(self, x, sigma, labels):
            return net(x, sigma, labels)

        def forward_with_cfg(self, x, sigma, labels, s):
            return net(x, sigma, labels) * s

    assert edm_dpm_solver_sampler(Denoiser(), x, y, cfg_scale=2.0, num_steps=5).device == meta


@needs_cuda
def test_cuda_loops_do_not_sync():
    net = _MetaNet()
    x = torch.randn(4, 2, 2, 2, device="cuda")
    y = torch.arange(4, device="cuda") % 3
    d = create_diffusion("")
    fn = Sampler(create_transport()).sample_dpm_solver(8, cfg_scale=2.0)
    run = [lambda: d.dpm_solver_sample_loop(lambda x, t, y: net(x, t, y), x.shape, noise=x, clip_denoised=False,
                                            num_steps=8, model_kwargs=dict(y=y)),
           lambda: fn(x, net, y=y)[-1]]
    for r in run:
        r()  # warm-up: device tables are built once
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert torch.isfinite(r()).all()
        finally:
            torch.cuda.set_sync_debug_mode("default")
