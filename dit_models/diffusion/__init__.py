"""DiT's Gaussian diffusion: one factory, create_diffusion.

Typical use:
    diffusion = create_diffusion("")       # training: all 1000 steps, hybrid loss
    loss = diffusion.training_losses(model, x0, t, dict(y=y))["loss"].mean()
    diffusion = create_diffusion("250")    # sampling: 250 respaced DDPM steps (DiT sample.py)
    x0 = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                 model_kwargs=dict(y=y, cfg_scale=1.5, cfg_channels=3))
    x0 = diffusion.dpm_solver_sample_loop(lambda x, t, y: model.forward_guided(x, t, y, 1.5), z.shape, z,
                                          clip_denoised=False, model_kwargs=dict(y=y), num_steps=20)
                                           # DPM-Solver++(2M): 20 network evaluations
"""
from . import gaussian_diffusion as gd
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """Build DiT's diffusion (always a SpacedDiffusion).

    Args:
        timestep_respacing: "" or None -> all diffusion_steps; "250", "ddim50", "10,20,30", ... (A5).
        noise_schedule: "linear" (DiT) or "squaredcos_cap_v2".
        use_kl: train on the (rescaled) variational bound only.
        sigma_small: with learn_sigma=False, use the posterior variance instead of beta_t.
        predict_xstart: the network predicts x_0 instead of epsilon.
        learn_sigma: learned-range variance from channels C..2C-1 (DiT default).
        rescale_learned_sigmas: scale vb by T/1000 (identical at T = 1000).
        diffusion_steps: T.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
