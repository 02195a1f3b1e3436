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
    ("sit", dict(num_sampling_steps=6)),                          # fast default: UniPC bh1
    ("sit", dict(sampler="dpm++", num_sampling_steps=6)),
    ("sit", dict(sampler="ode", sampling_method="heun", num_sampling_steps=6)),
    ("sit", dict(sampling_method="euler", num_sampling_steps=6)),
    ("sit", dict(sampler="sde", sampling_method="Euler", num_sampling_steps=6)),
    ("maskdit", dict(sampler="edm", num_sampling_steps=4)),
    ("maskdit", dict(sampler="dpm++", num_sampling_steps=4, solver_order=2)),
    ("sddit", dict(sampler="edm", num_sampling_steps=3)),
    ("sddit", dict(num_sampling_steps=3)),                        # fast default: UniPC bh2
    ("ddpm", dict(sampler="unipc", num_sampling_steps=5, unipc_variant="bh1")),
    ("sit", dict(sampler="unipc", num_sampling_steps=5, solver_order=3)),
    ("maskdit", dict(sampler="unipc", num_sampling_steps=4)),
    ("sddit", dict(sampler="unipc", num_sampling_steps=3)),
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


def _call_kinds(model, batch):
    """"g" for every outermost guided network call (forward_guided / forward_with_cfg, or forward on the 2B
    batch, as the SiT sampler calls it), "c" for a conditional-only one."""
    kinds, depth = [], [0]

    def wrap(fn, guided):
        def wrapper(x, *args, **kwargs):
            if depth[0] == 0:
                kinds.append("g" if guided or x.shape[0] == 2 * batch else "c")
            depth[0] += 1
            try:
                return fn(x, *args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    model.forward = wrap(model.forward, False)
    for name in ("forward_guided", "forward_with_cfg"):
        if hasattr(model, name):
            setattr(model, name, wrap(getattr(model, name), True))
    return kinds


# Intervals inside each process's own noise variable that hold some but not all of the 6 evaluations.
@pytest.mark.parametrize("method, sampler, interval", [
    ("ddpm", "unipc", (300.0, 999.0)), ("ddpm", "dpm++", (300.0, 999.0)), ("ddpm", "ddim", (300.0, 999.0)),
    ("sit", "unipc", (0.0, 0.5)), ("sit", "dpm++", (0.0, 0.5)), ("sit", "sde", (0.0, 0.5)),
    ("maskdit", "unipc", (1.0, 80.0)), ("sddit", "dpm++", (1.0, 80.0)),
])
def test_guidance_interval_runs_the_conditional_batch_outside_it(method, sampler, interval):
    from dit_models.generation import sampler_opts_from_args
    from types import SimpleNamespace

    labels = torch.arange(3)
    args = SimpleNamespace(sampler=sampler, num_sampling_steps=6, guidance_interval=list(interval))
    opts = sampler_opts_from_args(args, method)
    assert opts["guidance_interval"] == list(interval)
    model = _model(method)
    kinds = _call_kinds(model, 3)
    stats = {}
    x = generate(method, model, labels, opts, cfg_scale=3.0, generator=torch.Generator().manual_seed(0), batch_size=3,
                 stats=stats)
    assert torch.isfinite(x).all()
    assert set(kinds) == {"g", "c"} and len(kinds) == sampler_nfe(method, opts) == stats["nfe"]
    assert stats["guided_nfe"] == kinds.count("g")
    # Noise end first: the guided calls come first in every interval here, and stop once it is left.
    assert kinds == sorted(kinds, key=lambda k: k != "g"), kinds

    # An interval holding every evaluation is plain guidance, bit for bit.
    everywhere = dict(opts, guidance_interval=[-1e9, 1e9])
    plain = dict(opts)
    del plain["guidance_interval"]
    runs = [generate(method, _model(method), labels, o, cfg_scale=3.0, generator=torch.Generator().manual_seed(0),
                     batch_size=3) for o in (everywhere, plain)]
    assert torch.equal(runs[0], runs[1])


def test_guidance_interval_flag_is_checked():
    from dit_models.generation import sampler_opts_from_args
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="LO <= HI"):
        sampler_opts_from_args(SimpleNamespace(guidance_interval=[0.7, 0.3]), "sit")


def test_unipc_flags_pick_unipc_with_its_defaults():
    from dit_models.generation import sampler_opts_from_args
    from types import SimpleNamespace

    for method, variant in (("ddpm", "bh2"), ("sit", "bh1"), ("maskdit", "bh2"), ("sddit", "bh2")):
        opts = sampler_opts_from_args(SimpleNamespace(sampler="unipc"), method)
        assert opts["sampler"] == "unipc" and opts["unipc_variant"] == variant and opts["num_sampling_steps"] == 20
        assert sampler_nfe(method, opts) == 20
    opts = sampler_opts_from_args(SimpleNamespace(sampler="dpm++", solver_order=3, third_order="reference"), "ddpm")
    assert opts["third_order"] == "reference"
