"""UniPC (dit_models/multistep.py:unipc_plan) for DiT's DDPM, SiT transports and EDM.

Theory (Zhao et al. 2023): UniP-p has order p, and the corrector UniC-p, which reuses the network evaluation at the
predicted point that the next step needs anyway, raises it to p + 1, for both B(h) = h (bh1) and 1 - e^-h (bh2).
Checked on the analytic Gaussian targets (dit_models/transport/analytic.py), whose probability-flow ODE has an
exact solution: the global error must fall by about 2^(p + 1) as the steps double (DDPM: Karras grid, 40 -> 80
steps; EDM: its rho = 7 grid). A single step must integrate polynomial data predictions exactly up to its degree.
diffusers' UniPCMultistepScheduler (optional) must be reproduced to fp64 rounding on an identical DDPM grid.
"""
import math

import numpy as np
import pytest
import torch

from dit_models.diffusion import create_diffusion
from dit_models.edm import edm_unipc_sampler
from dit_models.multistep import _unipc_update, dpm_solver_plan, multistep_sample, unipc_plan
from dit_models.transport import Sampler, create_transport
from dit_models.transport.analytic import DiffusionGaussianTarget, EDMGaussianTarget, GaussianTarget

# error(K steps) / error(2K steps) for UniPC-1, -2, -3 (global orders 2, 3, 4): 0.85 (0.75 for order 4) x 2^(p + 1)
MIN_GAIN = {1: 3.4, 2: 6.8, 3: 12.0}
MU4 = [0.5, -0.3, 0.0, 1.0]


