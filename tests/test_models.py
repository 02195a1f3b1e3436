"""Functional tests for the DiT / SiT models and the checkpoint loader."""
import argparse
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import TOLERANCES, assert_close
from dit_models.checkpoint import infer_config_from_state_dict, load_checkpoint
from dit_models.models.dit import DiT, DiT_models, get_2d_sincos_pos_embed, run_dit_trunk
from dit_models.models.sit import SiT, SiT_models

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# Parameter counts of the public models at 256 px (input_size 32), p = 2 / 4 / 8, learn_sigma, 1001 label rows.
PARAM_COUNTS = {
    "S": (32_963_360, 32_945_024, 33_148_160),
    "B": (130_512_416, 130_475_648, 130_881_536),
    "L": (458_102_816, 458_053_760, 458_594_816),
    "XL": (675_129_632, 675_074_432, 675_683_072),
}




def _count(model):
    return sum(p.numel() for p in model.parameters())


def _tiny(cls=DiT, **kw):
    """Tiny model (depth 2, D 64, 4 heads, 8x8 latents, p 2) with random non-zero weights.

    The adaLN-Zero init makes every block the identity and the output 0, so paths would
    agree trivially; random weights exercise every term.
    """
    args = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    args.update(kw)
    torch.manual_seed(0)
    model = cls(**args)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.15)
    return model.eval()


def _inputs(n=3, c=4, h=8, w=8, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    t = torch.tensor([0.0, 371.0, 999.0, 10.5, 500.0, 1.0])[:n]
    y = torch.tensor([0, 3, num_classes, 7, 1, 2])[:n]
    return x, t, y


# -----------------------------------------------------------------------------------------------
# Shapes and parameter counts


@pytest.mark.parametrize("family", ["DiT", "SiT"])
@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_param_counts(family, size):
    registry = DiT_models if family == "DiT" else SiT_models
    for patch, expected in zip((2, 4, 8), PARAM_COUNTS[size]):
        with torch.device("meta"):
            model = registry[f"{family}-{size}/{patch}"]()
        assert _count(model) == expected, f"{family}-{size}/{patch}"
        assert model.patch_size == patch and model.input_size == 32


def test_registries_complete():
    names = [f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert sorted(DiT_models) == sorted(f"DiT-{n}" for n in names)
    assert sorted(SiT_models) == sorted(f"SiT-{n}" for n in names)


@pytest.mark.parametrize(
    "name,builder,input_size",
    [
        ("DiT-XL-2-256x256.pt", lambda **k: DiT_models["DiT-XL/2"](**k), 32),
        ("DiT-XL-2-512x512.pt", lambda **k: DiT_models["DiT-XL/2"](**k), 64),
        ("SiT-XL-2-256x256.pt", lambda **k: SiT_models["SiT-XL/2"](**k), 32),
    ],
)
def test_state_dict_keys_and_shapes(name, builder, input_size):
    with open(os.path.join(FIXTURES, "dit_xl2_keys.json")) as f:
        expected = json.load(f)[name]
    with torch.device("meta"):
        model = builder(input_size=input_size)
    sd = model.state_dict()
    assert list(sd) == list(expected) or set(sd) == set(expected)
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert len(list(model.buffers())) == 0
    assert not model.pos_embed.requires_grad
    total = sum(math.prod(s) for s in expected.values())
    assert _count(model) == total == (675_129_632 if input_size == 32 else 676_014_368)


def test_fused_flag_same_parameters():
    a, b = _tiny(fused=True), _tiny(fused=False)
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())


# -----------------------------------------------------------------------------------------------
# Embeddings and initialization


def _pos_formula(d, h, w):
    """MAE's 2-D sin-cos table written out: [E1d(D/2, column j), E1d(D/2, row i)], E1d = [sin | cos]."""
    out = np.zeros((h * w, d))
    half, quarter = d // 2, d // 4
    for i in range(h):
        for j in range(w):
            for part, pos in ((0, j), (1, i)):
                for k in range(quarter):
                    omega = 1.0 / 10000 ** (k / quarter)
                    out[i * w + j, part * half + k] = math.sin(pos * omega)
                    out[i * w + j, part * half + quarter + k] = math.cos(pos * omega)
    return out


def test_pos_embed_formula():
    model = DiT(input_size=12, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=5)
    expected = torch.from_numpy(_pos_formula(32, 6, 6)).float()
    assert_close(model.pos_embed[0], expected, atol=1e-7, rtol=0, name="pos_embed")
    # non-square grid: row-major tokens, column block first
    np.testing.assert_allclose(get_2d_sincos_pos_embed(32, (3, 5)), _pos_formula(32, 3, 5), atol=1e-12)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(1152, 16)[17], _pos_formula(1152, 16, 16)[17], atol=1e-12)


