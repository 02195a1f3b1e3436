"""Checkpoint conversion between the official DiT layout (facebookresearch/DiT) and diffusers' DiTTransformer2DModel.

    official (ours)                          diffusers DiTTransformer2DModel
    x_embedder.proj.*                        pos_embed.proj.*
    pos_embed (1, T, D) parameter            (none: diffusers recomputes a non-persistent sin-cos buffer)
    t_embedder.mlp.0 / .2                    transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1 / _2
    y_embedder.embedding_table               transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
                                             (the embedders are copied into every block)
    blocks.{i}.attn.qkv (3D, D) [q | k | v]  transformer_blocks.{i}.attn1.to_q / to_k / to_v
    blocks.{i}.attn.proj                     transformer_blocks.{i}.attn1.to_out.0
    blocks.{i}.mlp.fc1 / fc2                 transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    blocks.{i}.adaLN_modulation.1            transformer_blocks.{i}.norm1.linear
    final_layer.adaLN_modulation.1           proj_out_1
    final_layer.linear                       proj_out_2

The weights convert exactly, but diffusers' DiT computes a slightly different function from the official
one (the "parity traps"; docs/results.md has the measured differences):
1. the LayerNorm before the MLP (norm3) has eps 1e-5; the official DiT uses 1e-6 everywhere;
2. the timestep frequencies are exp(-ln(10^4) i / 127) (downscale_freq_shift=1); the official ones use / 128;
3. DiTPipeline guides all 4 latent channels; the official sample.py guides the first 3
   (our forward_with_cfg: cfg_channels=None guides all C like diffusers, cfg_channels=3 like the official).
``match_official_dit(model)`` sets 1 and 2 on a diffusers model so that it computes the official function
(and ``match_official_dit(model, False)`` restores diffusers' behaviour).

diffusers is needed only for the *_model helpers; the state_dict functions are plain tensor renames.
"""
import re

import torch

from .checkpoint import infer_config_from_state_dict, load_state_dict_strict, select_state_dict

__all__ = [
    "dit_to_diffusers",
    "diffusers_to_dit",
    "diffusers_config",
    "dit_kwargs_from_diffusers_config",
    "to_diffusers_model",
    "from_diffusers_model",
    "match_official_dit",
]

_BLOCK_RENAMES = (  # official suffix under blocks.{i}. -> diffusers suffix under transformer_blocks.{i}.
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
    ("adaLN_modulation.1", "norm1.linear"),
)
_TOP_RENAMES = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
)
_EMBEDDERS = (  # official prefix -> diffusers prefix under transformer_blocks.{i}.norm1.emb.
    ("t_embedder.mlp.0", "timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
    ("y_embedder.embedding_table", "class_embedder.embedding_table"),
)
_QKV = ("to_q", "to_k", "to_v")


def _depth(keys, pattern):
    return 1 + max((int(m.group(1)) for k in keys if (m := re.match(pattern, k))), default=-1)


def dit_to_diffusers(state_dict):
    """Official DiT / SiT state_dict (or training container; "ema" preferred) -> DiTTransformer2DModel's.

    pos_embed is dropped (diffusers recomputes it). An unconditional model (no y_embedder) has no diffusers
    counterpart and raises ValueError.
    """
    sd = select_state_dict(state_dict, "auto")
    if "y_embedder.embedding_table.weight" not in sd:
        raise ValueError("diffusers' DiTTransformer2DModel is class-conditional; this checkpoint has no y_embedder")
    out = {}
    depth = _depth(sd, r"blocks\.(\d+)\.")
    for k, v in sd.items():
        if k == "pos_embed" or k.startswith(("t_embedder.", "y_embedder.")):
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            prefix = f"transformer_blocks.{i}."
            if rest.startswith("attn.qkv."):
                param = rest[len("attn.qkv."):]  # weight (3D, D) or bias (3D,): [q | k | v]
                for name, part in zip(_QKV, v.chunk(3, dim=0)):
                    out[f"{prefix}attn1.{name}.{param}"] = part.clone()
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old + "."):
                    out[prefix + new + rest[len(old):]] = v
                    break
            else:
                raise KeyError(f"no diffusers name for official key {k!r}")
            continue
        for old, new in _TOP_RENAMES:
            if k.startswith(old + "."):
                out[new + k[len(old):]] = v
                break
        else:
            raise KeyError(f"no diffusers name for official key {k!r}")
    for i in range(depth):  # diffusers keeps one copy of the embedders per block
        for old, new in _EMBEDDERS:
            for param in ("weight", "bias"):
                if f"{old}.{param}" in sd:
                    out[f"transformer_blocks.{i}.norm1.emb.{new}.{param}"] = sd[f"{old}.{param}"].clone()
    return out


