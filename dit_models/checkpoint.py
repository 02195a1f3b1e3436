"""Loading DiT / SiT checkpoints.

Accepted inputs:
- a raw state_dict (the released DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt, SiT-XL-2-256x256.pt);
- the training container {"model", "ema", "opt", "args"} written by DiT/SiT train.py (and ours),
  whose "args" may be a pickled argparse.Namespace;
- a path to either, always loaded with map_location="cpu" (loading onto the GPU first can OOM);
- keys prefixed by "module." (DDP, Accelerate) or "_orig_mod." (torch.compile) are stripped.

Loading is always strict: a checkpoint key the model does not have, a model key the checkpoint lacks, or a
shape mismatch raises a ValueError naming the key (a non-strict load of a released file would silently keep
initial weights). MaskDiT files (EDMPrecond layout, keys under "model.") load with
dit_models.models.maskdit.load_maskdit_checkpoint, which uses load_state_dict_strict below.
"""
import os
import pickle
import re

import torch

__all__ = ["Checkpoint", "CheckpointMismatchError", "CheckpointReadError", "load_checkpoint", "load_state_dict_strict",
           "read_checkpoint", "select_state_dict",
           "infer_config_from_state_dict"]

_PREFIXES = ("module.", "_orig_mod.")
_CONTAINER_KEYS = ("ema", "model", "state_dict")


class CheckpointReadError(ValueError):
    """A file that torch.load cannot read: truncated, corrupt, or not a PyTorch checkpoint."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint file whose contents do not fit: not a state_dict, another model size or method."""


def read_checkpoint(path_or_state):
    """Load a checkpoint file onto the CPU (or pass a dict through unchanged).

    An unreadable file raises CheckpointReadError naming it, instead of whatever the unpickler tripped
    over ("invalid literal for int() with base 10: 'arbage'" for a text file)."""
    if not isinstance(path_or_state, (str, os.PathLike)):
        return path_or_state
    if not os.path.isfile(path_or_state):
        raise FileNotFoundError(f"checkpoint {str(path_or_state)!r} does not exist")
    try:
        try:
            return torch.load(path_or_state, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # DiT/SiT train.py store `args` as an argparse.Namespace, which the safe weights_only
            # unpickler rejects. Only load files you trust this way.
            return torch.load(path_or_state, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (the unpickler raises anything on garbage)
        size = os.path.getsize(path_or_state)
        why = (str(e).strip().splitlines() or [""])[0]  # one line: the CLIs print the message as their error line
        raise CheckpointReadError(f"cannot read checkpoint {str(path_or_state)!r} ({size:,} bytes): not a PyTorch "
                                  f"checkpoint, or truncated / corrupt ({type(e).__name__}: {why})") from e


def _is_container(obj):
    return isinstance(obj, dict) and any(k in obj and isinstance(obj[k], dict) for k in _CONTAINER_KEYS)


def _strip_prefixes(state_dict):
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def select_state_dict(checkpoint, which="auto"):
    """Pick the weights out of a raw state_dict or a {"model", "ema", ...} container.

    which: "ema" (sampling), "model" (resume training), or "auto" ("ema" when present, else "model").
    A raw state_dict is returned for any `which`. Prefixes "module." / "_orig_mod." are stripped.
    """
    if which not in ("ema", "model", "auto"):
        raise ValueError(f"which must be 'ema', 'model' or 'auto', got {which!r}")
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a state_dict or a checkpoint dict, got {type(checkpoint).__name__}")
    if _is_container(checkpoint):
        if which == "auto":
            key = next(k for k in _CONTAINER_KEYS if isinstance(checkpoint.get(k), dict))
        elif isinstance(checkpoint.get(which), dict):
            key = which
        else:
            raise KeyError(f"checkpoint has no {which!r} weights; it holds keys {sorted(checkpoint)}")
        checkpoint = checkpoint[key]
    return _strip_prefixes(checkpoint)


def _hint(key):
    if key.startswith("model."):
        return "keys under 'model.' are an EDMPrecond (MaskDiT) file: use dit_models.models.maskdit.load_maskdit_checkpoint"
    if key == "pos_embed":
        return ("pos_embed holds one row per token, (input_size / patch_size)^2: the checkpoint was trained at another "
                "resolution or patch size (build the model with the matching input_size and model name)")
    if key.startswith("final_layer.linear"):
        return "final_layer.linear has p*p*C_out rows: learn_sigma (C_out = 2C) or patch size differs; see infer_config_from_state_dict"
    if key.startswith("y_embedder"):
        return "the label table has num_classes (+1 null row when class_dropout_prob > 0) rows: num_classes or class_dropout_prob differs"
    if key.startswith("x_embedder"):
        return "the patch embedding (hidden size, in_channels, patch, patch) differs: patch size, in_channels or hidden size"
    return "the model configuration (size / depth / hidden size) differs from the checkpoint's"


def _unwrap_model(model):
    """The module under DDP (.module) / torch.compile (._orig_mod) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model._orig_mod
    return model


def describe_keys(keys, limit=8):
    """'a', 'b', ... and N more: sorted key names for error messages."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def load_state_dict_strict(model, state_dict, hint=_hint):
    """model.load_state_dict(state_dict, strict=True) with errors that name the keys.

    Args:
        model: the module (a DDP / torch.compile wrapper is unwrapped).
        state_dict: converted weights (prefixes stripped, names as in model.state_dict()).
        hint: key -> likely cause, appended to the messages.
    Raises:
        ValueError naming the first mismatching shape, every checkpoint key the model does not have, or
        every model key the checkpoint lacks.
    """
    model = _unwrap_model(model)
    own = model.state_dict()
    # The patch embedding first: its shape names the patch size, while pos_embed (the first key) differs
    # for a patch-size and a resolution mismatch alike.
    for k, v in sorted(state_dict.items(), key=lambda item: not item[0].startswith("x_embedder.")):
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor: not a state_dict, or corrupt")
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}. Hint: {hint(k)}"
            )
    unexpected = set(state_dict) - set(own)
    if unexpected:
        first = sorted(unexpected)[0]
        raise ValueError(f"checkpoint key(s) {describe_keys(unexpected)} are not in the model. Hint: {hint(first)}")
    missing = set(own) - set(state_dict)
    if missing:
        first = sorted(missing)[0]
        raise ValueError(f"model key(s) {describe_keys(missing)} are missing from the checkpoint. Hint: {hint(first)}")
    model.load_state_dict(state_dict, strict=True)


