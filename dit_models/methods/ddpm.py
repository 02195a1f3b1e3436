"""DiT (Peebles & Xie 2023) trained as a DDPM: its models, loss, samplers and released checkpoints.

Noise process: linear beta schedule 1e-4 .. 0.02 over T = 1000 steps; the model predicts eps and (learn_sigma)
the interpolation v of its log variance between beta_t and the posterior variance. Training: t ~ U{0..T-1},
loss = MSE(eps) + the variational bound term (with a stop-gradient on the mean, Nichol & Dhariwal's hybrid loss).
Published sampler: 250 ancestral steps respaced evenly over the 1000 ("ddpm"); "ddim" on the same respacing.
"""
from dit_models.cli import nonnegative_float, positive_int

from .base import Flag, Method, Objective, SamplerSpec, fast_options, margs, network, steps_nfe, unipc_options


def _models():
    from dit_models.models.dit import DiT_models

    return DiT_models


def model_kwargs(a):
    """DiT/SiT drop labels in the model (class_dropout_prob) and may learn the variance (learn_sigma)."""
    kw = dict(class_dropout_prob=a.get("class_dropout_prob", 0.1))
    if a.get("learn_sigma") is not None:
        kw["learn_sigma"] = a["learn_sigma"]
    return kw


class DDPMObjective(Objective):
    """t ~ U{0..T-1}, hybrid MSE + VB loss with learned variance."""

    def __init__(self, args):
        from dit_models.diffusion import create_diffusion

        self.diffusion = create_diffusion(timestep_respacing="", noise_schedule=args.noise_schedule,
                                          learn_sigma=args.learn_sigma, diffusion_steps=args.diffusion_steps)

    def __call__(self, model, x, y, step):
        import torch

        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        d = self.diffusion.training_losses(model, x, t, dict(y=y))
        logs = {k: d[k].mean().detach() for k in ("mse", "vb") if k in d}
        return d["loss"].mean(), logs


# ---------------------------------------------------------------------------------------------- sampling

def _diffusion(model, opts, sampling, respacing):
    from dit_models.diffusion import create_diffusion

    a = sampling.method_args
    return create_diffusion(respacing, noise_schedule=margs(a, "noise_schedule", "linear"),
                            learn_sigma=getattr(model, "learn_sigma", True),
                            diffusion_steps=margs(a, "diffusion_steps", 1000))


def _loop_kwargs(z, y, sampling):
    return dict(noise=z, clip_denoised=False, model_kwargs=dict(y=y), device=z.device, generator=sampling.generator)


def run_ancestral(model, z, y, opts, sampling):
    diffusion = _diffusion(model, opts, sampling, str(int(opts["num_sampling_steps"])))
    return diffusion.p_sample_loop(network(model, sampling), z.shape, **_loop_kwargs(z, y, sampling))


def run_ddim(model, z, y, opts, sampling):
    diffusion = _diffusion(model, opts, sampling, str(int(opts["num_sampling_steps"])))
    return diffusion.ddim_sample_loop(network(model, sampling), z.shape, eta=float(opts.get("ddim_eta") or 0.0),
                                      **_loop_kwargs(z, y, sampling))


def run_dpm_solver(model, z, y, opts, sampling):
    diffusion = _diffusion(model, opts, sampling, "")  # DPM-Solver++ runs on the base schedule
    return diffusion.dpm_solver_sample_loop(network(model, sampling), z.shape, num_steps=int(opts["num_sampling_steps"]),
                                            order=int(opts.get("solver_order", 2)),
                                            time_spacing=opts.get("time_spacing") or "time_uniform",
                                            third_order=opts.get("third_order") or "taylor",
                                            **_loop_kwargs(z, y, sampling))


def run_unipc(model, z, y, opts, sampling):
    diffusion = _diffusion(model, opts, sampling, "")  # on the base schedule, as DPM-Solver++
    return diffusion.unipc_sample_loop(network(model, sampling), z.shape, num_steps=int(opts["num_sampling_steps"]),
                                       order=int(opts.get("solver_order", 2)), variant=opts.get("unipc_variant", "bh2"),
                                       time_spacing=opts.get("time_spacing") or "time_uniform",
                                       **_loop_kwargs(z, y, sampling))


