"""Closed-form fields of a Gaussian data distribution, for testing samplers and conversions.

Three "models" with exact outputs: GaussianTarget (SiT transports: velocity / score / noise),
DiffusionGaussianTarget (DiT's DDPM: epsilon, plus learned-variance channels) and EDMGaussianTarget (EDM
denoiser D(x; sigma), with forward_with_cfg). Each counts its network calls (.calls) and records the batch
size of each call (.batch_sizes), so tests can check one evaluation per step on the 2B CFG batch, and each
gives the exact probability-flow ODE map (ode_solution) to measure a solver's order of convergence.

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

__all__ = ["GaussianTarget", "DiffusionGaussianTarget", "EDMGaussianTarget"]


def _class_mean(mu, x, y):
    """(C,) or per-class (K, C) means -> broadcastable (N or 1, C, 1, ...) in x's dtype."""
    m = mu if mu.dim() == 1 else mu[y.to(mu.device)]
    m = m.to(device=x.device, dtype=x.dtype)
    return m.reshape(m.shape[0] if m.dim() == 2 else 1, -1, *([1] * (x.dim() - 2)))


def _gaussian_ode_map(x, mean_from, var_from, mean_to, var_to):
    """The PF-ODE keeps (x - mean) / sqrt(var) constant: exact map between two marginals."""
    return mean_to + torch.sqrt(torch.as_tensor(var_to / var_from, dtype=x.dtype)) * (x - mean_from)


class DiffusionGaussianTarget:
    """Exact epsilon "network" of a DiT diffusion for data N(mu, std^2 I): model(x, t, y=None) -> eps.

    t: model times (DDPM step numbers, real-valued allowed) on the diffusion's continuous schedule
    (GaussianDiffusion.continuous_alphas_cumprod). With learn_sigma, C more constant channels `v` are appended
    (the learned-range variance input), as DiT outputs them.

    Args:
        diffusion: a GaussianDiffusion / SpacedDiffusion (its base schedule is used).
        mu: (C,) or (K, C) per-class means (label y selects the row). std: scalar.
    """

    def __init__(self, diffusion, mu, std, learn_sigma=True, v=0.0):
        self.diffusion = diffusion
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.std = float(std)
        self.learn_sigma = learn_sigma
        self.v = v
        self.calls = 0
        self.batch_sizes = []

    def alpha_sigma(self, t):
        """(alpha, sigma) float64 tensors of model times t (tensor or list)."""
        abar = torch.as_tensor(self.diffusion.continuous_alphas_cumprod(torch.as_tensor(t).double().cpu().numpy()))
        return abar.sqrt(), (1 - abar).sqrt()

    def __call__(self, x, t, y=None, **kwargs):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        a, s = self.alpha_sigma(t)
        a, s = (v.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1))) for v in (a, s))
        eps = s * (x - a * _class_mean(self.mu, x, y)) / (a * a * self.std ** 2 + s * s)
        return torch.cat([eps, torch.full_like(eps, self.v)], 1) if self.learn_sigma else eps

    def ode_solution(self, x, t_from, t_to=None, y=None):
        """Exact PF-ODE map of x from model time t_from to t_to (None: clean data, sigma = 0)."""
        a0, s0 = (float(v) for v in self.alpha_sigma([t_from]))
        a1, s1 = (1.0, 0.0) if t_to is None else (float(v) for v in self.alpha_sigma([t_to]))
        m = _class_mean(self.mu, x, y)
        return _gaussian_ode_map(x, a0 * m, a0 ** 2 * self.std ** 2 + s0 ** 2, a1 * m, a1 ** 2 * self.std ** 2 + s1 ** 2)


class EDMGaussianTarget:
    """Exact EDM denoiser D(x; sigma) = mu + std^2 / (std^2 + sigma^2) (x - mu) for data N(mu, std^2 I).

    Called as net(x, sigma, class_labels) like EDMPrecond / MaskDiT; forward_with_cfg(x, sigma, class_labels,
    cfg_scale) evaluates ONE 2N batch [y; null] (null label = the last row of a (K + 1, C) mu) and guides D.
    """

    def __init__(self, mu, std):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.std = float(std)
        self.calls = 0
        self.batch_sizes = []

    def _denoise(self, x, sigma, labels):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        m = _class_mean(self.mu, x, labels)
        return m + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x - m)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        return self._denoise(x, sigma, class_labels)

    def forward_with_cfg(self, x, sigma, class_labels, cfg_scale, **kwargs):
        self.calls += 1
        n = x.shape[0]
        null = torch.full_like(class_labels, self.mu.shape[0] - 1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(n)
        D = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null]))
        self.batch_sizes.append(2 * n)
        D_c, D_u = D[:n], D[n:]
        return D_u + cfg_scale * (D_c - D_u)

    def ode_solution(self, x, sigma_from, sigma_to=0.0, y=None):
        """Exact PF-ODE map of x from noise level sigma_from to sigma_to (x_sigma = x_data + sigma eps)."""
        m = _class_mean(self.mu, x, y)
        return _gaussian_ode_map(x, m, self.std ** 2 + sigma_from ** 2, m, self.std ** 2 + sigma_to ** 2)


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
        self.batch_sizes = []

    def _mean(self, x, y):
        return _class_mean(self.mu, x, y)

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
        self.batch_sizes.append(x.shape[0])
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
