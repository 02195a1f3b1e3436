"""MaskDiT: parameter counts, masking semantics, loss terms, fused vs unfused, CFG."""
import argparse
import copy
import math
import re

import numpy as np
import pytest
import torch

from dit_models.edm import edm_coefficients, edm_loss_weight, edm_sampler, sample_sigma
from dit_models.models.maskdit import (
    MaskDiT,
    MaskDiT_models,
    MaskDiTLoss,
    convert_maskdit_checkpoint,
    export_maskdit_checkpoint,
    get_mask_ratio_fn,
    load_maskdit_checkpoint,
    maskdit_loss_terms,
    patchify_output_layout,
)
from conftest import assert_close

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            decoder_hidden_size=16, decoder_depth=2, decoder_num_heads=2)
T_TINY = 16


def tiny(fused=False, seed=0, perturb=True, **kw):
    torch.manual_seed(seed)
    model = MaskDiT(**{**TINY, **kw}, fused=fused)
    if perturb:  # move off the zero init so every path carries signal
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return model


def count(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Architecture


def test_param_count_xl2():
    with torch.device("meta"):
        model = MaskDiT_models["MaskDiT-XL/2"]()
    enc = sum(count(getattr(model, n)) for n in ("x_embedder", "t_embedder", "y_embedder", "blocks")) + model.pos_embed.numel()
    bridge_dec = count(model.decoder_layer) + model.decoder_pos_embed.numel() + model.mask_token.numel() + count(model.decoder_blocks)
    assert enc == 672_435_072
    assert bridge_dec == 56_917_248
    assert count(model.final_layer) == 1_188_880
    assert count(model) == 730_541_200
    assert tuple(model.y_embedder.embedding_table.weight.shape) == (1152, 1000)
    assert model.y_embedder.embedding_table.bias is None


def test_registry():
    assert {"MaskDiT-XL/2", "MaskDiT-XL/4", "MaskDiT-L/2", "MaskDiT-L/4", "MaskDiT-B/2", "MaskDiT-B/4",
            "MaskDiT-S/2", "MaskDiT-S/4"} <= set(MaskDiT_models)
    with torch.device("meta"):
        m = MaskDiT_models["MaskDiT-S/4"]()
    assert m.patch_size == 4 and m.hidden_size == 384 and len(m.decoder_blocks) == 8
    assert m.decoder_hidden_size == 512 and m.decoder_blocks[0].attn.num_heads == 16
    assert m.final_layer.linear.out_features == 4 * 16


def test_keys_and_frozen_pos_embeds():
    model = tiny(perturb=False)
    keys = set(model.state_dict())
    for k in ("pos_embed", "decoder_pos_embed", "mask_token", "y_embedder.embedding_table.weight",
              "decoder_layer.adaLN_modulation.1.weight", "decoder_layer.linear.weight", "decoder_blocks.1.attn.qkv.weight",
              "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight", "t_embedder.mlp.2.bias"):
        assert k in keys
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.decoder_blocks[0].adaLN_modulation[1].weight.shape == (6 * 16, 32)  # c is encoder width


def test_init_F_is_zero():
    model = tiny(perturb=False).eval()
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.3, 3.0])
    c_skip = edm_coefficients(sigma)[0].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(model(x, sigma, torch.tensor([1, 10])), c_skip * x)


# --------------------------------------------------------------------------------------------
# Masking semantics


def test_ratio0_and_eval_equal_full_forward():
    model = tiny()
    x, sigma, y = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 3, 10])
    model.eval()
    ref = model(x, sigma, y)
    D, mask = model(x, sigma, y, mask_ratio=0.5, return_mask=True)  # eval: no masking
    assert mask is None
    torch.testing.assert_close(D, ref, atol=0, rtol=0)
    model.train()
    D, mask = model(x, sigma, y, mask_ratio=0.0, return_mask=True)
    assert mask is None
    torch.testing.assert_close(D, ref, atol=0, rtol=0)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.75])
