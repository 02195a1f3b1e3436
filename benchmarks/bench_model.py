"""End-to-end benchmarks: training-step throughput and SiT sampling speed.

Training step = forward + loss + backward + AdamW + EMA (multi-tensor), batch 64 of 256-px latents
(4 x 32 x 32) on CUDA; DiT-XL/2 under fp32+TF32, bf16 autocast, bf16 + torch.compile, bf16 + fused
kernels and bf16 + fused + torch.compile; MaskDiT-XL/2 at mask 0.5 and 0; SD-DiT-XL/2. Reports images/s and
peak memory (GiB).

Sampling = SiT-XL/2 SDE (Euler-Maruyama, sigma form), CFG 4.0, bf16: seconds per image at batch 1
and images/s at batch 64 for (a) the plain PyTorch path (fused=False, eager), (b) fused kernels,
(c) fused + CUDA graph, (d) the plain path under torch.compile(mode="reduce-overhead").
To fit the GPU session budget the loop is timed over DIT_BENCH_SAMPLE_STEPS (default 25) steps and
scaled to 250: every step costs the same (one network evaluation on the 2B CFG batch + one fused step).

On the CPU the same code runs on tiny models for a few steps (a harness check, not a measurement).
"""
import copy
import os

import pytest
import torch

from common import DEVICE, ON_CUDA, SMOKE, record, run, sync, time_fn

if ON_CUDA:
    BATCH, LATENT = 64, 32
    DIT_KW = dict(model="DiT-XL/2")
    MASKDIT_KW = dict(model="MaskDiT-XL/2")
    SDDIT_KW = dict(model="SD-DiT-XL/2")
    SIT_KW = dict(model="SiT-XL/2")
    SAMPLE_STEPS = int(os.environ.get("DIT_BENCH_SAMPLE_STEPS", "25"))
else:  # harness check on tiny models
    BATCH, LATENT = 4, 8
    TINY = dict(hidden_size=64, depth=2, num_heads=4)
    DIT_KW = dict(cls="DiT", **TINY)
    MASKDIT_KW = dict(cls="MaskDiT", decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=4, **TINY)
    SDDIT_KW = dict(cls="SDDiT", decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=4, **TINY)
    SIT_KW = dict(cls="SiT", **TINY)
    SAMPLE_STEPS = 3
FULL_SAMPLE_STEPS = 250


def label(family):
    """What actually runs: the XL/2 model on CUDA, the tiny harness model on the CPU."""
    return f"{family}-XL/2" if ON_CUDA else f"{family} d{TINY['depth']} w{TINY['hidden_size']} (CPU harness)"
NUM_CLASSES = 1000


def _build(kw, **extra):
    import dit_models

    kw = dict(kw)
    with torch.device(DEVICE):  # initialise on the device: an XL model's CPU init costs seconds of GPU lease
        if "model" in kw:
            name = kw.pop("model")
            registry = next(r for r in (dit_models.DiT_models, dit_models.SiT_models, dit_models.MaskDiT_models,
                                        dit_models.SDDiT_models) if name in r)
            model = registry[name](input_size=LATENT, num_classes=NUM_CLASSES, **kw, **extra)
        else:
            cls = getattr(dit_models, kw.pop("cls"))
            model = cls(input_size=LATENT, patch_size=2, num_classes=NUM_CLASSES, **kw, **extra)
    return model.to(DEVICE)


def _ema_update(ema_params, params, decay=0.9999):
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def _loss_fn(method, model, mask_ratio):
    """Returns step_loss(x, y, step) -> scalar loss for the method's published objective (as dit_models.train)."""
    from dit_models.train import build_objective, get_parser, resolve_args

    argv = ["--method", method, "--device", DEVICE] + ([] if mask_ratio is None else ["--mask-ratio", str(mask_ratio)])
    parser = get_parser()
    objective = build_objective(resolve_args(parser.parse_args(argv), parser, argv))
    return lambda x, y, step: objective(model, x, y, step)[0]


