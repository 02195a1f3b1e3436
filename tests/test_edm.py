"""EDM invariants: preconditioning, loss weight, schedule, Heun sampler."""
import math

import pytest
import torch

from dit_models.edm import (
    EDMLoss,
    EDMPrecond,
    edm_coefficients,
    edm_loss_weight,
    edm_sampler,
    edm_sigma_steps,
    precondition,
    sample_sigma,
)


class ZeroNet(torch.nn.Module):
    """Raw F that always outputs 0."""

    def forward(self, x_in, c_noise, class_labels=None):
        return torch.zeros_like(x_in)


class LinearNet(torch.nn.Module):
    """Raw F whose output depends on the label, so CFG mixing is observable."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x_in, c_noise, class_labels=None):
        y = class_labels.float().reshape(-1, 1, 1, 1)
        return self.w * x_in + y + c_noise.reshape(-1, 1, 1, 1)


def test_zero_F_gives_c_skip_x():
    x = torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    D = EDMPrecond(ZeroNet())(x, sigma)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(D, c_skip.reshape(-1, 1, 1, 1) * x)


def test_coefficients_and_lambda():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    torch.testing.assert_close(edm_loss_weight(sigma) * c_out ** 2, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # Unit variance of the network input and of the effective training target for data std sigma_d.
    torch.testing.assert_close(c_in ** 2 * (sigma ** 2 + 0.25), torch.ones_like(sigma))
    target_var = ((1 - c_skip) ** 2 * 0.25 + c_skip ** 2 * sigma ** 2) / c_out ** 2
    torch.testing.assert_close(target_var, torch.ones_like(sigma))


def test_precondition_is_fp32_for_low_precision_F():
    x = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    D, _ = precondition(lambda x_in, c_noise: x_in, x, torch.tensor([0.5, 2.0]))
    assert D.dtype == torch.float32


def test_schedule_endpoints():
    for n in (2, 18, 40):
        t = edm_sigma_steps(n)
        assert t.dtype == torch.float64 and t.shape == (n + 1,)
        assert t[0].item() == pytest.approx(80.0, rel=1e-12)
        assert t[n - 1].item() == pytest.approx(0.002, rel=1e-12)
        assert t[n].item() == 0.0
        assert (t[1:] < t[:-1]).all()


@pytest.mark.parametrize("num_steps", [1, 2, 18, 40])
def test_nfe_is_2N_minus_1(num_steps):
    calls = []

    def net(x, sigma, class_labels=None):
        calls.append(1)
        return torch.zeros_like(x)

    x, nfe = edm_sampler(net, torch.randn(2, 1, 2, 2), num_steps=num_steps, return_nfe=True)
    assert nfe == len(calls) == 2 * num_steps - 1
    assert x.dtype == torch.float64


def _gaussian_denoiser(mu, s):
    """Exact D(x; sigma) = E[y | y + sigma eps = x] for y ~ N(mu, s^2) per element."""
    def net(x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return net


def test_heun_on_gaussian_matches_exact_ode_solution():
    mu, s = 0.3, 0.7
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 1, 2, 2, generator=g)
    x = edm_sampler(_gaussian_denoiser(mu, s), z, num_steps=40)
    # PF-ODE from sigma_max to 0 for a Gaussian: x(0) - mu = s / sqrt(s^2 + sigma_max^2) (x(sigma_max) - mu).
    x0 = z.double() * 80.0
    exact = mu + s / math.sqrt(s ** 2 + 80.0 ** 2) * (x0 - mu)
    err40 = (x - exact).abs().max().item()
    assert err40 < 0.05
    # Second-order convergence: 4x the steps cuts the global error by ~16x.
    err160 = (edm_sampler(_gaussian_denoiser(mu, s), z, num_steps=160) - exact).abs().max().item()
    assert err160 < err40 / 8
    # And the sample statistics are those of the target (up to the sigma_max truncation and MC error).
    assert abs(x.mean().item() - mu) < 0.03
    assert abs(x.std().item() - s) < 0.03


def test_churn_reproducible_and_changes_path():
    net = _gaussian_denoiser(0.0, 1.0)
    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    a = edm_sampler(net, z, num_steps=8, S_churn=10, generator=torch.Generator().manual_seed(5))
    b = edm_sampler(net, z, num_steps=8, S_churn=10, generator=torch.Generator().manual_seed(5))
    c = edm_sampler(net, z, num_steps=8)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_cfg_inside_preconditioner():
    net = EDMPrecond(LinearNet())  # null label = zeros
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    y = torch.tensor([1, 2, 3])
    torch.testing.assert_close(net.forward_with_cfg(x, sigma, y, 1.0), net(x, sigma, y))
    s = 1.5
    D_c, D_u = net(x, sigma, y), net(x, sigma, torch.zeros_like(y))
    # c_skip / c_out do not depend on the branch, so guiding F equals guiding D.
    torch.testing.assert_close(net.forward_with_cfg(x, sigma, y, s), D_u + s * (D_c - D_u), atol=1e-5, rtol=1e-5)
    out = edm_sampler(net, torch.randn(3, 2, 4, 4), y, cfg_scale=s, num_steps=3)
    assert torch.isfinite(out).all()


def test_edm_loss_equals_F_space_mse():
    torch.manual_seed(0)
    model = LinearNet()
    net = EDMPrecond(model)
    y = torch.randn(5, 2, 4, 4)
    labels = torch.arange(5)
    out = EDMLoss()(net, y, labels, generator=torch.Generator().manual_seed(3))
    # Recompute with the same draws: unweighted MSE against the effective F target (lambda c_out^2 = 1).
    g = torch.Generator().manual_seed(3)
    sigma = sample_sigma(5, generator=g)
    n = torch.randn(y.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma.reshape(-1, 1, 1, 1))
    F_x = model(c_in * (y + n), c_noise.reshape(-1), labels)
    target = (y - c_skip * (y + n)) / c_out
    torch.testing.assert_close(out["loss"], ((F_x - target) ** 2).mean(dim=(1, 2, 3)), atol=1e-4, rtol=1e-4)
    assert out["loss"].shape == (5,)
