"""The tools' flags: bad sizes, counts, steps and scales refused at parse time in one line; --help shows each
default once under `python -m dit_models.<tool>`; Ctrl-C is one line; results record only the sampler's settings."""
import os
import re
import subprocess
import sys

import pytest

from dit_models import evaluate, extract_latents, sample, sample_ddp, train
from dit_models.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"train": (train, []), "sample": (sample, ["--ckpt", "x.pt"]), "evaluate": (evaluate, []),
         "extract_latents": (extract_latents, ["--data", "d", "--out-dir", "o"]), "sample_ddp": (sample_ddp, ["--ckpt", "x.pt"])}

BAD = [
    ("train", "--global-batch-size", "-1", "must be at least 1, got -1"),  # used to hang in StepBatches.iterate
    ("train", "--global-batch-size", "0", "must be at least 1, got 0"),  # used to be a ZeroDivisionError
    ("train", "--max-steps", "0", "must be at least 1, got 0"),  # used to say "already at --max-steps" + matplotlib
    ("train", "--epochs", "0", "must be at least 1, got 0"),
    ("train", "--lr", "0", "must be greater than 0, got 0"),
    ("train", "--lr", "nan", "expected a finite number, got 'nan'"),
    ("train", "--ema-decay", "1.5", "must be between 0 and 1, got 1.5"),
    ("train", "--class-dropout-prob", "-0.1", "must be between 0 and 1, got -0.1"),
    ("train", "--mask-ratio", "1", "must be at least 0 and below 1, got 1"),
    ("train", "--depth", "0", "must be at least 1, got 0"),
    ("train", "--hidden-size", "-8", "must be at least 1, got -8"),
    ("train", "--num-heads", "0", "must be at least 1, got 0"),
    ("train", "--decoder-depth", "0", "must be at least 1, got 0"),
    ("train", "--image-size", "0", "must be at least 1, got 0"),
    ("train", "--num-workers", "-1", "must be 0 or more, got -1"),
    ("train", "--warmup-steps", "-5", "must be 0 or more, got -5"),
    ("train", "--log-every", "0", "must be at least 1, got 0"),  # `done % 0`: ZeroDivisionError at step 1
    ("train", "--ckpt-every", "0", "must be at least 1, got 0"),  # idem (0 never meant off)
    ("train", "--sample-every", "-1", "must be 0 or more, got -1"),
    ("train", "--sample-cfg-scale", "-2", "must be 0 or more, got -2"),
    ("train", "--eval-samples", "0", "must be at least 1, got 0"),
    ("train", "--weight-decay", "-1", "must be 0 or more, got -1"),
    ("train", "--grad-clip", "-1", "must be 0 or more, got -1"),
    ("train", "--diffusion-steps", "0", "must be at least 1, got 0"),
    ("train", "--P-std", "0", "must be greater than 0, got 0"),
    ("train", "--num-classes", "0", "must be at least 1, got 0"),
    ("train", "--model-kwargs", "[1]", "expected a JSON object ({...}), got '[1]'"),
    ("train", "--model-kwargs", "{", "expected a JSON object, got '{' (Expecting property name enclosed in double "
     "quotes: line 1 column 2 (char 1))"),
    ("sample", "--batch-size", "0", "must be at least 1, got 0"),  # used to be a ZeroDivisionError
    ("sample", "--cfg-scale", "-2", "must be 0 or more, got -2"),  # used to be accepted silently
    ("sample", "--num-sampling-steps", "0", "must be at least 1, got 0"),  # TypeError (ddpm) / IndexError (edm)
    ("sample", "--samples-per-class", "0", "must be at least 1, got 0"),
    ("sample", "--guided-channels", "0", "must be at least 1, got 0"),
    ("sample", "--solver-order", "4", "invalid choice: 4 (choose from 1, 2, 3)"),
    ("sample", "--ddim-eta", "-1", "must be 0 or more, got -1"),
    ("sample", "--sigma-min", "0", "must be greater than 0, got 0"),
    ("sample", "--S-churn", "-1", "must be 0 or more, got -1"),
    ("sample", "--rtol", "0", "must be greater than 0, got 0"),
    ("evaluate", "--num-samples", "0", "must be at least 1, got 0"),  # used to be torch.cat's internal message
    ("evaluate", "--cfg-scale", "-1", "must be 0 or more, got -1"),
    ("evaluate", "--num-sampling-steps", "-3", "must be at least 1, got -3"),
    ("extract_latents", "--batch-size", "0", "must be at least 1, got 0"),
    ("extract_latents", "--image-size", "-256", "must be at least 1, got -256"),
    ("extract_latents", "--num-workers", "-2", "must be 0 or more, got -2"),
    ("sample_ddp", "--num-fid-samples", "0", "must be at least 1, got 0"),
    ("sample_ddp", "--per-proc-batch-size", "0", "must be at least 1, got 0"),
    ("sample_ddp", "--cfg-scale", "-1.5", "must be 0 or more, got -1.5"),
    ("sample_ddp", "--log-every", "0", "must be at least 1, got 0"),
]


