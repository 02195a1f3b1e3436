"""dit_models.generation: network evaluations per sample match sampler_nfe (what progress bars and
reports count), for every method's default sampler, with and without guidance."""
import pytest
import torch

from dit_models.builders import build_model
from dit_models.generation import generate, sampler_defaults, sampler_nfe

TINY = dict(depth=1, hidden_size=32, num_heads=2)
DECODER = dict(decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=2)


def _model(method):
    name = {"ddpm": "DiT-S/2", "sit": "SiT-S/2", "maskdit": "MaskDiT-S/2", "sddit": "SD-DiT-S/2"}[method]
    extra = DECODER if method in ("maskdit", "sddit") else {}
    torch.manual_seed(0)
    return build_model(method, name, 8, 1, 10, **TINY, **extra)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("method, opts", [
    ("ddpm", dict(sampler="ddpm", num_sampling_steps=5)),
    ("ddpm", dict(sampler="ddim", num_sampling_steps=4)),
    ("ddpm", dict(sampler="dpm++", num_sampling_steps=5, solver_order=3, time_spacing="logSNR")),
    ("sit", dict(num_sampling_steps=6)),                          # fast default: DPM-Solver++(2M)
    ("sit", dict(sampler="ode", sampling_method="heun", num_sampling_steps=6)),
    ("sit", dict(sampling_method="euler", num_sampling_steps=6)),
    ("sit", dict(sampler="sde", sampling_method="Euler", num_sampling_steps=6)),
    ("maskdit", dict(sampler="edm", num_sampling_steps=4)),
    ("maskdit", dict(sampler="dpm++", num_sampling_steps=4, solver_order=2)),
    ("sddit", dict(sampler="edm", num_sampling_steps=3)),
    ("sddit", dict(num_sampling_steps=3)),                        # fast default: DPM-Solver++(2M)
])
def test_network_evaluations_match_sampler_nfe(method, opts, cfg_scale):
    model = _model(method)
    calls, depth = [], [0]

    def counting(fn):  # one count per outermost call (forward_with_cfg may call forward inside)
        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                calls.append(1)
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    model.forward = counting(model.forward)
    if hasattr(model, "forward_with_cfg"):
        model.forward_with_cfg = counting(model.forward_with_cfg)
    opts = dict(sampler_defaults(method), **opts)
    labels = torch.arange(3)
    generate(method, model, labels, opts, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0),
             batch_size=3, progress=True)
    assert len(calls) == sampler_nfe(method, opts)  # guided: still one (2B-batch) call per evaluation
