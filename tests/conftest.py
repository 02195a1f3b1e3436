"""Shared test utilities: one tolerance table, one verbose comparison, device parametrisation.

DIT_EMULATE_CUDA=1 runs the session with the CUDA kernels, emulated on the CPU (tests/cuda_emu),
registered as the CPU kernels of every dit_kernels op: the CPU tests then exercise the CUDA code.
"""
import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# dtype -> (fwd atol, fwd rtol, grad atol, grad rtol); widen an entry only with a comment saying why.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7, 1e-7, 1e-7),
    torch.float32: (1e-5, 1.3e-6, 1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3, 2e-2, 1e-2),
    torch.bfloat16: (5e-2, 1.6e-2, 1e-1, 2e-2),
}

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
EMULATE_CUDA = os.environ.get("DIT_EMULATE_CUDA", "") == "1"
# For tests of CPU-only behaviour (e.g. noise drawn from a CPU torch.Generator) that the CUDA kernels
# do not share; they still run on the GPU's cpu parametrisation and in the plain CPU run.
cpu_kernel_only = pytest.mark.skipif(EMULATE_CUDA, reason="CPU-kernel behaviour; the emulated CUDA kernel differs")


REPO = Path(__file__).resolve().parents[1]


def load_repo_file(relative_path, name):
    """A repository file that is not part of a package (scripts/, benchmarks/, tests/cuda_emu/), imported by
    path under `name` (registered in sys.modules, which dataclasses in it need)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)  # one module: it holds the override registration alive
def cuda_emulation():
    """The tests/cuda_emu/build.py module (builds and loads the emulated CUDA kernels on demand)."""
    return load_repo_file("tests/cuda_emu/build.py", "dit_cuda_emu_build")


def pytest_configure(config):
    if EMULATE_CUDA:
        cuda_emulation().override_cpu_kernels()


def devices():
    """cpu always; cuda when a GPU is present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def assert_close(actual, expected, atol, rtol, name="tensor"):
    """torch.testing.assert_close with a message giving max/mean error and the first mismatches."""
    actual = actual.detach()
    expected = expected.detach().to(actual.dtype)
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    except AssertionError:
        diff = (actual.double() - expected.double()).abs()
        bad = (diff > atol + rtol * expected.double().abs()) | torch.isnan(actual.double())
        idx = bad.nonzero()[:5].tolist()
        rows = [f"  {tuple(i)}: got {actual[tuple(i)].item():.6g} expected {expected[tuple(i)].item():.6g}" for i in idx]
        raise AssertionError(
            f"{name}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}, "
            f"{int(bad.sum())} of {bad.numel()} mismatches\n" + "\n".join(rows)
        ) from None


def assert_lowp_close(fast, ref32, ref_lowp, atol, name="tensor"):
    """Low-precision rule: max|fast - ref32| <= 2 * max|ref_lowp - ref32| + atol."""
    err_fast = (fast.double() - ref32.double()).abs().max().item()
    err_ref = (ref_lowp.double() - ref32.double()).abs().max().item()
    assert err_fast <= 2 * err_ref + atol, f"{name}: kernel error {err_fast:.3g} > 2 x reference error {err_ref:.3g} + {atol}"


@pytest.fixture(autouse=True)
def num_threads():
    """Run every test on one intra-op thread, restoring the setting afterwards.

    The tests use tiny tensors that gain nothing from threads, and on a loaded 2-core machine
    thread hand-offs made them several to ~1000x slower. Yields the previous thread count, which
    the determinism tests use to compare 1 thread against several.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield n
    torch.set_num_threads(n)
