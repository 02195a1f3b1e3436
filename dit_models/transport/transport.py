"""SiT transport: prediction types, loss weights, time intervals, training loss and conversions.

The conversions between velocity, score and noise are all affine in
(x, network output) with coefficients that depend on t only, so they are exposed as coefficient
pairs (a, b) meaning  quantity = a * x + b * out.  The samplers build every update (ODE drift, SDE
drift v + D * s, last steps) from these pairs with ONE network evaluation per drift (fix D1#1).
"""
import enum
import math

import torch

from .path import GVPPath, LinearPath, VPPath, expand_t

__all__ = ["ModelType", "PathType", "WeightType", "Transport", "create_transport", "mean_flat", "SBDM_T0"]

# Smallest start time used by the "SBDM" diffusion form when the interval would start at t = 0,
# where its coefficient D(t) = drift_var(t) is infinite (Linear, GVP): fix D1#5.
SBDM_T0 = 1e-3


class ModelType(enum.Enum):
    """What the network predicts."""

    VELOCITY = "velocity"
    SCORE = "score"
    NOISE = "noise"


class PathType(enum.Enum):
    """Interpolation path between noise (t = 0) and data (t = 1)."""

    LINEAR = "Linear"
    GVP = "GVP"
    VP = "VP"


class WeightType(enum.Enum):
    """Loss weight for score/noise predictions (ignored for velocity)."""

    NONE = None
    VELOCITY = "velocity"
    LIKELIHOOD = "likelihood"


_PATHS = {PathType.LINEAR: LinearPath, PathType.GVP: GVPPath, PathType.VP: VPPath}


def mean_flat(x):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _enum(cls, value, what):
    if isinstance(value, cls):
        return value
    for member in cls:
        if member.value == value or (isinstance(value, str) and isinstance(member.value, str)
                                     and member.value.lower() == value.lower()):
            return member
    choices = [m.value for m in cls]
    raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")