def test_mask_counts(ratio):
    model = tiny().train()
    _, mask = model(torch.randn(4, 4, 8, 8), torch.ones(4), None, mask_ratio=ratio, return_mask=True,
                    generator=torch.Generator().manual_seed(0))
    keep = int(T_TINY * (1 - ratio))
    assert mask.shape == (4, T_TINY)
    assert (mask.sum(1) == T_TINY - keep).all()


def test_F_ignores_removed_patches():
    """The encoder sees only kept tokens: F (not the c_skip term) is invariant to removed-patch inputs."""
    model = tiny().train()
    x, sigma, y = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 2.0]), torch.tensor([1, 2])
    D1, mask = model(x, sigma, y, mask_ratio=0.5, return_mask=True, generator=torch.Generator().manual_seed(1))
    removed = mask.reshape(2, 1, 4, 1, 4, 1).expand(2, 4, 4, 2, 4, 2).reshape(2, 4, 8, 8).bool()
    x2 = torch.where(removed, x + torch.randn_like(x), x)
    D2 = model(x2, sigma, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(1))
    c_skip, c_out, _, _ = edm_coefficients(sigma.reshape(-1, 1, 1, 1))
    assert_close((D1 - c_skip * x) / c_out, (D2 - c_skip * x2) / c_out, 1e-5, 1e-5, "F_x")
    assert not torch.allclose(D1, D2)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_fused_matches_unfused(ratio):
    ref = tiny(fused=False).train()
    fast = copy.deepcopy(ref)
    fast.fused = True
    x, sigma, y = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 3, 10])
    outs = []
    for m in (ref, fast):
        D, mask = m(x, sigma, y, mask_ratio=ratio, return_mask=True, generator=torch.Generator().manual_seed(2))
        D.square().sum().backward()
        outs.append((D, mask, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert_close(outs[1][0], outs[0][0], 1e-5, 1e-5, "D_x")
    if ratio:
        torch.testing.assert_close(outs[1][1], outs[0][1])
    assert outs[0][2].keys() == outs[1][2].keys()
    for n in outs[0][2]:
        assert_close(outs[1][2][n], outs[0][2][n], 1e-4, 1e-4, n)


# --------------------------------------------------------------------------------------------
# Loss


def test_loss_terms_hand_computation():
    torch.manual_seed(0)
    N, C, p = 2, 2, 2
    y, n = torch.randn(N, C, 4, 4), torch.randn(N, C, 4, 4)
    sigma = torch.tensor([0.5, 2.0])
    yn = y + sigma.reshape(-1, 1, 1, 1) * n
    D = torch.randn(N, C, 4, 4)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    dsm, mae = maskdit_loss_terms(D, y, yn, sigma, mask, p)
    for b in range(N):
        lam = (sigma[b] ** 2 + 0.25) / (sigma[b] * 0.5) ** 2
        vis, msk = [], []
        for tok in range(4):
            i, j = divmod(tok, 2)
            sl = (b, slice(None), slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p))
            if mask[b, tok] == 0:
                vis.append((lam * (D[sl] - y[sl]) ** 2).mean())
            else:
                t = yn[sl].flatten()
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)  # divisor p*p*C - 1
                # Same (p, p, C) feature order for pred and target.
                t = t.reshape(C, p, p).permute(1, 2, 0).flatten()
                pr = D[sl].permute(1, 2, 0).flatten()
                msk.append(((pr - t) ** 2).mean())
        torch.testing.assert_close(dsm[b], torch.stack(vis).mean(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mae[b], torch.stack(msk).mean(), atol=1e-5, rtol=1e-5)
    # No mask: plain mean over all elements, MAE off.
    dsm0, mae0 = maskdit_loss_terms(D, y, yn, sigma, None, p)
    torch.testing.assert_close(dsm0, (edm_loss_weight(sigma).reshape(-1, 1, 1, 1) * (D - y) ** 2).mean((1, 2, 3)))
    assert (mae0 == 0).all()


def test_visible_and_masked_averaging():
    N, C, p = 1, 4, 2
    y = torch.randn(N, C, 4, 4)
    yn = y + torch.randn_like(y)
    mask = torch.tensor([[0.0, 1, 1, 0]])
    removed = mask.reshape(1, 1, 2, 1, 2, 1).expand(1, C, 2, 2, 2, 2).reshape(1, C, 4, 4).bool()
    # D exact on visible tokens, garbage on masked ones: DSM = 0.
    D = torch.where(removed, torch.randn_like(y) * 10, y)
    dsm, mae = maskdit_loss_terms(D, y, yn, torch.tensor([1.0]), mask, p)
    assert dsm.item() == 0 and mae.item() > 0
    # D equal to the normalized noisy patches on masked tokens, garbage on visible ones: MAE ~ 0.
    t = patchify_output_layout(yn, p)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    from dit_kernels import unpatchify_ref
    D = torch.where(removed, unpatchify_ref(t, p, 4, 4), torch.randn_like(y) * 10)
    dsm, mae = maskdit_loss_terms(D, y, yn, torch.tensor([1.0]), mask, p)
    assert mae.item() < 1e-10 and dsm.item() > 0


def test_loss_call_reproduces_terms():
    model = tiny().train()
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    out = MaskDiTLoss()(model, x, y, generator=torch.Generator().manual_seed(7))
    assert out["loss"].shape == (3,) and out["mask_ratio"] == 0.5
    # Same draws in the documented order: sigma, noise, label dropout, mask.
    g = torch.Generator().manual_seed(7)
    sigma = sample_sigma(3, generator=g)
    yn = x + torch.randn(x.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
    drop = torch.rand(3, generator=g) < 0.1
    y2 = torch.where(drop, torch.full_like(y, 10), y)
    D, mask = model(yn, sigma, y2, mask_ratio=0.5, generator=g, return_mask=True)
    dsm, mae = maskdit_loss_terms(D, x, yn, sigma, mask, 2)
    torch.testing.assert_close(out["dsm"], dsm)
    torch.testing.assert_close(out["mae"], mae)
    torch.testing.assert_close(out["loss"], dsm + 0.1 * mae)


def test_unmask_finetune_loss():
    model = tiny().train()
    out = MaskDiTLoss(mask_ratio=0.0)(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]),
                                      generator=torch.Generator().manual_seed(0))
    assert (out["mae"] == 0).all() and out["mask_ratio"] == 0.0
    out["loss"].mean().backward()
    assert model.mask_token.grad is not None and (model.mask_token.grad == 0).all()  # in the graph, zero grad


