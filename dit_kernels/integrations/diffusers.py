"""dit_kernels' fused adaLN ops inside diffusers' transformers (DiT, PixArt, SD3 / SD3.5, Flux).

    from dit_kernels.integrations.diffusers import fuse, unfuse
    fuse(transformer)    # DiT / PixArt / SD3 / Flux transformer models; returns the modules patched
    unfuse(transformer)  # back to diffusers' own forward

fuse replaces, per instance, the forward of every AdaLayerNormZero (DiT, SD3, Flux double blocks),
AdaLayerNormZeroSingle (Flux single blocks) and SD35AdaLayerNormZeroX (SD3.5 dual-attention blocks) by one
that computes LN(x) * (1 + scale) + shift with dit_kernels.modulated_layer_norm: one pass over x with
fp32 statistics and fp32 1 + scale, the module's own eps, the modulation read as strided (N, D) views of the
Linear's (N, kD) output. The adaLN Linear and the returned gates / MLP modulation are diffusers' own. No
parameter or buffer is added, renamed or moved: state_dicts load and save unchanged, fused or not.
Unsupported inputs (not (N, T, D), a modulation batch that differs, an affine LayerNorm, integer dtypes) take
diffusers' code for that call.

BasicTransformerBlock with norm_type "ada_norm_zero" (DiT) or "ada_norm_single" (PixArt) also gets a forward
whose inline gated residual + LayerNorm + modulate run as gated_residual_modulated_layer_norm (DiT: the
attention -> MLP hand-off in one pass) or as modulated_layer_norm / gated_residual (PixArt, whose cross-attention
sits between); blocks with GLIGEN, feed-forward chunking, a positional embedding inside the block or 4-D hidden
states take diffusers' forward.

FluxTransformerBlock and JointTransformerBlock (SD3 / SD3.5) likewise: both streams' attention -> MLP
hand-offs run as gated_residual_modulated_layer_norm, the MLP residuals as gated_residual (SD3.5's second
attention: gated_residual, then its hand-off fused); JointTransformerBlock with feed-forward chunking takes
diffusers' forward.
"""
import types

import torch

from ..ops.gated_residual import gated_residual, gated_residual_modulated_layer_norm
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


def _same_dtype(*ts):
    return len({t.dtype for t in ts}) == 1


def _gated(x, y, gate):
    """x + gate[:, None] * y (gate (N, D))."""
    if (x.dim() == 3 and y.shape == x.shape and tuple(gate.shape) == (x.shape[0], x.shape[2])
            and _same_dtype(x, y, gate)):
        return gated_residual(x, y, gate)
    return gate[:, None] * y + x


def _gated_modulate(norm, x, y, gate, shift, scale):
    """(x + gate*y, LN(x + gate*y) * (1 + scale) + shift) in one pass where supported."""
    if (x.dim() == 3 and y.shape == x.shape and _same_dtype(x, y, gate, shift, scale)
            and all(tuple(m.shape) == (x.shape[0], x.shape[2]) for m in (gate, shift, scale))
            and tuple(norm.normalized_shape) == (x.shape[2],)):
        return gated_residual_modulated_layer_norm(x, y, gate, shift, scale, eps=norm.eps)
    x = _gated(x, y, gate)
    return x, _modulate(norm, x, shift, scale)


def _block_supported(block, x, kwargs):
    mlp_norm = block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2
    return (x.dim() == 3 and block.pos_embed is None and block._chunk_size is None and _plain_ln(mlp_norm)
            and "gligen" not in kwargs and "scale" not in kwargs
            and (block.norm_type == "ada_norm_zero" or _plain_ln(block.norm1)))


def _basic_transformer_block(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                             encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                             class_labels=None, added_cond_kwargs=None):
    kwargs = dict(cross_attention_kwargs or {})
    x = hidden_states  # (N, T, D) residual stream
    if not _block_supported(self, x, kwargs):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    if self.norm_type == "ada_norm_zero":  # DiT; norm1 is an AdaLayerNormZero (fused itself when patched)
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)
        mlp_norm = self.norm3
    else:  # ada_norm_single (PixArt): a learned table plus the projected timestep, 6 x (N, D)
        table = self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.unbind(1)
        h = _modulate(self.norm1, x, shift_msa, scale_msa)
        mlp_norm = self.norm2
    attn = self.attn1(h, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                      attention_mask=attention_mask, **kwargs)
    if self.attn2 is None:  # DiT: residual, LayerNorm and modulation of the MLP input in one pass
        x, h = _gated_modulate(mlp_norm, x, attn, gate_msa, shift_mlp, scale_mlp)
    else:
        x = _gated(x, attn, gate_msa)
        context_in = self.norm2(x) if self.norm_type == "ada_norm_zero" else x  # PixArt: no norm before it
        x = self.attn2(context_in, encoder_hidden_states=encoder_hidden_states,
                       attention_mask=encoder_attention_mask, **kwargs) + x
        h = _modulate(mlp_norm, x, shift_mlp, scale_mlp)
    return _gated(x, self.ff(h), gate_mlp)