class Transport:
    """A path plus a prediction type, loss weight and the eps that keep t away from singular ends.

    Args:
        model_type: ModelType. path_type: PathType. loss_type: WeightType.
        train_eps, sample_eps: floats (use create_transport for the defaults).
    """

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps):
        self.model_type = model_type
        self.path_type = path_type
        self.loss_type = loss_type
        self.train_eps = float(train_eps)
        self.sample_eps = float(sample_eps)
        self.path_sampler = _PATHS[path_type]()

    @property
    def path(self):
        return self.path_sampler

    def __repr__(self):
        return (f"Transport(path={self.path_type.value}, prediction={self.model_type.value}, "
                f"loss_weight={self.loss_type.value}, train_eps={self.train_eps}, sample_eps={self.sample_eps})")

    # ------------------------------------------------------------------ time interval (B4)

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, reverse=False,
                       eval=False, last_step_size=0.0):
        """Return (t0, t1), the time interval for training (eval=False) or sampling (eval=True).

        Rules of B4; h = last_step_size (0 when there is no last step):
          VP: t1 = 1 - eps if (ODE or h == 0) else 1 - h.
          Linear/GVP, only when prediction != velocity or SDE: t0 = eps if ((SDE and SBDM) or
            prediction != velocity) else 0; t1 = 1 - eps if (ODE or h == 0) else 1 - h.
          reverse: (t0, t1) <- (1 - t0, 1 - t1).
        Fix D1#5: SDE with the SBDM form on Linear/GVP starts at SBDM_T0 = 1e-3 when eps is 0 (the
        velocity default), because D(t) = drift_var(t) is infinite at t = 0 (the public code gives NaN).
        """
        t0, t1 = 0.0, 1.0
        eps = sample_eps if eval else train_eps
        sbdm = sde and str(diffusion_form).upper() == "SBDM"
        if self.path_type == PathType.VP:
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        elif self.model_type != ModelType.VELOCITY or sde:
            t0 = eps if (sbdm or self.model_type != ModelType.VELOCITY) else 0.0
            if sbdm and t0 <= 0:
                t0 = SBDM_T0
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    # ------------------------------------------------------------------ training (B1, B3)

    def sample(self, x1, generator=None):
        """Draw (t (N,), x0 ~ N(0, I) like x1, x1) on x1's device; t ~ U[t0, t1] per sample."""
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        tdtype = torch.float64 if x1.dtype == torch.float64 else torch.float32
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=tdtype) * (t1 - t0) + t0
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        return t, x0, x1

    def training_losses(self, model, x1, model_kwargs=None, generator=None):
        """Per-sample training loss (B3).

        Args:
            model: callable model(x_t, t, **model_kwargs) -> prediction shaped like x1.
            x1: (N, C, H, W) data latents. model_kwargs: e.g. {"y": labels}.
            generator: optional torch.Generator on x1's device for t and the noise (device-side).
        Returns:
            {"loss": (N,), "pred": model output, "t": (N,)}.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        t, x0, x1 = self.sample(x1, generator=generator)
        xt, ut = self.path.plan(t, x0, x1)
        out = model(xt, t, **model_kwargs)
        if out.shape != xt.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} must equal the input shape {tuple(xt.shape)} "
                             "(drop learned-sigma channels before the transport loss)")
        if self.model_type == ModelType.VELOCITY:
            loss = mean_flat((out - ut) ** 2)
        else:
            te = expand_t(t, x1)
            sigma = self.path.sigma_t(te)
            if self.loss_type == WeightType.VELOCITY:
                weight = (self.path.drift_var(te) / sigma) ** 2
            elif self.loss_type == WeightType.LIKELIHOOD:
                weight = self.path.drift_var(te) / sigma ** 2
            else:
                weight = 1.0
            if self.model_type == ModelType.NOISE:
                loss = mean_flat(weight * (out - x0) ** 2)
            else:
                loss = mean_flat(weight * (sigma * out + x0) ** 2)
        return {"loss": loss, "pred": out, "t": t}

    @staticmethod
    def prior_logp(z):
        """log N(z; 0, I) per sample, in nats: -(d/2) ln(2 pi) - |z|^2 / 2 (B8)."""
        d = z[0].numel()
        return -0.5 * d * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(1)

    # ------------------------------------------------------------------ conversions (B5)

    def velocity_coeffs(self, t):
        """(a, b) with velocity = a * x + b * out for this prediction type."""
        p = self.path
        if self.model_type == ModelType.VELOCITY:
            return torch.zeros_like(t), torch.ones_like(t)
        if self.model_type == ModelType.SCORE:
            return p.alpha_ratio(t), p.drift_var(t)
        return p.alpha_ratio(t), -p.drift_var(t) / p.sigma_t(t)

    def score_coeffs(self, t):
        """(a, b) with score = a * x + b * out: s = (r v - x) / Delta, s = s_theta, s = -eps / sigma."""
        p = self.path
        if self.model_type == ModelType.VELOCITY:
            delta = p.score_denominator(t)
            return -1 / delta, p.velocity_ratio(t) / delta
        if self.model_type == ModelType.SCORE:
            return torch.zeros_like(t), torch.ones_like(t)
        return torch.zeros_like(t), -1 / p.sigma_t(t)

    def noise_coeffs(self, t):
        """(a, b) with noise = a * x + b * out (noise = -sigma * score)."""
        a, b = self.score_coeffs(t)
        sigma = self.path.sigma_t(t)
        return -sigma * a, -sigma * b

    def drift_coeffs(self, t, diffusion=None):
        """(a, b) with f = v + D * s = a * x + b * out; D = 0 (or None) gives the PF-ODE drift."""
        a_v, b_v = self.velocity_coeffs(t)
        if diffusion is None:
            return a_v, b_v
        a_s, b_s = self.score_coeffs(t)
        diffusion = torch.as_tensor(diffusion, dtype=t.dtype, device=t.device).expand_as(t)
        # where(): D = 0 must give exactly the ODE drift even where the score coefficients are infinite.
        zero = diffusion == 0
        return (torch.where(zero, a_v, a_v + diffusion * a_s), torch.where(zero, b_v, b_v + diffusion * b_s))

    def tweedie_coeffs(self, t):
        """(a, b) with E[x1 | x_t] = x / alpha + sigma^2 / alpha * s = a * x + b * out.

        Velocity models use the equivalent x1 = (sigma v - d_sigma x) / (sigma d_alpha - d_sigma alpha)
        (solve x = alpha x1 + sigma x0, v = d_alpha x1 + d_sigma x0), which stays finite at alpha = 0
        (t = 0 on the Linear / GVP paths: E[x1 | x_0] = x + v there).
        """
        p = self.path
        alpha, sigma = p.alpha_t(t), p.sigma_t(t)
        if self.model_type == ModelType.VELOCITY:
            d_alpha, d_sigma = p.d_alpha_t(t), p.d_sigma_t(t)
            w = sigma * d_alpha - d_sigma * alpha  # > 0 on every path
            return -d_sigma / w, sigma / w
        a_s, b_s = self.score_coeffs(t)
        return 1 / alpha + sigma ** 2 / alpha * a_s, sigma ** 2 / alpha * b_s

    def _apply(self, coeffs_fn, model, x, t, model_kwargs):
        out = model(x, t, **model_kwargs)
        a, b = coeffs_fn(t.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
        c = x.shape[1]
        return expand_t(a, x).to(x.dtype) * x + expand_t(b, x).to(x.dtype) * out[:, :c].to(x.dtype)

    def get_drift(self):
        """PF-ODE drift fn(x, t (N,), model, **kwargs) -> v, one network call (B5 `get_drift`)."""
        return lambda x, t, model, **kw: self._apply(self.velocity_coeffs, model, x, t, kw)

    def get_score(self):
        """Score fn(x, t (N,), model, **kwargs) -> s, one network call (B5 `get_score`)."""
        return lambda x, t, model, **kw: self._apply(self.score_coeffs, model, x, t, kw)

    def get_noise(self):
        """Noise fn(x, t (N,), model, **kwargs) -> eps prediction, one network call."""
        return lambda x, t, model, **kw: self._apply(self.noise_coeffs, model, x, t, kw)

    def get_tweedie(self):
        """Denoiser fn(x, t (N,), model, **kwargs) -> E[x1 | x_t], per-sample alpha, sigma (fix D1#7)."""
        return lambda x, t, model, **kw: self._apply(self.tweedie_coeffs, model, x, t, kw)


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None,
                     sample_eps=None):
    """Build a Transport with SiT's choices (prediction, loss weight, train/sample eps defaults).

    Args:
        path_type: "Linear" (default), "GVP" or "VP".
        prediction: "velocity" (default), "score" or "noise".
        loss_weight: None, "velocity" or "likelihood" (only used for score/noise predictions).
        train_eps, sample_eps: keep t away from singular ends. Defaults: VP 1e-5 / 1e-3; Linear/GVP with
            score or noise 1e-3 / 1e-3; Linear/GVP with velocity both forced to 0 (arguments ignored, as
            in SiT). Unlike SiT, each eps takes its default independently (fix D1#6): SiT leaves
            sample_eps = None when only train_eps is given.
    """
    model_type = _enum(ModelType, prediction, "prediction")
    path = _enum(PathType, path_type, "path_type")
    loss_type = _enum(WeightType, loss_weight, "loss_weight")
    if path == PathType.VP:
        train_eps = 1e-5 if train_eps is None else train_eps
        sample_eps = 1e-3 if sample_eps is None else sample_eps
    elif model_type != ModelType.VELOCITY:
        train_eps = 1e-3 if train_eps is None else train_eps
        sample_eps = 1e-3 if sample_eps is None else sample_eps
    else:
        train_eps, sample_eps = 0.0, 0.0
    return Transport(model_type=model_type, path_type=path, loss_type=loss_type, train_eps=train_eps,
                     sample_eps=sample_eps)
