"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, arXiv 2212.09748).

Checkpoint-compatible with the released DiT-XL/2 files (292 float32 tensors at depth 28, under the public names:
fused attn.qkv, adaLN_modulation.1 after the SiLU, t_embedder.mlp.0/.2, mlp.fc1/fc2, y_embedder.embedding_table
of K + 1 rows, no LayerNorm keys), with two
code paths over the same parameters:
- fused=False: plain PyTorch, written like the reference model (``DiTBlock.forward``).
- fused=True:  dit_kernels ops: patchify + GEMM patch embedding, cross-block fused
  "gated residual + modulated LayerNorm" chaining through the trunk, unpatchify kernel.
``model.fused`` is a plain attribute and may be toggled at any time.

Shape legend: N batch, C latent channels, H/W latent size, p patch, h = H/p, w = W/p,
T = h*w tokens, D hidden, nh heads, hd = D/nh head dim, C_out = 2C if learn_sigma else C.

Reusable trunk (MaskDiT / SD-DiT build their encoder and decoder on it)::

    run_dit_trunk(blocks, x, c, final_adaLN=None, fused=True) -> (x, h_final)
        blocks:      sequence of DiTBlock (any hidden size D; conditioning width may differ).
        x:           (N, T, D) tokens (residual stream).
        c:           (N, D_c) conditioning vector.
        final_adaLN: None, a module mapping c -> (N, 2D) (SiLU + Linear, split as (shift, scale)),
                     or an explicit (shift, scale) pair of (N, D) tensors.
        fused:       True -> dit_kernels chaining, False -> block(x, c) one after another.
        Returns x (N, T, D) after the last block, and h_final = modulate(LN(x), shift, scale)
        (N, T, D) when final_adaLN is given, else None.

Precision: the timestep embedding is always computed in fp32 (also under autocast and for a
model cast to bf16) and cast to the model dtype afterwards; LN statistics and modulation run in
fp32 inside the kernels (and in F.layer_norm under autocast). Under bf16 autocast the residual
stream stays fp32, as in the reference model under autocast; the fused path then hands the
kernels the bf16 attention/MLP outputs as they are and takes h back in bf16 for the next Linear
(the ops' "branch dtype"), so no cast pass or fp32 copy of a branch is made.
"""
import math
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dit_kernels
from dit_models.guidance import cfg_mix

try:  # optional; used only with attn_backend="flash_attn"
    from flash_attn import flash_attn_qkvpacked_func

    HAS_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_qkvpacked_func = None
    HAS_FLASH_ATTN = False

__all__ = [
    "modulate",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "DiTBlock",
    "FinalLayer",
    "DiT",
    "run_dit_trunk",
    "branch_dtype",
    "get_2d_sincos_pos_embed",
    "get_1d_sincos_pos_embed_from_grid",
    "DiT_models",
    "SIZES",
    "size_registry",
]

ATTN_BACKENDS = ("sdpa", "flash_attn")


def modulate(x, shift, scale):
    """x * (1 + scale) + shift, with (N, D) shift/scale broadcast over the T tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoid [cos | sin] (256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding (N,) -> (N, dim) in fp32; cosine block first, then sine.

        t may be fractional (SiT's t in [0, 1], MaskDiT's ln(sigma)/4).
        """
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )  # (half,)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        # fp32 even for a bf16 model or under autocast: t ~ 999 needs more than bf16's 8 mantissa bits.
        dtype = self.mlp[0].weight.dtype
        with torch.autocast(t.device.type, enabled=False):
            t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
            lin0, lin2 = self.mlp[0], self.mlp[2]
            h = F.linear(t_freq, lin0.weight.float(), lin0.bias.float())  # (N, D)
            h = F.linear(F.silu(h), lin2.weight.float(), lin2.bias.float())  # (N, D)
        return h.to(dtype)


class LabelEmbedder(nn.Module):
    """Embeds class labels; drops labels to the null class (= num_classes) for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null label: Bernoulli(dropout_prob) per sample, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


class PatchEmbed(nn.Module):
    """Image to patch tokens: Conv2d(C -> D, kernel = stride = p), flattened row-major (timm layout)."""

    def __init__(self, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x, fused=False):
        if fused:
            # Conv with kernel == stride is a GEMM over the patches in the conv weight's (C, p, p) order.
            w = self.proj.weight
            tokens = dit_kernels.patchify(x, self.patch_size)  # (N, T, C*p*p)
            return F.linear(tokens, w.view(w.shape[0], -1), self.proj.bias)  # (N, T, D)
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear ([q | k | v], head-contiguous)."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_backend="sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, nh, hd)
        if self.attn_backend == "flash_attn" and _flash_ok(qkv):
            # The packed entry point consumes the fused qkv layout without a permute copy.
            out = flash_attn_qkvpacked_func(qkv)  # (N, T, nh, hd)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, nh, T, hd)
            out = F.scaled_dot_product_attention(q, k, v)  # (N, nh, T, hd); scale hd^-1/2
            out = out.transpose(1, 2)  # (N, T, nh, hd)
        return self.proj(out.reshape(N, T, D))  # (N, T, D)


_warned_flash = False


def _flash_ok(qkv):
    """flash-attn needs the package, a CUDA tensor and fp16/bf16; otherwise fall back to SDPA."""
    global _warned_flash
    ok = HAS_FLASH_ATTN and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)
    if not ok and not _warned_flash:
        _warned_flash = True
        why = "not installed" if not HAS_FLASH_ATTN else f"needs CUDA fp16/bf16, got {qkv.device} {qkv.dtype}"
        warnings.warn(f"attn_backend='flash_attn': flash-attn {why}; using scaled_dot_product_attention")
    return ok


