"""Interpolation paths x_t = alpha_t * x1 + sigma_t * x0 of SiT.

t = 0 is noise (x0 ~ N(0, I)), t = 1 is data (x1). Every method takes t as a tensor (any shape, any
device and float dtype) and returns a tensor of the same shape, so the same code gives per-sample
coefficients during training (t of shape (N,)) and fp64 host coefficients for the samplers (the
whole time grid at once on the CPU, see sampler.py).

Besides alpha_t, sigma_t and their derivatives, each path gives the pieces of the probability-flow
ODE used by every conversion (B5):
    alpha_ratio(t) = d_alpha_t / alpha_t
    drift_var(t)   = alpha_ratio * sigma_t^2 - sigma_t * d_sigma_t
    velocity       = alpha_ratio * x + drift_var * score
and closed forms replace the generic expressions where the generic ones lose precision.
"""
import math

import torch

__all__ = ["Path", "LinearPath", "GVPPath", "VPPath", "expand_t"]


def expand_t(t, x):
    """Reshape per-sample t (N,) to broadcast against x (N, ...); scalars pass through."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Path:
    """Base class: subclasses define alpha_t, sigma_t, d_alpha_t, d_sigma_t."""

    name = "base"

    def alpha_t(self, t):
        raise NotImplementedError

    def sigma_t(self, t):
        raise NotImplementedError

    def d_alpha_t(self, t):
        raise NotImplementedError

    def d_sigma_t(self, t):
        raise NotImplementedError

    def alpha_ratio(self, t):
        """d_alpha_t / alpha_t (infinite where alpha_t = 0)."""
        return self.d_alpha_t(t) / self.alpha_t(t)

    def drift_var(self, t):
        """alpha_ratio * sigma^2 - sigma * d_sigma: the score coefficient of the PF-ODE drift."""
        sigma = self.sigma_t(t)
        return self.alpha_ratio(t) * sigma ** 2 - sigma * self.d_sigma_t(t)

    def velocity_ratio(self, t):
        """r = alpha_t / d_alpha_t (B5), used to turn a velocity into a score or a noise."""
        return self.alpha_t(t) / self.d_alpha_t(t)

    def score_denominator(self, t):
        """Delta = sigma^2 - r * d_sigma * sigma, so that score = (r * v - x) / Delta (B5)."""
        sigma = self.sigma_t(t)
        return sigma ** 2 - self.velocity_ratio(t) * self.d_sigma_t(t) * sigma

    def plan(self, t, x0, x1):
        """Return (x_t, u_t) for per-sample t (N,), noise x0 and data x1 (N, ...)."""
        te = expand_t(t, x1)
        xt = self.alpha_t(te) * x1 + self.sigma_t(te) * x0
        ut = self.d_alpha_t(te) * x1 + self.d_sigma_t(te) * x0
        return xt, ut


class LinearPath(Path):
    """alpha_t = t, sigma_t = 1 - t (SiT "Linear", the default)."""

    name = "Linear"

    def alpha_t(self, t):
        return t

    def sigma_t(self, t):
        return 1 - t

    def d_alpha_t(self, t):
        return torch.ones_like(t)

    def d_sigma_t(self, t):
        return -torch.ones_like(t)

    def alpha_ratio(self, t):
        return 1 / t

    def drift_var(self, t):
        return (1 - t) / t

    def velocity_ratio(self, t):
        return t

    def score_denominator(self, t):
        return 1 - t


class GVPPath(Path):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (SiT "GVP", variance preserving by construction)."""

    name = "GVP"

    def alpha_t(self, t):
        return torch.sin(t * (math.pi / 2))

    def sigma_t(self, t):
        return torch.cos(t * (math.pi / 2))

    def d_alpha_t(self, t):
        return (math.pi / 2) * torch.cos(t * (math.pi / 2))

    def d_sigma_t(self, t):
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))

    def alpha_ratio(self, t):
        return (math.pi / 2) / torch.tan(t * (math.pi / 2))

    def drift_var(self, t):
        return (math.pi / 2) / torch.tan(t * (math.pi / 2))

    def velocity_ratio(self, t):
        return torch.tan(t * (math.pi / 2)) / (math.pi / 2)

    def score_denominator(self, t):
        # cos^2 + tan * sin * cos = cos^2 + sin^2 ... = 1 up to rounding: use the exact value.
        return torch.ones_like(t)


class VPPath(Path):
    """Variance-preserving path of Song et al. run backwards in time (SiT "VP").

    alpha_t = exp(m(t)), sigma_t = sqrt(1 - exp(2 m(t))),
    m(t) = -1/4 (1 - t)^2 (beta_max - beta_min) - 1/2 (1 - t) beta_min, m'(t) = beta(t) / 2,
    beta(t) = beta_min + (1 - t)(beta_max - beta_min).
    """

    name = "VP"

    def __init__(self, beta_min=0.1, beta_max=20.0):
        self.beta_min = beta_min
        self.beta_max = beta_max

    def log_mean_coeff(self, t):
        """m(t) = log alpha_t."""
        return -0.25 * (1 - t) ** 2 * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def d_log_mean_coeff(self, t):
        """m'(t) = beta(t) / 2."""
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha_t(self, t):
        return torch.exp(self.log_mean_coeff(t))

    def sigma_t(self, t):
        # -expm1(2m) = 1 - exp(2m) without cancellation near t = 1.
        return torch.sqrt(-torch.expm1(2 * self.log_mean_coeff(t)))

    def d_alpha_t(self, t):
        return self.alpha_t(t) * self.d_log_mean_coeff(t)

    def d_sigma_t(self, t):
        return -torch.exp(2 * self.log_mean_coeff(t)) * self.d_log_mean_coeff(t) / self.sigma_t(t)

    def alpha_ratio(self, t):
        return self.d_log_mean_coeff(t)

    def drift_var(self, t):
        # m' sigma^2 + exp(2m) m' = m' because alpha^2 + sigma^2 = 1.
        return self.d_log_mean_coeff(t)

    def velocity_ratio(self, t):
        return 1 / self.d_log_mean_coeff(t)

    def score_denominator(self, t):
        # sigma^2 - sigma d_sigma / m' = sigma^2 + exp(2m) = 1.
        return torch.ones_like(t)
