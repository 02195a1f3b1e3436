"""dit_models.methods: one record per method, size registries as data, the explicit CUDA-graph cache key."""
import os
import re

import pytest
import torch

from dit_models import methods
from dit_models.builders import build_model
from dit_models.transport import Sampler, create_transport
from dit_models.transport import cuda_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_method_record_is_complete(name):
    m = methods.get_method(name)
    assert m.name == name and m.default_model in m.registry()
    assert list(m.samplers)[0] == m.published["sampler"] and "dpm++" in m.samplers
    fast = m.sampler_defaults(fast=True)
    # the fast default of each method is the best of issue 20's table at 10-20 NFE (docs/results.md)
    chosen = {"sit": ("unipc", "bh1"), "sddit": ("unipc", "bh2")}.get(name, ("dpm++", None))
    assert (fast["sampler"], fast.get("unipc_variant") if fast["sampler"] == "unipc" else None) == chosen
    assert (fast["num_sampling_steps"], fast["solver_order"]) == (20, 2)
    assert m.sampler(fast).nfe(fast) == 20
    published = m.sampler_defaults(fast=False)
    nfe = m.sampler(published).nfe(published)
    assert nfe is None or nfe >= published["num_sampling_steps"] - 1
    for variant in m.nfe_variants.values():  # the benchmark's solvers at 10 NFE stay within a step of it
        opts = dict(published, **variant(10))
        assert abs(m.sampler(opts).nfe(opts) - 10) <= 1
    with pytest.raises(ValueError, match="does not apply"):
        m.sampler(dict(published, sampler="no-such-sampler"))


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown --method"):
        methods.get_method("gan")


def test_size_registries_are_partials_of_the_published_sizes():
    reg = methods.get_method("ddpm").registry()
    assert reg["DiT-XL/2"].keywords == dict(patch_size=2, depth=28, hidden_size=1152, num_heads=16)
    assert list(reg)[:3] == ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8"] and len(reg) == 12
    mask = methods.get_method("maskdit").registry()
    assert mask["MaskDiT-H/2"].keywords["hidden_size"] == 1280 and "MaskDiT-H/4" not in mask
    assert mask["MaskDiT-S/4"].keywords["decoder_hidden_size"] == 512
    assert sorted(methods.get_method("sddit").registry()) == sorted(k.replace("MaskDiT", "SD-DiT") for k in mask
                                                                     if "H/" not in k)
    small = build_model("ddpm", "DiT-S/2", 8, 1, 10, depth=1, hidden_size=32, num_heads=2)
    assert (len(small.blocks), small.hidden_size, small.patch_size) == (1, 32, 2)


def test_no_method_branches_outside_the_methods_package():
    hits = []
    for folder in ("dit_models", "benchmarks", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if os.path.join("dit_models", "methods") in dirpath:
                continue
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    hits += [f"{f}: {m}" for m in re.findall(r".*method ==.*", text)]
    assert hits == []


def test_encoder_decoder_forward_guided_is_forward_with_cfg():
    model = build_model("maskdit", "MaskDiT-S/2", 8, 1, 10, depth=1, hidden_size=32, num_heads=2,
                        decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=2).eval()
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 2.0, 10.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        a = model.forward_guided(x, sigma, y, 2.5)
        b = model.forward_with_cfg(x, sigma, y, 2.5)
        c, u = model(x, sigma, y), model(x, sigma, None)
    assert a.equal(b)
    torch.testing.assert_close(a, u + 2.5 * (c - u), rtol=1e-4, atol=1e-4)  # D is affine in F


def _sde(**kw):
    args = dict(sampling_method="Euler", diffusion_form="sigma", num_steps=8, cfg_scale=2.0)
    args.update(kw)
    return Sampler(create_transport()).sample_sde(**args)


def test_graph_key_names_every_setting():
    """Equal settings give equal keys (a new sample function replays); any changed setting a new key (the
    "linear" diffusion form is not tried: on the Linear path it equals "sigma", coefficient for coefficient)."""
    assert _sde().graph_key() == _sde().graph_key()
    base = _sde().graph_key()
    for change in (dict(diffusion_norm=0.5), dict(last_step_size=0.02), dict(last_step="Tweedie"),
                   dict(diffusion_form="constant"), dict(cfg_scale=3.0), dict(guided_channels=3), dict(num_steps=9),
                   dict(sampling_method="Heun"), dict(null_label=7)):
        assert _sde(**change).graph_key() != base, change
    s = Sampler(create_transport())
    assert s.sample_ode("heun", 8).graph_key() != s.sample_ode("midpoint", 8).graph_key()
    assert s.sample_dpm_solver(8, 2).graph_key() != s.sample_dpm_solver(8, 3).graph_key()
    assert s.sample_dpm_solver(8, 2).graph_key() != s.sample_dpm_solver(8, 2, "logSNR").graph_key()
    vp = Sampler(create_transport("VP", "velocity", sample_eps=1e-3)).sample_ode("heun", 8).graph_key()
    assert vp != s.sample_ode("heun", 8).graph_key()


class _FakeGraph:
    def __init__(self):
        self.fn, self.out = None, None

    def replay(self):
        self.out.copy_(self.fn())


def test_graphed_call_replays_one_graph_per_shape_with_cpu_fake(monkeypatch):
    records = []

    def record(graph, fn):
        records.append(1)
        graph.fn, graph.out = fn, fn()
        return graph.out

    monkeypatch.setattr(cuda_graph.LoopGraph, "_warmup", staticmethod(lambda fn, device: fn()))
    monkeypatch.setattr(cuda_graph.LoopGraph, "_new_graph", staticmethod(lambda generator: _FakeGraph()))
    monkeypatch.setattr(cuda_graph.LoopGraph, "_record", staticmethod(record))
    call = cuda_graph.GraphedCall(lambda x, s: x * s + 1)
    for n in (2, 2, 3, 2):
        x = torch.randn(n, 4)
        assert call(x, 2.0).equal(x * 2.0 + 1)
    assert len(records) == 2  # batch 2 and batch 3