def diffusers_to_dit(state_dict, input_size, patch_size=None, check_embedders=True):
    """DiTTransformer2DModel state_dict -> official DiT layout (loads into dit_models.models.dit.DiT).

    Args:
        state_dict: diffusers weights (model.state_dict()).
        input_size: latent size H = W (diffusers' config.sample_size): builds the pos_embed table.
        patch_size: p (default: read from pos_embed.proj.weight).
        check_embedders: the official layout has one timestep/label embedder; diffusers has one per block
            (only block 0's feeds the final layer). Raise if the copies differ (a model fine-tuned in
            diffusers with untied embedders cannot be expressed exactly); False takes block 0's.
    """
    from .models.dit import get_2d_sincos_pos_embed

    sd = dict(state_dict)
    w = sd["pos_embed.proj.weight"]  # (D, C, p, p)
    hidden, p = w.shape[0], w.shape[2] if patch_size is None else patch_size
    if input_size % p:
        raise ValueError(f"input_size {input_size} is not divisible by the patch size {p}")
    depth = _depth(sd, r"transformer_blocks\.(\d+)\.")
    if depth == 0:
        raise ValueError("no transformer_blocks.* keys: not a DiTTransformer2DModel state_dict")
    out = {}
    for old, new in _EMBEDDERS:
        for param in ("weight", "bias"):
            key0 = f"transformer_blocks.0.norm1.emb.{new}.{param}"
            if key0 not in sd:
                continue
            out[f"{old}.{param}"] = sd[key0].clone()
            for i in range(1, depth):
                ki = f"transformer_blocks.{i}.norm1.emb.{new}.{param}"
                if check_embedders and not torch.equal(sd[ki], sd[key0]):
                    diff = (sd[ki].float() - sd[key0].float()).abs().max().item()
                    raise ValueError(f"{ki} differs from block 0's copy (max |diff| {diff:.3g}): the official layout "
                                     "has one embedder; pass check_embedders=False to use block 0's")
    for k, v in sd.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            if rest.startswith("norm1.emb."):
                continue
            qkv = re.match(r"attn1\.to_q\.(weight|bias)$", rest)
            if qkv:
                param = qkv.group(1)
                parts = [sd[f"transformer_blocks.{i}.attn1.{name}.{param}"] for name in _QKV]
                out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(parts, dim=0)  # (3D, ...) [q | k | v]
                continue
            if re.match(r"attn1\.to_[kv]\.", rest):
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(new + "."):
                    out[f"blocks.{i}.{old}{rest[len(new):]}"] = v
                    break
            else:
                raise KeyError(f"no official name for diffusers key {k!r}")
            continue
        for old, new in _TOP_RENAMES:
            if k.startswith(new + "."):
                out[old + k[len(new):]] = v
                break
        else:
            raise KeyError(f"no official name for diffusers key {k!r}")
    table = get_2d_sincos_pos_embed(hidden, input_size // p)  # (T, D) float64
    out["pos_embed"] = torch.from_numpy(table).to(w.dtype).unsqueeze(0)
    return out


def diffusers_config(state_dict, num_heads=None):
    """DiTTransformer2DModel constructor kwargs for an official state_dict (infer_config_from_state_dict)."""
    cfg = infer_config_from_state_dict(state_dict)
    heads = num_heads or cfg["num_heads"]
    if heads is None:
        raise ValueError(f"hidden size {cfg['hidden_size']} is not a registry width: pass num_heads")
    if cfg["mlp_ratio"] != 4.0:
        raise ValueError(f"diffusers' DiT has mlp_ratio 4, this checkpoint has {cfg['mlp_ratio']}")
    if not cfg["num_classes"]:
        raise ValueError("diffusers' DiTTransformer2DModel is class-conditional; this checkpoint is unconditional")
    return {
        "num_attention_heads": heads,
        "attention_head_dim": cfg["hidden_size"] // heads,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1),
        "num_layers": cfg["depth"],
        "sample_size": cfg["input_size"],
        "patch_size": cfg["patch_size"],
        "num_embeds_ada_norm": cfg["num_classes"],
    }


def dit_kwargs_from_diffusers_config(config):
    """dit_models DiT constructor kwargs for a DiTTransformer2DModel config (dict or FrozenDict)."""
    c = dict(config)
    if c.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"only norm_type 'ada_norm_zero' has an official DiT layout, got {c['norm_type']!r}")
    if c.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"the official DiT MLP is tanh-GELU ('gelu-approximate'), got {c['activation_fn']!r}")
    if c.get("sample_size", 32) // 64 > 1:
        raise ValueError("sample_size >= 128 makes diffusers interpolate its sin-cos table (interpolation_scale > 1), "
                         "which the official pos_embed does not")
    in_channels = c.get("in_channels", 4)
    out_channels = c.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels {out_channels} is neither C nor 2C for in_channels {in_channels}")
    heads, head_dim = c.get("num_attention_heads", 16), c.get("attention_head_dim", 72)
    return {
        "input_size": c.get("sample_size", 32),
        "patch_size": c.get("patch_size", 2),
        "in_channels": in_channels,
        "hidden_size": heads * head_dim,
        "depth": c.get("num_layers", 28),
        "num_heads": heads,
        "mlp_ratio": 4.0,
        "class_dropout_prob": 0.1,  # diffusers' LabelEmbedding always has the null row
        "num_classes": c.get("num_embeds_ada_norm", 1000),
        "learn_sigma": out_channels == 2 * in_channels,
    }