def test_mask_ratio_schedules():
    assert get_mask_ratio_fn("constant", 0.5)(0.7) == 0.5
    for k in range(2, 7):
        f = get_mask_ratio_fn(f"cosine{k}", 0.5, 0.1)
        assert f(0.0) == pytest.approx(0.5) and f(1.0) == pytest.approx(0.1)
        assert f(0.5) == pytest.approx(0.4 * math.cos(math.pi / 4) ** k + 0.1)
    assert get_mask_ratio_fn("cos4", 0.5)(0.5) == get_mask_ratio_fn("cosine4", 0.5)(0.5)
    assert get_mask_ratio_fn("exp", 0.5, 0.0)(1.0) == pytest.approx(0.5 * math.exp(-7))
    assert get_mask_ratio_fn("linear", 0.5, 0.1)(0.5) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        get_mask_ratio_fn("cosine7")
    loss = MaskDiTLoss(mask_ratio=0.5, mask_ratio_fn="cosine4", max_steps=100, mask_ratio_start_step=10)
    assert loss.mask_ratio_at(0) == pytest.approx(0.5) and loss.mask_ratio_at(110) == pytest.approx(0.0)


def test_one_step_lowers_loss():
    model = tiny(perturb=False).train()
    loss_fn = MaskDiTLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))

    def loss():
        return loss_fn(model, x, y, generator=torch.Generator().manual_seed(0))["loss"].mean()

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item()


