"""Print a markdown table from a pytest-benchmark JSON written by `pytest benchmarks`, or from the
JSON-lines file of records that benchmarks/common.py appends to when DIT_BENCH_JSONL is set."""
import json
import sys


def main(path):
    with open(path) as f:
        if path.endswith(".jsonl"):
            infos = [json.loads(line) for line in f if line.strip()]
        else:
            infos = [b.get("extra_info", {}) for b in json.load(f)["benchmarks"]]
    rows = {}
    model_rows = []
    meta = None
    for info in infos:
        if "op" not in info:
            continue
        meta = meta or info
        if info["provider"] in ("train_step", "sample"):
            model_rows.append(info)
            continue
        key = (info["op"], info["mode"])
        rows.setdefault(key, {})[info["provider"]] = info
    if meta:
        print(f"device: {meta['device']} | torch {meta['torch']} | CUDA {meta['cuda']} | git {meta['git']}")
        if "copy_GB/s" in meta:
            print(f"measured copy bandwidth: {meta['copy_GB/s']:.0f} GB/s")
    print("| op | mode | ref GB/s | ref_compiled GB/s | kernel GB/s | kernel/compiled | kernel frac of copy |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v, spec=".3g": format(v, spec) if v else "-"  # noqa: E731
    for (op, mode), prov in sorted(rows.items()):
        g = {p: prov[p].get("GB/s") for p in prov}
        ratio = g["kernel"] / g["ref_compiled"] if g.get("kernel") and g.get("ref_compiled") else None
        frac = prov.get("kernel", {}).get("frac_of_copy")
        cells = [op, mode, fmt(g.get("ref")), fmt(g.get("ref_compiled")), fmt(g.get("kernel")),
                 fmt(ratio, ".2f") + ("x" if ratio else ""), fmt(frac, ".2f")]
        print("| " + " | ".join(cells) + " |")
    if model_rows:
        print()
        print("| benchmark | mode | images/s | s/image | peak GiB |")
        print("|---|---|---|---|---|")
        for info in model_rows:
            cells = [info["op"], info["mode"], fmt(info.get("images_per_s")), fmt(info.get("seconds_per_image")),
                     fmt(info.get("peak_mem_GiB"))]
            print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main(sys.argv[1])