def test_timestep_embedding_layout():
    t = torch.tensor([0.0, 5.0, 999.0])
    from dit_models.models.dit import TimestepEmbedder

    emb = TimestepEmbedder.timestep_embedding(t, 256)
    k = torch.arange(128, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-math.log(10000) * k / 128)[None]
    assert_close(emb, torch.cat([torch.cos(args), torch.sin(args)], 1).float(), atol=2e-4, rtol=0, name="t_emb")


def test_zero_output_at_init():
    torch.manual_seed(0)
    model = DiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    x, t, y = _inputs()
    for fused in (True, False):
        model.fused = fused
        assert torch.equal(model(x, t, y), torch.zeros(3, 8, 8, 8))
    # every block is the identity at init
    tokens = torch.randn(3, 16, 64)
    c = torch.randn(3, 64)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)


def test_initialization_statistics():
    torch.manual_seed(0)
    model = DiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    w = model.x_embedder.proj.weight
    bound = math.sqrt(6.0 / (64 + 16))  # xavier on the (D, C*p*p) view
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6.0 / (64 + 192))  # one (3D, D) matrix
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.003
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.003
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0


# -----------------------------------------------------------------------------------------------
# Fused vs reference path


@pytest.mark.parametrize("cls", [DiT, SiT])
def test_fused_matches_unfused_forward_backward(cls):
    model = _tiny(cls)
    x, t, y = _inputs()
    outs, grads = [], []
    for fused in (True, False):
        model.fused = fused
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = model(xi, t, y)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} | {"x": xi.grad})
    expected_c = 4 if cls is SiT else 8
    assert outs[0].shape == (3, expected_c, 8, 8)
    atol, rtol, gatol, grtol = TOLERANCES[torch.float32]
    assert_close(outs[0], outs[1], atol=atol, rtol=rtol, name="output")
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        # composite of ~20 ops: fp32 accumulation-order differences, scaled to the gradient size
        scale = max(1.0, grads[1][n].abs().max().item())
        assert_close(grads[0][n], grads[1][n], atol=gatol * scale, rtol=grtol * 10, name=f"grad {n}")


def test_sit_drops_sigma_channels():
    dit, sit = _tiny(DiT), _tiny(SiT)
    sit.load_state_dict(dit.state_dict())
    x, t, y = _inputs()
    for fused in (True, False):
        dit.fused = sit.fused = fused
        assert_close(sit(x, t, y), dit(x, t, y)[:, :4], atol=1e-6, rtol=0, name="sit")
    no_sigma = _tiny(SiT, learn_sigma=False)
    assert no_sigma(x, t, y).shape == (3, 4, 8, 8)


