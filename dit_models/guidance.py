"""Classifier-free guidance (Ho & Salimans 2022): the one mix of conditional and unconditional outputs.

Below the models and the samplers (DiT/SiT forward_with_cfg, MaskDiT/SD-DiT forward_with_cfg inside the EDM
preconditioner, the transport samplers' CFG).
"""
import torch

__all__ = ["cfg_mix"]


def cfg_mix(cond, uncond, scale, channels=None):
    """uncond + scale (cond - uncond) on the first `channels` channels (dim 1; None = all), cond on the rest.

    cond, uncond: (N, C, ...) outputs of the network with the class label and with the null label.
    channels: 3 reproduces the public DiT/SiT code, which guides only the first 3 of the 4 latent channels.
    """
    if channels is None or int(channels) >= cond.shape[1]:
        return uncond + scale * (cond - uncond)
    g = int(channels)
    return torch.cat([uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)
