"""Benchmark helpers: device facts, robust timing, copy bandwidth, result records.

Timing: warm-up rounds (compile excluded), then timed rounds with a device sync, median with
p20/p80. On CUDA each round times `inner` back-to-back calls between two events and divides, with
`inner` chosen so that a round lasts >= ~1 ms: the host's launch overhead (10-30 us per op call)
then overlaps the GPU work of the previous call instead of being counted inside a ~100 us op.
Where one call's host time exceeds its GPU time (small ops, their fwd+bwd), back-to-back calls
cannot hide it: those benchmarks replay a CUDA graph of the `inner` calls (time_fn(graph=True)).
Every record is also appended as one JSON line to $DIT_BENCH_JSONL when set, so that a run cut
short by a time limit keeps what it measured. GB/s come from the op's minimal bytes (each input read once, each output written once).
Shapes come from the model registry (DiT-XL/2 @ 256 px -> T = 256, D = 1152) on CUDA, and small
shapes on CPU so that `pytest benchmarks --benchmark-only` finishes in minutes.
"""
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import time

import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
SMOKE = os.environ.get("DIT_BENCH_SMOKE", "0") == "1"  # CI: one quick round, no compile provider


def sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def capture_graph(fn, calls):
    """A CUDA graph of `calls` back-to-back fn() calls (warmed up on a side stream first), or None
    when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        sync()
        return graph
    except Exception:  # noqa: BLE001  (anything not capturable: time it eagerly instead)
        sync()
        return None


def time_fn(fn, warmup=3, rounds=20, min_round_s=1e-3, max_inner=50, graph=False):
    """Median, p20, p80 seconds per fn() call over `rounds` rounds (CUDA events on GPU).

    On CUDA a round is `inner` back-to-back calls (see the module docstring); inner = 1 on the CPU,
    where there is no asynchronous queue to fill. graph=True (CUDA) records the `inner` calls once in
    a CUDA graph and times its replays: the host's launch and autograd overhead, which back-to-back
    calls cannot hide when one call's GPU time is shorter than its host time, is then out of the
    figure. Returns (median, p20, p80, timing) with timing "cuda_graph", "back_to_back" or "host".
    """
    if SMOKE:
        warmup, rounds = 1, 1
    for _ in range(warmup):
        fn()
    sync()
    inner = 1
    if ON_CUDA and not SMOKE:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        single = max(start.elapsed_time(end) / 1e3, 1e-6)
        inner = max(1, min(max_inner, math.ceil(min_round_s / single)))
    replay = capture_graph(fn, inner) if (graph and ON_CUDA and not SMOKE) else None
    timing = "cuda_graph" if replay is not None else ("back_to_back" if ON_CUDA else "host")
    times = []
    for _ in range(rounds):
        if ON_CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if replay is not None:
                replay.replay()
            else:
                for _ in range(inner):
                    fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8), timing


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps():
    """Measured device-to-device copy bandwidth (read + write bytes / time), the ceiling for
    memory-bound ops on this card."""
    n = (1 << 28) if ON_CUDA else (1 << 24)  # 512 MiB / 32 MiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    med = time_fn(lambda: dst.copy_(src), warmup=5, rounds=30)[0]
    return 2 * src.numel() * src.element_size() / med / 1e9


@functools.lru_cache(maxsize=None)
def device_info():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        rev = ""
    return {
        "device": torch.cuda.get_device_name() if ON_CUDA else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git": rev,
    }


RECORDS = []  # every record of this session, for the summary tables (benchmarks/conftest.py)


def record(benchmark, name, provider, mode, seconds, nbytes=None, flops=None, **extra):
    """Attach roofline figures to the pytest-benchmark record and return them."""
    med, p20, p80 = seconds[:3]
    info = dict(device_info(), op=name, provider=provider, mode=mode, median_ms=med * 1e3,
                p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, **extra)
    if len(seconds) > 3:
        info["timing"] = seconds[3]
    if nbytes is not None:
        info["GB/s"] = nbytes / med / 1e9
        if not SMOKE:
            info["copy_GB/s"] = copy_bandwidth_gbps()
            info["frac_of_copy"] = info["GB/s"] / info["copy_GB/s"]
    if flops is not None:
        info["TFLOP/s"] = flops / med / 1e12
    benchmark.extra_info.update(info)
    RECORDS.append(info)
    jsonl = os.environ.get("DIT_BENCH_JSONL")
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(info) + "\n")
    return info


def run(benchmark, fn):
    """Let pytest-benchmark time fn too (its table), with a device sync per call."""

    def call():
        fn()
        sync()

    rounds, warmup = (1, 0) if SMOKE else ((10, 2) if ON_CUDA else (3, 1))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