@pytest.mark.parametrize("tool, flag, value, message", BAD, ids=[f"{t} {f} {v}" for t, f, v, _ in BAD])
def test_bad_values_are_refused_in_one_line(tool, flag, value, message, capsys):
    module, required = TOOLS[tool]
    with pytest.raises(SystemExit) as e:
        module.get_parser().parse_args([*required, flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: argument {flag}: {message}")


def test_edge_values_that_mean_something_still_parse():
    a = train.get_parser().parse_args(["--sample-every", "0", "--num-workers", "0", "--warmup-steps", "0",
                                       "--sample-cfg-scale", "0", "--grad-clip", "0", "--mask-ratio", "0",
                                       "--ema-decay", "1", "--max-steps", "1", "--global-batch-size", "1"])
    assert (a.sample_every, a.num_workers, a.sample_cfg_scale, a.mask_ratio, a.ema_decay, a.max_steps) == \
        (0, 0, 0.0, 0.0, 1.0, 1)
    a = sample.get_parser().parse_args(["--ckpt", "x", "--cfg-scale", "0", "--num-sampling-steps", "1", "--ddim-eta", "0"])
    assert (a.cfg_scale, a.num_sampling_steps, a.ddim_eta) == (0.0, 1, 0.0)  # 0 = unconditional


def test_step_batches_refuses_a_non_positive_batch():
    """A negative batch used to loop forever (at 100% CPU) in iterate(); 0 was a ZeroDivisionError. Run in a
    subprocess with a timeout, so that a regression fails instead of hanging the suite."""
    code = ("from dit_models.data import StepBatches\n"
            "for b in (0, -1):\n"
            "    try:\n"
            "        next(StepBatches(list(range(64)), b).iterate(0, 10))\n"
            "    except ValueError as e:\n"
            "        print(e)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["the batch per process must be at least 1, got 0",
                                     "the batch per process must be at least 1, got -1"]


@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_names_the_command_and_shows_each_default_once(tool):
    text = TOOLS[tool][0].get_parser().format_help()
    assert text.startswith(f"usage: python -m dit_models.{tool} ")
    assert "(default: None)" not in text
    blocks = re.split(r"\n(?=  -)", text.split("\noptions:", 1)[1])  # one block per flag
    for block in blocks:
        assert len(re.findall("default", block, re.IGNORECASE)) <= 1, block
    if tool == "train":
        flat = {b.split()[0]: " ".join(b.split()) for b in blocks if b.strip()}
        assert flat["--lr"].endswith("default: 0.0001")  # a flag without help text still shows its default
        assert flat["--seed"].endswith("default: 0")
        assert "(default: True)" in flat["--fused,"]


@pytest.mark.parametrize("tool, argv", [(sample, ["--ckpt", "x.pt"]), (evaluate, ["--ckpt", "x.pt"]),
                                        (extract_latents, ["--data", "d", "--out-dir", "o"])])
def test_ctrl_c_and_user_errors_are_one_line(tool, argv, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "main", interrupted)
    with pytest.raises(SystemExit) as e:
        tool.cli(argv)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"

    def bad(args):
        raise ValueError("bad input\n")

    monkeypatch.setattr(tool, "main", bad)
    with pytest.raises(SystemExit) as e:
        tool.cli(argv)
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad input\n"


def test_results_record_only_the_settings_of_the_sampler_used():
    """eval.json of a DPM-Solver++ SiT run listed the ODE and SDE settings (atol, diffusion_form...) too."""
    sit = METHODS["sit"]
    assert sit.sampler_settings(dict(sit.sampler_defaults(fast=True), sampler="dpm++")) == \
        {"sampler": "dpm++", "num_sampling_steps": 20, "solver_order": 2, "time_spacing": "time_uniform",
         "third_order": "taylor"}
    assert sit.sampler_settings(sit.sampler_defaults(fast=True)) == \
        {"sampler": "unipc", "num_sampling_steps": 20, "solver_order": 2, "time_spacing": "time_uniform",
         "unipc_variant": "bh1"}
    sde = dict(sit.sampler_defaults(fast=False), sampler="sde", sampling_method="Euler", guided_channels=3)
    assert set(sit.sampler_settings(sde)) == {"sampler", "num_sampling_steps", "sampling_method", "diffusion_form",
                                              "diffusion_norm", "last_step", "last_step_size", "guided_channels"}
    for m in METHODS.values():  # every option a sampler names is one its starting settings have
        for name, spec in m.samplers.items():
            start = dict(m.sampler_defaults(fast=name == "dpm++"), **spec.chosen)
            assert set(spec.options) <= set(start), (m.name, name)
    edm = METHODS["maskdit"]
    assert "S_churn" not in edm.sampler_settings(edm.sampler_defaults(fast=True))


def test_no_loss_plot_is_explained():
    """"(matplotlib not installed)" was printed whenever there was no plot, e.g. when no step was trained."""
    pytest.importorskip("matplotlib")
    assert train._no_plot_reason({"history": {"step": [], "loss": [], "step_loss": []}}) == \
        "(no loss values: no step was trained)"


def test_class_labels_that_are_not_integers_are_one_clear_line():
    with pytest.raises(ValueError, match="--class-labels '1,a': expected comma-separated integers"):
        sample.parse_labels("1,a", 10)


def test_edm_sigma_range_must_not_be_inverted():
    """--sigma-min 80 --sigma-max 0.002 used to run the EDM grid backwards without a word."""
    from dit_models.generation import sampler_opts_from_args

    p = sample.get_parser()
    with pytest.raises(ValueError, match="--sigma-min 80 must be below --sigma-max 0.002"):
        sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sigma-min", "80", "--sigma-max", "0.002"]), "maskdit")
    with pytest.raises(ValueError, match="--sigma-min 100 must be below --sigma-max 80"):
        sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sigma-min", "100"]), "sddit", fast=True)
    assert sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sigma-max", "40"]), "maskdit")["sigma_max"] == 40