def _flux_transformer_block(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                            joint_attention_kwargs=None):
    x, c = hidden_states, encoder_hidden_states  # (N, T, D) image and (N, L, D) text streams
    h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
    hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, emb=temb)
    outs = self.attn(hidden_states=h, encoder_hidden_states=hc, image_rotary_emb=image_rotary_emb,
                     **(joint_attention_kwargs or {}))
    x, h = _gated_modulate(self.norm2, x, outs[0], gate_msa, shift_mlp, scale_mlp)
    x = _gated(x, self.ff(h), gate_mlp)
    if len(outs) == 3:  # IP-adapter output
        x = x + outs[2]
    c, hc = _gated_modulate(self.norm2_context, c, outs[1], c_gate_msa, c_shift_mlp, c_scale_mlp)
    c = _gated(c, self.ff_context(hc), c_gate_mlp)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)  # as diffusers does for the text stream
    return c, x


def _joint_transformer_block(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    if self._chunk_size is not None:  # feed-forward chunking: diffusers' forward
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    kwargs = joint_attention_kwargs or {}
    x, c = hidden_states, encoder_hidden_states  # (N, T, D) image and (N, L, D) text streams
    if self.use_dual_attention:  # SD3.5: a second self-attention on its own modulation of the same LN
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp, h2, gate_msa2 = self.norm1(x, emb=temb)
    else:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
    if self.context_pre_only:  # last block: the text stream only feeds the attention
        hc = self.norm1_context(c, temb)
    else:
        hc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, emb=temb)
    attn, c_attn = self.attn(hidden_states=h, encoder_hidden_states=hc, **kwargs)
    if self.use_dual_attention:
        x = _gated(x, attn, gate_msa)
        x, h = _gated_modulate(self.norm2, x, self.attn2(hidden_states=h2, **kwargs), gate_msa2, shift_mlp, scale_mlp)
    else:
        x, h = _gated_modulate(self.norm2, x, attn, gate_msa, shift_mlp, scale_mlp)
    x = _gated(x, self.ff(h), gate_mlp)
    if self.context_pre_only:
        return None, x
    c, hc = _gated_modulate(self.norm2_context, c, c_attn, c_gate_msa, c_shift_mlp, c_scale_mlp)
    return _gated(c, self.ff_context(hc), c_gate_mlp), x


def _joint_block_eligible(block):
    return _plain_ln(block.norm2) and (block.context_pre_only or _plain_ln(block.norm2_context))


def _flux_block_eligible(block):
    return _plain_ln(block.norm2) and _plain_ln(block.norm2_context)


def _basic_block_eligible(block):
    return block.norm_type in ("ada_norm_zero", "ada_norm_single")


def _patches():
    """{module class: (fused forward, eligibility test)}."""
    from diffusers.models import normalization as n
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    def plain_norm(module):
        return _plain_ln(getattr(module, "norm", None))

    return {
        n.AdaLayerNormZero: (_ada_layer_norm_zero, plain_norm),
        n.AdaLayerNormZeroSingle: (_ada_layer_norm_zero_single, plain_norm),
        n.SD35AdaLayerNormZeroX: (_sd35_ada_layer_norm_zero_x, plain_norm),
        BasicTransformerBlock: (_basic_transformer_block, _basic_block_eligible),
        FluxTransformerBlock: (_flux_transformer_block, _flux_block_eligible),
        JointTransformerBlock: (_joint_transformer_block, _joint_block_eligible),
    }


def fuse(model):
    """Patch every supported adaLN module of `model` (in place). Returns the number of modules patched."""
    patches = _patches()
    count = 0
    for module in model.modules():
        forward, eligible = patches.get(type(module), (None, None))
        if forward is None or getattr(module, _MARK, False) or not eligible(module):
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