def test_other_resolutions_and_non_square():
    model = _tiny()
    torch.manual_seed(3)
    for h, w in ((12, 12), (8, 12)):
        x = torch.randn(2, 4, h, w)
        t, y = torch.tensor([3.0, 800.0]), torch.tensor([1, 10])
        model.fused = True
        a = model(x, t, y)
        model.fused = False
        b = model(x, t, y)
        assert a.shape == (2, 8, h, w)
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"{h}x{w}")
        pos = model.get_pos_embed(h // 2, w // 2, x.device, torch.float32)[0]
        assert_close(pos, torch.from_numpy(_pos_formula(64, h // 2, w // 2)).float(), atol=1e-6, rtol=0, name="pos")
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 9, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_run_dit_trunk_variants():
    model = _tiny()
    x = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    shift, scale = torch.randn(2, 64) * 0.1, torch.randn(2, 64) * 0.1
    xa, ha = run_dit_trunk(model.blocks, x, c, final_adaLN=(shift, scale), fused=True)
    xb, hb = run_dit_trunk(model.blocks, x, c, final_adaLN=(shift, scale), fused=False)
    assert_close(xa, xb, atol=1e-5, rtol=1e-5, name="x")
    assert_close(ha, hb, atol=1e-5, rtol=1e-5, name="h")
    xa, ha = run_dit_trunk(model.blocks, x, c, fused=True)
    assert ha is None
    assert_close(xa, xb, atol=1e-5, rtol=1e-5, name="x (no final)")


# -----------------------------------------------------------------------------------------------
# Classifier-free guidance and labels


@pytest.mark.parametrize("cls", [DiT, SiT])
@pytest.mark.parametrize("cfg_channels", [3, None])
def test_forward_with_cfg_matches_manual(cls, cfg_channels):
    model = _tiny(cls)
    B, s = 2, 2.5
    x, t, _ = _inputs(n=2 * B)
    x[B:] = torch.randn(B, 4, 8, 8)  # the unconditional half of the state is ignored
    t = torch.cat([t[:B], t[:B]])
    y = torch.tensor([1, 4, 10, 10])
    out = model.forward_with_cfg(x, t, y, s, cfg_channels=cfg_channels)
    ref = model(torch.cat([x[:B], x[:B]]), t, y)
    g = 4 if cfg_channels is None else 3
    guided = ref[B:, :g] + s * (ref[:B, :g] - ref[B:, :g])
    assert_close(out[:B, :g], guided, atol=1e-6, rtol=1e-6, name="guided cond")
    assert_close(out[B:, :g], guided, atol=1e-6, rtol=1e-6, name="guided uncond")
    assert torch.equal(out[:, g:], ref[:, g:])  # unguided channels (incl. variance) pass through
    # guided_channels is an alias; forward_guided carries only B rows
    assert torch.equal(model.forward_with_cfg(x, t, y, s, guided_channels=cfg_channels), out)
    assert_close(model.forward_guided(x[:B], t[:B], y[:B], s, cfg_channels), out[:B], atol=1e-6, rtol=1e-6, name="guided")


def test_cfg_scale_one_is_conditional():
    model = _tiny()
    x, t, _ = _inputs(n=4)
    t = torch.cat([t[:2], t[:2]])
    x = torch.cat([x[:2], x[:2]])
    y = torch.tensor([2, 5, 10, 10])
    out = model.forward_with_cfg(x, t, y, 1.0)
    assert_close(out[:2], model(x, t, y)[:2], atol=1e-6, rtol=1e-6, name="s=1")


def test_label_dropout_only_in_train_mode():
    model = _tiny()
    emb = model.y_embedder
    y = torch.arange(8) % 10
    emb.dropout_prob = 1.0  # every label dropped in train mode
    null = emb.embedding_table.weight[10]
    assert torch.equal(emb(y, train=True), null.expand(8, -1))
    assert torch.equal(emb(y, train=False), emb.embedding_table(y))
    assert torch.equal(emb(y, train=False, force_drop_ids=torch.ones(8)), null.expand(8, -1))
    emb.dropout_prob = 0.1
    torch.manual_seed(0)
    dropped = (emb.token_drop(torch.zeros(20000, dtype=torch.long)) == 10).float().mean().item()
    assert abs(dropped - 0.1) < 0.01
    # model.train() routes to dropping, model.eval() does not
    x, t, y3 = _inputs()
    model.eval()
    a = model(x, t, y3)
    assert torch.equal(a, model(x, t, y3))
    emb.dropout_prob = 1.0
    model.train()
    assert_close(model(x, t, y3), model.eval()(x, t, torch.full_like(y3, 10)), atol=1e-6, rtol=0, name="train drop")


def test_num_classes_and_unconditional():
    no_null = DiT(input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=7, class_dropout_prob=0.0)
    assert no_null.y_embedder.embedding_table.num_embeddings == 7
    uncond = _tiny(num_classes=0)
    assert not any(k.startswith("y_embedder") for k in uncond.state_dict())
    x, t, _ = _inputs()
    assert torch.equal(uncond(x, t), uncond(x, t, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError):
        uncond.forward_with_cfg(x, t, None, 1.5)
    cond = _tiny()
    assert torch.equal(cond(x, t, None), cond(x, t, torch.full((3,), 10)))


# -----------------------------------------------------------------------------------------------
# Low precision


def test_bf16_autocast_and_pure_bf16():
    model = _tiny()
    x, t, y = _inputs()
    ref = model(x, t, y).double()
    errs = {}
    for fused in (True, False):
        model.fused = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        errs[("autocast", fused)] = (out.double() - ref).abs().max().item()
    bf = copy.deepcopy(model).to(torch.bfloat16)
    for fused in (True, False):
        bf.fused = fused
        out = bf(x, t, y)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        errs[("pure", fused)] = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    # the fused path is no worse than the reference path at the same precision (+ a bf16 floor)
    for mode in ("autocast", "pure"):
        assert errs[(mode, True)] <= 2 * errs[(mode, False)] + 0.02 * scale, errs
    # training step under autocast: gradients flow and are finite
    model.fused = True
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t, y).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_timestep_embedding_fp32_in_bf16_model():
    model = _tiny()
    bf = copy.deepcopy(model).to(torch.bfloat16)
    t = torch.tensor([998.0, 999.0])
    up = copy.deepcopy(bf.t_embedder).float()  # same (bf16-rounded) weights, fp32 math
    expected = up(t).to(torch.bfloat16)
    assert torch.equal(bf.t_embedder(t), expected)
    assert not torch.equal(expected[0], expected[1])  # bf16 arguments would collapse 998 and 999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.t_embedder(t).dtype == torch.float32


# -----------------------------------------------------------------------------------------------
# Checkpoints


def test_load_container_and_raw(tmp_path):
    src = _tiny()
    ema = _tiny()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    opt = torch.optim.AdamW(src.parameters())
    path = tmp_path / "0000100.pt"
    args = argparse.Namespace(model="DiT-XL/2", image_size=256)  # as DiT/SiT train.py store it
    torch.save({"model": src.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)

    dst = _tiny()
    ckpt = load_checkpoint(str(path), dst, which="ema")
    assert ckpt["args"].image_size == 256 and "opt" in ckpt
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), ema.state_dict().values()))
    load_checkpoint(path, dst, which="model")
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
    load_checkpoint(path, dst, which="auto")  # "auto" prefers ema
    assert torch.equal(dst.pos_embed, ema.pos_embed)

    # raw state_dict with DDP / compile prefixes, from a file and in memory
    raw = {"module." + k: v for k, v in src.state_dict().items()}
    torch.save(raw, tmp_path / "raw.pt")
    load_checkpoint(tmp_path / "raw.pt", dst, which="ema")
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
    load_checkpoint({"_orig_mod." + k: v for k, v in ema.state_dict().items()}, dst)
    assert torch.equal(dst.final_layer.linear.weight, ema.final_layer.linear.weight)
    with pytest.raises(KeyError):
        load_checkpoint({"model": src.state_dict()}, dst, which="ema")


def test_released_layout_never_loads_non_strictly():
    """A key the loader does not map, or a model key the file lacks, is an error naming it (issue 13)."""
    src = _tiny()
    dst = _tiny()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    extra = dict(src.state_dict(), **{"blocks.0.attn.q_norm.weight": torch.ones(8)})
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.q_norm\.weight' are not in the model"):
        load_checkpoint(extra, dst)
    lacking = {k: v for k, v in src.state_dict().items() if k != "final_layer.adaLN_modulation.1.bias"}
    with pytest.raises(ValueError, match=r"'final_layer\.adaLN_modulation\.1\.bias' are missing"):
        load_checkpoint({"ema": lacking, "model": src.state_dict()}, dst, which="ema")
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing half-loaded
    with pytest.raises(TypeError):
        load_checkpoint(src.state_dict(), dst, strict=False)  # no way to ask for a non-strict load
    # a MaskDiT (EDMPrecond) file handed to the DiT loader says which loader to use
    with pytest.raises(ValueError, match="load_maskdit_checkpoint"):
        load_checkpoint({"model." + k: v for k, v in src.state_dict().items()}, dst)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(input_size=16), "pos_embed"),
        (dict(learn_sigma=False), "final_layer.linear"),
        (dict(num_classes=20), "y_embedder"),
    ],
)
def test_shape_mismatch_errors(kwargs, key):
    src = _tiny()
    dst = _tiny(**kwargs)
    with pytest.raises(ValueError) as err:
        load_checkpoint(src.state_dict(), dst)
    msg = str(err.value)
    assert key in msg and "checkpoint" in msg and "Hint" in msg
    k = next(k for k in src.state_dict() if k.startswith(key))
    assert str(tuple(src.state_dict()[k].shape)) in msg and str(tuple(dst.state_dict()[k].shape)) in msg