def _z(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("corrector,order", [(False, 1), (False, 3), (True, 2), (True, 3)])
def test_one_update_is_exact_for_polynomial_predictions(variant, corrector, order):
    """UniP-p is exact for x_hat of degree p - 1 in lambda, UniC-p (with the new point) for degree p.

    (UniP-2 and UniC-1 use the paper's fixed weight 1/2: one order, not exact for a line.)
    """
    degree = order if corrector else order - 1
    coef = [0.7, -0.3, 0.05, 0.02][:degree + 1]
    p = lambda lam: sum(c * lam ** j for j, c in enumerate(coef))  # noqa: E731
    sig = [3.0, 1.7, 0.8, 0.45, 0.3]  # EDM view: alpha = 1, lambda = -log sigma
    lam = [-math.log(s) for s in sig]
    s, t = 3, 4  # history 2, 1 before s
    w = _unipc_update(lam, 1.0, s, t, order, variant, corrector)
    assert set(w) == set(range(s - order + 1, s + 1)) | ({t} if corrector else set())
    x_s = 1.25
    step = sig[t] / sig[s] * x_s + sum(c * p(lam[j]) for j, c in w.items())
    grid = torch.linspace(lam[s], lam[t], 200001, dtype=torch.float64)
    exact = sig[t] * (x_s / sig[s] + torch.trapezoid(torch.exp(grid) * p(grid), grid).item())
    assert step == pytest.approx(exact, rel=1e-9)


def test_predictor_only_is_dpm_solver_and_plan_layout():
    alphas = [0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 1.0]  # from alpha = 0 (SiT Linear at t = 0) to sigma = 0
    sigmas = [1.0, 0.9, 0.7, 0.5, 0.35, 0.2, 0.0]

    def padded(plan, n=4):
        return [(c_x, tuple(cs) + (0.0,) * (n - len(cs))) for c_x, cs in plan]

    for variant in ("bh1", "bh2"):  # order 1 without the corrector is DDIM
        assert padded(unipc_plan(alphas, sigmas, 1, variant, corrector=False)) == padded(dpm_solver_plan(alphas, sigmas, 1))
    # bh2's UniP-2 is DPM-Solver++(2M): B(h) = 1 - e^-h and the weight 1/2.
    for (cx, cs), (dx, ds) in zip(padded(unipc_plan(alphas, sigmas, 2, "bh2", corrector=False)),
                                  padded(dpm_solver_plan(alphas, sigmas, 2))):
        assert cx == pytest.approx(dx, rel=1e-14) and cs == pytest.approx(ds, rel=1e-12, abs=1e-15)
    for order in (1, 2, 3):
        plan = unipc_plan(alphas, sigmas, order)
        assert len(plan) == 6 and {len(cs) for _, cs in plan} == {max(2, order + 1)}
        assert all(math.isfinite(c) for _, cs in plan for c in cs)
        # step 0 leaves lambda = -inf: first order; point 1 is not corrected (h_0 = inf); the step to sigma = 0
        # returns the data prediction at the last point.
        assert plan[0][1][1:] == (0.0,) * (len(plan[0][1]) - 1)
        assert plan[1][1][2:] == (0.0,) * (len(plan[1][1]) - 2) and plan[1][1][1] == 0.0
        assert plan[-1][0] == 0.0 and plan[-1][1][0] == pytest.approx(1.0)
        # a constant prediction passes through a corrected step unchanged: the weights sum to the DDIM weight
        for i, (c_x, cs) in enumerate(plan):
            assert sum(cs) == pytest.approx(alphas[i + 1] - sigmas[i + 1] * alphas[i] / sigmas[i], abs=1e-12)
    with pytest.raises(ValueError, match="variant"):
        unipc_plan(alphas, sigmas, 2, "bh3")
    with pytest.raises(ValueError, match="order"):
        unipc_plan(alphas, sigmas, 4)


def test_lower_order_final_and_warmup_orders():
    lams = [-3.0 + 0.5 * i for i in range(9)]
    alphas = [1 / math.sqrt(1 + math.exp(-2 * lam)) for lam in lams]
    sigmas = [a * math.exp(-lam) for a, lam in zip(alphas, lams)]
    full, low = unipc_plan(alphas, sigmas, 3, lower_order_final=False), unipc_plan(alphas, sigmas, 3)
    assert full[:6] == low[:6] and full[7] != low[7] and full[6] != low[6]
    # warm-up: UniP-1 + nothing, UniP-2 + UniC-1, UniP-3 + UniC-2, then UniP-3 + UniC-3 (weights on 4 predictions)
    assert [sum(c != 0 for c in cs) for _, cs in full[:4]] == [1, 2, 3, 4]
    # no corrector: a constant-width shift of the predictor history
    assert [sum(c != 0 for c in cs) for _, cs in unipc_plan(alphas, sigmas, 3, corrector=False)] == [1, 2] + [3] * 4 + [2, 1]


# ---------------------------------------------------------------------------------------------- DDPM (DiT)


def _ddpm_errors(order, variant, spacing="karras", steps=(40, 80), lower_order_final=False):
    d = create_diffusion("")
    target = DiffusionGaussianTarget(d, MU4, 0.3)
    z = _z((32, 4, 2, 2))
    errs = []
    for k in steps:
        ts = d.solver_timesteps(k, spacing, denoise_final=False)
        x = d.unipc_sample_loop(target, z.shape, noise=z, clip_denoised=False, num_steps=k, order=order,
                                variant=variant, time_spacing=spacing, denoise_final=False,
                                lower_order_final=lower_order_final)
        errs.append((x - target.ode_solution(z, ts[0], ts[-1])).abs().max().item())
    return errs


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_ddpm_unipc_order_of_convergence(order, variant):
    e40, e80 = _ddpm_errors(order, variant)
    assert e40 / e80 > MIN_GAIN[order], (e40, e80)
    assert e80 < {1: 0.02, 2: 2e-3, 3: 2e-4}[order], (e40, e80)


def test_ddpm_unipc_default_grid_converges():
    """lower_order_final (the default) makes the last step first order; ending at t = 0, where the data
    prediction barely moves, that costs little: still third order for UniPC-2 on the logSNR grid."""
    e40, e80 = _ddpm_errors(2, "bh2", "logSNR", lower_order_final=True)
    assert e40 / e80 > 6.0 and e80 < 5e-4, (e40, e80)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 notice
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_ddpm_matches_diffusers_unipc(order, variant, final):
    """diffusers' UniPCMultistepScheduler on an identical grid: same betas, same integer time steps, sigmas set to
    float64 values from the same alphas_cumprod (diffusers stores float32 ones), same model (the exact epsilon of a
    Gaussian), float64 states. final "zero" ends with the step to sigma = 0 (our denoise_final=True), "sigma_min"
    at t = 0 (denoise_final=False with the end point t = 0). diffusers' bh1 returns NaN on the step to sigma = 0
    (B(h) = h = inf times a zero correction), where ours returns the data prediction, as bh2."""
    diffusers = pytest.importorskip("diffusers")
    d = create_diffusion("")
    target = DiffusionGaussianTarget(d, MU4, 0.3, learn_sigma=False)
    sched = diffusers.UniPCMultistepScheduler(trained_betas=d.betas, solver_order=order, solver_type=variant,
                                              predict_x0=True, lower_order_final=True, disable_corrector=[],
                                              final_sigmas_type=final)
    sched.set_timesteps(12)
    ts = [int(t) for t in sched.timesteps]
    ends = ts + ([0] if final == "sigma_min" else [])
    abar = d.alphas_cumprod[ends]
    sched.sigmas = torch.tensor(np.append(np.sqrt((1 - abar) / abar), [0.0] if final == "zero" else []),
                                dtype=torch.float64)
    z = _z((8, 4, 2, 2))
    x = z.clone()
    for t in sched.timesteps:
        x = sched.step(target(x, torch.full((8,), float(t), dtype=torch.float64)), t, x).prev_sample
    ours = d.unipc_sample_loop(target, z.shape, noise=z, clip_denoised=False, order=order, variant=variant,
                               timesteps=[float(t) for t in ends], denoise_final=final == "zero")
    assert torch.isfinite(ours).all()
    if variant == "bh1" and final == "zero":
        assert not torch.isfinite(x).all()
        return
    assert ((ours - x).abs().max() / x.abs().max()).item() < 1e-12


def test_ddpm_unipc_cfg_one_evaluation_per_step_and_x0_model():
    d = create_diffusion("")
    mu = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = DiffusionGaussianTarget(d, mu, 0.3)
    z, y, s = _z((6, 4, 2, 2)), torch.arange(6) % 3, 2.5

    def forward_guided(x, t, y):  # DiT's forward_guided: one call on [x; x] with [y; null]
        out = target(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 3)]))
        cond, uncond = out[:, :4].chunk(2)
        return torch.cat([uncond + s * (cond - uncond), out[: len(x), 4:]], 1)

    x = d.unipc_sample_loop(forward_guided, z.shape, noise=z, clip_denoised=False, num_steps=7, model_kwargs=dict(y=y))
    assert target.calls == 7 and target.batch_sizes == [12] * 7 and torch.isfinite(x).all()
    dx = create_diffusion("", predict_xstart=True, learn_sigma=False)
    out = dx.unipc_sample_loop(lambda x, t: torch.full_like(x, 3.0), z.shape, noise=z, num_steps=5, order=3)
    torch.testing.assert_close(out, torch.ones_like(out))  # clip_denoised clamps x0_hat; constant x0 is exact


