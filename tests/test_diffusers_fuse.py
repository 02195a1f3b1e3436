"""dit_kernels.integrations.diffusers.fuse on tiny random diffusers transformers: same outputs and gradients."""
import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import assert_close, assert_lowp_close  # noqa: E402
from dit_kernels.integrations.diffusers import fuse, is_fused, unfuse  # noqa: E402

N = 2


def _randomize(model, seed=0):
    """Random weights everywhere (adaLN-Zero's zero init would hide every modulation path)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def _dit():
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(N, 4, 8, 8, generator=g), timestep=torch.tensor([3, 700]),
                  class_labels=torch.tensor([1, 9]))
    return model, inputs, 4  # per block: the block (inline residual + LN + modulate) and its AdaLayerNormZero


def _sd3():
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                            pos_embed_max_size=8, dual_attention_layers=(0,))
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(N, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(N, 5, 16, generator=g),
                  pooled_projections=torch.randn(N, 16, generator=g), timestep=torch.tensor([10, 500]))
    return model, inputs, 5  # 2 blocks; block 0: SD35AdaLayerNormZeroX + context AdaLayerNormZero; block 1: norm1


def _flux():
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    g = torch.Generator().manual_seed(3)
    s, l = 16, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(s, 3)
    inputs = dict(hidden_states=torch.randn(N, s, 8, generator=g),
                  encoder_hidden_states=torch.randn(N, l, 16, generator=g),
                  pooled_projections=torch.randn(N, 16, generator=g), timestep=torch.tensor([0.2, 0.9]),
                  img_ids=img_ids, txt_ids=torch.zeros(l, 3))
    return model, inputs, 4  # double block: the block, norm1, norm1_context; single block: norm


def _pixart():
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                               cross_attention_dim=16, caption_channels=16,
                                               use_additional_conditions=False)
    g = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(N, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(N, 5, 16, generator=g), timestep=torch.tensor([10, 900]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, 2  # ada_norm_single blocks (no norm module of their own)


MODELS = {"dit": _dit, "sd3": _sd3, "flux": _flux, "pixart": _pixart}


def _out(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _grads(model, inputs):
    model.zero_grad()
    out = _out(model, inputs)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)))
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_unpatched_fp32(name):
    model, inputs, expected = MODELS[name]()
    model = _randomize(model)
    keys = list(model.state_dict())
    out_ref, g_ref = _grads(model, inputs)
    count = fuse(model)
    assert count > 0 and is_fused(model)
    if expected is not None:
        assert count == expected
    assert list(model.state_dict()) == keys  # names unchanged
    out, g = _grads(model, inputs)
    assert_close(out, out_ref, 1e-5, 1e-5, f"{name} output")
    assert g.keys() == g_ref.keys()
    for k in g:
        assert_close(g[k], g_ref[k], 1e-4, 1e-4, f"{name} grad {k}")
    assert unfuse(model) == count and not is_fused(model)
    assert torch.equal(_out(model, inputs).detach(), out_ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_bf16_two_x_rule(name):
    model, inputs, _ = MODELS[name]()
    model = _randomize(model)
    with torch.no_grad():
        ref32 = _out(model, inputs).double()
        model.to(torch.bfloat16)
        activations = ("hidden_states", "encoder_hidden_states", "pooled_projections")
        low = {k: v.bfloat16() if k in activations else v for k, v in inputs.items()}
        ref_lowp = _out(model, low)
        fuse(model)
        fast = _out(model, low)
    assert_lowp_close(fast, ref32, ref_lowp, 1e-3, f"{name} bf16 output")


def test_unsupported_shape_falls_back():
    """A modulation batch that does not match x (broadcast (1, D)) takes diffusers' expression."""
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    norm = _randomize(AdaLayerNormZeroSingle(16))
    x, emb = torch.randn(3, 5, 16), torch.randn(1, 16)
    ref = norm(x, emb=emb)
    fuse(norm)
    out = norm(x, emb=emb)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_cpu_timing_side_by_side():
    """Prints a CPU side-by-side of the DiT adaLN-Zero module (docs/results.md); asserts only equality."""
    from diffusers.models.normalization import AdaLayerNormZero

    norm = _randomize(AdaLayerNormZero(384))
    x, emb = torch.randn(4, 256, 384), torch.randn(4, 384)
    times = {}
    for label in ("diffusers", "fused"):
        if label == "fused":
            fuse(norm)
        with torch.no_grad():
            out = norm(x, emb=emb)
            t0 = time.perf_counter()
            for _ in range(20):
                norm(x, emb=emb)
            times[label] = (time.perf_counter() - t0) / 20 * 1e3
        times[label + "_out"] = out[0]
    print(f"AdaLayerNormZero D=384, x (4, 256, 384), 1 thread: diffusers {times['diffusers']:.3f} ms, "
          f"fused {times['fused']:.3f} ms")
    assert_close(times["fused_out"], times["diffusers_out"], 1e-5, 1e-5, "AdaLayerNormZero")


def test_unsupported_block_falls_back():
    """Feed-forward chunking is not on the fused block path: the block takes diffusers' forward."""
    model, inputs, _ = _dit()
    model = _randomize(model)
    for block in model.transformer_blocks:
        block.set_chunk_feed_forward(4, 1)
    with torch.no_grad():
        ref = _out(model, inputs)
        fuse(model)
        out = _out(model, inputs)
    assert_close(out, ref, 1e-5, 1e-5, "chunked feed-forward")