def test_infer_config_from_state_dict():
    with torch.device("meta"):
        sd = SiT_models["SiT-XL/2"](input_size=64).state_dict()
    cfg = infer_config_from_state_dict({"ema": sd, "model": sd})
    assert cfg == {
        "input_size": 64, "patch_size": 2, "in_channels": 4, "hidden_size": 1152, "depth": 28,
        "num_heads": 16, "mlp_ratio": 4.0, "learn_sigma": True, "num_classes": 1000, "size_name": "XL/2",
    }  # fmt: skip
    tiny = _tiny(learn_sigma=False, num_classes=3)
    cfg = infer_config_from_state_dict(tiny.state_dict())
    assert (cfg["learn_sigma"], cfg["num_classes"], cfg["input_size"], cfg["depth"]) == (False, 3, 8, 2)
    rebuilt = DiT(**{k: v for k, v in cfg.items() if k not in ("size_name", "num_heads")}, num_heads=4)
    load_checkpoint(tiny.state_dict(), rebuilt)


# -----------------------------------------------------------------------------------------------
# Patch embedding / unpatchify equivalences and kernel use


def test_patch_embed_gemm_and_unpatchify_layouts():
    import dit_kernels

    model = _tiny(input_size=12)
    x = torch.randn(2, 4, 12, 8)
    conv = model.x_embedder(x, fused=False)  # (N, T, D)
    gemm = model.x_embedder(x, fused=True)
    assert_close(gemm, conv, atol=1e-5, rtol=1e-5, name="patch embed")
    y = torch.randn(2, 24, 2 * 2 * 8)
    assert torch.equal(model.unpatchify(y, 12, 8), dit_kernels.unpatchify(y, 2, 12, 8))
    assert torch.equal(dit_kernels.unpatchify(y, 2, 12, 8, channels=4), model.unpatchify(y, 12, 8)[:, :4])
    # output layout: out[n, c, i*p + a, j*p + b] = y[n, i*w + j, (a*p + b)*C_out + c]
    out = model.unpatchify(y, 12, 8)
    n, c, i, j, a, b = 1, 5, 3, 2, 1, 0
    assert out[n, c, i * 2 + a, j * 2 + b] == y[n, i * 4 + j, (a * 2 + b) * 8 + c]


