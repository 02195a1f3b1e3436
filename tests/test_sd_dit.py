"""SD-DiT: teacher EMA and gradients, decoder input, losses, schedules, counts."""
import copy

import pytest
import torch

from dit_models.edm import edm_coefficients, edm_sampler
from dit_models.models.sd_dit import SDDiT, SDDiT_models, SDDiTLoss
from conftest import assert_close

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            decoder_hidden_size=16, decoder_depth=2, decoder_num_heads=2,
            head_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
T_TINY = 16


def tiny(fused=False, seed=0, perturb=True, **kw):
    torch.manual_seed(seed)
    model = SDDiT(**{**TINY, **kw}, fused=fused)
    if perturb:  # off the zero init; then re-sync the teacher (momentum 0 = copy)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        model.update_teacher(0.0)
    return model.train()


def count(module):
    return sum(p.numel() for p in module.parameters())


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_param_counts_xl2():
    with torch.device("meta"):
        model = SDDiT_models["SD-DiT-XL/2"]()
    head = 1152 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 256 * 8192
    assert count(model.head) == head == 9_179_392
    # Sampling network = MaskDiT-XL/2 (730,541,200) - mask token (512) + [CLS] (1152).
    assert count(model) - count(model.teacher) - count(model.head) == 730_541_200 - 512 + 1152
    assert count(model.teacher) == 672_435_072 + 1152 + head
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert set(SDDiT_models) >= {"SD-DiT-XL/2", "SD-DiT-B/2", "SD-DiT-S/2", "SD-DiT-S/4"}


def test_teacher_starts_as_copy_and_moves_only_by_ema():
    model = tiny(perturb=False)
    for t, s in model.teacher.student_pairs(model):
        torch.testing.assert_close(t, s, atol=0, rtol=0)
    model = tiny()
    loss_fn = SDDiTLoss()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    x, y = batch()
    loss_fn(model, x, y, step=0, generator=torch.Generator().manual_seed(0))["loss"].mean().backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    opt.step()
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], atol=0, rtol=0)  # the optimizer never touches it
    m = loss_fn.update_teacher(model, step=0, total_steps=100)
    assert m == pytest.approx(0.996)
    for name, t in model.teacher.named_parameters():
        expected = m * teacher_before[name] + (1 - m) * model.get_parameter(name)
        assert_close(t, expected, 1e-6, 1e-6, name)


def test_decoder_input_keeps_original_invisible_tokens():
    model = tiny()
    x_in = torch.randn(2, 4, 8, 8)
    c_noise = torch.tensor([0.1, -0.3])
    y = torch.tensor([1, 2])
    import dit_kernels
    ids_keep, _, mask = dit_kernels.random_token_mask(2, T_TINY, 12, generator=torch.Generator().manual_seed(0))
    dec_in, z, c = model.student_encode(x_in, c_noise, y, ids_keep)
    assert dec_in.shape == (2, T_TINY, 16) and z.shape == (2, 1 + 12, 32)
    # Invisible slots: the unmodified input tokens (patch embed + pos-embed) through the bridge.
    original = model.decoder_layer(model.embed_tokens(x_in), c)  # (N, T, Dd)
    inv = mask.bool()
    torch.testing.assert_close(dec_in[inv], original[inv], atol=1e-6, rtol=1e-6)
    # Visible slots: bridge of the encoder output ([CLS] dropped), in ids_keep order.
    vis = model.decoder_layer(z[:, 1:], c)
    torch.testing.assert_close(torch.gather(dec_in, 1, ids_keep[..., None].expand(-1, -1, 16)), vis, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dec_in[~inv], original[~inv])


def test_training_outputs_and_dis_gradients():
    model = tiny()
    x, y = batch()
    sigma = torch.tensor([0.3, 1.0, 4.0])
    out = model(x + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x), sigma, y, mask_ratio=0.2,
                generator=torch.Generator().manual_seed(0), x_teacher=x, sigma_teacher=0.002)
    K = int(T_TINY * 0.8)
    assert out["student_logits"].shape == out["teacher_logits"].shape == (3, 1 + K, 64)
    assert out["mask"].sum(1).eq(T_TINY - K).all()
    assert not out["teacher_logits"].requires_grad and out["student_logits"].dtype == torch.float32
    dis = SDDiTLoss().discriminative_loss(out["student_logits"], out["teacher_logits"], model.center)
    dis.mean().backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.cls_token.grad.abs().sum() > 0 and model.head.last_layer.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.decoder_blocks[0].attn.qkv.weight.grad is None  # decoder carries only the generative loss


