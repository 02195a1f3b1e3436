"""Summary tables of benchmark records (the dicts benchmarks/common.py `record` returns): one table of
ops (GB/s per provider and the kernel's ratio to each reference), one of model benchmarks. Printed at the
end of `pytest benchmarks` (benchmarks/conftest.py) and by scripts/summarize_bench.py from saved records."""


def _fmt(value, spec=".3g"):
    return format(value, spec) if value else "-"


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def format_summary(infos):
    """Markdown tables (a list of lines) for a list of records."""
    ops, models, meta = {}, [], None
    for info in infos:
        if "op" not in info:
            continue
        meta = meta or info
        if info["provider"] in ("train_step", "sample"):
            models.append(info)
        else:
            ops.setdefault((info["op"], info["mode"]), {})[info["provider"]] = info
    lines = []
    if meta:
        lines.append(f"device: {meta['device']} | torch {meta['torch']} | CUDA {meta['cuda']} | git {meta['git']}")
        if "copy_GB/s" in meta:
            lines.append(f"measured copy bandwidth: {meta['copy_GB/s']:.0f} GB/s")
    if ops:
        shapes = {str(p.get("shape")) for prov in ops.values() for p in prov.values() if p.get("shape")}
        lines += ["", f"ops, GB/s from the minimal bytes{' (shape ' + shapes.pop() + ')' if len(shapes) == 1 else ''}:",
                  "| op | mode | ref | ref_compiled | kernel | kernel/ref | kernel/compiled | kernel/copy |",
                  "|---|---|---|---|---|---|---|---|"]
        for (op, mode), prov in sorted(ops.items()):
            g = {p: prov[p].get("GB/s") for p in prov}
            frac = prov.get("kernel", {}).get("frac_of_copy")
            lines.append("| " + " | ".join([op, mode, _fmt(g.get("ref")), _fmt(g.get("ref_compiled")), _fmt(g.get("kernel")),
                                            _ratio(g.get("kernel"), g.get("ref")),
                                            _ratio(g.get("kernel"), g.get("ref_compiled")), _fmt(frac, ".2f")]) + " |")
    if models:
        lines += ["", "models:", "| benchmark | mode | images/s | s/image | peak GiB |", "|---|---|---|---|---|"]
        for info in models:
            lines.append("| " + " | ".join([info["op"], info["mode"], _fmt(info.get("images_per_s")),
                                            _fmt(info.get("seconds_per_image")), _fmt(info.get("peak_mem_GiB"))]) + " |")
    return lines
