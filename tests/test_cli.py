"""Command-line entry points: quickstart, sample (PNG), sample_ddp (.npz, resumable), evaluate, bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import load_repo_file
from dit_models import evaluate, generation, metrics, sample, sample_ddp, train
from dit_models.methods import get_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16", "--device", "cpu",
        "--num-workers", "0", "--log-every", "5", "--sample-every", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private classifier cache for the session (trained once, in seconds)."""
    d = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("DIT_MODELS_CACHE")
    os.environ["DIT_MODELS_CACHE"] = d
    yield d
    if old is None:
        os.environ.pop("DIT_MODELS_CACHE", None)
    else:
        os.environ["DIT_MODELS_CACHE"] = old


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny 3-step checkpoints of every method (sampling tests only need the format, not quality)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method, model, extra in [("ddpm", "DiT-S/2", []), ("sit", "SiT-S/2", []),
                                 ("maskdit", "MaskDiT-S/2", ["--decoder-depth", "1", "--decoder-hidden-size", "32",
                                                             "--decoder-num-heads", "2"])]:
        argv = ["--method", method, "--model", model, "--max-steps", "3", "--results-dir", str(root / method), *TINY, *extra]
        p = train.get_parser()
        out[method] = train.main(train.resolve_args(p.parse_args(argv), p, argv))["checkpoint"]
    return out


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_quickstart_short(tmp_path, cache_dir):
    """The main-job command itself, shortened: trains, samples, plots, evaluates and prints where things are."""
    r = _run(["dit_models.quickstart", "--max-steps", "20", "--eval-samples", "20", "--sample-every", "20",
              "--log-every", "10", "--results-dir", str(tmp_path), "--depth", "1", "--hidden-size", "32"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "step      20/20" in out and "steps/s" in out and "img/s" in out
    run = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    for f in ("loss.png", "log.txt", "eval.json", "eval_samples.png", "samples/0000020.png", "checkpoints/0000020.pt"):
        assert os.path.exists(os.path.join(run, f)), f
    for f in ("loss.png", "log.txt", "eval.json", "0000020.png", "0000020.pt"):
        assert f in out, f  # the summary says where everything is
    res = json.load(open(os.path.join(run, "eval.json")))
    assert 0 <= res["accuracy"] <= 1 and res["fd"] > 0
    assert "class accuracy" in out and run in out


@pytest.mark.parametrize("method,flags", [
    ("ddpm", ["--sampler", "ddim", "--num-sampling-steps", "4"]),
    ("ddpm", ["--sampler", "ddpm", "--num-sampling-steps", "3", "--cfg-scale", "2.0"]),
    ("sit", ["--sampler", "ode", "--sampling-method", "euler", "--num-sampling-steps", "4"]),
    ("sit", ["--sampler", "sde", "--diffusion-form", "linear", "--num-sampling-steps", "4", "--cfg-scale", "1.0"]),
    ("maskdit", ["--num-sampling-steps", "3", "--cfg-scale", "1.5"]),
    ("ddpm", ["--sampler", "dpm++", "--num-sampling-steps", "4", "--cfg-scale", "2.0"]),
    ("sit", ["--sampler", "dpm++", "--num-sampling-steps", "4", "--solver-order", "3", "--time-spacing", "logSNR"]),
    ("maskdit", ["--sampler", "dpm++", "--num-sampling-steps", "4", "--cfg-scale", "1.5"]),
])
def test_sample_png(method, flags, checkpoints, tmp_path):
    out = str(tmp_path / "grid.png")
    path = sample.main(sample.get_parser().parse_args(["--ckpt", checkpoints[method], "--out", out, "--device", "cpu",
                                                       "--samples-per-class", "1", *flags]))
    from PIL import Image

    im = Image.open(path)
    assert path == out and im.size[0] > 10 * 16  # 10 digits wide, upscaled


def test_generate_is_seeded(checkpoints):
    model, method, margs = generation.load_model_for_sampling(checkpoints["sit"])
    opts = dict(generation.sampler_defaults("sit"), sampler="sde", sampling_method="Euler", num_sampling_steps=4)
    y = torch.arange(4)
    a = generation.generate(method, model, y, opts, 1.0, torch.Generator().manual_seed(5), margs)
    b = generation.generate(method, model, y, opts, 1.0, torch.Generator().manual_seed(5), margs)
    c = generation.generate(method, model, y, opts, 1.0, torch.Generator().manual_seed(6), margs)
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_dpm_solver_options_and_nfe(checkpoints):
    """--sampler dpm++ defaults to 20 steps = 20 network evaluations (one per step, CFG on the 2B batch)."""
    p = sample.get_parser()
    opts = generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "dpm++"]), "ddpm")
    assert (opts["num_sampling_steps"], opts["solver_order"], opts["time_spacing"]) == (20, 2, "time_uniform")
    assert generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "dpm++"]), "sit")["time_spacing"] \
        == "time_uniform"
    with pytest.raises(ValueError, match="does not apply"):
        generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "edm"]), "ddpm")
    for method in ("ddpm", "sit", "maskdit"):
        model, _, margs = generation.load_model_for_sampling(checkpoints[method])
        batches = []
        model.x_embedder.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
        opts = generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "dpm++",
                                                           "--num-sampling-steps", "6"]), method)
        x = generation.generate(method, model, torch.arange(5), opts, 2.0, torch.Generator().manual_seed(0), margs)
        assert x.shape == (5, 1, 16, 16) and torch.isfinite(x).all()
        assert batches == [10] * 6 == [10] * generation.sampler_nfe(method, opts), (method, batches)