# --------------------------------------------------------------------------------------------
# Labels, CFG, sampling, checkpoints


def test_labels_int_onehot_null_equivalent():
    model = tiny().eval()
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 1.0, 5.0])
    y = torch.tensor([1, 9, 10])  # 10 = null
    one_hot = torch.nn.functional.one_hot(y, 11)[:, :10].float()
    torch.testing.assert_close(model(x, sigma, y), model(x, sigma, one_hot))
    torch.testing.assert_close(model(x, sigma, None), model(x, sigma, torch.full_like(y, 10)))


def test_cfg_all_channels():
    model = tiny().eval()
    x, sigma, y = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 5.0]), torch.tensor([2, 7])
    torch.testing.assert_close(model.forward_with_cfg(x, sigma, y, 1.0), model(x, sigma, y), atol=1e-5, rtol=1e-5)
    D_c, D_u = model(x, sigma, y), model(x, sigma, None)
    assert_close(model.forward_with_cfg(x, sigma, y, 1.5), D_u + 1.5 * (D_c - D_u), 1e-5, 1e-5, "cfg")


def test_sampler_runs_with_cfg():
    model = tiny().eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out, nfe = edm_sampler(model, z, torch.tensor([1, 2]), cfg_scale=1.5, num_steps=3, return_nfe=True)
    assert out.shape == z.shape and out.dtype == torch.float64 and torch.isfinite(out).all() and nfe == 5


# --------------------------------------------------------------------------------------------
# Released checkpoints (issue 13)


def public_maskdit_layout(D, depth, Dd, decoder_depth, p, C, K, T, mlp_ratio=4):
    """Key -> shape of a released Anima-Lab/MaskDiT file: the EDMPrecond state dict, network under "model.".

    Written from the layout facts (the released MaskDiT shapes and DiT's block keys), not from the
    model code; the encoder->decoder bridge is the reference's `decoder_layer` (issue 13).
    """
    def block(prefix, w, cond):
        h = int(mlp_ratio * w)
        return {f"{prefix}.attn.qkv.weight": (3 * w, w), f"{prefix}.attn.qkv.bias": (3 * w,),
                f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
                f"{prefix}.mlp.fc1.weight": (h, w), f"{prefix}.mlp.fc1.bias": (h,),
                f"{prefix}.mlp.fc2.weight": (w, h), f"{prefix}.mlp.fc2.bias": (w,),
                f"{prefix}.adaLN_modulation.1.weight": (6 * w, cond), f"{prefix}.adaLN_modulation.1.bias": (6 * w,)}

    layout = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (D, K),  # bias-free Linear on the one-hot label
        "decoder_layer.linear.weight": (Dd, D), "decoder_layer.linear.bias": (Dd,),
        "decoder_layer.adaLN_modulation.1.weight": (2 * D, D), "decoder_layer.adaLN_modulation.1.bias": (2 * D,),
        "mask_token": (1, 1, Dd),
        "decoder_pos_embed": (1, T, Dd),
        "final_layer.linear.weight": (p * p * C, Dd), "final_layer.linear.bias": (p * p * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * Dd, D), "final_layer.adaLN_modulation.1.bias": (2 * Dd,),
    }
    for i in range(depth):
        layout.update(block(f"blocks.{i}", D, D))
    for i in range(decoder_depth):
        layout.update(block(f"decoder_blocks.{i}", Dd, D))  # decoder adaLN reads the encoder-width c
    return {f"model.{k}": shape for k, shape in layout.items()}


TINY_LAYOUT = dict(D=32, depth=2, Dd=16, decoder_depth=2, p=2, C=4, K=10, T=T_TINY)


def public_tiny_weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in public_maskdit_layout(**TINY_LAYOUT).items()}


def assert_holds(model, public):
    """Every model tensor equals the public file's (nothing left at its initial value)."""
    own = model.state_dict()
    assert set(own) == {k[len("model."):] for k in public}
    for k, v in public.items():
        assert torch.equal(own[k[len("model."):]], v), k


