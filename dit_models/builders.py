"""Build a registry model for a method, with size overrides: shared by training, sampling and tools.

Below every command-line tool (train, sample, evaluate, quickstart import it; it imports none of them). The
registries map a name to functools.partial(cls, patch_size=..., depth=..., ...): the partial's keywords are the
registry size, so overrides rebuild the same class with them changed (no instance, no signature inspection).
"""
from dit_models.methods import METHODS, MethodUnavailable, get_method

__all__ = ["METHODS", "MethodUnavailable", "model_registry", "build_model", "model_config", "build_model_from_args"]


def model_registry(method):
    """Registry of model factories for a method (imported lazily so each family stands alone)."""
    return get_method(method).registry()


def build_model(method, name, input_size, in_channels, num_classes, class_dropout_prob=0.1, learn_sigma=None,
                fused=None, depth=None, hidden_size=None, num_heads=None, decoder_depth=None,
                decoder_hidden_size=None, decoder_num_heads=None, model_kwargs=None):
    """Builds a registry model; depth/width/heads overrides (for tests and laptops) rebuild it with the same class.

    Encoder-decoder models (MaskDiT, SD-DiT): encoder overrides shrink the decoder (and SD-DiT's projection heads)
    with them unless decoder_* overrides are given, so that the small-model flags shrink the whole model.
    """
    m = get_method(method)
    reg = m.registry()
    if name not in reg:
        raise ValueError(f"unknown --model {name!r} for --method {method}; choose from {sorted(reg)}")
    factory = reg[name]
    cfg = dict(factory.keywords)  # the registry size
    cfg.update(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    cfg.update(m.model_kwargs(dict(class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma)))
    cfg.update(model_kwargs or {})
    overrides = {k: v for k, v in dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                                       decoder_depth=decoder_depth, decoder_hidden_size=decoder_hidden_size,
                                       decoder_num_heads=decoder_num_heads).items() if v is not None}
    cfg.update(m.derived_size(cfg, overrides))
    cfg.update(overrides)
    try:
        model = factory.func(*factory.args, **cfg)
    except TypeError as e:
        raise ValueError(f"{name}: {factory.func.__name__} does not accept these arguments ({e})") from e
    if fused is not None and hasattr(model, "fused"):
        model.fused = bool(fused)
    return model


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