def test_fused_path_uses_compiled_ops():
    import dit_kernels

    needed = ("modulated_layer_norm", "gated_residual_modulated_layer_norm", "patchify", "unpatchify")
    if not all(dit_kernels.has_kernel(op, "cpu") for op in needed):
        pytest.skip("compiled CPU kernels not built")
    model = _tiny()
    x, t, y = _inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, t, y)
    names = {e.name for e in prof.events()}
    assert {f"dit_kernels::{op}" for op in needed} <= names


def test_autocast_fused_trunk_keeps_branches_in_bf16():
    """Under bf16 autocast the fused trunk keeps the fp32 residual and hands the kernels the bf16
    branch outputs as they are (no cast ops between blocks); outputs and grads match the plain path."""
    from dit_models.models.dit import run_dit_trunk

    model = _tiny()
    model.train()
    x, t, y = _inputs()
    tokens = torch.randn(x.shape[0], 16, model.hidden_size)
    c = torch.randn(x.shape[0], model.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res, h = run_dit_trunk(model.blocks, tokens, c, final_adaLN=model.final_layer.adaLN_modulation, fused=True)
        assert res.dtype == torch.float32 and h.dtype == torch.bfloat16
        # no fp32<->bf16 copies of (N, T, D) branch tensors between the fused ops
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run_dit_trunk(model.blocks, tokens, c, final_adaLN=model.final_layer.adaLN_modulation, fused=True)
    big_casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                 and len(e.input_shapes[0]) == 3]
    assert not big_casts, [e.input_shapes for e in big_casts]

    grads = {}
    for fused in (True, False):
        model.fused = fused
        model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        grads[fused] = (out.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()
                                                if p.grad is not None})
    (o1, g1), (o0, g0) = grads[True], grads[False]
    assert (o1 - o0).abs().max() <= 0.05 * o0.abs().max()
    for n in g0:
        err = (g1[n] - g0[n]).norm() / (g0[n].norm() + 1e-12)
        assert err < 0.05, (n, err.item())


