"""Closed-form fields of a Gaussian data distribution, for testing samplers and conversions.

For data x1 ~ N(mu, std^2 I) and noise x0 ~ N(0, I), x_t = alpha_t x1 + sigma_t x0 is Gaussian with
mean alpha_t mu and variance V_t = alpha_t^2 std^2 + sigma_t^2, and every quantity a SiT network
learns is affine in x:
    score    s(x, t) = -(x - alpha mu) / V
    noise    E[x0 | x_t] = sigma (x - alpha mu) / V
    velocity E[u_t | x_t] = d_alpha mu + (d_alpha alpha std^2 + d_sigma sigma) / V (x - alpha mu)
The PF-ODE keeps xi = (x_t - alpha_t mu) / sqrt(V_t) constant, which gives exact ODE solutions.
"""
import math

import torch

from .path import expand_t

__all__ = ["GaussianTarget"]


class GaussianTarget:
    """Exact "model" for a transport: call it like a network, model(x, t, y=None) -> field.

    Args:
        transport: the Transport whose prediction type (velocity/score/noise) the output follows.
        mu: (C,) data mean, or (K, C) per-class means selected by the label y (class-conditional).
        std: data standard deviation (scalar).
    """

    def __init__(self, transport, mu, std):
        self.transport = transport
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.std = float(std)
        self.calls = 0

    def _mean(self, x, y):
        mu = self.mu if self.mu.dim() == 1 else self.mu[y]
        mu = mu.to(device=x.device, dtype=x.dtype)
        return mu.reshape(mu.shape[0] if mu.dim() == 2 else 1, -1, *([1] * (x.dim() - 2)))

    def moments(self, t, x, y=None):
        """(mean of x_t (N or 1, C, ...), variance V_t) for per-sample t (N,) or a float."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        te = expand_t(t, x)
        p = self.transport.path
        alpha, sigma = p.alpha_t(te), p.sigma_t(te)
        return alpha * self._mean(x, y), alpha ** 2 * self.std ** 2 + sigma ** 2

    def field(self, x, t, kind, y=None):
        """Exact velocity, score or noise ("velocity" | "score" | "noise") at (x, t)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 1 and t.numel() > 1 and bool((t == t[0]).all()):
            t = t[:1]  # samplers pass one time for the whole batch: evaluate the path once
        te = expand_t(t, x)
        p = self.transport.path
        alpha, sigma = p.alpha_t(te), p.sigma_t(te)
        var = alpha ** 2 * self.std ** 2 + sigma ** 2
        mu = self._mean(x, y)
        dev = x - alpha * mu
        if kind == "score":
            return -dev / var
        if kind == "noise":
            return sigma * dev / var
        d_alpha, d_sigma = p.d_alpha_t(te), p.d_sigma_t(te)
        return d_alpha * mu + (d_alpha * alpha * self.std ** 2 + d_sigma * sigma) / var * dev

    def __call__(self, x, t, y=None, **kwargs):
        self.calls += 1
        kind = self.transport.model_type.value
        return self.field(x, t.to(x.dtype), kind, y)

    def ode_solution(self, x, t_from, t_to, y=None):
        """Exact PF-ODE map of x from time t_from to t_to (floats)."""
        m0, v0 = self.moments(t_from, x, y)
        m1, v1 = self.moments(t_to, x, y)
        return m1 + torch.sqrt(v1 / v0) * (x - m0)

    def log_prob(self, x, t=1.0, y=None):
        """Exact log-density of x under the marginal at time t (default: the data), nats per sample."""
        m, v = self.moments(t, x, y)
        d = x[0].numel()
        v = torch.as_tensor(v, dtype=x.dtype)
        return -0.5 * ((x - m) ** 2 / v).flatten(1).sum(1) - 0.5 * d * torch.log(2 * math.pi * v).flatten().mean()