def to_diffusers_model(dit, official=False):
    """A DiTTransformer2DModel holding the weights of our (or an official) DiT module.

    official=True applies match_official_dit, so that the diffusers model computes the same function.
    """
    from diffusers import DiTTransformer2DModel

    sd = dit.state_dict()
    model = DiTTransformer2DModel(**diffusers_config(sd, num_heads=getattr(dit, "num_heads", None)))
    model.load_state_dict(dit_to_diffusers(sd), strict=True)
    dtype = next(dit.parameters()).dtype
    if dtype != torch.float32:
        model.to(dtype)
    return match_official_dit(model) if official else model


def from_diffusers_model(model, **dit_kwargs):
    """Our DiT (dit_models.models.dit.DiT) holding a DiTTransformer2DModel's weights (strict load).

    dit_kwargs override the constructor arguments (e.g. fused=False). The result computes the official DiT
    function, i.e. model after match_official_dit (docs/results.md: the measured differences otherwise).
    """
    from .models.dit import DiT

    kwargs = dit_kwargs_from_diffusers_config(model.config)
    kwargs.update(dit_kwargs)
    dit = DiT(**kwargs)
    load_state_dict_strict(dit, diffusers_to_dit(model.state_dict(), kwargs["input_size"], kwargs["patch_size"]))
    return dit.to(next(model.parameters()).dtype)


def match_official_dit(model, enabled=True):
    """Make a diffusers DiTTransformer2DModel compute the official DiT function (in place; returns model).

    Sets every block's MLP LayerNorm (norm3) eps to 1e-6 (diffusers: 1e-5) and the timestep projection's
    downscale_freq_shift to 0 (diffusers: 1, i.e. frequencies over 127 instead of 128). enabled=False restores
    diffusers' values. Guidance is the pipeline's business: see the module docstring (trap 3).
    """
    for block in model.transformer_blocks:
        if getattr(block, "norm3", None) is not None:
            block.norm3.eps = 1e-6 if enabled else 1e-5
        emb = getattr(block.norm1, "emb", None)
        if emb is not None:
            emb.time_proj.downscale_freq_shift = 0 if enabled else 1
    return model