# ---------------------------------------------------------------------------------------------- SiT

SIT_MODELS = [(path, pred) for path in ("Linear", "GVP", "VP") for pred in ("velocity", "score", "noise")]


@pytest.mark.parametrize("path,prediction", SIT_MODELS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sit_unipc_converges_on_every_path_and_prediction(path, prediction, order):
    """logSNR grid, no final step past t1. The first step leaves t = 0 (lambda = -inf on Linear / GVP) with a
    fixed first order step, whose error floor (~1e-4) hides order 4, so order 3 is checked over 10 -> 40 steps."""
    tr = create_transport(path, prediction)
    target = GaussianTarget(tr, [1.0, -0.5], 0.5)
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps, eval=True)
    z = _z((64, 2))
    errs = []
    for k in (10, 20, 40):
        fn = Sampler(tr).sample_unipc(k, order, "bh2", "logSNR", denoise_final=False, lower_order_final=False)
        errs.append((fn(z, target)[-1] - target.ode_solution(z, t0, t1)).abs().max().item())
        assert fn.nfe == k
    e10, e20, e40 = errs
    if order == 3:
        assert e10 / e40 > 15 and e40 < 3e-4, errs
    else:
        assert e20 / e40 > {1: 3.3, 2: 6.0}[order] and e40 < {1: 0.03, 2: 3e-3}[order], errs


