"""SiT transport: paths, conversions, eps defaults, time intervals and training losses."""
import itertools

import pytest
import torch

from dit_models.transport import Path, Sampler, create_transport
from dit_models.transport.analytic import GaussianTarget
from dit_models.transport.transport import SBDM_T0, ModelType, mean_flat

PATHS = ["Linear", "GVP", "VP"]
PREDICTIONS = ["velocity", "score", "noise"]
WEIGHTS = [None, "velocity", "likelihood"]


def _t_grid(n=9, lo=0.05, hi=0.95):
    return torch.linspace(lo, hi, n, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("path_type", PATHS)
def test_path_endpoints(path_type):
    p = create_transport(path_type).path
    x0, x1 = torch.randn(2, 4, 3, dtype=torch.float64).unbind(0)
    one, zero = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    xt1, _ = p.plan(one, x0, x1)
    xt0, _ = p.plan(zero, x0, x1)
    torch.testing.assert_close(xt1, x1, atol=1e-12, rtol=0)
    # VP never reaches pure noise: alpha(0) = exp(-(beta_max + beta_min) / 4) ~ 6.5e-3.
    atol = 1e-2 * x1.abs().max().item() if path_type == "VP" else 1e-12
    torch.testing.assert_close(xt0, x0, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("path_type", PATHS)
def test_path_derivatives_match_finite_differences(path_type):
    p = create_transport(path_type).path
    t, h = _t_grid(), 1e-6
    for f, df in ((p.alpha_t, p.d_alpha_t), (p.sigma_t, p.d_sigma_t)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, atol=1e-7, rtol=1e-6)
    # u_t is the time derivative of x_t along the path.
    x0, x1 = torch.randn(2, 9, 5, dtype=torch.float64).unbind(0)
    _, ut = p.plan(t, x0, x1)
    fd = (p.plan(t + h, x0, x1)[0] - p.plan(t - h, x0, x1)[0]) / (2 * h)
    torch.testing.assert_close(ut, fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("path_type", PATHS)
def test_closed_forms_equal_generic_formulas(path_type):
    p = create_transport(path_type).path
    t = _t_grid()
    for name in ("alpha_ratio", "drift_var", "velocity_ratio", "score_denominator"):
        torch.testing.assert_close(getattr(p, name)(t), getattr(Path, name)(p, t), atol=1e-10, rtol=1e-10,
                                   msg=name)
    if path_type == "Linear":
        torch.testing.assert_close(p.drift_var(t), (1 - t) / t)
    if path_type == "VP":  # drift_var = beta(t) / 2
        torch.testing.assert_close(p.drift_var(t), 0.5 * (0.1 + (1 - t) * (20 - 0.1)))


# ---------------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("path_type,prediction", list(itertools.product(PATHS, PREDICTIONS)))
def test_conversions_round_trip(path_type, prediction):
    """A network predicting the exact field of its type yields the exact v, s, eps and E[x1|x_t] (B5)."""
    tr = create_transport(path_type, prediction)
    target = GaussianTarget(tr, mu=[0.7, -0.3, 1.1], std=0.6)
    x = torch.randn(9, 3, 2, 2, dtype=torch.float64)
    t = _t_grid()
    for kind, fn in (("velocity", tr.get_drift()), ("score", tr.get_score()), ("noise", tr.get_noise())):
        torch.testing.assert_close(fn(x, t, target), target.field(x, t, kind), atol=1e-9, rtol=1e-9, msg=kind)
    # Tweedie: E[x1 | x_t] = mu + alpha std^2 / V (x - alpha mu), per sample (fix D1#7).
    mean, var = target.moments(t, x)
    te = t.reshape(-1, 1, 1, 1)
    expected = target._mean(x, None) + tr.path.alpha_t(te) * 0.36 / var * (x - mean)
    torch.testing.assert_close(tr.get_tweedie()(x, t, target), expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("path_type", PATHS)
def test_velocity_score_noise_are_mutually_inverse(path_type):
    """velocity -> score -> velocity and score <-> noise on arbitrary (non-exact) fields."""
    t = _t_grid()
    x = torch.randn(9, 4, dtype=torch.float64)
    v = torch.randn(9, 4, dtype=torch.float64)
    tv, ts, tn = (create_transport(path_type, p) for p in PREDICTIONS)
    te = t[:, None]
    s = tv.get_score()(x, t, lambda *_: v)
    torch.testing.assert_close(ts.get_drift()(x, t, lambda *_: s), v, atol=1e-9, rtol=1e-9)
    eps = tv.get_noise()(x, t, lambda *_: v)
    torch.testing.assert_close(eps, -tv.path.sigma_t(te) * s, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tn.get_drift()(x, t, lambda *_: eps), v, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(tn.get_score()(x, t, lambda *_: eps), s, atol=1e-9, rtol=1e-9)
    if path_type == "Linear":  # B5 closed forms
        torch.testing.assert_close(s, (te * v - x) / (1 - te))
        torch.testing.assert_close(eps, x - te * v)


def test_drift_coeffs_diffusion_zero_is_ode_drift_even_where_singular():
    tr = create_transport("Linear", "velocity")
    t = torch.tensor([0.5, 1.0], dtype=torch.float64)  # score coefficients are infinite at t = 1
    a, b = tr.drift_coeffs(t, torch.zeros(2, dtype=torch.float64))
    assert a.tolist() == [0.0, 0.0] and b.tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------- eps and intervals


def test_eps_defaults():
    assert (create_transport().train_eps, create_transport().sample_eps) == (0.0, 0.0)
    assert (create_transport("GVP", train_eps=0.1, sample_eps=0.2).train_eps) == 0.0  # forced for velocity
    tr = create_transport("Linear", "noise")
    assert (tr.train_eps, tr.sample_eps) == (1e-3, 1e-3)
    tr = create_transport("VP")
    assert (tr.train_eps, tr.sample_eps) == (1e-5, 1e-3)
    # Fix D1#6: each eps defaults independently (SiT leaves sample_eps = None here).
    tr = create_transport("Linear", "score", train_eps=0.01)
    assert (tr.train_eps, tr.sample_eps) == (0.01, 1e-3)
    tr = create_transport("VP", sample_eps=0.02)
    assert (tr.train_eps, tr.sample_eps) == (1e-5, 0.02)


def test_check_interval_rules():
    def interval(path, pred, **kw):
        tr = create_transport(path, pred)
        return tr.check_interval(tr.train_eps, tr.sample_eps, **kw)

    e = 1e-3
    # velocity + Linear/GVP: training and ODE on [0, 1]; SDE on [0, 1 - h].
    assert interval("Linear", "velocity") == (0.0, 1.0)
    assert interval("GVP", "velocity", eval=True) == (0.0, 1.0)
    assert interval("Linear", "velocity", sde=True, eval=True, diffusion_form="sigma", last_step_size=0.04) == (
        0.0, 0.96)
    assert interval("Linear", "velocity", sde=True, eval=True, diffusion_form="sigma") == (0.0, 1.0)
    # SBDM on a velocity path would start at t = 0 where D is infinite: fix D1#5.
    assert interval("Linear", "velocity", sde=True, eval=True, last_step_size=0.04) == (SBDM_T0, 0.96)
    # score/noise: [eps, 1 - eps] for training and ODE; SDE ends at 1 - h.
    assert interval("Linear", "noise") == (e, 1 - e)
    assert interval("GVP", "score", eval=True) == (e, 1 - e)
    assert interval("Linear", "score", sde=True, eval=True, diffusion_form="linear", last_step_size=0.04) == (e, 0.96)
    # VP: t0 = 0; t1 = 1 - eps (train 1e-5, sample 1e-3) or 1 - h for an SDE with a last step.
    assert interval("VP", "velocity") == (0.0, 1 - 1e-5)
    assert interval("VP", "noise", eval=True) == (0.0, 1 - e)
    assert interval("VP", "velocity", sde=True, eval=True, last_step_size=0.04) == (0.0, 0.96)
    assert interval("VP", "velocity", sde=True, eval=True, last_step_size=0.0) == (0.0, 1 - e)
    # reverse maps (t0, t1) to (1 - t0, 1 - t1).
    assert interval("Linear", "noise", eval=True, reverse=True) == pytest.approx((1 - e, e), abs=1e-15)


def test_factory_rejects_unknown_choices():
    for kw in (dict(path_type="Cosine"), dict(prediction="x0"), dict(loss_weight="snr")):
        with pytest.raises(ValueError, match="choose one of"):
            create_transport(**kw)
    assert create_transport("linear", "Velocity").model_type == ModelType.VELOCITY


# ---------------------------------------------------------------------------------------------- training losses


class _TinyNet(torch.nn.Module):
    """1x1 conv with a time-dependent bias: enough to make losses depend on x_t and t."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 1)
        self.t_proj = torch.nn.Linear(1, c)

    def forward(self, x, t, y=None):
        return self.conv(x) + self.t_proj(t[:, None].to(x.dtype))[:, :, None, None]


@pytest.mark.parametrize("path_type,prediction,weight", list(itertools.product(PATHS, PREDICTIONS, WEIGHTS)))
def test_training_losses_finite(path_type, prediction, weight):
    torch.manual_seed(0)
    tr = create_transport(path_type, prediction, weight)
    net = _TinyNet(4)
    x1 = torch.randn(16, 4, 4, 4)
    out = tr.training_losses(net, x1, dict(y=torch.zeros(16, dtype=torch.long)))
    assert out["loss"].shape == (16,) and torch.isfinite(out["loss"]).all()
    assert out["pred"].shape == x1.shape
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps)
    assert ((out["t"] >= t0) & (out["t"] <= t1)).all()
    out["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("prediction,weight", list(itertools.product(PREDICTIONS, WEIGHTS)))
def test_loss_formulas_and_weights(prediction, weight):
    """The loss equals the B3 formula with the B3 weights, for the same t and noise (device generator)."""
    tr = create_transport("GVP", prediction, weight)
    x1 = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    net = lambda x, t: torch.tanh(x) * t[:, None, None, None]  # noqa: E731
    got = tr.training_losses(net, x1, generator=torch.Generator().manual_seed(3))
    t, x0, _ = tr.sample(x1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got["t"], t)
    te = t[:, None, None, None]
    p = tr.path
    alpha, sigma = p.alpha_t(te), p.sigma_t(te)
    xt = alpha * x1 + sigma * x0
    out = net(xt, t)
    drift_var = p.d_alpha_t(te) / alpha * sigma ** 2 - sigma * p.d_sigma_t(te)
    w = {None: 1.0, "velocity": (drift_var / sigma) ** 2, "likelihood": drift_var / sigma ** 2}[weight]
    if prediction == "velocity":  # the weight is ignored
        expected = mean_flat((out - (p.d_alpha_t(te) * x1 + p.d_sigma_t(te) * x0)) ** 2)
    elif prediction == "noise":
        expected = mean_flat(w * (out - x0) ** 2)
    else:
        expected = mean_flat(w * (sigma * out + x0) ** 2)
    torch.testing.assert_close(got["loss"], expected, atol=1e-12, rtol=1e-10)


def test_training_losses_shape_check():
    tr = create_transport()
    with pytest.raises(ValueError, match="learned-sigma"):
        tr.training_losses(lambda x, t: torch.cat([x, x], 1), torch.randn(2, 4, 2, 2))


def test_velocity_loss_is_minimised_by_the_exact_field():
    """The exact marginal velocity has a lower loss than a perturbed one (Monte-Carlo, same draws)."""
    tr = create_transport()
    target = GaussianTarget(tr, mu=[1.0, -1.0], std=0.5)
    x1 = target.mu.float() + 0.5 * torch.randn(4096, 2)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    exact = tr.training_losses(target, x1, generator=g())["loss"].mean()
    worse = tr.training_losses(lambda x, t: target(x, t) * 1.1, x1, generator=g())["loss"].mean()
    assert exact < worse


def test_sampler_accepts_transport():
    assert Sampler(create_transport()).transport.model_type == ModelType.VELOCITY
