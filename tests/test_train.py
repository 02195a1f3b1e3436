"""Training loop: every method learns on digits, exact resume, checkpoint round trip, EMA, 2-process DDP (gloo)."""
import os
import subprocess
import sys

import pytest
import torch

from dit_models import builders, train, utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny models (overrides documented for tests/laptops): 2 blocks of width 32.
TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--decoder-depth", "1",
        "--decoder-hidden-size", "32", "--decoder-num-heads", "2"]
MODELS = {"ddpm": "DiT-S/2", "sit": "SiT-S/2", "maskdit": "MaskDiT-S/2", "sddit": "SD-DiT-S/2"}
SDDIT_HEAD = ["--model-kwargs", '{"head_out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32}']


def make_args(method, tmp_path, *extra):
    argv = ["--method", method, "--model", MODELS[method], "--results-dir", str(tmp_path), "--global-batch-size", "16",
            "--log-every", "5", "--sample-every", "0", "--ckpt-every", "1000", "--device", "cpu", "--num-workers", "0",
            "--precision", "fp32", *TINY, *(SDDIT_HEAD if method == "sddit" else []), *extra]
    if method in ("ddpm", "sit"):
        argv = [a for i, a in enumerate(argv) if not (a.startswith("--decoder") or argv[i - 1].startswith("--decoder"))]
    parser = train.get_parser()
    return train.resolve_args(parser.parse_args(argv), parser, argv)


def fixed_batch_loss(args, model, n_batches=3):
    """Objective on fixed digits batches with fixed randomness (same draws for every model)."""
    from dit_models.data import digits_dataset

    ds = digits_dataset("train")
    objective = train.build_objective(args)
    model.train()
    total = 0.0
    with torch.no_grad():
        for b in range(n_batches):
            utils.seed_everything(1000 + b)
            x, y = ds.images[b * 128 : (b + 1) * 128], ds.labels[b * 128 : (b + 1) * 128]
            loss, logs = objective(model, x, y, 0)
            total += float(logs.get("gen", loss))  # SD-DiT: the generative (EDM) part
    return total / n_batches


@pytest.mark.parametrize("method", ["ddpm", "sit", "maskdit", "sddit"])
def test_training_lowers_loss(method, tmp_path):
    args = make_args(method, tmp_path, "--max-steps", "30", "--lr", "2e-3")
    out = train.main(args)
    utils.seed_everything(utils.derive_seed(args.seed, 10**9))  # the initial weights of the run
    init = builders.build_model_from_args(args, 16, 1)
    before, after = fixed_batch_loss(args, init), fixed_batch_loss(args, out["model"])
    assert after < 0.9 * before, f"{method}: loss {before:.4f} -> {after:.4f}"
    assert os.path.exists(out["checkpoint"]) and out["final_loss"] is not None
    assert len(out["history"]["step"]) == 6


