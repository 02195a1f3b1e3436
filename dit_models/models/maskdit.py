"""MaskDiT: Fast Training of Diffusion Models with Masked Transformers (Zheng et al., TMLR 2024, arXiv 2306.09305).

An asymmetric encoder-decoder DiT with EDM preconditioning inside (sigma_data = 0.5): during
masked training the encoder (DiT blocks) sees only the kept tokens; a bridge (`DecoderLayer`) maps them to the
decoder width, learnable mask tokens fill the removed positions, and a small decoder (8 x 512) predicts F for
all tokens. Evaluation/sampling processes all tokens; no masking outside train mode.

Public API (used by dit_models/train.py, method "maskdit", and the samplers)
-------------------------------------------------------------------------
    MaskDiT_models: {"MaskDiT-{S,B,L,XL}/{2,4}", "MaskDiT-H/2"} -> factory(**kwargs) -> MaskDiT
    MaskDiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4,
            num_classes=1000, decoder_hidden_size=512, decoder_depth=8, decoder_num_heads=16, sigma_data=0.5,
            fused=None, attn_backend="sdpa")
        .forward(x, sigma, class_labels=None, mask_ratio=0.0, generator=None, return_mask=False)
            -> D_x (N, C, H, W) fp32 [, mask (N, T) float 1 = removed, or None]
        .forward_with_cfg(x, sigma, class_labels, cfg_scale) -> D_x   (CFG on F, all channels, 2N-batch forward)
        .network(x_in, c_noise, class_labels, ids_keep=None, ids_restore=None) -> F_x (the raw network)
    MaskDiTLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5, mask_ratio=0.5, mae_loss_coef=0.1,
                mask_ratio_fn="constant", mask_ratio_min=0.0, mask_ratio_start_step=0, max_steps=None,
                label_dropout=0.1, norm_pix_eps=1e-6)
        (model, x, y, step=None, generator=None) -> dict(loss=(N,), dsm=(N,), mae=(N,), sigma=(N,), mask_ratio=float)
        Unmask fine-tuning: MaskDiTLoss(mask_ratio=0.0).
    get_mask_ratio_fn(name="constant", ratio_scale=0.5, ratio_min=0.0) -> fn(x in [0, 1]) -> ratio
    maskdit_loss_terms(D_yn, y, yn, sigma, mask, patch_size, sigma_data=0.5, norm_pix_eps=1e-6) -> (dsm, mae)
    convert_maskdit_checkpoint(ckpt, key="ema") -> state_dict for MaskDiT.load_state_dict (unknown keys raise)
    load_maskdit_checkpoint(model, ckpt_or_path, key="ema") -> checkpoint object (always strict)
    export_maskdit_checkpoint(ema, model=None) -> {"model", "ema"} in the public EDMPrecond layout

Labels: class_labels may be (N,) int64 in [0, num_classes] (num_classes = null) or a (N, K) one-hot float
tensor (all-zero row = null); None means null for every sample. Label dropout (CFG training, p = 0.1) is done
by MaskDiTLoss with its generator, not by the model.

Checkpoint layout (Anima-Lab/MaskDiT; at 256 px the label embedding is a bias-free Linear (1152, 1000) on one-hot
labels, the bridge Linear(1152 -> 2 x 1152) + Linear(1152 -> 512), the mask token (1, 1, 512)). The reference wraps the
network in an EDMPrecond whose only state is the network under ``model.``; its train.py saves
{"model", "ema", "opt", "args"} and its sampling scripts read ckpt["ema"]. Inside ``model.`` the names are this
module's state_dict names, one for one: x_embedder.proj.*, pos_embed, t_embedder.mlp.{0,2}.*,
y_embedder.embedding_table.weight (a bias-free Linear, shape (D, K)), blocks.{i}.* (DiT block keys),
decoder_layer.{linear,adaLN_modulation.1}.* (the bridge, named as in the reference), mask_token,
decoder_pos_embed, decoder_blocks.{i}.*, final_layer.*. Loading is strict both ways: a key outside this layout
raises (the reference's optional hooks pad_cls_token / ext_feature_dim / use_encoder_feat add keys and are off in
every released file), and so does a missing one: a file trained with mae_loss_coef = 0 (no mask_token) is
not a released layout. export_maskdit_checkpoint writes the public layout back.

Shape legend: N batch, C channels, H/W latent size, p patch, T tokens, K kept tokens, D encoder width,
Dd decoder width.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import dit_kernels
from dit_models.checkpoint import describe_keys, load_state_dict_strict, read_checkpoint
from dit_models.edm import SIGMA_DATA, edm_loss_weight, precondition, sample_sigma
from dit_models.guidance import cfg_mix
from dit_models.models.dit import SIZES as DIT_SIZES
from dit_models.models.dit import (
    DiTBlock,
    FinalLayer,
    PatchEmbed,
    TimestepEmbedder,
    branch_dtype,
    get_2d_sincos_pos_embed,
    modulate,
    run_dit_trunk,
    size_registry,
)

__all__ = [
    "OneHotLabelEmbedder",
    "DecoderLayer",
    "EncoderDecoderDiT",
    "MaskDiT",
    "MaskDiTLoss",
    "maskdit_loss_terms",
    "get_mask_ratio_fn",
    "convert_maskdit_checkpoint",
    "export_maskdit_checkpoint",
    "load_maskdit_checkpoint",
    "MaskDiT_models",
    "SIZES",
    "DECODER",
]


#################################################################################
#                                 Building blocks                               #
#################################################################################

class OneHotLabelEmbedder(nn.Module):
    """Bias-free Linear(K -> D) on a one-hot label; the null label (all-zero vector) embeds to exactly 0."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Linear(num_classes, hidden_size, bias=False)

    def forward(self, one_hot):
        return self.embedding_table(one_hot.to(self.embedding_table.weight.dtype))  # (N, D)


