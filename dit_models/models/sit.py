"""SiT: Scalable Interpolant Transformers (Ma et al., arXiv 2401.08740).

The DiT architecture with identical keys, shapes, initialization and pos-embed (models.md §12);
t is continuous in [0, 1] (t = 1 data) and fed to the timestep embedder unscaled. With
learn_sigma=True (the released SiT-XL-2-256 file and the training default) the network still
has C_out = 2C outputs, but forward returns only the first C channels (velocity / score / noise);
the fused path drops them inside the unpatchify kernel.
"""
from .dit import DiT

__all__ = ["SiT", "SiT_models"]


class SiT(DiT):
    """DiT backbone whose forward returns (N, C, H, W): channels C..2C-1 are discarded."""

    drop_sigma_channels = True


def SiT_XL_2(**kwargs):
    return SiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def SiT_XL_4(**kwargs):
    return SiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def SiT_XL_8(**kwargs):
    return SiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def SiT_L_2(**kwargs):
    return SiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def SiT_L_4(**kwargs):
    return SiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def SiT_L_8(**kwargs):
    return SiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def SiT_B_2(**kwargs):
    return SiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def SiT_B_4(**kwargs):
    return SiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def SiT_B_8(**kwargs):
    return SiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def SiT_S_2(**kwargs):
    return SiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def SiT_S_4(**kwargs):
    return SiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def SiT_S_8(**kwargs):
    return SiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


SiT_models = {
    "SiT-XL/2": SiT_XL_2, "SiT-XL/4": SiT_XL_4, "SiT-XL/8": SiT_XL_8,
    "SiT-L/2": SiT_L_2, "SiT-L/4": SiT_L_4, "SiT-L/8": SiT_L_8,
    "SiT-B/2": SiT_B_2, "SiT-B/4": SiT_B_4, "SiT-B/8": SiT_B_8,
    "SiT-S/2": SiT_S_2, "SiT-S/4": SiT_S_4, "SiT-S/8": SiT_S_8,
}  # fmt: skip
