"""The minimal-byte formulas of benchmarks/bench_ops.py (what every GB/s divides by) against what the
references actually read and write, on the CPU shapes of the benchmark.

Forward: bytes of every input element the outputs depend on (an element is read iff its gradient
under random cotangents is nonzero; integer inputs are read whole) + bytes of every output.
Backward: every cotangent, the forward tensors the case declares its backward re-reads
(`bwd_reads`), every input gradient that is not a cotangent passed through.
"""
import sys

import pytest
import torch
from conftest import REPO, load_repo_file

BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def bench_ops():
    sys.path.insert(0, str(BENCH))  # bench_ops imports its sibling `common`
    try:
        yield load_repo_file("benchmarks/bench_ops.py", "bench_ops_under_test")
    finally:
        sys.path.remove(str(BENCH))


def _nbytes(t):
    return t.numel() * t.element_size()


def measured_bytes(case):
    """(fwd, fwd_bwd) bytes the reference must move, by the rules in the module docstring."""
    torch.manual_seed(0)
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in case["inputs"]]
    outs = case["ref"](*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [torch.randn_like(o) for o in outs]
    diff = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, diff, cots)
    read = sum(_nbytes(t) for t in leaves if not t.is_floating_point())
    read += sum(int((g != 0).sum()) * g.element_size() for g in grads)
    fwd = read + sum(_nbytes(o) for o in outs)
    bwd = sum(_nbytes(c) for c in cots)
    bwd += sum(_nbytes(case["inputs"][i] if kind == "in" else outs[i]) for kind, i in case["bwd_reads"])
    passed_through = {c.data_ptr() for c in cots}
    bwd += sum(_nbytes(g) for g in grads if g.data_ptr() not in passed_through)
    return fwd, fwd + bwd


@pytest.mark.parametrize("case_name", [
    "modulated_layer_norm", "gated_residual", "gated_residual_modulated_layer_norm",
    "gated_residual_modulated_layer_norm[fp32 x, bf16 y]", "patchify[latent]", "patchify[pixel]",
    "unpatchify[latent]", "unpatchify[pixel]", "gather_tokens", "scatter_tokens"])
def test_byte_formulas_match_the_references(bench_ops, case_name):
    assert case_name in bench_ops.CASES
    case = bench_ops.CASES[case_name]()
    fwd, fwd_bwd = measured_bytes(case)
    assert case["bytes_fwd"] == fwd
    assert case["bytes_fwd_bwd"] == fwd_bwd


def test_unpatchify_counts_only_the_kept_channels(bench_ops):
    """The latent shape drops the learned-sigma half: the op reads C of C_all = 2C columns."""
    case = bench_ops.CASES["unpatchify[latent]"]()
    (y,) = case["inputs"]
    assert case["bytes_fwd"] == _nbytes(y)  # half of y read + an image of the same size written