@pytest.mark.parametrize("size", ["tiny", "XL/2"])
def test_public_layout_keys_and_shapes(size):
    if size == "tiny":
        layout = public_maskdit_layout(**TINY_LAYOUT)
        model = tiny(perturb=False)
    else:  # the released 256 px files
        layout = public_maskdit_layout(D=1152, depth=28, Dd=512, decoder_depth=8, p=2, C=4, K=1000, T=256)
        assert sum(math.prod(s) for s in layout.values()) == 730_541_200
        with torch.device("meta"):
            model = MaskDiT_models["MaskDiT-XL/2"]()
    sd = convert_maskdit_checkpoint({k: torch.empty(s, device="meta") for k, s in layout.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {f"model.{k}" for k in model.state_dict()} == set(layout)  # state_dict() is the public layout


def test_released_forms_load_strictly(tmp_path):
    ema, raw = public_tiny_weights(1), public_tiny_weights(2)
    model = tiny(perturb=False)

    load_maskdit_checkpoint(model, ema)  # bare EDMPrecond state dict
    assert_holds(model, ema)
    assert torch.equal(model.decoder_layer.linear.weight, ema["model.decoder_layer.linear.weight"])

    model = tiny(perturb=False)
    load_maskdit_checkpoint(model, {"ema": ema, "model": raw})  # "ema" for sampling
    assert_holds(model, ema)
    load_maskdit_checkpoint(model, {"ema": ema, "model": raw}, key="model")
    assert_holds(model, raw)

    # The reference train.py container from a file (args is a pickled argparse.Namespace).
    path = tmp_path / "2000000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(precond="edm", model_type="DiT-XL/2")}, path)
    model = tiny(perturb=False)
    ckpt = load_maskdit_checkpoint(model, str(path))
    assert_holds(model, ema)
    assert ckpt["args"].precond == "edm"

    # The converter yields exactly the model's names; export writes the public layout back, bit for bit.
    assert set(convert_maskdit_checkpoint(ckpt)) == set(model.state_dict())
    out = export_maskdit_checkpoint(model)
    assert set(out) == {"model", "ema"}
    for form in (out["ema"], out["model"]):
        assert set(form) == set(ema) and all(torch.equal(form[k], ema[k]) for k in ema)
    both = export_maskdit_checkpoint(ckpt["ema"], ckpt["model"])
    assert all(torch.equal(both["model"][k], raw[k]) for k in raw)
    assert all(torch.equal(both["ema"][k], ema[k]) for k in ema)


def test_export_roundtrip_same_outputs(tmp_path):
    src = tiny(seed=3).eval()
    torch.save(export_maskdit_checkpoint(src), tmp_path / "public.pt")
    dst = tiny(seed=4, perturb=False).eval()
    load_maskdit_checkpoint(dst, str(tmp_path / "public.pt"))
    x, sigma, y = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 5.0]), torch.tensor([2, 7])
    torch.testing.assert_close(dst(x, sigma, y), src(x, sigma, y), atol=0, rtol=0)
    # this library's own names (dit_models.train containers) load through the same converter
    load_maskdit_checkpoint(dst, {"model": src.state_dict(), "ema": src.state_dict(), "args": {}})
    torch.testing.assert_close(dst(x, sigma, y), src(x, sigma, y), atol=0, rtol=0)


@pytest.mark.parametrize("edit,named", [
    (lambda sd: sd.update({"model.cls_token": torch.zeros(1, 1, 32)}), "model.cls_token"),  # pad_cls_token hook
    (lambda sd: sd.update({"model.feat_embedder.weight": torch.zeros(32, 8)}), "model.feat_embedder.weight"),
    (lambda sd: sd.update({"model.decoder_embed.linear.weight": sd.pop("model.decoder_layer.linear.weight")}),
     "model.decoder_embed.linear.weight"),
    (lambda sd: sd.pop("model.decoder_layer.linear.bias"), "decoder_layer.linear.bias"),
    (lambda sd: sd.pop("model.mask_token"), "mask_token"),  # a file trained with mae_loss_coef = 0
    (lambda sd: sd.update({"model.pos_embed": torch.zeros(1, 64, 32)}), "pos_embed"),
], ids=["cls_token_hook", "feat_embedder_hook", "bridge_misnamed", "bridge_bias_missing", "mask_token_missing",
        "pos_embed_shape"])
