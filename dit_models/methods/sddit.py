"""SD-DiT (Zhu et al. 2024): the MaskDiT backbone (no mask tokens) with a self-distillation loss.

Noise process and samplers: EDM, as MaskDiT (dit_models/methods/maskdit.py). Training: the EDM generative loss on
a student that sees 80 % of the tokens (mask ratio 0.2) plus lambda = 1 x a DINO-style discriminative loss between
the student's projection-head scores and those of an EMA teacher encoder on a near-clean view (sigma 0.002).
No released checkpoints.
"""
from dit_models.cli import nonnegative_float

from .base import Flag, Method, MethodUnavailable, given, unipc_options
from .maskdit import EDM_NFE_VARIANTS, EDM_PUBLISHED, EDM_SAMPLER_FLAGS, EDM_SAMPLERS, EDM_TRAIN_FLAGS, LossDictObjective, shrunk_decoder


def _models():
    from dit_models.models.sd_dit import SDDiT_models

    return SDDiT_models


def shrunk_heads(overrides):
    """Projection-head sizes for a narrowed model (the defaults 2048 / 256 / 8192 are sized for width 1152:
    a width-64 model would otherwise carry 14 M head parameters beside a 0.6 M backbone)."""
    width = overrides.get("hidden_size")
    if width is None:
        return {}
    return {"head_hidden_dim": min(2048, 4 * width), "head_bottleneck_dim": min(256, width),
            "head_out_dim": min(8192, 16 * width)}


def derived_size(cfg, overrides):
    """The decoder (as MaskDiT) and the projection heads follow the encoder overrides, unless given."""
    out = shrunk_decoder(cfg, overrides)
    out.update({k: v for k, v in shrunk_heads(overrides).items() if k not in cfg})
    return out


class SDDiTObjective(LossDictObjective):
    """EDM generative loss + teacher-student discriminative loss; the teacher follows the student after each step."""

    def __init__(self, args):
        try:
            from dit_models.models.sd_dit import SDDiTLoss
        except ImportError as e:
            raise MethodUnavailable(f"--method sddit is not available in this build: {e}") from e
        self.loss = SDDiTLoss(**given(args, dict(mask_ratio="mask_ratio", P_mean="P_mean", P_std="P_std",
                                                 dis_loss_coef="dis_loss_coef", label_dropout="class_dropout_prob")))

    def after_step(self, model, step, max_steps):
        from dit_models import utils

        self.loss.update_teacher(utils.unwrap(model), step, max_steps)


METHOD = Method(
    name="sddit",
    family="SD-DiT",
    models=_models,
    default_model="SD-DiT-XL/2",
    global_batch_size=1024,
    cuda_precision="bf16",
    train_defaults={"mask_ratio": 0.2},
    model_kwargs=lambda a: {},
    derived_size=derived_size,
    objective=SDDiTObjective,
    find_unused_parameters=True,
    published=EDM_PUBLISHED,
    # UniPC bh2, 20 NFE on EDM's Karras sigmas: on the digits SD-DiT (docs/results.md, issue 20) the lowest FD at
    # 10-20 NFE at cfg 1 (13.5 / 11.8 / 11.7 at 10 / 15 / 20 NFE, DPM-Solver++(2M) 14.1 / 12.1 / 11.8, EDM Heun with
    # 99 NFE 11.8). MaskDiT, on the same process, keeps DPM-Solver++(2M), which was as good there.
    fast=unipc_options(EDM_PUBLISHED, None),
    samplers=EDM_SAMPLERS,
    train_flags=EDM_TRAIN_FLAGS + (
        Flag(("--dis-loss-coef",), dict(type=nonnegative_float, default=None,
                                        help="sddit discriminative loss weight (default 1)")),),
    sampler_flags=EDM_SAMPLER_FLAGS,
    nfe_variants=EDM_NFE_VARIANTS,
)
