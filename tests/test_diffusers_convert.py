"""Official DiT layout <-> diffusers DiTTransformer2DModel (dit_models/convert_diffusers.py), on tiny random models."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

from conftest import assert_close  # noqa: E402
from dit_models import convert_diffusers as cd  # noqa: E402
from dit_models.models.dit import DiT  # noqa: E402

CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _diffusers_model(seed=0):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**CONFIG).eval()
    sd = model.state_dict()
    # tie the per-block embedder copies (as converted official files have them) and give every weight signal
    for k in sd:
        if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
            sd[k] = sd["transformer_blocks.0." + k.split(".", 2)[2]]
        else:
            sd[k] = 0.2 * torch.randn_like(sd[k])
    model.load_state_dict(sd)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 871.0]), torch.tensor([2, 9])


def _ours(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y)


def _theirs(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("fused", [False, True])
def test_diffusers_to_dit_outputs_equal(fused):
    theirs = cd.match_official_dit(_diffusers_model())
    ours = cd.from_diffusers_model(theirs, fused=fused).eval()
    x, t, y = _inputs()
    assert_close(_ours(ours, x, t, y), _theirs(theirs, x, t, y), 2e-5, 2e-5, "DiT vs diffusers")


def test_round_trip_is_exact():
    theirs = _diffusers_model()
    ours = cd.from_diffusers_model(theirs, fused=False)
    back = cd.dit_to_diffusers(ours.state_dict())
    sd = theirs.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = cd.diffusers_to_dit(back, CONFIG["sample_size"])
    assert again.keys() == ours.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


def test_dit_to_diffusers_model_outputs_equal():
    torch.manual_seed(0)
    ours = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
               learn_sigma=True, fused=False).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs = cd.to_diffusers_model(ours, official=True).eval()
    assert dict(theirs.config)["out_channels"] == 8
    x, t, y = _inputs()
    assert_close(_theirs(theirs, x, t, y), _ours(ours, x, t, y), 2e-5, 2e-5, "diffusers vs DiT")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_parity_traps_are_each_measurable():
    """Each of diffusers' two numerical differences changes the output; match_official_dit removes both
    (docs/results.md gives these figures)."""
    theirs = cd.match_official_dit(_diffusers_model())
    ours = cd.from_diffusers_model(theirs, fused=False).eval()
    x, t, y = _inputs()
    ref = _ours(ours, x, t, y)
    for block in theirs.transformer_blocks:  # trap 1 only: MLP LayerNorm eps 1e-5
        block.norm3.eps = 1e-5
    eps_only = _rel(_theirs(theirs, x, t, y), ref)
    cd.match_official_dit(theirs)
    for block in theirs.transformer_blocks:  # trap 2 only: frequencies over 127
        block.norm1.emb.time_proj.downscale_freq_shift = 1
    freq_only = _rel(_theirs(theirs, x, t, y), ref)
    cd.match_official_dit(theirs, enabled=False)
    both = _rel(_theirs(theirs, x, t, y), ref)
    print(f"relative L2 difference to the official function: eps {eps_only:.2e}, /127 {freq_only:.2e}, both {both:.2e}")
    assert 0 < eps_only < 1e-3 and freq_only > 1e-3 and both > 1e-3


def test_cfg_channels_trap():
    """DiTPipeline guides all 4 latent channels; the official sample.py guides 3: our forward_with_cfg does either."""
    ours = cd.from_diffusers_model(cd.match_official_dit(_diffusers_model()), fused=False).eval()
    x, t, y = _inputs()
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    with torch.no_grad():
        out4 = ours.forward_with_cfg(xx, tt, yy, 4.0)  # diffusers' choice (our default)
        out3 = ours.forward_with_cfg(xx, tt, yy, 4.0, cfg_channels=3)  # the official choice
        raw = ours(xx, tt, yy)
    assert torch.equal(out4[:, :3], out3[:, :3])
    assert torch.equal(out3[:2, 3], raw[:2, 3]) and not torch.equal(out4[:2, 3], raw[:2, 3])


def test_errors_name_the_problem():
    sd = _diffusers_model().state_dict()
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"] += 1
    with pytest.raises(ValueError, match="differs from block 0"):
        cd.diffusers_to_dit(sd, 8)
    assert "t_embedder.mlp.0.weight" in cd.diffusers_to_dit(sd, 8, check_embedders=False)
    uncond = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match="class-conditional"):
        cd.dit_to_diffusers(uncond.state_dict())
