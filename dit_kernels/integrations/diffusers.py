"""dit_kernels' fused modulated LayerNorm inside diffusers' adaLN-Zero norm modules.

    from dit_kernels.integrations.diffusers import fuse, unfuse
    fuse(transformer)    # DiTTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel, ...
    unfuse(transformer)  # back to diffusers' own forward

fuse replaces, per instance, the forward of every AdaLayerNormZero (DiT, SD3, Flux double blocks),
AdaLayerNormZeroSingle (Flux single blocks) and SD35AdaLayerNormZeroX (SD3.5 dual-attention blocks) by one
that computes LN(x) * (1 + scale) + shift with dit_kernels.modulated_layer_norm: one pass over x with
fp32 statistics and fp32 1 + scale, the module's own eps, the modulation read as strided (N, D) views of the
Linear's (N, kD) output. The adaLN Linear and the returned gates / MLP modulation are diffusers' own. No
parameter or buffer is added, renamed or moved: state_dicts load and save unchanged, fused or not.
Unsupported inputs (not (N, T, D), a modulation batch that differs, an affine LayerNorm, integer dtypes) take
diffusers' code for that call.

Not patched (yet): the inline gated residual + LayerNorm + modulate inside BasicTransformerBlock (DiT's MLP
half, PixArt's ada_norm_single), JointTransformerBlock and FluxTransformerBlock; they run diffusers' code.
"""
import types

import torch

from ..ops.modulated_layer_norm import modulated_layer_norm

__all__ = ["fuse", "unfuse", "is_fused"]

_MARK = "_dit_kernels_fused"


def _plain_ln(norm):
    """The module's LayerNorm when the kernel computes it exactly: no affine parameters."""
    return isinstance(norm, torch.nn.LayerNorm) and norm.weight is None and norm.bias is None


def _modulate(norm, x, shift, scale):
    """LN(x) * (1 + scale[:, None]) + shift[:, None] through the kernel, or diffusers' expression."""
    ok = (x.dim() == 3 and x.is_floating_point() and shift.dim() == 2 and scale.shape == shift.shape
          and tuple(shift.shape) == (x.shape[0], x.shape[2]) and shift.is_floating_point()
          and tuple(norm.normalized_shape) == (x.shape[2],))
    if not ok:
        return norm(x) * (1 + scale[:, None]) + shift[:, None]
    if shift.dtype not in (x.dtype, torch.float32):  # the kernel reads modulation in x.dtype or fp32
        shift, scale = shift.to(x.dtype), scale.to(x.dtype)
    y = modulated_layer_norm(x, shift, scale, eps=norm.eps)
    out_dtype = torch.promote_types(x.dtype, shift.dtype)  # diffusers' result dtype (type promotion)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _ada_layer_norm_zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    m = self.linear(self.silu(emb))  # (N, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = m.chunk(6, dim=1)
    return _modulate(self.norm, x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_layer_norm_zero_single(self, x, emb=None):
    shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)  # 3 x (N, D)
    return _modulate(self.norm, x, shift_msa, scale_msa), gate_msa


def _sd35_ada_layer_norm_zero_x(self, hidden_states, emb=None):
    m = self.linear(self.silu(emb)).chunk(9, dim=1)  # 9 x (N, D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = m
    # Two modulations of one LayerNorm: the kernel twice (two reads of x) instead of LN + two modulates.
    h = _modulate(self.norm, hidden_states, shift_msa, scale_msa)
    h2 = _modulate(self.norm, hidden_states, shift_msa2, scale_msa2)
    return h, gate_msa, shift_mlp, scale_mlp, gate_mlp, h2, gate_msa2


def _patches():
    from diffusers.models import normalization as n

    return {
        n.AdaLayerNormZero: _ada_layer_norm_zero,
        n.AdaLayerNormZeroSingle: _ada_layer_norm_zero_single,
        n.SD35AdaLayerNormZeroX: _sd35_ada_layer_norm_zero_x,
    }


def fuse(model):
    """Patch every supported adaLN module of `model` (in place). Returns the number of modules patched."""
    patches = _patches()
    count = 0
    for module in model.modules():
        forward = patches.get(type(module))
        if forward is None or getattr(module, _MARK, False) or not _plain_ln(getattr(module, "norm", None)):
            continue
        module.forward = types.MethodType(forward, module)
        setattr(module, _MARK, True)
        count += 1
    return count


def unfuse(model):
    """Undo fuse (in place): diffusers' own forward again. Returns the number of modules restored."""
    count = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            count += 1
    return count


def is_fused(model):
    return any(getattr(m, _MARK, False) for m in model.modules())
