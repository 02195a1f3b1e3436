"""MaskDiT (Zheng et al. 2024): an encoder-decoder DiT with EDM preconditioning, trained on half the tokens.

Noise process (EDM, Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2), D(x; sigma) = c_skip x + c_out F(c_in x,
ln(sigma) / 4) with sigma_data = 0.5. Training: denoising loss on the visible tokens (mask ratio 0.5) plus 0.1 x
an MAE loss on the masked ones. Published sampler: EDM's Heun (Algorithm 2) on 40 Karras steps (sigma 80 ->
0.002, rho 7) = 79 network evaluations (Euler on the last step to sigma = 0), no churn.
"""
import torch

from dit_models.cli import finite_float, fraction_below_one, nonnegative_float, positive_float

from .base import Flag, Method, MethodUnavailable, Objective, SamplerSpec, fast_options, given, network, steps_nfe, unipc_options


def _models():
    from dit_models.models.maskdit import MaskDiT_models

    return MaskDiT_models


def shrunk_decoder(cfg, overrides):
    """Decoder size that follows encoder overrides: no wider than the encoder (its heads), no deeper. The public
    MaskDiT decoder is 8 x 512 under every encoder; a 4 x 64 encoder then gets a 4 x 64 decoder, not 8 x 512."""
    if "decoder_hidden_size" not in cfg or any(k.startswith("decoder_") for k in overrides):
        return {}
    out = {}
    if "hidden_size" in overrides and overrides["hidden_size"] < cfg["decoder_hidden_size"]:
        out["decoder_hidden_size"] = overrides["hidden_size"]
        out["decoder_num_heads"] = overrides.get("num_heads", cfg.get("num_heads", cfg.get("decoder_num_heads")))
    elif "num_heads" in overrides and cfg["decoder_hidden_size"] % overrides["num_heads"] == 0:
        out["decoder_num_heads"] = min(overrides["num_heads"], cfg.get("decoder_num_heads", overrides["num_heads"]))
    if "depth" in overrides and overrides["depth"] < cfg.get("decoder_depth", 0):
        out["decoder_depth"] = overrides["depth"]
    return out


class LossDictObjective(Objective):
    """Objectives whose loss object returns {"loss": (N,), <terms>...}: log the mean of every term."""

    def __call__(self, model, x, y, step):
        d = self.loss(model, x, y, step=step)
        logs = {k: v.mean().detach() for k, v in d.items() if k != "loss" and torch.is_tensor(v) and v.is_floating_point()}
        return d["loss"].mean(), logs


class MaskDiTObjective(LossDictObjective):
    """EDM denoising loss on visible tokens + 0.1 x MAE on masked tokens."""

    def __init__(self, args):
        try:
            from dit_models.models.maskdit import MaskDiTLoss
        except ImportError as e:
            raise MethodUnavailable(f"--method maskdit is not available in this build: {e}") from e
        self.loss = MaskDiTLoss(**given(args, dict(mask_ratio="mask_ratio", mae_loss_coef="mae_loss_coef",
                                                   P_mean="P_mean", P_std="P_std", label_dropout="class_dropout_prob")))


# ---------------------------------------------------------------------------------------------- sampling

def run_edm(model, z, y, opts, sampling):
    """EDM Heun (with churn S_churn); guidance on all channels of F inside the preconditioner."""
    from dit_models.edm import edm_sampler

    net = network(model, sampling, guided_channels=False)
    return edm_sampler(net, z, class_labels=y, num_steps=int(opts["num_sampling_steps"]), sigma_min=opts["sigma_min"],
                       sigma_max=opts["sigma_max"], rho=opts["rho"], S_churn=opts["S_churn"], S_min=opts["S_min"],
                       S_max=opts["S_max"], S_noise=opts["S_noise"], generator=sampling.generator).float()


def run_dpm_solver(model, z, y, opts, sampling):
    """DPM-Solver++ on EDM's own Karras sigma grid (rho 7)."""
    from dit_models.edm import edm_dpm_solver_sampler

    net = network(model, sampling, guided_channels=False)
    return edm_dpm_solver_sampler(net, z, class_labels=y, num_steps=int(opts["num_sampling_steps"]),
                                  sigma_min=opts["sigma_min"], sigma_max=opts["sigma_max"], rho=opts["rho"],
                                  order=int(opts.get("solver_order", 2)),
                                  third_order=opts.get("third_order") or "taylor").float()


