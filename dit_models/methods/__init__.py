"""The noise processes, one file per method: DiT's DDPM (ddpm), SiT's interpolant transport (sit), MaskDiT's and
SD-DiT's EDM (maskdit, sddit). Each file holds one `Method` (dit_models/methods/base.py): its model registry, its
training objective and defaults, its samplers with their published and fast options and NFE formulas, its
released-checkpoint loader and the command-line flags it adds.

    get_method("sit").samplers["dpm++"].run(model, z, y, opts, sampling)

Below every command-line tool and above the models and noise processes (which it imports lazily).
"""
from . import ddpm, maskdit, sddit, sit
from .base import Flag, Method, MethodUnavailable, Objective, SamplerSpec, Sampling

METHODS = {m.name: m for m in (ddpm.METHOD, sit.METHOD, maskdit.METHOD, sddit.METHOD)}

__all__ = ["METHODS", "get_method", "add_flags", "sampler_flags", "Method", "MethodUnavailable", "Objective",
           "SamplerSpec", "Sampling", "Flag"]


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"unknown --method {name!r}; choose from {tuple(METHODS)}")
    return METHODS[name]


def _flags(kind):
    """Every method's flags of one kind ("train_flags" or "sampler_flags"), each once, in method order."""
    seen = {}
    for m in METHODS.values():
        for f in getattr(m, kind):
            seen.setdefault(f.dest, f)
    return list(seen.values())


def add_flags(group, kind):
    for f in _flags(kind):
        group.add_argument(*f.names, **f.kwargs)


def sampler_flags():
    return _flags("sampler_flags")