class _GeluLinear(torch.autograd.Function):
    """linear(tanh-GELU(u), weight, bias) that saves u only and recomputes the GELU in backward.

    Autograd of fc2(gelu(u)) keeps both u and gelu(u), two (N, T, 4D) tensors: the largest
    activations of a DiT block (2 x 2.25 MiB per DiT-XL/2 block and image in bf16, 8 GiB at batch
    64). Recomputing gelu(u) costs one elementwise pass in backward and saves half of that.
    Runs in u's dtype (bf16 under autocast, where fc1's output is bf16), like autocast would;
    weight/bias gradients come back in the parameters' dtype.
    """

    @staticmethod
    def forward(ctx, u, weight, bias):
        ctx.save_for_backward(u, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(u.device.type, enabled=False):
            a = F.gelu(u, approximate="tanh")  # (..., 4D)
            return F.linear(a, weight.to(u.dtype), None if bias is None else bias.to(u.dtype))  # (..., D)

    @staticmethod
    def backward(ctx, grad_out):
        u, weight = ctx.saved_tensors
        need_u, need_w, need_b = ctx.needs_input_grad
        with torch.autocast(u.device.type, enabled=False):
            grad_out = grad_out.to(u.dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (rows, D)
            du = dw = db = None
            if need_u:
                da = grad_out @ weight.to(u.dtype)  # (..., 4D)
                du = torch.ops.aten.gelu_backward(da, u, approximate="tanh")
            if need_w:
                a = F.gelu(u, approximate="tanh").reshape(-1, u.shape[-1])  # recomputed (rows, 4D)
                dw = (g2.t() @ a).to(weight.dtype)  # (D, 4D)
            if need_b and ctx.bias_dtype is not None:
                db = g2.sum(0).to(ctx.bias_dtype)
        return du, dw, db


class Mlp(nn.Module):
    """Transformer MLP: fc1 (D -> 4D) -> tanh-GELU -> fc2 (4D -> D).

    forward(x, recompute_act=True) gives the same result through _GeluLinear, which does not store
    the GELU output for backward (the fused DiT path uses it; see DiT.mlp_recompute).
    """

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x, recompute_act=False):
        u = self.fc1(x)  # (N, T, 4D)
        if recompute_act and u.requires_grad:  # False under no_grad: nothing to save
            return _GeluLinear.apply(u, self.fc2.weight, self.fc2.bias)  # (N, T, D)
        return self.fc2(self.act(u))  # (N, T, D)


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    cond_size: width of the conditioning vector c (default hidden_size; MaskDiT's decoder
    maps a 1152-d c to 6 x 512).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cond_size=None, attn_backend="sdpa"):
        super().__init__()
        cond_size = hidden_size if cond_size is None else cond_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, attn_backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        """Reference (unfused) path. x (N, T, D), c (N, D_c) -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: modulated LN (no gate) -> Linear(D -> p*p*C_out)."""

    def __init__(self, hidden_size, patch_size, out_channels, cond_size=None):
        super().__init__()
        cond_size = hidden_size if cond_size is None else cond_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        """Reference path. x (N, T, D), c (N, D_c) -> (N, T, p*p*C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


def branch_dtype(x):
    """dtype of the block branches (attention / MLP in and out) for the residual stream x.

    Under fp16/bf16 autocast with an fp32 residual stream the Linears read and write the autocast
    dtype, so the fused ops take y and emit h in it; otherwise x.dtype.
    """
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return x.dtype


def _as_branch(y, branch):
    """A block output as the fused ops take it: in the branch dtype (a no-op under autocast)."""
    return y if y.dtype == branch else y.to(branch)


def _mod_dtype(m, dtype):
    """Kernels take modulation in x.dtype or fp32. Under autocast the adaLN output is bf16 while
    the residual stream is fp32: upcast the small (N, kD) tensor, as the reference's type promotion does."""
    return m if m.dtype in (dtype, torch.float32) else m.to(dtype)


