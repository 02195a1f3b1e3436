"""Property-based differential fuzzing of every dit_kernels op and its backward (a fixed-seed CI slice).

hypothesis draws cases from the space of scripts/fuzz_ops.py (`draw_case`: random shapes with 0-size, T = 1,
odd and large D; non-contiguous, chunked, broadcast and misaligned layouts; dtype mixes; out-of-range and
repeated ids; NaN / inf inputs; one deliberate misuse), and a worker subprocess runs each one: the compiled
kernel against the reference, forward and backward, or a clear error naming the argument. A crash or a hang
of the worker fails the example (and hypothesis shrinks it to a small reproducer). Long runs:
`python scripts/fuzz_ops.py --cases N [--emulated]`.
"""
import pytest

from conftest import HAS_CUDA, load_repo_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

fuzz_ops = load_repo_file("scripts/fuzz_ops.py", "fuzz_ops")

# derandomize: the same examples on every run (CI); no deadline: the first example starts the worker.
CI_SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class HypothesisDraw:
    """The draw interface of fuzz_ops.draw_case over hypothesis' interactive data."""

    def __init__(self, data):
        self.data = data

    def choice(self, name, options):
        return self.data.draw(st.sampled_from(list(options)), label=name)

    def integer(self, name, lo, hi):
        return self.data.draw(st.integers(lo, hi), label=name)


@pytest.fixture(scope="module")
def cpp_runner():
    runner = fuzz_ops.Runner(emulated=False, timeout=60)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def emulated_runner():
    runner = fuzz_ops.Runner(emulated=True, timeout=120)
    yield runner
    runner.close()


def _check(runner, case):
    res = runner.run(case)
    assert res["outcome"] in ("equal", "error", "unspecified"), (
        f"[{res['outcome']}] {res.get('message')}\n{fuzz_ops.reproducer(case, runner.emulated)}")


@pytest.mark.parametrize("op", fuzz_ops.OPS)
def test_fuzz_cpp_kernels(cpp_runner, op):
    @settings(max_examples=25, **CI_SETTINGS)
    @given(st.data())
    def run(data):
        _check(cpp_runner, fuzz_ops.draw_case(HypothesisDraw(data), op))

    run()


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: the real CUDA kernels are fuzzed instead")
@pytest.mark.parametrize("op", fuzz_ops.OPS)
def test_fuzz_emulated_cuda_kernels(emulated_runner, op):
    @settings(max_examples=12, **CI_SETTINGS)
    @given(st.data())
    def run(data):
        _check(emulated_runner, fuzz_ops.draw_case(HypothesisDraw(data), op, max_numel=1 << 13))

    run()


def test_runner_reports_a_crash_and_recovers():
    """A worker that dies mid-case is a "crash" outcome naming the exit status, and the next case runs."""
    runner = fuzz_ops.Runner(emulated=False, timeout=60)
    try:
        res = runner.run({"op": "_crash"})
        assert res["outcome"] == "crash" and "exit status" in res["message"], res
        ok = runner.run({"op": "gated_residual", "seed": 0, "dtype": "float32", "special": "none", "n": 1, "t": 2,
                         "d": 8, "x_layout": "contig", "mod_layout": "full", "mod_dtype": "same", "eps": 1e-6,
                         "grad": True, "branch": "same", "y_layout": "contig", "grad_outputs": "all", "misuse": None})
        assert ok["outcome"] == "equal", ok
    finally:
        runner.close()
