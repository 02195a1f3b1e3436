"""DiT, SiT, MaskDiT and SD-DiT models, noise processes, samplers and scripts.

Public names are imported lazily so that ``import dit_models`` stays cheap and each
family can be used on its own.
"""
import importlib

_EXPORTS = {
    "DiT": "dit_models.models.dit",
    "DiT_models": "dit_models.models.dit",
    "SiT": "dit_models.models.sit",
    "SiT_models": "dit_models.models.sit",
    "MaskDiT": "dit_models.models.maskdit",
    "MaskDiT_models": "dit_models.models.maskdit",
    "SDDiT": "dit_models.models.sd_dit",
    "SDDiT_models": "dit_models.models.sd_dit",
    "load_checkpoint": "dit_models.checkpoint",
    "create_diffusion": "dit_models.diffusion",
    "create_transport": "dit_models.transport",
    "Sampler": "dit_models.transport",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dit_models' has no attribute {name!r}")