def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps + --resume + 3 steps (weights, EMA and optimizer state bit-identical)."""
    base = ("--max-steps", "6", "--ckpt-every", "3")
    a = train.main(make_args("maskdit", tmp_path / "a", *base))  # masks, sigma, noise, label dropout all random
    b1 = train.main(make_args("maskdit", tmp_path / "b", "--max-steps", "3"))
    b2 = train.main(make_args("maskdit", tmp_path / "b", *base, "--resume", b1["run_dir"]))
    assert b2["run_dir"] == b1["run_dir"]
    ca = torch.load(a["checkpoint"], weights_only=False)
    cb = torch.load(b2["checkpoint"], weights_only=False)
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), f"{key}.{name} differs after resume"
    for (ka, sa), (kb, sb) in zip(ca["opt"]["state"].items(), cb["opt"]["state"].items()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_lr_schedule_warmup_and_cosine(tmp_path):
    a = make_args("sit", tmp_path, "--lr", "1e-3", "--warmup-steps", "4", "--lr-schedule", "cosine")
    lrs = [train.lr_at(a, s, 14) for s in range(14)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up, full LR at step 3
    assert lrs[4] == pytest.approx(1e-3) and lrs[9] == pytest.approx(5e-4)  # cosine: half way at 5 of 10 steps
    assert all(x > y for x, y in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0
    const = make_args("sit", tmp_path, "--lr", "1e-3")
    assert {train.lr_at(const, s, 14) for s in range(14)} == {1e-3}  # paper default: constant, no warm-up
    out = train.main(make_args("sit", tmp_path / "run", "--max-steps", "4", "--warmup-steps", "1",
                               "--lr-schedule", "cosine", "--lr", "1e-3"))
    ckpt = torch.load(out["checkpoint"], weights_only=False)
    assert ckpt["opt"]["param_groups"][0]["lr"] == pytest.approx(2.5e-4)  # step 3: cos(2/3 pi) -> lr / 4


def test_checkpoint_round_trip(tmp_path):
    out = train.main(make_args("sit", tmp_path, "--max-steps", "4", "--ckpt-every", "2"))
    ckpt_dir = os.path.join(out["run_dir"], "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["0000002.pt", "0000004.pt"]  # atomic: no temp files left
    ck = torch.load(out["checkpoint"], map_location="cpu", weights_only=False)
    assert {"model", "ema", "opt", "step", "epoch", "args", "rng"} <= set(ck)
    assert type(ck["args"]) is dict and ck["args"]["method"] == "sit" and ck["args"]["input_size"] == 16
    assert utils.latest_checkpoint(out["run_dir"]).endswith("0000004.pt")
    # Sampling loads the EMA weights through dit_models.checkpoint.
    from dit_models.generation import load_model_for_sampling

    model, method, margs = load_model_for_sampling(out["checkpoint"])
    assert method == "sit" and margs["depth"] == 2
    for name, t in model.state_dict().items():
        assert torch.equal(t, ck["ema"][name])
    # The generic loader used for released files also accepts our container.
    from dit_models import load_checkpoint

    fresh = builders.build_model_from_args(ck["args"], 16, 1)
    load_checkpoint(out["checkpoint"], fresh, which="model")
    assert torch.equal(fresh.final_layer.linear.weight, ck["model"]["final_layer.linear.weight"])
    with pytest.raises(ValueError, match="not a resumable"):
        utils.load_training_checkpoint(_save_raw(tmp_path, ck["ema"]))


def _save_raw(tmp_path, sd):
    p = str(tmp_path / "raw.pt")
    torch.save(sd, p)
    return p


def test_ema_update_multi_tensor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are skipped (stay an exact copy)
    import copy

    ema = copy.deepcopy(model)
    ref = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    utils.EMA(model, ema).update(0.9)
    for (k, v), p in zip(ema.state_dict().items(), model.state_dict().values()):
        # Reference DiT update, one parameter at a time: ema.mul_(decay).add_(param, alpha=1 - decay).
        expected = ref[k] if k == "0.bias" else ref[k].clone().mul_(0.9).add_(p, alpha=1 - 0.9)
        assert torch.equal(v, expected), k


def test_atomic_save_and_seed(tmp_path):
    p = str(tmp_path / "x" / "c.pt")
    utils.save_atomic({"a": torch.ones(2)}, p)
    assert os.listdir(os.path.dirname(p)) == ["c.pt"]
    assert utils.derive_seed(1, 0, 5) == utils.derive_seed(1, 0, 5) != utils.derive_seed(1, 1, 5)


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun --nproc_per_node 2 on the CPU: gloo, DistributedSampler, all-reduced loss, rank-0 outputs."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "dit_models.train", "--method", "sit", "--model", "SiT-S/2", "--depth", "1", "--hidden-size", "32",
           "--num-heads", "2", "--global-batch-size", "16", "--max-steps", "4", "--log-every", "2",
           "--sample-every", "0", "--device", "cpu", "--num-workers", "0", "--results-dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = os.listdir(tmp_path)
    assert len(runs) == 1  # only rank 0 creates the run folder
    log = open(os.path.join(tmp_path, runs[0], "log.txt")).read()
    assert "2 process(es)" in log and "8 per process" in log
    assert log.count("step       4/4") == 1  # rank-0 logging only
    ck = torch.load(os.path.join(tmp_path, runs[0], "checkpoints", "0000004.pt"), weights_only=False)
    assert set(ck["rng"]) == {0, 1}  # both ranks' RNG states are saved


@pytest.mark.parametrize("method, name", [("maskdit", "MaskDiT-S/2"), ("sddit", "SD-DiT-S/2")])
def test_small_model_flags_shrink_the_whole_model(method, name):
    """--depth/--hidden-size/--num-heads shrink the decoder (and SD-DiT's heads) too, unless --decoder-* say
    otherwise; the public decoder is 8 x 512 under every encoder."""
    from dit_models.builders import build_model, model_config

    small = build_model(method, name, 16, 1, 10, depth=4, hidden_size=64, num_heads=4)
    cfg = model_config(small)
    assert (cfg["decoder_depth"], cfg["decoder_hidden_size"], cfg["decoder_num_heads"]) == (4, 64, 4)
    assert utils.count_params(small) < 1.5e6  # was 27.3 M (MaskDiT) / 41.5 M (SD-DiT) with the 8 x 512 decoder
    explicit = model_config(build_model(method, name, 16, 1, 10, depth=4, hidden_size=64, num_heads=4, decoder_depth=2))
    assert (explicit["decoder_depth"], explicit["decoder_hidden_size"]) == (2, 512)
    full = model_config(build_model(method, name, 16, 1, 10))
    assert (full["decoder_depth"], full["decoder_hidden_size"]) == (8, 512)