class Checkpoint(dict):
    """A checkpoint container (a plain dict) whose repr lists its parts instead of every tensor, so that
    a notebook cell ending in load_checkpoint(...) prints a few lines."""

    def __repr__(self):
        if self and all(isinstance(v, torch.Tensor) for v in self.values()):  # a raw state dict
            return f"Checkpoint(state dict: {len(self)} tensors, {sum(v.numel() for v in self.values()):,} values)"
        parts = []
        for key, value in self.items():
            if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                n = sum(v.numel() for v in value.values())
                parts.append(f"{key}: {len(value)} tensors, {n:,} values")
            elif isinstance(value, (int, float, str)) or value is None:
                parts.append(f"{key}: {value!r}")
            elif key == "args" and isinstance(value, dict):
                parts.append(f"args: {len(value)} settings" + (f" (method {value['method']!r})" if "method" in value else ""))
            else:
                parts.append(f"{key}: {type(value).__name__}")
        return "Checkpoint(" + ", ".join(parts) + ")"


def load_checkpoint(path_or_state, model, which="auto", path=None):
    """Load DiT/SiT weights into `model`, strictly (every key mapped, every shape equal).

    Args:
        path_or_state: file path, raw state_dict or {"model", "ema", "opt", "args"} container.
        model: the module (a DDP / torch.compile wrapper is unwrapped).
        which: "ema" | "model" | "auto" (see select_state_dict).
        path: the file an already loaded checkpoint came from, for the error message.
    Returns:
        The loaded checkpoint object (the container, e.g. for "opt" and "args" on resume).
    Raises:
        ValueError naming the mismatching key(s) and the likely cause (load_state_dict_strict); from a file,
        a CheckpointMismatchError that also names the file.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        path = path_or_state
    checkpoint = read_checkpoint(path_or_state)
    try:
        load_state_dict_strict(model, select_state_dict(checkpoint, which))
    except (ValueError, TypeError, KeyError) as e:
        if path is None:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointMismatchError(f"checkpoint {str(path)!r} does not fit the model: {msg}") from e
    return Checkpoint(checkpoint) if isinstance(checkpoint, dict) else checkpoint


_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # registry head counts by hidden size
_SIZES = {(12, 384): "S", (12, 768): "B", (24, 1024): "L", (28, 1152): "XL"}


def infer_config_from_state_dict(state_dict):
    """Infer constructor arguments from a DiT/SiT state_dict (or container; "ema" is preferred).

    Returns a dict with input_size, patch_size, in_channels, hidden_size, depth, mlp_ratio,
    learn_sigma, num_classes, num_heads (None if D is not a registry width) and size_name
    ("XL/2"-style; prefix "DiT-" or "SiT-" for the registries; None if not a registry size). num_classes assumes the label table has the
    null row (class_dropout_prob > 0), as in every released file.
    """
    sd = select_state_dict(state_dict, "auto")
    needed = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight")
    absent = [k for k in needed if not isinstance(sd.get(k), torch.Tensor)]
    if absent:
        raise CheckpointMismatchError(f"not a DiT/SiT state_dict: no tensor {describe_keys(absent)}. Hint: {_hint(next(iter(sd), ''))}")
    if sd["x_embedder.proj.weight"].dim() != 4 or sd["pos_embed"].dim() != 3:
        raise CheckpointMismatchError(f"not a DiT/SiT state_dict: x_embedder.proj.weight {tuple(sd['x_embedder.proj.weight'].shape)} "
                                      f"and pos_embed {tuple(sd['pos_embed'].shape)} are not (D, C, p, p) and (1, T, D)")
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, p = w.shape[0], w.shape[1], w.shape[2]
    tokens = sd["pos_embed"].shape[1]
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid; pass input_size explicitly")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out_features = sd["final_layer.linear.weight"].shape[0]
    c_out = out_features // (p * p)
    if c_out not in (in_channels, 2 * in_channels):
        raise ValueError(f"final_layer.linear has {out_features} rows, not p*p*C or p*p*2C for p={p}, C={in_channels}")
    table = sd.get("y_embedder.embedding_table.weight")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden if depth > 0 else 4.0
    size = _SIZES.get((depth, hidden))
    return {
        "input_size": grid * p,
        "patch_size": p,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": _HEADS.get(hidden),
        "mlp_ratio": mlp_ratio,
        "learn_sigma": c_out == 2 * in_channels,
        "num_classes": 0 if table is None else table.shape[0] - 1,
        "size_name": f"{size}/{p}" if size else None,
    }