# ---------------------------------------------------------------------------------------------- released files

def load_released_dit(cls, family):
    """Loader of released DiT/SiT files (raw state_dicts): the architecture is read off the tensor shapes
    (learn_sigma from final_layer, resolution from pos_embed); --num-heads for non-registry widths."""

    def load(ckpt, device, model_name=None, num_heads=None, image_size=None, num_classes=None):
        from dit_models.checkpoint import infer_config_from_state_dict, load_checkpoint

        cfg = infer_config_from_state_dict(ckpt)
        heads = num_heads or cfg["num_heads"]
        if heads is None:
            raise ValueError(f"hidden size {cfg['hidden_size']} is not a registry width: pass --num-heads")
        if image_size is not None and cfg["input_size"] != image_size // 8 and cfg["input_size"] != image_size:
            raise ValueError(f"checkpoint is for {cfg['input_size']}x{cfg['input_size']} latents ({cfg['input_size'] * 8}px), "
                             f"not --image-size {image_size}")
        if num_classes is not None and num_classes != cfg["num_classes"]:
            raise ValueError(f"checkpoint has {cfg['num_classes']} classes, not --num-classes {num_classes}")
        model = cls()(input_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                      hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=heads, mlp_ratio=cfg["mlp_ratio"],
                      num_classes=cfg["num_classes"], learn_sigma=cfg["learn_sigma"],
                      class_dropout_prob=0.1 if cfg["num_classes"] else 0.0)
        load_checkpoint(ckpt, model, which="ema")
        a = dict(cfg, model=f"{family}-{cfg['size_name']}" if cfg["size_name"] else None, data="imagenet",
                 data_kind="latents")
        return model.to(device).eval(), a

    return load


def _dit_class():
    from dit_models.models.dit import DiT

    return DiT


PUBLISHED = {"sampler": "ddpm", "num_sampling_steps": 250, "ddim_eta": 0.0}

METHOD = Method(
    name="ddpm",
    family="DiT",
    models=_models,
    default_model="DiT-XL/2",
    global_batch_size=256,
    cuda_precision="tf32",  # the reference train.py allows TF32 matmuls
    train_defaults={"learn_sigma": True},
    model_kwargs=model_kwargs,
    objective=DDPMObjective,
    published=PUBLISHED,
    # Uniform in t: evaluations from T - 1 down to t = 0, then the step to clean data; on the digits DiT it beat
    # uniform-logSNR and Karras grids at 10 and 20 NFE (docs/results.md).
    fast=fast_options(PUBLISHED, "time_uniform"),
    samplers={"ddpm": SamplerSpec(run_ancestral, steps_nfe),
              "ddim": SamplerSpec(run_ddim, steps_nfe, options=("ddim_eta",)),
              "dpm++": SamplerSpec(run_dpm_solver, steps_nfe, options=("solver_order", "time_spacing", "third_order")),
              "unipc": SamplerSpec(run_unipc, steps_nfe, unipc_options(PUBLISHED, "time_uniform"),
                                   ("solver_order", "time_spacing", "unipc_variant"))},
    load_released=load_released_dit(_dit_class, "DiT"),
    train_flags=(
        Flag(("--noise-schedule",), dict(default="linear", choices=["linear", "squaredcos_cap_v2"], help="ddpm")),
        Flag(("--diffusion-steps",), dict(type=positive_int, default=1000, help="ddpm: T")),
    ),
    eps_on_beta_schedule=True,
    nfe_variants={"ddpm": lambda nfe: dict(sampler="ddpm", num_sampling_steps=nfe),
                  "ddim": lambda nfe: dict(sampler="ddim", num_sampling_steps=nfe)},
    sampler_flags=(Flag(("--ddim-eta",), dict(type=nonnegative_float, default=None,
                                              help="ddim: eta (0 = deterministic)")),),
)
