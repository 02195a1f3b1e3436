"""pytest-benchmark settings for readable output, and the summary tables printed at the end.

pytest-benchmark's own tables are kept narrow (median, IQR, rounds) and in two groups (ops, models);
the figures that matter (GB/s, images/s and the kernel's ratio to each reference) are in the summary
printed last (benchmarks/summary.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytest  # noqa: E402

import common  # noqa: E402
from summary import format_summary  # noqa: E402


def _given(config, flag):
    return any(a == flag or a.startswith(flag + "=") for a in config.invocation_params.args)


def pytest_configure(config):
    if hasattr(config.option, "benchmark_columns") and not _given(config, "--benchmark-columns"):
        config.option.benchmark_columns = ["median", "iqr", "rounds"]
    if hasattr(config.option, "benchmark_group_by") and not _given(config, "--benchmark-group-by"):
        config.option.benchmark_group_by = "func"  # one table per test function, not one per case


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    lines = format_summary(common.RECORDS)
    if common.RECORDS:
        terminalreporter.write_sep("=", "dit_kernels benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)
