"""SiT: Scalable Interpolant Transformers (Ma et al., arXiv 2401.08740).

The DiT architecture with identical keys, shapes, initialization and pos-embed (the public SiT models.py is
DiT's file with the classes renamed);
t is continuous in [0, 1] (t = 1 data) and fed to the timestep embedder unscaled. With
learn_sigma=True (the released SiT-XL-2-256 file and the training default) the network still
has C_out = 2C outputs, but forward returns only the first C channels (velocity / score / noise);
the fused path drops them inside the unpatchify kernel.
"""
from .dit import SIZES, DiT, size_registry

__all__ = ["SiT", "SiT_models"]


class SiT(DiT):
    """DiT backbone whose forward returns (N, C, H, W): channels C..2C-1 are discarded."""

    drop_sigma_channels = True


SiT_models = size_registry(SiT, "SiT", SIZES, (2, 4, 8))