def test_sample_ddp_npz_resumable(checkpoints, tmp_path):
    argv = ["--ckpt", checkpoints["ddpm"], "--num-fid-samples", "10", "--per-proc-batch-size", "4",
            "--sample-dir", str(tmp_path), "--num-sampling-steps", "2", "--cfg-scale", "1.0", "--device", "cpu",
            "--name", "s"]
    path = sample_ddp.main(sample_ddp.get_parser().parse_args(argv))
    d = np.load(path)
    assert d["arr_0"].shape == (10, 16, 16, 3) and d["arr_0"].dtype == np.uint8
    assert d["labels"].shape == (10,) and d["labels"].max() < 10
    first = d["arr_0"].copy()
    # Resume: a lost batch is regenerated identically (seeds depend on the batch index only).
    os.remove(os.path.join(tmp_path, "s_parts", "000001.npz"))
    os.remove(path)
    path = sample_ddp.main(sample_ddp.get_parser().parse_args(argv))
    assert np.array_equal(np.load(path)["arr_0"], first)
    # evaluate scores an npz with labels
    res = evaluate.main(evaluate.get_parser().parse_args(["--npz", path]))
    assert res["num_samples"] == 10 and 0 <= res["accuracy"] <= 1


def test_evaluate_scores(cache_dir):
    from dit_models.data import digits_dataset

    te = digits_dataset("test")
    real = metrics.score_samples(te.images[:200], te.labels[:200])
    noise = metrics.score_samples(torch.rand(200, 1, 16, 16) * 2 - 1, torch.arange(200) % 10)
    assert real["accuracy"] > 0.9 and noise["accuracy"] < 0.4
    assert real["fd"] < real["fd_real"] * 3 < noise["fd"]
    x = np.random.RandomState(0).randn(500, 4)
    assert abs(metrics.frechet_distance(x, x)) < 1e-6
    assert metrics.frechet_distance(x, x + 1.0) == pytest.approx(4.0, rel=1e-6)


