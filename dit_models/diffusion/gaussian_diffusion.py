"""DiT's discrete Gaussian diffusion (DDPM / improved DDPM), as in the improved-diffusion code DiT ships.

Tables are float64 numpy arrays; per-sample lookups use float32 device copies of them (made once
per device), so sampling loops do no host<->device traffic besides launching kernels. Noise can come
from an optional torch.Generator on the sampling device.

Shape legend: N batch, C channels, H/W latent size; model output (N, 2C, H, W) = [eps | v] with
learned-range variance, else (N, C, H, W).
"""
import enum
import math

import numpy as np
import torch

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "GaussianDiffusion",
]


class ModelMeanType(enum.Enum):
    """What the network predicts for the mean."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise (DiT)


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()  # the network outputs log sigma^2
    FIXED_SMALL = enum.auto()  # clipped posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (first entry beta~_1)
    LEARNED_RANGE = enum.auto()  # interpolation between log beta_t and log beta~_t (DiT)


class LossType(enum.Enum):
    MSE = enum.auto()  # with learned variance: the hybrid mse + vb loss (DiT)
    RESCALED_MSE = enum.auto()  # vb scaled by T/1000
    KL = enum.auto()  # variational bound only
    RESCALED_KL = enum.auto()  # variational bound scaled by T

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta), float64."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """"linear" (DDPM, scaled so that T=1000 gives 1e-4..0.02) or "squaredcos_cap_v2" (cosine)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name!r}")