def run_dit_trunk(blocks, x, c, final_adaLN=None, fused=True, mlp_recompute=True):
    """Run DiT blocks over x, optionally ending with the final modulated LayerNorm.

    Args:
        blocks: sequence of DiTBlock with hidden size D.
        x: (N, T, D) residual stream.
        c: (N, D_c) conditioning.
        final_adaLN: None; a module c -> (N, 2D) split as (shift, scale); or a (shift, scale) pair.
        fused: chain dit_kernels ops across blocks (True) or call block(x, c) (False).
        mlp_recompute: fused path only: recompute the MLP's GELU in backward instead of storing
            it (Mlp(recompute_act=True)): ~20% less activation memory (DiT-XL/2), one extra
            elementwise pass.
    Returns:
        (x, h_final): x (N, T, D) after the last block; h_final = modulate(LN(x), shift, scale)
        (N, T, D) if final_adaLN is given, else None.
    """
    final_mod = None
    if final_adaLN is not None:
        if isinstance(final_adaLN, (tuple, list)):
            final_mod = tuple(_mod_dtype(m, x.dtype) for m in final_adaLN)
        else:
            final_mod = _mod_dtype(final_adaLN(c), x.dtype).chunk(2, dim=1)  # 2 x (N, D) strided views

    if not fused:
        for block in blocks:
            x = block(x, c)
        h = None
        if final_mod is not None:
            shift, scale = final_mod
            h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)
        return x, h

    branch = branch_dtype(x)
    if len(blocks) == 0:
        h = None if final_mod is None else dit_kernels.modulated_layer_norm(x, *final_mod, out_dtype=branch)
        return x, h

    # All modulations depend only on c: compute them up front so that each block's last
    # fused op can already apply the next block's (or the final layer's) LayerNorm.
    # Chunks are strided (N, D) views of the (N, 6D) output; the kernels read any row stride.
    mods = [_mod_dtype(block.adaLN_modulation(c), x.dtype).chunk(6, dim=1) for block in blocks]
    h = dit_kernels.modulated_layer_norm(x, mods[0][0], mods[0][1], out_dtype=branch)  # (N, T, D)
    for i, block in enumerate(blocks):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[i]
        if i + 1 < len(blocks):
            next_shift, next_scale = mods[i + 1][0], mods[i + 1][1]
        elif final_mod is not None:
            next_shift, next_scale = final_mod
        else:
            next_shift = next_scale = None

        attn_out = _as_branch(block.attn(h), branch)  # (N, T, D); bf16 beside the fp32 residual under autocast
        x, h = dit_kernels.gated_residual_modulated_layer_norm(x, attn_out, gate_msa, shift_mlp, scale_mlp)
        mlp_out = _as_branch(block.mlp(h, recompute_act=mlp_recompute), branch)  # (N, T, D)
        if next_shift is None:  # last block, no final layer: only the residual is needed
            x = dit_kernels.gated_residual(x, mlp_out, gate_mlp)
            h = None
        else:
            x, h = dit_kernels.gated_residual_modulated_layer_norm(x, mlp_out, gate_mlp, next_shift, next_scale)
    return x, h


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Args:
        input_size: latent size H (= W) used for the stored pos_embed; other sizes divisible by
            patch_size (also non-square) work in forward, with the sin-cos table recomputed.
        patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio: architecture.
        class_dropout_prob: label dropout for CFG; > 0 adds the null-label row (index num_classes).
        num_classes: K. num_classes=0 builds an unconditional model: no label embedder, y is ignored
            (may be None), and forward_with_cfg is unavailable.
        learn_sigma: C_out = 2C (epsilon | variance interpolation v) instead of C.
        fused: dit_kernels code path; None -> True when the compiled extension is loaded.
        attn_backend: "sdpa" (default) or "flash_attn" (used only when installed, on CUDA fp16/bf16).
    """

    # SiT sets this to True: forward returns only the first C channels when learn_sigma.
    drop_sigma_channels = False
    # Fused path: recompute each MLP's GELU in backward rather than store it (run_dit_trunk).
    # A plain attribute like `fused`; set False to trade ~4 GiB (DiT-XL/2, batch 64, bf16) for
    # one elementwise pass per block in backward.
    mlp_recompute = True

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        fused=None,
        attn_backend="sdpa",
    ):
        super().__init__()
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {hidden_size}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.fused = dit_kernels.HAS_EXT if fused is None else bool(fused)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos embedding; a frozen Parameter (not a buffer) so that it is in the state_dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self._pos_cache = {}  # (h, w, device, dtype) -> (1, T, D) for sizes other than input_size

        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, attn_backend=attn_backend) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def attn_backend(self):
        return self.blocks[0].attn.attn_backend if len(self.blocks) else "sdpa"

    def set_attn_backend(self, attn_backend):
        """Switch every block between "sdpa" and "flash_attn"."""
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        for block in self.blocks:
            block.attn.attn_backend = attn_backend

    def initialize_weights(self):
        if self.pos_embed.device.type == "meta":  # shape-only construction (parameter counting)
            return

        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)  # fused qkv: one (3D, D) matrix
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Initialize (and freeze) pos_embed by the fixed sin-cos embedding:
        g = self.input_size // self.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, g)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d): xavier on the (D, C*p*p) view.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize label embedding table:
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Initialize timestep embedding MLP:
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks (each block starts as the identity):
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers (the model outputs exactly 0 at init):
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ------------------------------------------------------------------------------------------

    def get_pos_embed(self, h, w, device, dtype):
        """(1, h*w, D) sin-cos table: the stored pos_embed for the built size, else recomputed."""
        g = self.input_size // self.patch_size
        if h == g and w == g:
            return self.pos_embed
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            table = get_2d_sincos_pos_embed(self.hidden_size, (h, w))
            self._pos_cache[key] = torch.from_numpy(table).float().unsqueeze(0).to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def unpatchify(self, x, height, width):
        """(N, T, p*p*C_out) -> (N, C_out, H, W), reference einsum form."""
        c = self.out_channels
        p = self.patch_size
        h, w = height // p, width // p
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))  # (N, h, w, p, p, C_out)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C_out, h, p, w, p)
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))  # (N, C_out, H, W)

    def embed_condition(self, t, y):
        """c = TimestepEmbedder(t) + LabelEmbedder(y): (N,), (N,) -> (N, D)."""
        c = self.t_embedder(t)  # (N, D), fp32 math, model dtype
        if self.y_embedder is not None:
            if y is None:
                if self.y_embedder.dropout_prob <= 0:
                    raise ValueError("y=None needs a null label (class_dropout_prob > 0)")
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            c = c + self.y_embedder(y, self.training)  # (N, D)
        return c

    def forward(self, x, t, y=None):
        """Forward pass of DiT.

        x: (N, C, H, W) latents; t: (N,) diffusion steps (DiT: 0..999, SiT: [0, 1]);
        y: (N,) int64 labels in [0, num_classes] (num_classes = null label); None -> null label
        (or ignored by an unconditional model).
        Returns (N, C_out, H, W) (SiT: (N, C, H, W)).
        """
        N, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p}")
        x = x.to(self.x_embedder.proj.weight.dtype)
        if t.dim() == 0:
            t = t.expand(N)
        pos = self.get_pos_embed(H // p, W // p, x.device, self.pos_embed.dtype)
        x = self.x_embedder(x, fused=self.fused) + pos  # (N, T, D)
        c = self.embed_condition(t, y)  # (N, D)
        channels = self.in_channels if (self.drop_sigma_channels and self.learn_sigma) else None

        if self.fused:
            _, h = run_dit_trunk(self.blocks, x, c, final_adaLN=self.final_layer.adaLN_modulation, fused=True,
                                 mlp_recompute=self.mlp_recompute)
            out = self.final_layer.linear(h)  # (N, T, p*p*C_out)
            return dit_kernels.unpatchify(out, p, H, W, channels=channels)  # (N, C_out or C, H, W)

        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        x = self.unpatchify(x, H, W)  # (N, C_out, H, W)
        if channels is not None:
            x, _ = x.chunk(2, dim=1)  # SiT: drop the (unused) variance channels
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None, guided_channels=None):
        """Classifier-free guidance with the public DiT/SiT batch semantics: a 2B batch in, a 2B batch out.

        x: (2B, C, H, W) laid out [conditional; unconditional]; only x[:B] is used, duplicated.
        y: (2B,) = [labels; null labels]. t: (2B,). cfg_scale: float (or a tensor broadcastable
        to (B, 1, 1, 1)).
        cfg_channels (alias guided_channels): guide output channels [:cfg_channels] only.
            3 reproduces the public code exactly (what the published FIDs used: DiT 2.27, SiT 2.06);
            None (default here) guides all C channels of epsilon / velocity. The variance channels
            (DiT learn_sigma) are never guided.
        Returns (2B, C_out, H, W): guided channels are equal in both halves, the rest unguided.
        """
        if self.y_embedder is None:
            raise ValueError("forward_with_cfg needs a class-conditional model (num_classes > 0)")
        if guided_channels is not None:
            if cfg_channels is not None and cfg_channels != guided_channels:
                raise ValueError("pass either cfg_channels or guided_channels, not both")
            cfg_channels = guided_channels
        g = self.in_channels if cfg_channels is None else int(cfg_channels)
        if not 1 <= g <= self.in_channels:
            raise ValueError(f"cfg_channels must be in [1, {self.in_channels}], got {cfg_channels}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # (2B, C, H, W)
        model_out = self.forward(combined, t, y)  # (2B, C_out, H, W)
        eps, rest = model_out[:, :g], model_out[:, g:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = cfg_mix(cond_eps, uncond_eps, cfg_scale)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def forward_guided(self, x, t, y, cfg_scale, cfg_channels=None):
        """CFG on a B-row state: the sampler carries B rows (the public samplers carry, and add noise to, an
        ignored duplicate half); the 2B network batch exists only inside this call.

        x: (B, C, H, W); t: (B,) or scalar; y: (B,) labels. Builds the 2B network batch
        [x; x] with labels [y; null] and returns the guided (B, C_out, H, W) output (the
        unguided channels carry the conditional values). cfg_channels as in forward_with_cfg.
        """
        B = x.shape[0]
        if t.dim() == 0:
            t = t.expand(B)
        null = torch.full_like(y, self.num_classes)
        out = self.forward_with_cfg(
            torch.cat([x, x], 0), torch.cat([t, t], 0), torch.cat([y, null], 0), cfg_scale, cfg_channels
        )
        return out[:B]


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# MAE layout (facebookresearch/mae util/pos_embed.py): the first D/2 channels encode the column j, the last
# D/2 the row i; sine first; frequencies 1 / 10000^(k / (D/4)), float64, token tau = i * w + j.


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """grid_size: int g or (h, w). Returns float64 numpy (h*w, embed_dim), token tau = i*w + j."""
    if isinstance(grid_size, int):
        grid_h = grid_w = grid_size
    else:
        grid_h, grid_w = grid_size
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    emb_col = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols.reshape(-1))  # (T, D/2)
    emb_row = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows.reshape(-1))  # (T, D/2)
    return np.concatenate([emb_col, emb_row], axis=1)  # (T, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: output dim per position; pos: (M,) positions. Returns (M, embed_dim) = [sin | cos]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", np.asarray(pos, dtype=np.float64).reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                  #
#################################################################################


# Registry sizes (depth, width, heads) as published for DiT (Peebles & Xie, Table 1); SiT uses the same table.
SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
}


def size_registry(cls, family, sizes, patch_sizes, **fixed):
    """{"<family>-<size>/<patch>": functools.partial(cls, patch_size=p, **size, **fixed)}: the keywords of an
    entry are its architecture (builders read them for size overrides); calling it builds the model."""
    return {f"{family}-{s}/{p}": partial(cls, patch_size=p, **cfg, **fixed)
            for s, cfg in sizes.items() for p in patch_sizes}


DiT_models = size_registry(DiT, "DiT", SIZES, (2, 4, 8))