def test_bad_inputs(tmp_path, capsys):
    base = ["--results-dir", str(tmp_path), *TINY, "--max-steps", "1"]
    cases = [
        (["--data", str(tmp_path / "nope")], "does not exist"),
        (["--num-classes", "7"], "does not match the dataset"),
        (["--model", "DiT-Q/2"], "unknown --model"),
        (["--method", "sit", "--model", "SiT-S/2", "--decoder-depth", "2"], "does not accept"),
        (["--global-batch-size", "4096"], "fewer than one global batch"),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            train.cli(base + extra)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, extra
    assert os.listdir(tmp_path) == []  # nothing written for bad configurations
    with pytest.raises(SystemExit):
        sample.cli(["--ckpt", str(tmp_path / "missing.pt")])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"garbage\n", b"PK\x03\x04" + b"\0" * 40, b""])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, content):
    """A text file, a truncated zip and an empty file: every tool names the file, exits 2, no traceback."""
    bad = tmp_path / "0001000.pt"
    bad.write_bytes(content)
    for tool, argv in [(sample.cli, ["--ckpt", str(bad)]), (evaluate.cli, ["--ckpt", str(bad)]),
                       (train.cli, ["--resume", str(bad), *TINY, "--results-dir", str(tmp_path / "runs")])]:
        with pytest.raises(SystemExit) as e:
            tool(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "cannot read checkpoint" in err and str(bad) in err, (tool, err)


def test_dry_run_prints_config(tmp_path, capsys):
    out = train.cli(["--method", "sit", "--model", "SiT-S/2", "--dry-run", "--results-dir", str(tmp_path), *TINY])
    text = capsys.readouterr().out
    cfg = json.loads(text[: text.index("\ndata:")])
    assert cfg["method"] == "sit" and cfg["lr"] == 1e-4 and cfg["ema_decay"] == 0.9999 and cfg["input_size"] == 16
    assert out["config"]["num_classes"] == 10 and os.listdir(tmp_path) == []


def test_published_defaults():
    p = train.get_parser()
    a = train.resolve_args(p.parse_args(["--method", "maskdit"]), p, ["--method", "maskdit"])
    assert (a.lr, a.ema_decay, a.weight_decay, a.class_dropout_prob, a.global_batch_size, a.mask_ratio) == \
        (1e-4, 0.9999, 0.0, 0.1, 1024, 0.5)
    a = train.resolve_args(p.parse_args(["--method", "sddit"]), p, ["--method", "sddit"])
    assert a.mask_ratio == 0.2 and a.model == "SD-DiT-XL/2"
    a = train.resolve_args(p.parse_args(["--method", "ddpm"]), p, ["--method", "ddpm"])
    assert a.global_batch_size == 256 and a.learn_sigma and a.grad_clip == 0
    q = train.resolve_args(p.parse_args(["--quickstart", "--max-steps", "7"]), p, ["--quickstart", "--max-steps", "7"])
    assert q.max_steps == 7 and q.method == train.QUICKSTART["method"] and q.depth == train.QUICKSTART["depth"]


def test_released_style_raw_state_dict(tmp_path):
    """A raw DiT state_dict (the released-file format) samples with --method; config inferred from shapes."""
    from dit_models.models.dit import DiT

    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save(dit.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="pass --method"):
        generation.load_model_for_sampling(str(tmp_path / "raw.pt"))
    model, method, margs = generation.load_model_for_sampling(str(tmp_path / "raw.pt"), method="ddpm", num_heads=2)
    assert margs["learn_sigma"] and margs["input_size"] == 8 and margs["data_kind"] == "latents"
    opts = dict(generation.sampler_defaults("ddpm"), num_sampling_steps=2)
    x = generation.generate(method, model, torch.tensor([1, 2]), opts, 4.0, torch.Generator().manual_seed(0), margs)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_bf16_training_step(tmp_path):
    argv = ["--method", "sit", "--model", "SiT-S/2", "--max-steps", "2", "--results-dir", str(tmp_path), *TINY]
    argv[argv.index("--precision") + 1] = "bf16"
    p = train.get_parser()
    out = train.main(train.resolve_args(p.parse_args(argv), p, argv))
    assert np.isfinite(out["final_loss"]) and next(out["model"].parameters()).dtype == torch.float32


def test_sampler_nfe_benchmark_counts_resumes_and_tabulates(checkpoints, cache_dir, tmp_path):
    bench = load_repo_file("benchmarks/sampler_nfe.py", "_bench_sampler_nfe")
    out = str(tmp_path / "nfe.jsonl")
    recs = bench.run(checkpoints["sit"], ["dpm++2", "heun"], [4], [1.0, 2.0], 20, 0, out)
    assert [(r["sampler"], r["cfg"], r["nfe"]) for r in recs] == [("dpm++2", 1.0, 4), ("heun", 1.0, 4),
                                                                 ("dpm++2", 2.0, 4), ("heun", 2.0, 4)]
    assert bench.run(checkpoints["sit"], ["dpm++2", "heun"], [4], [1.0, 2.0], 20, 0, out) == []  # resumed
    assert torch.is_grad_enabled()  # the benchmark must not switch autograd off for the rest of the process
    table = bench.markdown_table(out)
    assert "sit, cfg 2, 20 samples" in table and "| dpm++2 time_uniform |" in table and "| heun |" in table
    # UniPC and a guidance interval: SiT t in [0.5, 1] guides the later half of a 4-step uniform grid only
    recs = bench.run(checkpoints["sit"], ["unipc-bh2"], [4], [2.0], 20, 0, out, guidance_interval=(0.5, 1.0))
    assert [(r["sampler"], r["nfe"], r["guidance_interval"]) for r in recs] == [("unipc-bh2", 4, [0.5, 1.0])]
    assert 0 < recs[0]["guided_nfe"] < 4
    with open(out, "a") as f:  # a 250-NFE reference row: the table says how far the best sampler is from it
        f.write(json.dumps(dict(recs[0], sampler="heun", nfe_target=250, nfe=250, fd=recs[0]["fd"] / 1.1)) + "\n")
    table = bench.markdown_table(out)
    assert "sit, cfg 2, guidance interval [0.5, 1.0], 20 samples" in table and "| unipc-bh2 time_uniform |" in table
    assert f"NFE 4: unipc-bh2 time_uniform {recs[0]['fd']:.1f} (+10.0%)" in table


def test_compare_diffusers_skips_cleanly_without_diffusers(monkeypatch, capsys):
    bench = load_repo_file("benchmarks/compare_diffusers.py", "_bench_compare_diffusers")
    monkeypatch.setattr(bench, "diffusers_available", lambda: False)
    assert bench.main(["--ckpt", "unused.pt"]) == []
    assert "diffusers is not installed" in capsys.readouterr().err


def test_compare_diffusers_table_marks_each_sides_best(tmp_path):
    bench = load_repo_file("benchmarks/compare_diffusers.py", "_bench_compare_diffusers")
    base = dict(cfg=1.0, num_samples=10, ckpt="c.pt", method="sit", non_finite_samples=0, accuracy=0.5)
    recs = [dict(base, solver="ours a", nfe=10, fd=2.0), dict(base, solver="ours b", nfe=10, fd=3.0),
            dict(base, solver="flow x", nfe=10, fd=4.0), dict(base, solver="flow y", nfe=10, fd=float("nan"),
                                                               non_finite_samples=10)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    table = bench.markdown_table(str(path))
    assert "| ours a | **2.0** / 0.500 |" in table and "| ours b | 3.0 / 0.500 |" in table
    assert "| flow x | **4.0** / 0.500 |" in table and "| flow y | non-finite (10) |" in table
    assert "NFE 10: ours 2.0, diffusers 4.0 (-50.0%)" in table


def test_compare_diffusers_flow_anchor_drives_sit_like_our_samplers(checkpoints):
    # diffusers' flow-matching schedulers on a SiT velocity network (sigma = 1 - t, flow output = -v): on
    # (nearly) our grid they must land where our own DPM-Solver++ / UniPC land; a sign or time-direction slip
    # in the mapping does not.
    pytest.importorskip("diffusers")
    bench = load_repo_file("benchmarks/compare_diffusers.py", "_bench_compare_diffusers")
    nfe_bench = load_repo_file("benchmarks/sampler_nfe.py", "_bench_sampler_nfe")
    model, method, margs = generation.load_model_for_sampling(checkpoints["sit"], device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # a 3-step network still outputs ~0 (zero-initialised final layer): give it a field
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)
    C, H = model.in_channels, model.input_size
    z = torch.randn(8, C, H, H, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % model.num_classes
    with torch.no_grad():
        for theirs, ours in (("flow dpm++2M", "dpm++2"), ("flow unipc bh2", "unipc-bh2")):
            x_ours = generation.generate(method, model, y, nfe_bench.sampler_opts(method, ours, 8), 1.0,
                                         method_args=margs, noise=z)
            x_theirs = bench.diffusers_sample(bench.make_scheduler(theirs), bench.sit_flow_output(model, 1.0), z, 8, y)
            scale = float(x_ours.abs().max())
            assert float((x_theirs - x_ours).abs().max()) < 0.05 * scale, theirs
        flipped = lambda x, t, y_: -bench.sit_flow_output(model, 1.0)(x, t, y_)  # noqa: E731
        x_wrong = bench.diffusers_sample(bench.make_scheduler("flow dpm++2M"), flipped, z, 8, y)
        assert float((x_wrong - x_ours).abs().max()) > 0.2 * scale


def test_fast_sampler_is_the_tables_choice_and_another_sampler_gets_its_published_settings():
    p = sample.get_parser()
    for method, sampler in (("ddpm", "dpm++"), ("sit", "unipc"), ("maskdit", "dpm++"), ("sddit", "unipc")):
        opts = generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x"]), method, fast=True)
        assert (opts["sampler"], opts["num_sampling_steps"], opts["solver_order"]) == (sampler, 20, 2)
        assert generation.sampler_nfe(method, opts) == 20
    # SiT: UniPC bh1 by default and for a bare --sampler unipc; --sampler dpm++ is the previous default
    assert generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x"]), "sit", fast=True)["unipc_variant"] == "bh1"
    opts = generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "unipc"]), "sit", fast=True)
    assert (opts["sampler"], opts["unipc_variant"]) == ("unipc", "bh1")
    opts = generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "dpm++"]), "sit", fast=True)
    assert (opts["sampler"], opts["num_sampling_steps"], opts["solver_order"]) == ("dpm++", 20, 2)
    assert "unipc_variant" not in get_method("sit").sampler_settings(opts)  # results record dpm++'s options only
    opts = generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "ddpm"]), "ddpm", fast=True)
    assert (opts["sampler"], opts["num_sampling_steps"]) == ("ddpm", 250)
    opts = generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x", "--sampler", "edm", "--num-sampling-steps",
                                                           "18"]), "maskdit", fast=True)
    assert (opts["sampler"], opts["num_sampling_steps"], generation.sampler_nfe("maskdit", opts)) == ("edm", 18, 35)
    assert generation.sampler_opts_from_args(p.parse_args(["--ckpt", "x"]), "sit")["sampler"] == "ode"  # published
