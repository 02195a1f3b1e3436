"""Fused kernels for Diffusion Transformers, each beside its pure-PyTorch reference.

Every public op takes ``impl="auto" | "ext" | "ref"``: the compiled kernel when the
extension is loaded and has one for the input's device, or the reference.
"""
from ._ext import HAS_CUDA_KERNELS, HAS_EXT, has_kernel  # noqa: F401
from .ops.modulated_layer_norm import modulated_layer_norm, modulated_layer_norm_ref  # noqa: F401
from .ops.gated_residual import (  # noqa: F401
    gated_residual,
    gated_residual_modulated_layer_norm,
    gated_residual_modulated_layer_norm_ref,
    gated_residual_ref,
)
from .ops.patchify import patchify, patchify_ref, unpatchify, unpatchify_ref  # noqa: F401
from .ops.tokens import (  # noqa: F401
    gather_tokens,
    gather_tokens_ref,
    random_token_mask,
    scatter_tokens,
    scatter_tokens_ref,
)
from .ops.sde_step import (  # noqa: F401
    sde_euler_maruyama_step,
    sde_euler_maruyama_step_ref,
    sde_euler_maruyama_step_table,
    sde_euler_maruyama_step_table_ref,
)