def test_sit_unipc_default_cfg_trajectory():
    tr = create_transport("Linear", "velocity")
    mu = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = GaussianTarget(tr, mu, 0.5)
    target.num_classes = 3  # null label 3
    z, y = _z((8, 4, 1, 1)), torch.arange(8) % 3
    fn = Sampler(tr).sample_unipc(9, cfg_scale=2.0, return_trajectory=True)
    traj = fn(z, target, y=y)
    assert fn.nfe == 9 and target.calls == 9 and target.batch_sizes == [16] * 9
    assert len(traj) == 10 and traj[0].equal(z) and torch.isfinite(traj[-1]).all()
    assert fn.solver == "unipc2-bh2" and fn.graph_key() != Sampler(tr).sample_dpm_solver(9, cfg_scale=2.0).graph_key()


# ---------------------------------------------------------------------------------------------- EDM


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_edm_unipc_order_of_convergence(order, variant):
    target = EDMGaussianTarget([0.3, -0.2], 0.5)
    z = _z((64, 2, 1, 1))
    exact = target.ode_solution(z * 80.0, 80.0, 0.0)
    e40, e80 = ((edm_unipc_sampler(target, z, num_steps=k, order=order, variant=variant) - exact).abs().max().item()
                for k in (40, 80))
    assert e40 / e80 > MIN_GAIN[order], (e40, e80)


def test_edm_unipc_cfg_nfe():
    mu = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = EDMGaussianTarget(mu, 0.5)
    z, y = _z((6, 2, 1, 1)), torch.arange(6) % 3
    x, nfe = edm_unipc_sampler(target, z, y, cfg_scale=1.5, num_steps=8, order=3, return_nfe=True)
    assert nfe == 8 and target.calls == 8 and target.batch_sizes == [12] * 8 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="forward_with_cfg"):
        edm_unipc_sampler(lambda x, s, y: x, z, y, cfg_scale=1.5, num_steps=4)


# ---------------------------------------------------------------------------------------------- no host syncs


def test_unipc_loops_never_read_device_values_on_the_host():
    """On the "meta" device any host read of a tensor value raises: the loops are graph-capturable."""
    meta = torch.device("meta")
    y = torch.arange(4, device=meta) % 3
    x = torch.empty(4, 2, 2, 2, device=meta)

    def net(x, t, y=None):
        return torch.tanh(x) * t.reshape(-1, 1, 1, 1) + y.reshape(-1, 1, 1, 1)

    net.num_classes = 3
    out = create_diffusion("").unipc_sample_loop(lambda x, t, y: torch.cat([net(x, t, y), x], 1), x.shape, noise=x,
                                                 clip_denoised=False, num_steps=5, order=3, model_kwargs=dict(y=y))
    assert out.device == meta
    assert Sampler(create_transport("VP", "noise")).sample_unipc(5, order=3, cfg_scale=2.0)(x, net, y=y)[-1].device == meta

    class Denoiser:
        def __call__(self, x, sigma, labels):
            return net(x, sigma, labels)

        def forward_with_cfg(self, x, sigma, labels, s):
            return net(x, sigma, labels) * s

    assert edm_unipc_sampler(Denoiser(), x, y, cfg_scale=2.0, num_steps=5, order=3).device == meta


def test_multistep_sample_keeps_the_plan_history():
    """multistep_sample keeps as many past predictions as the plan's tuples are long (UniPC-3: four)."""
    plan = [(1.0, (1.0, 0.0, 0.0, 0.0)), (1.0, (0.0, 0.0, 0.0, 0.0)), (1.0, (0.0, 0.0, 0.0, 0.0)),
            (1.0, (0.0, 0.0, 0.0, 2.0))]
    x = multistep_sample(torch.zeros(1), lambda x, i: torch.full((1,), float(i + 1)), plan)
    assert x.item() == 1.0 + 2.0 * 1.0  # step 3 reads the prediction of step 0
