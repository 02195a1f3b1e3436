"""Preemption-safe training pieces: atomic checkpoints, the newest complete one, stop signals, a dead rank."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dit_models import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ckpt(step):
    return {"model": {"w": torch.full((3,), float(step))}, "ema": {}, "opt": {}, "step": step}


def test_newest_complete_checkpoint_skips_torn_ones(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        utils.save_atomic(_ckpt(step), str(folder / f"{step:07d}.pt"))
    data = (folder / "0000006.pt").read_bytes()
    (folder / "0000006.pt").write_bytes(data[: len(data) // 2])  # torn: a copy cut short
    (folder / "0000008.pt").write_bytes(b"")  # an empty file
    (folder / "0000004.pt.tmp.1234").write_bytes(data[:100])  # what a killed save_atomic leaves
    said = []
    path, ckpt = utils.newest_complete_checkpoint(str(tmp_path), log=said.append)
    assert path.endswith("0000004.pt") and ckpt["step"] == 4
    assert len(said) == 2 and "0000008.pt" in said[0] and "0000006.pt" in said[1]
    assert utils.remove_stale_temp_files(str(folder)) == ["0000004.pt.tmp.1234"]
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000004.pt", "0000006.pt", "0000008.pt"]
    for name in ("0000002.pt", "0000004.pt"):
        (folder / name).write_bytes(b"garbage")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint .* \(4 unreadable"):
        utils.newest_complete_checkpoint(str(tmp_path))


@pytest.mark.parametrize("sig", utils.StopSignals.SIGNALS)
def test_stop_signals_request_a_stop_and_restore_the_handlers(sig):
    before = signal.getsignal(sig)
    with utils.StopSignals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), sig)
        deadline = time.time() + 5
        while not stop.requested() and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested() and stop.received == signal.Signals(sig).name
    assert signal.getsignal(sig) is before


def test_a_dead_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    # Rank 1 dies (SIGKILL, no clean-up) after joining; rank 0's next collective must raise, not hang.
    code = textwrap.dedent("""
        import os, sys, time, torch, torch.distributed as dist
        from dit_models import utils
        rank, world, _, _ = utils.setup_distributed("cpu", timeout_s=20)
        dist.barrier()
        if rank == 1:
            os.kill(os.getpid(), 9)
        time.sleep(1)
        start = time.time()
        try:
            dist.all_reduce(torch.ones(1))
        except Exception as e:
            print(f"raised after {time.time() - start:.1f}s: {type(e).__name__}")
            sys.exit(3)
        print("no error")
    """)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), WORLD_SIZE="2",
               PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 3, (out, err[-2000:])
    assert "raised after" in out


def test_nonfinite_step_sees_nan_and_inf_in_loss_or_any_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    loss = model(torch.randn(5, 3)).square().mean()
    loss.backward()
    assert not utils.nonfinite_step(loss, model.parameters())
    assert utils.nonfinite_step(loss * float("nan"), model.parameters())
    for bad in (float("nan"), float("inf"), -float("inf")):
        model[1].bias.grad[0] = bad
        assert utils.nonfinite_step(loss, model.parameters())
    model[1].bias.grad[0] = 0.0
    assert not utils.nonfinite_step(loss, model.parameters())
    model[0].weight.grad = None  # a frozen or unused parameter
    assert not utils.nonfinite_step(loss, model.parameters())