def test_unmapped_or_missing_key_is_an_error_naming_it(edit, named):
    sd = public_tiny_weights(0)
    edit(sd)
    model = tiny(perturb=False)
    before = copy.deepcopy(model.state_dict())
    for form in (sd, {"ema": sd, "model": sd}):
        with pytest.raises(ValueError, match=re.escape(named)):
            load_maskdit_checkpoint(model, form)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    with pytest.raises(KeyError, match="'ema'"):
        load_maskdit_checkpoint(model, {"opt": {}, "args": {}})


def test_sample_cli_on_public_file(tmp_path, monkeypatch, capsys):
    """python -m dit_models.sample --method maskdit --ckpt <public file>, on a tiny registry entry and a stub VAE."""
    from types import SimpleNamespace

    import torch.nn as nn
    from PIL import Image

    from dit_models import sample

    class StubVAE(nn.Module):  # stands in for the SD VAE (needs diffusers and a download)
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(()))

        def decode(self, z):
            return SimpleNamespace(sample=torch.nn.functional.interpolate(z[:, :3], scale_factor=8) * self.gain)

    monkeypatch.setitem(MaskDiT_models, "MaskDiT-T/2", lambda **kw: MaskDiT(**{**TINY, **kw}))
    monkeypatch.setattr("dit_models.data.load_vae", lambda name, device: StubVAE())
    src = tiny(seed=5)
    ckpt = export_maskdit_checkpoint(src)
    ckpt.update(opt={}, args=argparse.Namespace(precond="edm"))
    torch.save(ckpt, tmp_path / "public.pt")
    argv = ["--ckpt", str(tmp_path / "public.pt"), "--method", "maskdit", "--model", "MaskDiT-T/2", "--image-size", "64",
            "--num-classes", "10", "--class-labels", "1,2,3", "--samples-per-class", "1", "--num-sampling-steps", "2",
            "--cfg-scale", "1.5", "--device", "cpu", "--out", str(tmp_path / "grid.png")]
    path = sample.cli(argv)
    im = np.asarray(Image.open(path))
    assert im.shape[0] >= 64 and im.shape[1] >= 3 * 64 and im.std() > 0
    assert "maskdit MaskDiT-T/2: 3 samples" in capsys.readouterr().out

    ckpt["ema"]["model.cls_token"] = torch.zeros(1, 1, 32)  # a layout the converter does not map
    torch.save(ckpt, tmp_path / "public.pt")
    with pytest.raises(SystemExit) as e:
        sample.cli(argv)
    assert e.value.code == 2 and "model.cls_token" in capsys.readouterr().err


def test_unconditional_and_bf16_autocast():
    model = tiny(num_classes=0).eval()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 5.0])
    assert model.y_embedder is None
    ref = model(x, sigma, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D = model(x, sigma, None)
    assert D.dtype == torch.float32
    assert (D - ref).abs().max().item() < 0.1


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_masked_training_and_bf16_sampling(fused):
    model = tiny(fused=fused).train()
    x, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4])
    ref = MaskDiTLoss()(model, x, y, generator=torch.Generator().manual_seed(0))["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MaskDiTLoss()(model, x, y, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32
    assert (out["loss"] - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    out["loss"].mean().backward()
    assert model.mask_token.grad.dtype == torch.float32 and torch.isfinite(model.mask_token.grad).all()
    # A model cast to bf16 samples with fp64 state and fp32 coefficients.
    model = model.to(torch.bfloat16).eval()
    z = torch.randn(2, 4, 8, 8)
    assert torch.isfinite(edm_sampler(model, z, torch.tensor([1, 2]), cfg_scale=1.5, num_steps=2)).all()
