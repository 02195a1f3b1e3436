"""Print the summary tables (benchmarks/summary.py) from a pytest-benchmark JSON written by
`pytest benchmarks --benchmark-json=...`, or from the JSON-lines file of records that
benchmarks/common.py appends to when DIT_BENCH_JSONL is set."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from summary import format_summary  # noqa: E402


def main(path):
    with open(path) as f:
        if path.endswith(".jsonl"):
            infos = [json.loads(line) for line in f if line.strip()]
        else:
            infos = [b.get("extra_info", {}) for b in json.load(f)["benchmarks"]]
    print("\n".join(format_summary(infos)))


if __name__ == "__main__":
    main(sys.argv[1])