class GaussianDiffusion:
    """Training losses and samplers for a discrete diffusion process.

    Args:
        betas: (T,) float64 noise schedule, 0 < beta <= 1.
        model_mean_type, model_var_type, loss_type: the enums above.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: replace log(0) by log beta~_1 ("clipped").
        if len(self.posterior_variance) > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([])
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        self.log_betas = np.log(betas)
        # FIXED_LARGE: log of [beta~_1, beta_1, beta_2, ...]
        self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:])) if len(betas) > 1 else self.log_betas
        self._device_tables = {}

    # ------------------------------------------------------------------------------------------
    # Table lookups

    def _extract(self, name, t, ndim):
        """table[t] as float32 on t's device, shaped (N, 1, ..., 1) with `ndim` dims."""
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(np.asarray(getattr(self, name), dtype=np.float64)).to(t.device).float()
            self._device_tables[key] = table
        return table[t].view(-1, *([1] * (ndim - 1)))

    def _model_call(self, model, x, t, model_kwargs):
        """Hook: SpacedDiffusion maps spaced indices to original step numbers here."""
        return model(x, t, **(model_kwargs or {}))

    # ------------------------------------------------------------------------------------------
    # Forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.dim()) * x_start
        variance = self._extract("alphas_cumprod", t, x_start.dim())
        variance = 1.0 - variance
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.dim())
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None, generator=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        nd = x_start.dim()
        return self._extract("sqrt_alphas_cumprod", t, nd) * x_start + self._extract(
            "sqrt_one_minus_alphas_cumprod", t, nd
        ) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        nd = x_t.dim()
        mean = self._extract("posterior_mean_coef1", t, nd) * x_start + self._extract("posterior_mean_coef2", t, nd) * x_t
        variance = self._extract("posterior_variance", t, nd)
        log_variance = self._extract("posterior_log_variance_clipped", t, nd)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------------------
    # Model output -> p(x_{t-1} | x_t)

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, model_output=None):
        """Apply the model and return {"mean", "variance", "log_variance", "pred_xstart", "model_output"}.

        model_output: pass a precomputed network output to skip the call (used by the frozen-mean vb).
        """
        N, C = x.shape[:2]
        nd = x.dim()
        if model_output is None:
            model_output = self._model_call(model, x, t, model_kwargs)
        model_output = model_output.to(x.dtype)  # bf16 networks: the diffusion math runs in x's dtype

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned variance needs 2C = {2 * C} output channels, got {model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, nd)
                max_log = self._extract("log_betas", t, nd)
                frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [0, 1]; not clamped
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            name = "fixed_large_log_variance" if self.model_var_type == ModelVarType.FIXED_LARGE else "posterior_log_variance_clipped"
            model_log_variance = self._extract(name, t, nd).expand_as(x)
            model_variance = torch.exp(model_log_variance)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        else:  # PREVIOUS_X
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        nd = x_t.dim()
        return self._extract("sqrt_recip_alphas_cumprod", t, nd) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, nd) * eps

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # mean = c1 x_0 + c2 x_t  =>  x_0 = (xprev - c2 x_t) / c1
        nd = x_t.dim()
        c1 = self._extract("posterior_mean_coef1", t, nd)
        c2 = self._extract("posterior_mean_coef2", t, nd)
        return (xprev - c2 * x_t) / c1

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        nd = x_t.dim()
        return (self._extract("sqrt_recip_alphas_cumprod", t, nd) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, nd
        )

    # ------------------------------------------------------------------------------------------
    # Ancestral (DDPM) sampling

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generator=None, noise=None):
        """One step x_t -> x_{t-1} = mean + 1[t != 0] sigma z. Returns {"sample", "pred_xstart"}."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # no noise at t == 0
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator=None):
        """Sample from the model: K ancestral steps from x_K ~ N(0, I). Returns x_0 (shape)."""
        final = None
        for out in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator
        ):
            final = out
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False, generator=None):
        """Yield {"sample", "pred_xstart"} after every step (intermediates are not kept)."""
        device = _sampling_device(device, noise, generator, model)
        x = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        for i in _progress(range(self.num_timesteps)[::-1], progress):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, generator)
            yield out
            x = out["sample"]

    # ------------------------------------------------------------------------------------------
    # DDIM

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0,
                    generator=None, noise=None):
        """One DDIM step (Song et al. 2020): x <- sqrt(abar') x0^ + sqrt(1 - abar' - s^2) eps^ + s z."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        nd = x.dim()
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # consistent with a clipped x0^
        alpha_bar = self._extract("alphas_cumprod", t, nd)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, nd)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta != 0:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (nd - 1)))
            mean_pred = mean_pred + nonzero_mask * sigma * noise
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Deterministic DDIM inversion step x_t -> x_{t+1} (eta must be 0)."""
        if eta != 0.0:
            raise ValueError("reverse DDIM is deterministic: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.dim())
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, generator=None):
        """DDIM sampling over all (respaced) steps. Returns x_0 (shape)."""
        final = None
        for out in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta, generator
        ):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0, generator=None):
        device = _sampling_device(device, noise, generator, model)
        x = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        for i in _progress(range(self.num_timesteps)[::-1], progress):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, generator)
            yield out
            x = out["sample"]

    # ------------------------------------------------------------------------------------------
    # DPM-Solver++ and UniPC (multistep, one network evaluation per step; dit_models/multistep.py)

    def _solver_alphas_cumprod(self):
        """abar over the network's own time axis 0..T-1 (SpacedDiffusion: the base process)."""
        return self.alphas_cumprod

    def continuous_alphas_cumprod(self, t):
        """abar at real-valued model times t in [0, T-1]: log abar interpolated linearly between steps.

        This is the continuous-time view of a discrete DPM of Lu et al. (DPM-Solver, App. D) on the
        network's own step numbers; at integer t it is the table itself. t: float or numpy array.
        """
        log_abar = np.log(self._solver_alphas_cumprod())
        return np.exp(np.interp(t, np.arange(len(log_abar), dtype=np.float64), log_abar))

    def _time_of_log_snr(self, lam):
        """Inverse of lambda(t) = log(sqrt(abar) / sqrt(1 - abar)) on the interpolated schedule (numpy)."""
        log_abar = np.log(self._solver_alphas_cumprod())
        target = -np.logaddexp(0.0, -2.0 * np.asarray(lam, dtype=np.float64))  # log abar = -softplus(-2 lambda)
        # log abar decreases with t: interpolate on the reversed table.
        steps = np.arange(len(log_abar), dtype=np.float64)
        return np.interp(target, log_abar[::-1], steps[::-1])

    def solver_timesteps(self, num_steps, time_spacing="logSNR", t_max=None, t_min=0.0, denoise_final=True):
        """Model times (host floats, decreasing) at which DPM-Solver++ evaluates the network.

        num_steps evaluations; the first at t_max (default T - 1), the last at t_min (default 0), spaced
        uniformly in time ("time_uniform"), in log-SNR ("logSNR") or rho = 7 in sigma / alpha ("karras").
        With denoise_final the last step goes from t_min to clean data (sigma = 0, as DDPM and DDIM end:
        they return x0_hat at step 0); without it the grid gets one more point (t_min) and sampling ends
        there, so num_steps points precede it.
        """
        from dit_models.multistep import spaced_log_snrs

        T = len(self._solver_alphas_cumprod())
        t_max = float(T - 1 if t_max is None else t_max)
        if not 0.0 <= t_min < t_max <= T - 1:
            raise ValueError(f"need 0 <= t_min < t_max <= {T - 1}, got t_min={t_min}, t_max={t_max}")
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        n = num_steps if denoise_final else num_steps + 1
        if n == 1:
            return [t_max]
        if time_spacing == "time_uniform":
            return [t_max + i / (n - 1) * (t_min - t_max) for i in range(n)]
        abar = self.continuous_alphas_cumprod(np.array([t_max, t_min]))
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))
        ts = self._time_of_log_snr(spaced_log_snrs(time_spacing, n, float(lam[0]), float(lam[1])))
        ts = [float(v) for v in ts]
        ts[0], ts[-1] = t_max, float(t_min)  # exact ends
        return ts

    def dpm_solver_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                               device=None, progress=False, num_steps=20, order=2, time_spacing="time_uniform",
                               denoise_final=True, timesteps=None, generator=None, third_order="taylor"):
        """DPM-Solver++ (Lu et al. 2022; 2M by default) with ONE network evaluation per step. Returns x_0.

        The solver works on the continuous-time schedule of the network's own steps (see
        continuous_alphas_cumprod; for a SpacedDiffusion the base process, whatever the respacing) and calls
        the network with real-valued step numbers. The variance channels of a learned-sigma model are not
        used (the probability-flow ODE needs only the mean).

        Args:
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator: as in
                ddim_sample_loop (the generator only draws the initial noise).
            num_steps: network evaluations (NFE).
            order: 1 (= DDIM on the same grid), 2 (DPM-Solver++(2M)) or 3 (3M).
            third_order: "taylor" or "reference" (diffusers' 3M; dit_models.multistep.dpm_solver_plan).
            time_spacing: "time_uniform" (default; the best of the three on the digits DiT, docs/results.md),
                "logSNR" or "karras" (solver_timesteps).
            denoise_final: end with a step to sigma = 0 (x0_hat, as DDPM/DDIM); else stop at t_min = 0.
            timesteps: explicit decreasing model times to evaluate at (overrides num_steps/time_spacing);
                with denoise_final=False the last entry is the end point, not evaluated.
        """
        from dit_models.multistep import dpm_solver_plan

        return self._multistep_sample_loop("DPM-Solver++", lambda a, s: dpm_solver_plan(a, s, order, third_order), model, shape,
                                           noise, clip_denoised, denoised_fn, model_kwargs, device, progress,
                                           num_steps, time_spacing, denoise_final, timesteps, generator)

    def unipc_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                          device=None, progress=False, num_steps=20, order=2, variant="bh2", time_spacing="time_uniform",
                          denoise_final=True, timesteps=None, generator=None, lower_order_final=True):
        """UniPC (Zhao et al. 2023; bh2 UniPC-2 by default) with ONE network evaluation per step. Returns x_0.

        Same grid, model call and arguments as dpm_solver_sample_loop (dit_models/multistep.py:unipc_plan); with
        denoise_final and diffusers' integer time steps it reproduces UniPCMultistepScheduler(predict_x0=True,
        solver_type=variant, solver_order=order, lower_order_final=lower_order_final).

        Args:
            order: 1, 2 or 3 (UniPC-p: predictor order p, p + 1 with the corrector).
            variant: "bh1" or "bh2" (B(h) = h or 1 - e^-h).
            lower_order_final: lower the order on the last steps (diffusers' default).
            others: as dpm_solver_sample_loop.
        """
        from dit_models.multistep import unipc_plan

        return self._multistep_sample_loop(
            "UniPC", lambda a, s: unipc_plan(a, s, order, variant, lower_order_final), model, shape, noise,
            clip_denoised, denoised_fn, model_kwargs, device, progress, num_steps, time_spacing, denoise_final,
            timesteps, generator)

    def _multistep_sample_loop(self, name, make_plan, model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                               device, progress, num_steps, time_spacing, denoise_final, timesteps, generator):
        """The DPM-Solver++ / UniPC loop: grid, make_plan(alphas, sigmas), data prediction, multistep_sample."""
        from dit_models.multistep import multistep_sample

        if self.model_mean_type not in (ModelMeanType.EPSILON, ModelMeanType.START_X):
            raise ValueError(f"{name} needs an epsilon or x_0 predicting model")
        device = _sampling_device(device, noise, generator, model)
        x = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        if timesteps is None:
            timesteps = self.solver_timesteps(num_steps, time_spacing, denoise_final=denoise_final)
        timesteps = [float(t) for t in timesteps]
        abar = self.continuous_alphas_cumprod(np.array(timesteps))
        alphas, sigmas = np.sqrt(abar).tolist(), np.sqrt(1.0 - abar).tolist()
        if denoise_final:
            alphas, sigmas = alphas + [1.0], sigmas + [0.0]
        plan = make_plan(alphas, sigmas)
        N, C = x.shape[:2]
        tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t_table = torch.tensor(timesteps[:len(plan)], dtype=torch.float64)[:, None].expand(len(plan), N)
        t_table = t_table.to(tdtype).contiguous().to(device)  # (K, N): no host traffic inside the loop
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        model_kwargs = model_kwargs or {}

        def data_prediction(x, i):
            out = model(x, t_table[i], **model_kwargs)
            out = (out[:, :C] if learned else out).to(x.dtype)
            if self.model_mean_type == ModelMeanType.START_X:
                x0 = out
            else:  # x0 = (x - sigma eps) / alpha with host-float coefficients
                x0 = (out * (-sigmas[i] / alphas[i])).add_(x, alpha=1.0 / alphas[i])
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        with torch.no_grad():
            return multistep_sample(x, data_prediction, plan, progress=(lambda it: _progress(it, True)) if progress else None)

    # ------------------------------------------------------------------------------------------
    # Losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None, model_output=None):
        """L_t in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, None, model_kwargs, model_output=model_output)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, generator=None):
        """Per-sample training losses for a batch.

        Args:
            model: callable (x_t, t, **model_kwargs) -> (N, C_out, H, W).
            x_start: (N, C, H, W) clean latents. t: (N,) int64 step indices.
            model_kwargs: extra model arguments, e.g. {"y": labels}.
            noise: optional (N, C, H, W) epsilon (default: drawn on x_start's device, from
                `generator` when given).
        Returns:
            {"loss": (N,), "mse": (N,), "vb": (N,)}; "vb" (bits, mean frozen: only the variance
            channels get its gradient) is present with a learned variance; KL losses return "loss" only.
        """
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._model_call(model, x_t, t, model_kwargs).to(x_start.dtype)
        C = x_start.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned variance needs 2C = {2 * C} output channels, got {model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # vb learns the variance only: the mean (epsilon) is detached so mse alone trains it.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(None, x_start, x_t, t, clip_denoised=False, model_output=frozen_out)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ------------------------------------------------------------------------------------------
    # Likelihood

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (N,)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, torch.zeros_like(qt_mean), torch.zeros_like(qt_mean))
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, generator=None):
        """Full variational bound in bits per dim: {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}."""
        N = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps)[::-1]:
            t = torch.full((N,), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((self._predict_eps_from_xstart(x_t, t, out["pred_xstart"]) - noise) ** 2))
        vb = torch.stack(vb[::-1], dim=1)  # (N, K), index = step
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse[::-1], dim=1),
            "mse": torch.stack(mse[::-1], dim=1),
        }


def _sampling_device(device, noise, generator, model):
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    if generator is not None:
        return generator.device
    model = getattr(model, "__self__", model)  # a bound method such as model.forward_with_cfg
    params = getattr(model, "parameters", None)
    if params is not None:
        p = next(params(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def _progress(it, progress):
    if not progress:
        return it
    try:
        from tqdm.auto import tqdm

        return tqdm(it)
    except ImportError:  # tqdm is optional
        return it