class DecoderLayer(nn.Module):
    """MaskDiT bridge: LN (no affine) -> modulate with (shift, scale) = Linear(SiLU(c)) -> Linear(D -> Dd)."""

    def __init__(self, hidden_size, decoder_hidden_size, cond_size=None):
        super().__init__()
        cond_size = hidden_size if cond_size is None else cond_size
        self.norm_decoder = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, decoder_hidden_size, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, fused=False):
        """x (N, T, D), c (N, D_c) -> (N, T, Dd)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        if fused:
            if shift.dtype not in (x.dtype, torch.float32):
                shift, scale = shift.to(x.dtype), scale.to(x.dtype)
            h = dit_kernels.modulated_layer_norm(x, shift, scale, out_dtype=branch_dtype(x))  # (N, T, D)
        else:
            h = modulate(self.norm_decoder(x), shift, scale)  # (N, T, D)
        return self.linear(h)  # (N, T, Dd)


def labels_to_one_hot(class_labels, num_classes, batch, device):
    """(N,) int labels (num_classes = null) / (N, K) one-hot / None -> (N, K) float one-hot (null = zeros)."""
    if class_labels is None:
        return torch.zeros(batch, num_classes, device=device)
    if class_labels.dim() == 2:
        return class_labels
    if class_labels.dtype.is_floating_point:
        raise TypeError("class_labels must be int64 (N,) labels or a (N, K) one-hot tensor")
    return F.one_hot(class_labels.long(), num_classes + 1)[:, :num_classes].float()  # null row -> zeros


def drop_labels(class_labels, drop, num_classes):
    """Replace labels by the null label where drop (N,) bool is True (int: num_classes, one-hot: zeros)."""
    if class_labels is None:
        return None
    if class_labels.dim() == 2:
        return class_labels * (~drop).to(class_labels.dtype).unsqueeze(1)
    return torch.where(drop, torch.full_like(class_labels, num_classes), class_labels)


#################################################################################
#                      Encoder-decoder DiT with EDM preconditioning             #
#################################################################################

class EncoderDecoderDiT(nn.Module):
    """Shared MaskDiT / SD-DiT backbone: DiT encoder, bridge, small DiT decoder, EDM preconditioning.

    Subclasses implement ``network(x_in, c_noise, class_labels, ...)`` (the raw F).
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        decoder_hidden_size=512,
        decoder_depth=8,
        decoder_num_heads=16,
        sigma_data=SIGMA_DATA,
        fused=None,
        attn_backend="sdpa",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels  # learn_sigma = False (EDM)
        self.hidden_size = hidden_size
        self.decoder_hidden_size = decoder_hidden_size
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.fused = dit_kernels.HAS_EXT if fused is None else bool(fused)
        self.num_patches = (input_size // patch_size) ** 2

        # Encoder (DiT trunk) and its embedders.
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = OneHotLabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, attn_backend=attn_backend) for _ in range(depth)]
        )

        # Bridge and decoder; the decoder's adaLN reads the encoder-width conditioning c. The bridge keeps the
        # reference's name (decoder_layer.*) so state_dict() is the public layout both ways.
        self.decoder_layer = DecoderLayer(hidden_size, decoder_hidden_size)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, decoder_hidden_size), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                DiTBlock(decoder_hidden_size, decoder_num_heads, mlp_ratio=mlp_ratio, cond_size=hidden_size,
                         attn_backend=attn_backend)
                for _ in range(decoder_depth)
            ]
        )
        self.final_layer = FinalLayer(decoder_hidden_size, patch_size, self.out_channels, cond_size=hidden_size)

    def initialize_weights(self):
        """DiT scheme (Xavier-uniform Linears, normal(0.02) embedders, fixed sin-cos pos-embeds); zero init for all
        adaLN outputs, both bridge Linears, final layer."""
        if self.pos_embed.device.type == "meta":  # shape-only construction (parameter counting)
            return

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Fixed sin-cos tables for encoder and decoder widths.
        g = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.hidden_size, g)).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(get_2d_sincos_pos_embed(self.decoder_hidden_size, g)).float().unsqueeze(0)
        )

        # Patch embedding as a Linear on its (D, C*p*p) view.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Every block (encoder and decoder) starts as the identity.
        for block in list(self.blocks) + list(self.decoder_blocks):
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Bridge and output layers start at zero.
        for lin in (self.decoder_layer.adaLN_modulation[-1], self.decoder_layer.linear,
                    self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.constant_(lin.weight, 0)
            nn.init.constant_(lin.bias, 0)

    # ------------------------------------------------------------------------------------------
    # Pieces shared by MaskDiT and SD-DiT

    def embed_tokens(self, x_in):
        """c_in x (N, C, H, W) -> patch tokens + fixed pos-embed (N, T, D). Masking happens after this."""
        N, _, H, W = x_in.shape
        if H != self.input_size or W != self.input_size:
            raise ValueError(f"model built for {self.input_size}x{self.input_size} latents, got {H}x{W}")
        x_in = x_in.to(self.x_embedder.proj.weight.dtype)
        return self.x_embedder(x_in, fused=self.fused) + self.pos_embed  # (N, T, D)

    def embed_condition(self, c_noise, class_labels):
        """c = TimestepEmbedder(c_noise) + LabelEmbedder(one-hot y): (N,), labels -> (N, D)."""
        c = self.t_embedder(c_noise)  # (N, D), fp32 sinusoid
        if self.y_embedder is not None:
            one_hot = labels_to_one_hot(class_labels, self.num_classes, c_noise.shape[0], c_noise.device)
            c = c + self.y_embedder(one_hot)  # (N, D)
        return c

    def encode(self, x, c):
        """Encoder blocks then the bridge's modulated LN. x (N, K, D) -> (residual (N, K, D), h (N, K, D))."""
        return run_dit_trunk(self.blocks, x, c, final_adaLN=self.decoder_layer.adaLN_modulation, fused=self.fused)

    def gather(self, x, ids_keep):
        """Kept rows x[n, ids_keep[n]]: (N, T, D) -> (N, K, D)."""
        if self.fused:
            return dit_kernels.gather_tokens(x, ids_keep)
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # reference: (N, K, D) index

    def decode(self, x, c, height, width):
        """Decoder input (N, T, Dd) in token order -> F_x (N, C, H, W)."""
        x = x + self.decoder_pos_embed  # (N, T, Dd)
        p = self.patch_size
        if self.fused:
            _, h = run_dit_trunk(self.decoder_blocks, x, c, final_adaLN=self.final_layer.adaLN_modulation)
            out = self.final_layer.linear(h)  # (N, T, p*p*C)
            return dit_kernels.unpatchify(out, p, height, width)  # (N, C, H, W)
        for block in self.decoder_blocks:
            x = block(x, c)  # (N, T, Dd)
        out = self.final_layer(x, c)  # (N, T, p*p*C)
        return dit_kernels.unpatchify_ref(out, p, height, width)  # (N, C, H, W)

    def network(self, x_in, c_noise, class_labels, **kwargs):
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # EDM-preconditioned denoiser D(x; sigma)

    def forward_with_cfg(self, x, sigma, class_labels, cfg_scale, cfg_channels=None):
        """Classifier-free guidance inside the preconditioner, on F (all C channels by default, as published).

        x: (N, C, H, W) (N rows of state; the 2N network batch [x; x] with labels [y; null] is built here);
        class_labels for the conditional branch; the unconditional branch uses the null label (a zero one-hot
        row). cfg_channels: guide F's first channels only (None = all). Returns guided D_x (N, C, H, W).
        """
        if self.y_embedder is None:
            raise ValueError("forward_with_cfg needs a class-conditional model (num_classes > 0)")
        N = x.shape[0]
        labels = labels_to_one_hot(class_labels, self.num_classes, N, x.device)
        labels = torch.cat([labels, torch.zeros_like(labels)])  # [y; null]

        def F_cfg(x_in, c_noise):
            out = self.network(torch.cat([x_in, x_in]), torch.cat([c_noise, c_noise]), labels)  # (2N, C, H, W)
            F_c, F_u = out.float().chunk(2)
            return cfg_mix(F_c, F_u, cfg_scale, cfg_channels)

        return precondition(F_cfg, x, sigma, self.sigma_data)[0]

    def forward_guided(self, x, sigma, class_labels, cfg_scale, cfg_channels=None):
        """The sampling contract shared with DiT/SiT: guided output for an N-row state (see forward_with_cfg,
        which is already on the unduplicated batch here)."""
        return self.forward_with_cfg(x, sigma, class_labels, cfg_scale, cfg_channels)


class MaskDiT(EncoderDecoderDiT):
    """MaskDiT: EDM-preconditioned asymmetric encoder-decoder DiT with mask tokens filling the removed positions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.decoder_hidden_size))
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()
        if self.pos_embed.device.type != "meta":
            nn.init.normal_(self.mask_token, std=0.02)

    def unmask_tokens(self, x, ids_keep, ids_restore):
        """Bridge outputs of the kept tokens (N, K, Dd) -> length-T sequence with mask tokens elsewhere."""
        N, K, Dd = x.shape
        T = ids_restore.shape[1]
        if self.fused:
            # out[n, ids_keep[n, k]] = x[n, k]; mask_token at every removed position (one row-scatter).
            # The fp32 token goes in as is: its gradient (a sum over N (T - K) rows) accumulates in fp32.
            return dit_kernels.scatter_tokens(x, ids_keep, self.mask_token, length=T)  # (N, T, Dd)
        # Reference: append T - K mask tokens after the kept ones, then un-shuffle with ids_restore.
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(N, T - K, Dd)], dim=1)  # (N, T, Dd) shuffled order
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # (N, T, Dd)

    def network(self, x_in, c_noise, class_labels, ids_keep=None, ids_restore=None):
        """The raw network F.

        Args:
            x_in: (N, C, H, W) = c_in x. c_noise: (N,) = ln(sigma) / 4. class_labels: see module docstring.
            ids_keep (N, K), ids_restore (N, T): masking indices (random_token_mask), or None for all tokens.
        Returns:
            F_x (N, C, H, W).
        """
        N, _, H, W = x_in.shape
        x = self.embed_tokens(x_in)  # (N, T, D)
        c = self.embed_condition(c_noise, class_labels)  # (N, D)
        if ids_keep is not None:
            x = self.gather(x, ids_keep)  # (N, K, D)
        if self.fused:
            _, h = self.encode(x, c)  # (N, K, D) modulated LN of the encoder output
            x = self.decoder_layer.linear(h)  # (N, K, Dd)
        else:
            for block in self.blocks:
                x = block(x, c)  # (N, K, D)
            x = self.decoder_layer(x, c)  # (N, K, Dd)
        if ids_keep is not None:
            x = self.unmask_tokens(x, ids_keep, ids_restore)  # (N, T, Dd)
        return self.decode(x, c, H, W)  # (N, C, H, W)

    def forward(self, x, sigma, class_labels=None, mask_ratio=0.0, generator=None, return_mask=False):
        """D(x; sigma, y) = c_skip x + c_out F(c_in x, ln(sigma)/4, y).

        Args:
            x: (N, C, H, W) noisy latents (any float dtype; fp64 from the sampler).
            sigma: (N,) or scalar noise level.
            class_labels: (N,) int64 (num_classes = null), (N, K) one-hot, or None (null).
            mask_ratio: fraction r of tokens removed; used only in train mode and when r > 0.
            generator: torch.Generator for the token shuffle.
            return_mask: also return the mask (N, T) float (1 = removed), or None when not masking.
        Returns:
            D_x (N, C, H, W) in fp32 (fp64 for fp64 x) [, mask].
        """
        ids_keep = ids_restore = mask = None
        if self.training and mask_ratio > 0:
            N, T = x.shape[0], self.num_patches
            len_keep = int(T * (1 - mask_ratio))
            ids_keep, ids_restore, mask = dit_kernels.random_token_mask(N, T, len_keep, generator=generator,
                                                                        device=x.device)

        def F_x(x_in, c_noise):
            return self.network(x_in, c_noise, class_labels, ids_keep, ids_restore)

        D_x, _ = precondition(F_x, x, sigma, self.sigma_data)
        return (D_x, mask) if return_mask else D_x


#################################################################################
#                                    Loss                                       #
#################################################################################

def get_mask_ratio_fn(name="constant", ratio_scale=0.5, ratio_min=0.0):
    """Mask-ratio schedule r(x), x = (step - start) / max_steps clamped to [0, 1] (the reference's schedules).

    constant: r; cosine2..cosine6 (alias cos2..cos6): (r - r_min) cos(pi x / 2)^k + r_min;
    exp: (r - r_min) e^(-7x) + r_min; linear: (r - r_min)(1 - x) + r_min.
    """
    if name.startswith("cos") and not name.startswith("cosine"):
        name = "cosine" + name[3:]  # the reference's cos4 config names a schedule it rejects; accept it
    if name == "constant":
        return lambda x: ratio_scale
    if name.startswith("cosine") and name[6:] in {"2", "3", "4", "5", "6"}:
        k = int(name[6:])
        return lambda x: (ratio_scale - ratio_min) * math.cos(math.pi * x / 2) ** k + ratio_min
    if name == "exp":
        return lambda x: (ratio_scale - ratio_min) * math.exp(-7 * x) + ratio_min
    if name == "linear":
        return lambda x: (ratio_scale - ratio_min) * (1 - x) + ratio_min
    raise ValueError(f"unknown mask ratio schedule {name!r} (constant, cosine2..cosine6, exp, linear)")


def patchify_output_layout(x, patch_size):
    """(N, C, H, W) -> (N, T, p*p*C) with features in (a, b, c) order, channel fastest (MAE `patchify`)."""
    N, C, H, W = x.shape
    p = patch_size
    x = x.reshape(N, C, H // p, p, W // p, p)  # (N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
    return x.reshape(N, (H // p) * (W // p), p * p * C)  # (N, T, p*p*C)


def maskdit_loss_terms(D_yn, y, yn, sigma, mask, patch_size, sigma_data=SIGMA_DATA, norm_pix_eps=1e-6):
    """Per-sample DSM and MAE terms of the MaskDiT loss (DSM on the visible tokens, MAE on the masked ones).

    Args:
        D_yn: (N, C, H, W) preconditioned output D(y + n; sigma). y: clean latents. yn: noisy input y + n.
        sigma: (N,). mask: (N, T) float, 1 = removed, or None (no masking).
    Returns:
        dsm (N,): lambda(sigma)-weighted squared error averaged over the visible tokens.
        mae (N,): MSE between patchify(D) and the per-patch-normalized patchify(y + n) over the masked
            tokens (unbiased variance, eps 1e-6, no lambda); zeros without masking.
    """
    D_yn, y, yn = D_yn.float(), y.float(), yn.float()
    weight = edm_loss_weight(sigma.float(), sigma_data).reshape(-1, 1, 1, 1)
    e = weight * (D_yn - y) ** 2  # (N, C, H, W)
    if mask is None:
        return e.mean(dim=(1, 2, 3)), torch.zeros_like(e[:, 0, 0, 0])
    # One value per token (row-major): mean over channels, then average-pool each p x p patch.
    per_token = F.avg_pool2d(e.mean(dim=1, keepdim=True), patch_size, patch_size).flatten(1)  # (N, T)
    visible = 1 - mask
    dsm = (per_token * visible).sum(1) / visible.sum(1).clamp_min(1)

    target = patchify_output_layout(yn, patch_size)  # (N, T, p*p*C)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, unbiased=True, keepdim=True)
    target = (target - mean) / (var + norm_pix_eps) ** 0.5
    pred = patchify_output_layout(D_yn, patch_size)  # (N, T, p*p*C), not normalized
    mae_tok = ((pred - target) ** 2).mean(dim=-1)  # (N, T)
    mae = (mae_tok * mask).sum(1) / mask.sum(1).clamp_min(1)
    return dsm, mae


def _unwrap(model):
    """The underlying module of a DDP / torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class MaskDiTLoss:
    """MaskDiT training objective: DSM on visible tokens + mae_loss_coef x MAE on masked tokens.

    Called as ``loss(model, x, y, step=None, generator=None)``:
        x: (N, C, H, W) clean latents; y: (N,) int64 labels or (N, K) one-hot (or None).
        step: training step for the mask-ratio schedule (None = start of the schedule).
        generator: torch.Generator on x's device for sigma, noise, label dropout and the mask
            (drawn in this order).
    Returns dict(loss=(N,), dsm=(N,), mae=(N,), sigma=(N,), mask_ratio=float); train on loss.mean().
    """

    def __init__(
        self,
        P_mean=-1.2,                    # ln sigma ~ N(P_mean, P_std^2)
        P_std=1.2,
        sigma_data=SIGMA_DATA,
        mask_ratio=0.5,                 # r; 0.0 = unmask fine-tuning (full-image DSM)
        mae_loss_coef=0.1,              # weight of the MAE term
        mask_ratio_fn="constant",       # schedule name, see get_mask_ratio_fn
        mask_ratio_min=0.0,             # r_min of the schedules
        mask_ratio_start_step=0,        # schedule x = (step - start) / max_steps
        max_steps=None,                 # needed by non-constant schedules
        label_dropout=0.1,              # CFG: probability of the null label per sample
        norm_pix_eps=1e-6,              # per-patch normalization of the MAE target
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.mask_ratio = mask_ratio
        self.mae_loss_coef = mae_loss_coef
        self.mask_ratio_schedule = get_mask_ratio_fn(mask_ratio_fn, mask_ratio, mask_ratio_min)
        self.mask_ratio_fn = mask_ratio_fn
        self.mask_ratio_start_step = mask_ratio_start_step
        self.max_steps = max_steps
        self.label_dropout = label_dropout
        self.norm_pix_eps = norm_pix_eps
        if mask_ratio_fn != "constant" and not max_steps:
            raise ValueError(f"mask_ratio_fn={mask_ratio_fn!r} needs max_steps")

    def mask_ratio_at(self, step=None):
        """Mask ratio at a training step."""
        if step is None or self.mask_ratio_fn == "constant":
            return self.mask_ratio_schedule(0.0)
        x = min(max((step - self.mask_ratio_start_step) / self.max_steps, 0.0), 1.0)
        return self.mask_ratio_schedule(x)

    def __call__(self, model, x, y, step=None, generator=None):
        N, device = x.shape[0], x.device
        net = _unwrap(model)
        sigma = sample_sigma(N, self.P_mean, self.P_std, generator, device)  # (N,)
        n = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32) * sigma.reshape(-1, 1, 1, 1)
        yn = x.float() + n  # (N, C, H, W)
        if y is not None and self.label_dropout > 0:
            drop = torch.rand(N, generator=generator, device=device) < self.label_dropout
            y = drop_labels(y, drop, net.num_classes)
        r = self.mask_ratio_at(step)
        D_yn, mask = model(yn.to(x.dtype), sigma, y, mask_ratio=r, generator=generator, return_mask=True)
        dsm, mae = maskdit_loss_terms(D_yn, x, yn, sigma, mask, net.patch_size, self.sigma_data, self.norm_pix_eps)
        loss = dsm + self.mae_loss_coef * mae
        if mask is None and getattr(net, "mask_token", None) is not None:
            loss = loss + 0 * net.mask_token.sum()  # DDP: keep the unused mask token in the graph
        return dict(loss=loss, dsm=dsm, mae=mae, sigma=sigma, mask_ratio=r if mask is not None else 0.0)


#################################################################################
#                               Checkpoint loading                              #
#################################################################################

# The public layout (Anima-Lab/MaskDiT EDMPrecond with the released options: use_decoder, mae_loss_coef > 0,
# no pad_cls_token / ext_feature_dim / use_encoder_feat) after the "model." prefix: exactly this module's names.
_PUBLIC_KEY = re.compile(
    r"pos_embed|decoder_pos_embed|mask_token"
    r"|x_embedder\.proj\.(weight|bias)"
    r"|t_embedder\.mlp\.[02]\.(weight|bias)"
    r"|y_embedder\.embedding_table\.weight"
    r"|(blocks|decoder_blocks)\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)\.(weight|bias)"
    r"|(decoder_layer|final_layer)\.(linear|adaLN_modulation\.1)\.(weight|bias)"
)
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")  # EDMPrecond, DDP / Accelerate, torch.compile


def _select_weights(ckpt, key):
    """A state dict out of a state dict, an nn.Module, or a container holding one under `key`."""
    if isinstance(ckpt, nn.Module):
        return ckpt.state_dict()
    if not isinstance(ckpt, dict):
        raise TypeError(f"expected a MaskDiT state dict or checkpoint dict, got {type(ckpt).__name__}")
    if any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    if key in ckpt:
        weights = ckpt[key]
    elif key == "ema" and any(k in ckpt for k in ("model", "net", "state_dict")):
        weights = ckpt[next(k for k in ("model", "net", "state_dict") if k in ckpt)]  # no EMA saved: raw weights
    else:
        raise KeyError(f"checkpoint has no {key!r} weights; it holds keys {sorted(ckpt)}")
    return weights.state_dict() if isinstance(weights, nn.Module) else weights


def convert_maskdit_checkpoint(ckpt, key="ema"):
    """Public MaskDiT checkpoint (EDMPrecond state dict, keys under ``model.``) -> MaskDiT state dict.

    ckpt: a state dict (bare EDMPrecond, or this module's names), an nn.Module, or a container such as
    {"model", "ema", "opt", "args"} holding one under `key` ("ema" for sampling, "model" to resume; a
    container without "ema" falls back to "model"). Prefixes "model." / "module." / "_orig_mod." are stripped.
    Raises ValueError naming every key that is not part of the MaskDiT layout (never dropped silently).
    """
    out, unmapped = {}, []
    for k, v in _select_weights(ckpt, key).items():
        name = k
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if not _PUBLIC_KEY.fullmatch(name):
            unmapped.append(k)
        out[name] = v
    if unmapped:
        raise ValueError(
            f"checkpoint key(s) {describe_keys(unmapped)} are not part of the MaskDiT layout; the reference's optional"
            " hooks (pad_cls_token, ext_feature_dim, use_encoder_feat) are off in every released file and not supported"
        )
    return out


def export_maskdit_checkpoint(ema, model=None):
    """MaskDiT weights -> the public layout {"model": ..., "ema": ...} of EDMPrecond state dicts (keys under
    ``model.``), as Anima-Lab/MaskDiT train.py writes them (without "opt" / "args") and its sampling and
    fine-tuning scripts read them. ``export_maskdit_checkpoint(w)["ema"]`` alone is the bare EDMPrecond form.

    ema, model: MaskDiT modules, state dicts (this module's names or public) or containers; model defaults to ema.
    E.g. export_maskdit_checkpoint(ckpt["ema"], ckpt["model"]) for a dit_models.train checkpoint.
    """
    def public(weights):
        return {f"model.{k}": v.detach().cpu() for k, v in convert_maskdit_checkpoint(weights).items()}

    ema_sd = public(ema)
    return {"model": ema_sd if model is None else public(model), "ema": ema_sd}


def _maskdit_hint(key):
    if key in ("pos_embed", "decoder_pos_embed"):
        return ("one row per token: the checkpoint is for another resolution or patch size (build the model with the"
                " matching input_size: 32 for 256 px, 64 for 512 px)")
    if key.startswith("y_embedder"):
        return "the one-hot label Linear is (hidden, num_classes) without a null row: num_classes differs"
    if key == "mask_token":
        return "the reference creates mask_token only when mae_loss_coef > 0 (0.1 in every released file)"
    if key.startswith("decoder_"):
        return "the decoder differs (released files: 8 blocks x 512 wide)"
    if key.startswith("final_layer.linear"):
        return "final_layer.linear has p*p*C rows (no learned sigma in MaskDiT): patch size or in_channels differ"
    return "the model configuration (registry size, depth, hidden size) differs from the checkpoint's"


def load_maskdit_checkpoint(model, ckpt_or_path, key="ema"):
    """Load a public or self-trained MaskDiT checkpoint into `model`, strictly (map_location="cpu").

    Every checkpoint key must map to a model key and every model key must be present with the same shape;
    otherwise a ValueError names the key(s). Returns the loaded checkpoint object (e.g. the container).
    """
    ckpt = read_checkpoint(ckpt_or_path)
    load_state_dict_strict(model, convert_maskdit_checkpoint(ckpt, key), hint=_maskdit_hint)
    return ckpt


#################################################################################
#                                MaskDiT Configs                                #
#################################################################################

# The DiT sizes plus H (depth 32, width 1280, 16 heads), patches 2 and 4 (H: 2 only); every size has the
# public 8 x 512 decoder with 16 heads.
DECODER = dict(decoder_depth=8, decoder_hidden_size=512, decoder_num_heads=16)
SIZES = {"H": dict(depth=32, hidden_size=1280, num_heads=16), **DIT_SIZES}

MaskDiT_models = {
    **size_registry(MaskDiT, "MaskDiT", {"H": SIZES["H"]}, (2,), **DECODER),
    **size_registry(MaskDiT, "MaskDiT", DIT_SIZES, (2, 4), **DECODER),
}