def test_autocast_fused_model_compiles_fullgraph():
    model = _tiny()
    x, t, y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x, t, y)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2, name="compiled autocast forward")


@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_recompute_act(autocast):
    """Mlp(recompute_act=True) equals the plain MLP in value and gradients and stores less."""
    from dit_models.models.dit import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x = torch.randn(2, 5, 16, requires_grad=True)
    grad_out = torch.randn(2, 5, 16)
    param_ptrs = {p.data_ptr() for p in mlp.parameters()}
    results = []
    for recompute in (False, True):
        saved = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.data_ptr(), t), lambda t: t):
                out = mlp(x, recompute_act=recompute)
        grads = torch.autograd.grad(out, [x, *mlp.parameters()], grad_out.to(out.dtype))
        # activation elements of hidden width 64 kept for backward (weights and their casts excluded)
        hidden = sum(t.numel() for p, t in saved.items() if p not in param_ptrs and t.numel() == 2 * 5 * 64)
        results.append((out, grads, hidden))
    (o0, g0, n0), (o1, g1, n1) = results
    assert o1.dtype == o0.dtype and torch.equal(o1, o0)
    for a, b in zip(g1, g0):
        assert a.dtype == b.dtype
        tol = (2e-2, 2e-2) if autocast else (1e-6, 1e-5)
        assert_close(a, b, *tol, name="grad")
    assert n1 == n0 // 2  # only u = fc1(x) kept, not gelu(u)


def test_mlp_recompute_in_model_and_compile():
    model = _tiny()
    model.train()
    x, t, y = _inputs()
    grads = {}
    for recompute in (True, False):
        model.mlp_recompute = recompute
        model.zero_grad()
        torch.manual_seed(0)
        model(x, t, y).square().mean().backward()
        grads[recompute] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads[True], grads[False]):
        assert_close(a, b, 1e-6, 1e-5, "grad")
    model.mlp_recompute = True
    torch.manual_seed(0)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    out.square().mean().backward()


def test_patch_size_mismatch_is_named_as_such():
    # pos_embed (the first key) differs too, and used to be blamed on another resolution.
    src, dst = _tiny(patch_size=2), _tiny(patch_size=4)
    with pytest.raises(ValueError) as err:
        load_checkpoint(src.state_dict(), dst)
    msg = str(err.value)
    assert msg.startswith("shape mismatch for x_embedder.proj.weight") and "patch size" in msg, msg