TRAIN_CASES = {
    # name: (method, model kwargs, precision, fused, compile, mask_ratio)
    "DiT fp32+tf32": ("ddpm", DIT_KW, "tf32", False, False, None),
    "DiT bf16": ("ddpm", DIT_KW, "bf16", False, False, None),
    "DiT bf16+compile": ("ddpm", DIT_KW, "bf16", False, True, None),
    "DiT bf16+fused": ("ddpm", DIT_KW, "bf16", True, False, None),
    "DiT bf16+fused+compile": ("ddpm", DIT_KW, "bf16", True, True, None),
    "MaskDiT mask0.5 bf16+fused": ("maskdit", MASKDIT_KW, "bf16", True, False, 0.5),
    "MaskDiT mask0.5 bf16+fused+compile": ("maskdit", MASKDIT_KW, "bf16", True, True, 0.5),
    "MaskDiT mask0 bf16+fused": ("maskdit", MASKDIT_KW, "bf16", True, False, 0.0),
    "SD-DiT bf16+fused": ("sddit", SDDIT_KW, "bf16", True, False, None),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_step(benchmark, case):
    method, kw, precision, fused, use_compile, mask_ratio = TRAIN_CASES[case]
    if use_compile and SMOKE:
        pytest.skip("smoke run: compile skipped")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    model = _build(kw, fused=fused)
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [p for p, q in zip(ema.parameters(), model.parameters()) if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=ON_CUDA)
    net = torch.compile(model) if use_compile else model
    loss_fn = _loss_fn(method, net, mask_ratio)
    x = torch.randn(BATCH, 4, LATENT, LATENT, device=DEVICE)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), device=DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")
    state = {"step": 0}

    def step():
        opt.zero_grad(set_to_none=True)  # before the forward: no stale gradients at the memory peak
        with autocast:
            loss = loss_fn(x, y, state["step"])
        loss.backward()
        opt.step()
        _ema_update(ema_params, params)
        state["step"] += 1

    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    seconds = time_fn(step, warmup=3, rounds=8 if ON_CUDA else 2)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ON_CUDA else None
    family, variant = case.split(" ", 1)
    info = record(benchmark, f"{label(family)} {variant}", "train_step", precision, seconds, batch=BATCH,
                  images_per_s=BATCH / seconds[0], peak_mem_GiB=peak)
    print(f"{info['op']}: {info['images_per_s']:.1f} images/s, peak {peak} GiB")
    run(benchmark, step)


SAMPLE_CASES = ["plain", "fused", "fused+cuda_graph", "plain+compile(reduce-overhead)"]


@pytest.mark.parametrize("batch", [1, 64] if ON_CUDA else [1, 2])
@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_sit_sde_sampling(benchmark, case, batch):
    from dit_models.transport import Sampler, create_transport

    if "compile" in case and SMOKE:
        pytest.skip("smoke run: compile skipped")
    torch.manual_seed(0)
    fused = case.startswith("fused")
    model = _build(SIT_KW, fused=fused).eval()
    if ON_CUDA:
        model = model.to(torch.bfloat16)
    net = torch.compile(model, mode="reduce-overhead") if "compile" in case else model
    sampler = Sampler(create_transport("Linear", "velocity"))
    # Same grid spacing as the 250-step sampler; time SAMPLE_STEPS of it and scale (see module docstring).
    sample_fn = sampler.sample_sde(diffusion_form="sigma", num_steps=SAMPLE_STEPS, cfg_scale=4.0,
                                   cuda_graph="cuda_graph" in case, null_label=NUM_CLASSES)
    z = torch.randn(batch, 4, LATENT, LATENT, device=DEVICE)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=DEVICE)
    dtype = torch.bfloat16 if ON_CUDA else torch.float32

    def forward(x, t, y):
        return net(x.to(dtype), t.to(dtype), y)

    def sample():
        with torch.no_grad():
            return sample_fn(z, forward, y=y)[-1]

    seconds = time_fn(sample, warmup=2, rounds=3 if ON_CUDA else 1)
    scale = FULL_SAMPLE_STEPS / SAMPLE_STEPS
    per_run = seconds[0] * scale
    info = record(benchmark, f"{label('SiT')} SDE {case}", "sample", f"batch{batch}", seconds, batch=batch,
                  steps_timed=SAMPLE_STEPS, seconds_per_250_steps=per_run, seconds_per_image=per_run / batch,
                  images_per_s=batch / per_run)
    print(f"{case} batch {batch}: {info['seconds_per_image']:.3f} s/image, {info['images_per_s']:.2f} images/s")
    sync()
    run(benchmark, sample)
