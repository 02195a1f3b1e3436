"""The benchmark summary table (benchmarks/summary.py): GB/s per provider, the kernel's ratios, model rows apart."""
from conftest import load_repo_file


def _summary():
    return load_repo_file("benchmarks/summary.py", "bench_summary")


def test_summary_rows_and_ratios():
    meta = dict(device="H200", torch="2.11", cuda="13.0", git="abc")
    infos = [dict(meta, op="gated_residual", provider=p, mode="fwd", **{"GB/s": g}) for p, g in
             (("ref", 1000.0), ("ref_compiled", 2000.0), ("kernel", 3000.0))]
    infos.append(dict(meta, op="DiT-XL/2 bf16+fused", provider="train_step", mode="bf16", images_per_s=451.0,
                      peak_mem_GiB=27.6))
    lines = _summary().format_summary(infos)
    row = next(line for line in lines if line.startswith("| gated_residual"))
    assert row.split(" | ")[1:7] == ["fwd", "1e+03", "2e+03", "3e+03", "3.00x", "1.50x"]
    model_header = lines.index("models:")
    assert any("DiT-XL/2 bf16+fused" in line and "451" in line for line in lines[model_header:])
    assert not any("DiT-XL/2" in line for line in lines[:model_header])
