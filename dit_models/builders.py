"""Build a registry model for a method, with size overrides: shared by training, sampling and tools.

Below every command-line tool (train, sample, evaluate, quickstart import it; it imports none of them).
"""
import inspect

import torch

METHODS = ("ddpm", "sit", "maskdit", "sddit")


class MethodUnavailable(RuntimeError):
    pass


def model_registry(method):
    """Registry of model factories for a method (imported lazily so each family stands alone)."""
    try:
        if method == "ddpm":
            from dit_models.models.dit import DiT_models as reg
        elif method == "sit":
            from dit_models.models.sit import SiT_models as reg
        elif method == "maskdit":
            from dit_models.models.maskdit import MaskDiT_models as reg
        elif method == "sddit":
            from dit_models.models.sd_dit import SDDiT_models as reg
        else:
            raise ValueError(f"unknown --method {method!r}; choose from {METHODS}")
    except ImportError as e:
        raise MethodUnavailable(f"--method {method} is not available in this build: {e}") from e
    return reg


def _init_params(cls):
    """Keyword names accepted by cls.__init__, following **kwargs up the MRO (MaskDiT(*args, **kwargs) -> base)."""
    names = set()
    for c in getattr(cls, "__mro__", [cls]):
        if "__init__" not in vars(c):
            continue
        try:
            params = inspect.signature(c.__init__).parameters
        except (TypeError, ValueError):
            return None
        names |= {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return names
    return None  # open-ended


def accepts_kwarg(cls, name):
    names = _init_params(cls)
    return names is None or name in names


def build_model(method, name, input_size, in_channels, num_classes, class_dropout_prob=0.1, learn_sigma=None,
                fused=None, depth=None, hidden_size=None, num_heads=None, decoder_depth=None,
                decoder_hidden_size=None, decoder_num_heads=None, model_kwargs=None):
    """Builds a registry model; depth/width/heads overrides (for tests and laptops) rebuild it with the same class.

    The registry size is read from a shape-only ('meta') instance, then the class is called with the overrides.
    Encoder-decoder models (MaskDiT, SD-DiT): encoder overrides shrink the decoder with them unless decoder_*
    overrides are given, so that the small-model flags shrink the whole model (shrunk_decoder).
    """
    reg = model_registry(method)
    if name not in reg:
        raise ValueError(f"unknown --model {name!r} for --method {method}; choose from {sorted(reg)}")
    kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    if method in ("ddpm", "sit"):  # MaskDiT / SD-DiT drop labels in their loss and have no learned sigma
        kwargs["class_dropout_prob"] = class_dropout_prob
        if learn_sigma is not None:
            kwargs["learn_sigma"] = learn_sigma
    kwargs.update(model_kwargs or {})
    overrides = {k: v for k, v in dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                                       decoder_depth=decoder_depth, decoder_hidden_size=decoder_hidden_size,
                                       decoder_num_heads=decoder_num_heads).items() if v is not None}
    if not overrides:
        try:
            model = reg[name](**kwargs)
        except TypeError as e:
            raise ValueError(f"{name}: bad model arguments {kwargs}: {e}") from e
    else:
        with torch.device("meta"):
            ref = reg[name](**kwargs)
        cls = type(ref)
        cfg = model_config(ref)
        cfg.update(kwargs)
        cfg.update(shrunk_decoder(cfg, overrides))
        if accepts_kwarg(cls, "head_hidden_dim"):  # SD-DiT's projection heads follow the width too
            cfg.update({k: v for k, v in shrunk_heads(overrides).items() if k not in kwargs})
        cfg.update(overrides)
        bad = [k for k in cfg if not accepts_kwarg(cls, k)]
        if bad:
            raise ValueError(f"{cls.__name__} does not accept {bad}")
        model = cls(**cfg)
    if fused is not None and hasattr(model, "fused"):
        model.fused = bool(fused)
    return model


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


def shrunk_heads(overrides):
    """SD-DiT projection-head sizes for a narrowed model (the defaults 2048 / 256 / 8192 are sized for width 1152:
    a width-64 model would otherwise carry 14 M head parameters beside a 0.6 M backbone)."""
    width = overrides.get("hidden_size")
    if width is None:
        return {}
    return {"head_hidden_dim": min(2048, 4 * width), "head_bottleneck_dim": min(256, width),
            "head_out_dim": min(8192, 16 * width)}


def model_config(model):
    """Architecture kwargs of a built model (as far as it exposes them), used for overrides and logs."""
    cfg = {}
    for k in ("patch_size", "hidden_size", "decoder_hidden_size", "learn_sigma"):
        if isinstance(getattr(model, k, None), (int, float, bool)):
            cfg[k] = getattr(model, k)
    for prefix, blocks in (("", getattr(model, "blocks", None)), ("decoder_", getattr(model, "decoder_blocks", None))):
        if blocks is not None:
            cfg[prefix + "depth"] = len(blocks)
            if len(blocks):
                cfg[prefix + "num_heads"] = blocks[0].attn.num_heads
                if not prefix:
                    cfg["mlp_ratio"] = blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features
    return cfg


def build_model_from_args(args, input_size, in_channels):
    """build_model with the model flags of a train / checkpoint args namespace (or dict)."""
    a = args if isinstance(args, dict) else vars(args)
    return build_model(a["method"], a["model"], input_size, in_channels, a["num_classes"], a.get("class_dropout_prob", 0.1),
                       a.get("learn_sigma"), None if a.get("fused", True) else False, a.get("depth"), a.get("hidden_size"),
                       a.get("num_heads"), a.get("decoder_depth"), a.get("decoder_hidden_size"),
                       a.get("decoder_num_heads"), a.get("model_kwargs"))