def test_teacher_sees_all_tokens_at_sigma_min():
    """Teacher scores at the student's positions equal a full teacher pass read at those positions."""
    model = tiny()
    x, y = batch(2)
    import dit_kernels
    ids_keep, _, _ = dit_kernels.random_token_mask(2, T_TINY, 12, generator=torch.Generator().manual_seed(3))
    full = model.teacher_logits(x, 0.002, y, None)  # (N, 1 + T, P)
    part = model.teacher_logits(x, 0.002, y, ids_keep)  # (N, 1 + K, P)
    torch.testing.assert_close(part[:, 0], full[:, 0])
    torch.testing.assert_close(part[:, 1:], torch.gather(full[:, 1:], 1, ids_keep[..., None].expand(-1, -1, 64)))


def test_loss_terms_and_center_update():
    model = tiny()
    x, y = batch()
    loss_fn = SDDiTLoss(warmup_teacher_temp_steps=10)
    out = loss_fn(model, x, y, step=3, generator=torch.Generator().manual_seed(5))
    assert out["loss"].shape == out["gen"].shape == out["dis"].shape == (3,)
    torch.testing.assert_close(out["loss"], out["gen"] + out["dis"])
    # Recompute with the documented draw order: sigma, eps, label dropout, mask.
    from dit_models.edm import sample_sigma
    g = torch.Generator().manual_seed(5)
    sigma = sample_sigma(3, generator=g)
    eps = torch.randn(x.shape, generator=g)
    drop = torch.rand(3, generator=g) < 0.1
    y2 = torch.where(drop, torch.full_like(y, 10), y)
    center_before = torch.zeros(1, 64)  # the call above updated model.center from zeros
    o = model(x + sigma.reshape(-1, 1, 1, 1) * eps, sigma, y2, mask_ratio=0.2, generator=g,
              x_teacher=x + 0.002 * eps, sigma_teacher=0.002)
    lam = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out["gen"], (lam * (o["D_x"] - x) ** 2).mean((1, 2, 3)))
    tau_T = 0.04 + 0.03 * 3 / 10
    p_t = torch.softmax((o["teacher_logits"] - center_before) / tau_T, -1)
    ce = -(p_t * torch.log_softmax(o["student_logits"] / 0.1, -1)).sum(-1).mean(1)
    torch.testing.assert_close(out["dis"], ce)
    torch.testing.assert_close(model.center, 0.1 * o["teacher_logits"].mean((0, 1))[None])


def test_schedules():
    loss_fn = SDDiTLoss()
    assert loss_fn.teacher_momentum_at(0, 1000) == pytest.approx(0.996)
    assert loss_fn.teacher_momentum_at(500, 1000) == pytest.approx(0.998)
    assert loss_fn.teacher_momentum_at(1000, 1000) == pytest.approx(1.0)
    assert loss_fn.teacher_temp_at(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp_at(37500 // 2) == pytest.approx(0.055)
    assert loss_fn.teacher_temp_at(10 ** 6) == pytest.approx(0.07)


@pytest.mark.parametrize("which", ["gen", "dis"])
def test_one_step_lowers_each_loss(which):
    model = tiny()
    loss_fn = SDDiTLoss(center_momentum=1.0)  # frozen center: the two evaluations see the same targets
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = batch(8)

    def loss():
        return loss_fn(model, x, y, step=0, generator=torch.Generator().manual_seed(0))[which].mean()

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def test_fused_matches_unfused_training():
    ref = tiny(fused=False)
    fast = copy.deepcopy(ref)
    fast.fused = True
    x, y = batch()
    outs = [SDDiTLoss()(m, x, y, step=0, generator=torch.Generator().manual_seed(1)) for m in (ref, fast)]
    for k in ("gen", "dis"):
        assert_close(outs[1][k], outs[0][k], 1e-4, 1e-5, k)


def test_inference_uses_all_tokens_and_samples():
    model = tiny().eval()
    x, y = batch(2)
    sigma = torch.tensor([0.5, 3.0])
    D = model(x, sigma, y, mask_ratio=0.2)  # eval: mask ignored
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma.reshape(-1, 1, 1, 1))
    F_x = model.network(c_in * x, c_noise.reshape(-1), y)
    torch.testing.assert_close(D, c_skip * x + c_out * F_x)
    no_cls = copy.deepcopy(model)
    no_cls.cls_at_inference = False
    assert not torch.allclose(no_cls(x, sigma, y), D)  # [CLS] takes part in encoder attention
    out = edm_sampler(model, torch.randn(2, 4, 8, 8), y, cfg_scale=1.5, num_steps=2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_training(fused):
    model = tiny(fused=fused)
    x, y = batch(4)
    ref = SDDiTLoss(center_momentum=1.0)(model, x, y, step=0, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SDDiTLoss(center_momentum=1.0)(model, x, y, step=0, generator=torch.Generator().manual_seed(0))
    for k in ("gen", "dis"):
        assert out[k].dtype == torch.float32
        assert (out[k] - ref[k]).abs().max().item() < 0.05 * ref[k].abs().max().item() + 1e-3, k
    out["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unconditional():
    model = tiny(num_classes=0)
    x, _ = batch(2)
    out = SDDiTLoss()(model, x, None, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]).all() and model.y_embedder is None and model.teacher.y_embedder is None
