"""EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Used by MaskDiT and SD-DiT (EDM preconditioning with sigma_data = 0.5, the EDM loss weight and Karras
schedule, and EDM's deterministic Heun sampler, Algorithm 2 of Karras et al. 2022).

Public API
----------
    SIGMA_DATA = 0.5
    edm_coefficients(sigma, sigma_data=0.5) -> (c_skip, c_out, c_in, c_noise)   same dtype/shape as sigma
    edm_loss_weight(sigma, sigma_data=0.5) -> lambda(sigma)
    sample_sigma(n, P_mean=-1.2, P_std=1.2, generator=None, device=None) -> (N,) fp32, ln sigma ~ N(P_mean, P_std^2)
    precondition(F, x, sigma, sigma_data=0.5) -> (D_x, c)                         D = c_skip x + c_out F(c_in x, c_noise)
    EDMPrecond(model, sigma_data=0.5, null_label=None)                           nn.Module wrapper around a raw F
        .forward(x, sigma, class_labels=None, **model_kwargs) -> D_x
        .forward_with_cfg(x, sigma, class_labels, cfg_scale, **model_kwargs) -> D_x (CFG on F, all channels)
    EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
        (net, y, class_labels=None, generator=None) -> dict(loss=(N,))          mean over C, H, W of lambda (D - y)^2
    edm_sigma_steps(num_steps=40, sigma_min=0.002, sigma_max=80, rho=7, device=None) -> (num_steps + 1,) fp64, last = 0
    edm_sampler(net, latents, class_labels=None, cfg_scale=1.0, num_steps=40, sigma_min=0.002, sigma_max=80,
                rho=7, S_churn=0, S_min=0, S_max=inf, S_noise=1, generator=None, return_nfe=False) -> x (N, C, H, W) fp64
    edm_dpm_solver_sampler(net, latents, class_labels=None, cfg_scale=1.0, num_steps=20, sigma_min=0.002,
                sigma_max=80, rho=7, order=2, return_nfe=False) -> x fp64       DPM-Solver++(2M): NFE = num_steps
    edm_unipc_sampler(net, latents, class_labels=None, cfg_scale=1.0, num_steps=20, sigma_min=0.002, sigma_max=80,
                rho=7, order=2, variant="bh2", lower_order_final=True, return_nfe=False) -> x fp64   UniPC: NFE = num_steps

Net protocol used by the loss and the sampler: ``net(x, sigma, class_labels) -> D_x`` (the preconditioned
denoiser, x and D_x of shape (N, C, H, W), sigma (N,) or a scalar tensor). For guidance the sampler calls
``net.forward_with_cfg(x, sigma, class_labels, cfg_scale)`` (MaskDiT, SD-DiT and EDMPrecond provide it).

Precision: the c_* coefficients and the skip connection are computed in fp32 (fp64 when x is fp64, as in the
sampler); only F runs in the network's dtype. The sampler integrates in fp64.
"""
import math

import torch
import torch.nn as nn

SIGMA_DATA = 0.5

__all__ = [
    "SIGMA_DATA",
    "edm_coefficients",
    "edm_loss_weight",
    "sample_sigma",
    "precondition",
    "EDMPrecond",
    "EDMLoss",
    "edm_sigma_steps",
    "edm_sampler",
    "edm_dpm_solver_sampler",
    "edm_unipc_sampler",
]


#################################################################################
#                               Preconditioning                                 #
#################################################################################

def edm_coefficients(sigma, sigma_data=SIGMA_DATA):
    """EDM preconditioning coefficients (EDM Table 1), elementwise in sigma's dtype.

    Returns (c_skip, c_out, c_in, c_noise) with c_noise = ln(sigma) / 4.
    """
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma, sigma_data=SIGMA_DATA):
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, so that lambda c_out^2 = 1."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigma(n, P_mean=-1.2, P_std=1.2, generator=None, device=None):
    """Training noise levels: ln sigma ~ N(P_mean, P_std^2), one per sample, (N,) fp32."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    rnd_normal = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return (rnd_normal * P_std + P_mean).exp()


def _coef_dtype(x):
    # fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (sampler state).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def broadcast_sigma(sigma, x):
    """sigma (scalar, 0-d or (N,)) -> (N,) tensor on x's device in the coefficient dtype."""
    dtype = _coef_dtype(x)
    sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
    if sigma.dim() == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def precondition(F, x, sigma, sigma_data=SIGMA_DATA):
    """D_x = c_skip x + c_out F(c_in x, c_noise).

    Args:
        F: callable (x_in (N, C, H, W) in x's dtype, c_noise (N,) fp32) -> F_x (N, C, H, W) (any float dtype).
        x: (N, C, H, W) noisy input. sigma: scalar or (N,).
    Returns:
        D_x in the coefficient dtype (fp32, or fp64 for fp64 x), and the coefficient tuple.
    """
    dtype = _coef_dtype(x)
    sigma = broadcast_sigma(sigma, x)                                  # (N,)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma.reshape(-1, 1, 1, 1), sigma_data)
    x32 = x.to(dtype)
    F_x = F((c_in * x32).to(x.dtype), c_noise.reshape(-1).float())
    D_x = c_skip * x32 + c_out * F_x.to(dtype)
    return D_x, (c_skip, c_out, c_in, c_noise)


