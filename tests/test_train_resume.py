"""Preemption-safe training (SIGKILL anywhere, SIGTERM, a dead DDP rank), the non-finite step guard, resuming
with the checkpoint's settings, Ctrl-C and failed start-ups. Subprocess tests run the real command line."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dit_models import train, utils
from test_train import TINY, make_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
# One command line for the first start and every requeue (bitwise comparisons: one thread, as the reference).
BASE = ["--method", "sit", "--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
        "--global-batch-size", "16", "--max-steps", str(STEPS), "--log-every", "1", "--sample-every", "0",
        "--ckpt-every", "1", "--device", "cpu", "--num-workers", "0", "--precision", "fp32"]
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _start(argv, log_path, env=ENV):
    f = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "dit_models.train", *argv], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT), f


def _wait_for(proc, log_path, text, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in open(log_path).read():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not seen in {timeout}s:\n{open(log_path).read()[-3000:]}")


def _final(results_dir):
    run, = os.listdir(results_dir)
    return torch.load(os.path.join(results_dir, run, "checkpoints", f"{STEPS:07d}.pt"), weights_only=False)


def _assert_bitwise_equal(a, b):
    assert a["step"] == b["step"] == STEPS and a["epoch"] == b["epoch"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs"
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Every step's loss (log-every 1): the same batches, noise and weights at every step.
    assert len(a["history"]["step_loss"]) == STEPS and a["history"]["step_loss"] == b["history"]["step_loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    r = subprocess.run([sys.executable, "-m", "dit_models.train", *BASE, "--results-dir", str(out)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return _final(out)


def _freeze_when(proc, condition, then=0):
    """Run proc in slices of about a millisecond, stopped (SIGSTOP, delivered) between them, until condition()
    has held at `then` + 1 stops; return True with proc left stopped there, False if it exited first. A test
    that watched a running trainer lost the race on a loaded machine: the tiny run ended before the watcher
    got a core back. A stopped process cannot run ahead of the check."""
    def stopped():
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "Tt"

    held = 0
    while proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)
        deadline = time.time() + 5
        while proc.poll() is None and not stopped() and time.time() < deadline:
            time.sleep(0.0002)
        if proc.poll() is not None:
            break
        if condition():
            if held >= then:
                return True
            held += 1
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    return False


def test_sigkill_anywhere_then_resume_auto_is_bitwise_exact(reference, tmp_path):
    """SIGKILL at random times (and once the moment a checkpoint write is under way), a torn newest checkpoint
    once; the same command line (--resume auto) every time, until it finishes."""
    results, rng = tmp_path / "runs", random.Random(0)
    argv = [*BASE, "--resume", "auto", "--results-dir", str(results)]
    kills, finished, logs = 0, False, []
    for attempt in range(15):
        log = str(tmp_path / f"attempt{attempt}.txt")
        proc, f = _start(argv, log)
        try:
            if attempt == 1:  # the moment a checkpoint write is under way
                ckdir = results / os.listdir(results)[0] / "checkpoints"
                frozen = _freeze_when(proc, lambda: any(".pt.tmp." in n for n in os.listdir(ckdir)))
            else:  # a random moment after its first checkpoint
                frozen = _freeze_when(proc, lambda: "saved checkpoint" in open(log).read(), rng.randrange(40))
            if frozen:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(60)
        finally:
            proc.kill()
            f.close()
        logs.append(open(log).read())
        if proc.returncode == 0:
            finished = True
            break
        if attempt == 2:  # a torn newest checkpoint (a copy cut short, a crashed file system)
            newest = utils.checkpoint_files(str(results / os.listdir(results)[0]))[0]
            data = open(newest, "rb").read()
            open(newest, "wb").write(data[: len(data) // 3])
    assert finished and kills >= 3, (kills, logs[-1][-2000:])
    assert len(os.listdir(results)) == 1  # one run folder for every attempt
    assert any("skipping" in text for text in logs)  # the torn checkpoint was passed over
    assert not [n for n in os.listdir(results / os.listdir(results)[0] / "checkpoints") if ".tmp." in n]
    _assert_bitwise_equal(_final(results), reference)


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(reference, tmp_path):
    results = tmp_path / "runs"
    argv = [*BASE, "--ckpt-every", "1000", "--resume", "--results-dir", str(results)]  # bare --resume = auto
    log = str(tmp_path / "first.txt")
    proc, f = _start(argv, log)
    try:
        _wait_for(proc, log, f"step       3/{STEPS}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, open(log).read()[-2000:]
    finally:
        proc.kill()
        f.close()
    text = open(log).read()
    line, = [ln for ln in text.splitlines() if "SIGTERM: stopped at step" in ln]
    step = int(line.split("stopped at step ")[1].split("/")[0])
    assert 3 <= step < STEPS and f"{step:07d}.pt" in line
    run, = os.listdir(results)
    assert sorted(os.listdir(results / run / "checkpoints")) == [f"{step:07d}.pt"]
    r = subprocess.run([sys.executable, "-m", "dit_models.train", *argv], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    _assert_bitwise_equal(_final(results), reference)


def test_a_dead_rank_stops_the_other_within_dist_timeout(tmp_path):
    timeout = 10
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + os.getpid() % 1000), WORLD_SIZE="2")
    argv = [*BASE, "--max-steps", "100000", "--ckpt-every", "1000000", "--dist-timeout", str(timeout),
            "--results-dir", str(tmp_path / "runs")]
    procs, files = [], []
    for r in (0, 1):
        p, f = _start(argv, str(tmp_path / f"rank{r}.txt"), dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        procs.append(p)
        files.append(f)
    try:
        _wait_for(procs[0], str(tmp_path / "rank0.txt"), "step       3/")
        procs[1].send_signal(signal.SIGKILL)
        start = time.time()
        rc = procs[0].wait(timeout + 60)
        elapsed = time.time() - start
    finally:
        for p, f in zip(procs, files):
            p.kill()
            f.close()
    text = open(tmp_path / "rank0.txt").read()
    assert rc not in (0, None) and elapsed < timeout + 30, (rc, elapsed, text[-2000:])
    assert "error: a process of the distributed run failed or stopped answering" in text, text[-2000:]


def test_batches_from_any_step_are_the_tail_of_the_uninterrupted_order():
    from dit_models.data import StepBatches, digits_dataset

    batches = StepBatches(digits_dataset("train"), 16, seed=3)
    n = batches.steps_per_epoch + 5  # across an epoch boundary
    full = [(e, s, y) for e, s, _, y in batches.iterate(0, n)]
    for start in (1, batches.steps_per_epoch - 1, batches.steps_per_epoch + 2):
        tail = [(e, s, y) for e, s, _, y in batches.iterate(start, n)]
        assert [(e, s) for e, s, _ in tail] == [(e, s) for e, s, _ in full[start:]]
        assert all(torch.equal(a[2], b[2]) for a, b in zip(tail, full[start:]))


class _Poisoned:
    """An objective whose loss is NaN at the chosen (0-based) steps."""

    def __init__(self, objective, bad_steps):
        self.objective, self.bad_steps = objective, set(bad_steps)

    def __call__(self, model, x, y, step):
        loss, logs = self.objective(model, x, y, step)
        return (loss * float("nan"), logs) if step in self.bad_steps else (loss, logs)

    def __getattr__(self, name):
        return getattr(self.objective, name)


def _poison(monkeypatch, *bad_steps):
    real = train.build_objective
    monkeypatch.setattr(train, "build_objective", lambda args: _Poisoned(real(args), bad_steps))


def test_nonfinite_step_is_skipped_and_counted(monkeypatch, tmp_path):
    _poison(monkeypatch, 3)
    out = train.main(make_args("sit", tmp_path, "--max-steps", "6", "--ckpt-every", "1", "--log-every", "2"))
    ck = {s: torch.load(os.path.join(out["run_dir"], "checkpoints", f"{s:07d}.pt"), weights_only=False)
          for s in (3, 4, 5)}
    for key in ("model", "ema"):  # step index 3 (checkpoints 3 -> 4) changed nothing, step 4 did
        assert all(torch.equal(t, ck[4][key][n]) for n, t in ck[3][key].items()), key
        assert not all(torch.equal(t, ck[5][key][n]) for n, t in ck[4][key].items()), key
    for sa, sb in zip(ck[3]["opt"]["state"].values(), ck[4]["opt"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)  # Adam's moments and step count did not advance
    assert (ck[3]["skipped_steps"], ck[4]["skipped_steps"], out["skipped_steps"]) == (0, 1, 1)
    assert "non-finite loss or gradient at step 4/6" in open(out["log"]).read()
    assert out["history"]["loss"] and all(v == v for v in out["history"]["loss"])  # interval means: finite steps


def test_nonfinite_stop_mode_and_failed_runs_leave_no_empty_folder(monkeypatch, tmp_path, capsys):
    argv = ["--method", "sit", "--model", "SiT-S/2", *TINY[:6], "--global-batch-size", "16", "--device", "cpu",
            "--num-workers", "0", "--sample-every", "0", "--max-steps", "6", "--ckpt-every", "2",
            "--on-nonfinite", "stop"]
    _poison(monkeypatch, 0)  # before the first checkpoint: the run folder goes
    with pytest.raises(SystemExit) as e:
        train.cli([*argv, "--results-dir", str(tmp_path / "early")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: non-finite loss or gradient at step 1/6 (loss nan); stopped (--on-nonfinite stop)" in err
    assert "removed the run folder" in err and os.listdir(tmp_path / "early") == []
    monkeypatch.undo()
    _poison(monkeypatch, 3)  # after checkpoint 2: the folder stays, the message names the checkpoint
    with pytest.raises(SystemExit) as e:
        train.cli([*argv, "--results-dir", str(tmp_path / "late")])
    err = capsys.readouterr().err
    run, = os.listdir(tmp_path / "late")
    assert e.value.code == 2 and "at step 4/6" in err and f"last checkpoint: {tmp_path / 'late' / run}" in err
    assert os.listdir(tmp_path / "late" / run / "checkpoints") == ["0000002.pt"]


def test_resume_takes_the_run_settings_from_the_checkpoint(tmp_path, capsys):
    first = train.main(make_args("maskdit", tmp_path, "--max-steps", "2", "--lr", "2e-4", "--ckpt-every", "1000"))
    ckpt = first["checkpoint"]
    # No model flags: they come from the checkpoint; the step count may change.
    out = train.cli(["--resume", ckpt, "--max-steps", "3", "--lr", "3e-4", "--device", "cpu", "--num-workers", "0"])
    assert out["run_dir"] == first["run_dir"] and out["checkpoint"].endswith("0000003.pt")
    ck = torch.load(out["checkpoint"], weights_only=False)
    assert (ck["args"]["method"], ck["args"]["depth"], ck["args"]["global_batch_size"]) == ("maskdit", 2, 16)
    assert ck["args"]["lr"] == 3e-4 and ck["args"]["ema_decay"] == 0.9999
    assert "changed: --max-steps 3 (checkpoint: 2), --lr 0.0003 (checkpoint: 0.0002)" in open(out["log"]).read()
    capsys.readouterr()
    # Every conflicting flag in one message: flag, checkpoint value, given value.
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", ckpt, "--model", "MaskDiT-B/2", "--depth", "3", "--seed", "1", "--ema-decay", "0.999",
                   "--mask-ratio", "0.5", "--max-steps", "5", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    for line in ("--model: checkpoint 'MaskDiT-S/2', given 'MaskDiT-B/2'", "--depth: checkpoint 2, given 3",
                 "--seed: checkpoint 0, given 1", "--ema-decay: checkpoint 0.9999, given 0.999"):
        assert line in err, err
    assert "--mask-ratio" not in err and "--max-steps" not in err  # equal, or allowed to change
    assert len(os.listdir(tmp_path)) == 1


def test_given_flags_and_bare_resume():
    p = train.get_parser()
    assert p.parse_args(["--resume"]).resume == "auto" and p.parse_args([]).resume is None
    assert train.given_flags(["--quickstart", "--lr", "1e-4", "--no-fused"]) == {"quickstart", "lr", "fused"}


def test_ctrl_c_names_the_last_checkpoint(tmp_path):
    log = str(tmp_path / "out.txt")
    proc, f = _start([*BASE, "--max-steps", "100000", "--ckpt-every", "2", "--results-dir", str(tmp_path / "r")], log)
    try:
        _wait_for(proc, log, "saved checkpoint")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
        f.close()
    last, = [ln for ln in open(log).read().splitlines() if ln.startswith("interrupted")]
    assert "interrupted: last checkpoint " in last and "/checkpoints/00000" in last and "Traceback" not in open(log).read()