def run_unipc(model, z, y, opts, sampling):
    """UniPC on EDM's own Karras sigma grid (rho 7), as DPM-Solver++."""
    from dit_models.edm import edm_unipc_sampler

    net = network(model, sampling, guided_channels=False)
    return edm_unipc_sampler(net, z, class_labels=y, num_steps=int(opts["num_sampling_steps"]),
                             sigma_min=opts["sigma_min"], sigma_max=opts["sigma_max"], rho=opts["rho"],
                             order=int(opts.get("solver_order", 2)), variant=opts.get("unipc_variant", "bh2")).float()


def edm_nfe(opts):
    """Heun: two evaluations per step, one (Euler) on the last step to sigma = 0."""
    return 2 * int(opts["num_sampling_steps"]) - 1


def load_released(ckpt, device, model_name=None, num_heads=None, image_size=None, num_classes=None):
    """A released MaskDiT file ({"model", "ema", ...} in the public EDMPrecond layout); --model names its size."""
    from dit_models.models.maskdit import MaskDiT_models, load_maskdit_checkpoint

    name = model_name or "MaskDiT-XL/2"
    size = (image_size or 256) // 8
    model = MaskDiT_models[name](input_size=size, num_classes=num_classes or 1000, in_channels=4)
    load_maskdit_checkpoint(model, ckpt, key="ema")
    a = dict(model=name, input_size=size, in_channels=4, num_classes=model.num_classes, data="imagenet",
             data_kind="latents")
    return model.to(device).eval(), a


EDM_PUBLISHED = {"sampler": "edm", "num_sampling_steps": 40, "sigma_min": 0.002, "sigma_max": 80.0,
                 "rho": 7.0, "S_churn": 0.0, "S_min": 0.0, "S_max": float("inf"), "S_noise": 1.0}
EDM_SAMPLERS = {
    "edm": SamplerSpec(run_edm, edm_nfe,
                       options=("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise")),
    "dpm++": SamplerSpec(run_dpm_solver, steps_nfe,
                         options=("sigma_min", "sigma_max", "rho", "solver_order", "third_order")),
    "unipc": SamplerSpec(run_unipc, steps_nfe, unipc_options(EDM_PUBLISHED, None),
                         ("sigma_min", "sigma_max", "rho", "solver_order", "unipc_variant")),
}
EDM_NFE_VARIANTS = {"heun": lambda nfe: dict(sampler="edm", num_sampling_steps=max(2, (nfe + 1) // 2))}
EDM_SAMPLER_FLAGS = (
    Flag(("--S-churn",), dict(type=nonnegative_float, default=None, help="edm churn (0 = deterministic)")),
    Flag(("--sigma-min",), dict(type=positive_float, default=None, help="edm (0.002)")),
    Flag(("--sigma-max",), dict(type=positive_float, default=None, help="edm (80)")),
    Flag(("--rho",), dict(type=positive_float, default=None, help="edm (7)")),
)
EDM_TRAIN_FLAGS = (
    Flag(("--mask-ratio",), dict(type=fraction_below_one, default=None, help="maskdit 0.5 / sddit 0.2 by default")),
    Flag(("--P-mean",), dict(type=finite_float, default=None, help="edm: ln sigma mean (-1.2)")),
    Flag(("--P-std",), dict(type=positive_float, default=None, help="edm: ln sigma std (1.2)")),
)

METHOD = Method(
    name="maskdit",
    family="MaskDiT",
    models=_models,
    default_model="MaskDiT-XL/2",
    global_batch_size=1024,
    cuda_precision="bf16",
    train_defaults={"mask_ratio": 0.5},
    model_kwargs=lambda a: {},  # labels are dropped in the loss; no learned variance
    derived_size=shrunk_decoder,
    objective=MaskDiTObjective,
    find_unused_parameters=True,
    published=EDM_PUBLISHED,
    fast=fast_options(EDM_PUBLISHED, None),  # EDM steps on its own Karras sigma grid
    samplers=EDM_SAMPLERS,
    load_released=load_released,
    train_flags=EDM_TRAIN_FLAGS + (
        Flag(("--mae-loss-coef",), dict(type=nonnegative_float, default=None, help="maskdit MAE weight (paper: 0.1)")),),
    sampler_flags=EDM_SAMPLER_FLAGS,
    nfe_variants=EDM_NFE_VARIANTS,
)