class EDMPrecond(nn.Module):
    """EDM preconditioner around a raw network ``model(x_in, c_noise, class_labels, **kw) -> F_x``.

    State-dict keys carry a ``model.`` prefix (as in the public EDM/MaskDiT code). ``null_label`` is the
    label used for the unconditional CFG branch (None: a zero one-hot vector, i.e. zeros like class_labels).
    """

    def __init__(self, model, sigma_data=SIGMA_DATA, null_label=None):
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data
        self.null_label = null_label

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        D_x, _ = precondition(lambda x_in, c_noise: self.model(x_in, c_noise, class_labels, **model_kwargs),
                              x, sigma, self.sigma_data)
        return D_x

    def _null_like(self, class_labels):
        if self.null_label is None:
            return torch.zeros_like(class_labels)
        return torch.full_like(class_labels, self.null_label)

    def forward_with_cfg(self, x, sigma, class_labels, cfg_scale, **model_kwargs):
        """CFG inside the preconditioner: F = F_u + s (F_c - F_u) on all channels; one 2N-batch forward."""
        def F(x_in, c_noise):
            labels = torch.cat([class_labels, self._null_like(class_labels)])
            out = self.model(torch.cat([x_in, x_in]), torch.cat([c_noise, c_noise]), labels, **model_kwargs)
            F_c, F_u = out.chunk(2)
            return F_u + cfg_scale * (F_c - F_u)
        D_x, _ = precondition(F, x, sigma, self.sigma_data)
        return D_x


#################################################################################
#                                    Loss                                       #
#################################################################################

class EDMLoss:
    """EDM training loss: lambda(sigma) (D(y + n; sigma) - y)^2, averaged over C, H, W per sample.

    Called as ``loss(net, y, class_labels=None, generator=None)`` -> dict(loss=(N,), sigma=(N,)).
    """

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=SIGMA_DATA):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, y, class_labels=None, generator=None):
        sigma = sample_sigma(y.shape[0], self.P_mean, self.P_std, generator, y.device)  # (N,)
        weight = edm_loss_weight(sigma, self.sigma_data).reshape(-1, 1, 1, 1)
        n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * sigma.reshape(-1, 1, 1, 1).to(y.dtype)
        D_yn = net(y + n, sigma, class_labels)
        loss = weight * (D_yn.float() - y.float()) ** 2                              # (N, C, H, W)
        return dict(loss=loss.mean(dim=(1, 2, 3)), sigma=sigma)


#################################################################################
#                      Deterministic Heun sampler (EDM Alg. 2)                  #
#################################################################################

def edm_sigma_steps(num_steps=40, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N; t_N = 0. fp64."""
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    t_steps = (sigma_max ** (1 / rho) + step_indices / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0


@torch.no_grad()
def edm_sampler(
    net,
    latents,
    class_labels=None,
    cfg_scale=1.0,          # classifier-free guidance scale on F (all channels); 1 = conditional model only
    num_steps=40,           # MaskDiT evaluation: 40 steps = 79 NFE (EDM default 18)
    sigma_min=0.002,        # lowest noise level
    sigma_max=80.0,         # highest noise level
    rho=7.0,                # time-step exponent
    S_churn=0.0,            # stochasticity strength; 0 = deterministic
    S_min=0.0,              # churn only for S_min <= t_i <= S_max
    S_max=float("inf"),
    S_noise=1.0,            # churn noise inflation
    generator=None,         # torch.Generator for the churn noise (latents are passed in)
    return_nfe=False,       # also return the number of network evaluations
):
    """EDM Algorithm 2 (Heun, 2nd order) with optional churn. Returns the final state in fp64.

    Args:
        net: D_x = net(x, sigma, class_labels); with cfg_scale != 1, net.forward_with_cfg(x, sigma, y, s).
        latents: (N, C, H, W) standard normal; x_0 = latents * t_0.
        class_labels: passed through to the net ((N,) int or (N, K) one-hot), or None.
    """
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)  # (num_steps + 1,)
    # Churn decisions on host floats: no device sync inside the loop.
    t_host = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    gammas = [min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t <= S_max else 0.0 for t in t_host[:-1]]
    guided = cfg_scale != 1.0
    if guided and not hasattr(net, "forward_with_cfg"):
        raise ValueError("cfg_scale != 1 needs a net with forward_with_cfg(x, sigma, class_labels, cfg_scale)")
    nfe = 0

    def denoise(x, t):
        nonlocal nfe
        nfe += 1
        sigma = t.reshape(1).expand(x.shape[0])                            # (N,) fp64
        if guided:
            D = net.forward_with_cfg(x, sigma, class_labels, cfg_scale)
        else:
            D = net(x, sigma, class_labels)
        return D.to(torch.float64)

    # Integration state in fp64; the net casts to its own dtype inside the preconditioner.
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase noise temporarily (churn).
        gamma = gammas[i]
        if gamma > 0:
            t_hat = t_cur + gamma * t_cur
            eps = torch.randn(x_cur.shape, generator=generator, device=x_cur.device, dtype=torch.float64)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps
        else:
            t_hat, x_hat = t_cur, x_cur

        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun 2nd-order correction (not at the last step, where t_next = 0).
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return (x_next, nfe) if return_nfe else x_next


#################################################################################
#          DPM-Solver++ and UniPC multistep samplers (one evaluation per step)  #
#################################################################################

@torch.no_grad()
def edm_dpm_solver_sampler(
    net,
    latents,
    class_labels=None,
    cfg_scale=1.0,          # classifier-free guidance scale on F (all channels)
    num_steps=20,           # network evaluations (NFE)
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    order=2,                # 1 = EDM Euler, 2 = DPM-Solver++(2M), 3 = 3M
    return_nfe=False,
    third_order="taylor",   # or "reference": diffusers' 3M (dit_models.multistep.dpm_solver_plan)
):
    """DPM-Solver++ (Lu et al. 2022) on EDM's grid: ONE network evaluation per step. Returns the state in fp64.

    Same noise levels as edm_sampler with num_steps steps (edm_sigma_steps: sigma_max .. sigma_min, then 0), so
    NFE = num_steps instead of Heun's 2 num_steps - 1. In EDM's parametrisation alpha = 1 and the data prediction
    is D itself; the update is the exponential integrator of dit_models/multistep.py in lambda = -log sigma
    (order 1 is exactly EDM's Euler step). The last step, to sigma = 0, is first order.
    """
    from dit_models.multistep import dpm_solver_plan

    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()  # host floats (num_steps + 1,)
    return _edm_multistep(net, latents, class_labels, cfg_scale, sigmas,
                          dpm_solver_plan([1.0] * len(sigmas), sigmas, order, third_order), return_nfe)


@torch.no_grad()
def edm_unipc_sampler(
    net,
    latents,
    class_labels=None,
    cfg_scale=1.0,          # classifier-free guidance scale on F (all channels)
    num_steps=20,           # network evaluations (NFE)
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    order=2,                # UniPC-p: 1, 2 or 3
    variant="bh2",          # B(h): "bh1" (h) or "bh2" (1 - e^-h)
    lower_order_final=True,
    return_nfe=False,
):
    """UniPC (Zhao et al. 2023) on EDM's grid: ONE network evaluation per step. Returns the state in fp64.

    Same grid, denoiser calls and NFE (= num_steps) as edm_dpm_solver_sampler; the plan is
    dit_models/multistep.py:unipc_plan (predictor UniP-p, corrector UniC-p reusing the next step's evaluation).
    """
    from dit_models.multistep import unipc_plan

    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()  # host floats (num_steps + 1,)
    return _edm_multistep(net, latents, class_labels, cfg_scale, sigmas,
                          unipc_plan([1.0] * len(sigmas), sigmas, order, variant, lower_order_final), return_nfe)


def _edm_multistep(net, latents, class_labels, cfg_scale, sigmas, plan, return_nfe):
    """Run a multistep plan on the EDM grid sigmas (host floats): D is the data prediction (alpha = 1)."""
    from dit_models.multistep import multistep_sample

    t_steps = torch.tensor(sigmas, dtype=torch.float64, device=latents.device)
    guided = cfg_scale != 1.0
    if guided and not hasattr(net, "forward_with_cfg"):
        raise ValueError("cfg_scale != 1 needs a net with forward_with_cfg(x, sigma, class_labels, cfg_scale)")
    n = latents.shape[0]

    def denoise(x, i):
        sigma = t_steps[i].reshape(1).expand(n)                            # (N,) fp64, no host traffic
        D = net.forward_with_cfg(x, sigma, class_labels, cfg_scale) if guided else net(x, sigma, class_labels)
        return D.to(torch.float64)

    x = multistep_sample(latents.to(torch.float64) * sigmas[0], denoise, plan)
    return (x, len(plan)) if return_nfe else x
