"""FD and class accuracy against the number of network evaluations, for every sampler of a digits checkpoint.

    python benchmarks/sampler_nfe.py --ckpt /work/ckpt12/sit/.../0006000.pt --nfe 5 10 20 50 250 \
        --cfg 1 3 --num-samples 1000 --out sit.jsonl

Every sampler runs from the same initial noise and labels (labels i mod 10, seed fixed), so the rows differ
only by the sampler. The evaluations are counted (a forward hook on the patch embedding: one count per
network batch, i.e. per NFE with or without CFG), not computed from the step count. Samplers per method: the
method's nfe_variants (dit_models/methods/<method>.py), then dpm++2 (2M), dpm++3 (3M), unipc-bh2 and unipc-bh1
(UniPC-2 with its corrector, B(h) variant bh2 / bh1), steps = NFE:
  ddpm:  ddpm (ancestral), ddim                                      steps = NFE
  sit:   euler (ODE, NFE + 1 grid points), heun (ODE, NFE / 2 + 1 points), sde (Euler-Maruyama, "sigma"
         form, last step Mean 0.04; NFE grid points)                 (dopri5 needs torchdiffeq: not run)
  edm:   heun (EDM Heun, (NFE + 1) / 2 steps)                        (maskdit, sddit)
--guidance-interval LO HI guides only where the noise level (the process's own variable: DDPM step t, SiT t with
0 = noise, EDM sigma; dit_models/guidance_interval.py) lies in [LO, HI]; the record then also counts the
guided calls (guided_nfe). One JSON line per (sampler, NFE, cfg, interval) with fd, accuracy, nfe (counted),
seconds; --out appends and a rerun skips the cells already there for the same checkpoint. --table prints one
markdown table per (checkpoint, cfg, interval) and, where the largest NFE is a reference run (>= 50), how far
the best sampler at each smaller NFE is from it.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dit_models.metrics import score_samples  # noqa: E402
from dit_models.generation import generate, load_model_for_sampling, sampler_defaults  # noqa: E402
from dit_models.methods import METHODS, get_method  # noqa: E402

# Each method's published solvers at a given NFE (dit_models/methods/<method>.py, nfe_variants), then DPM-Solver++.
SAMPLERS = {name: [*m.nfe_variants, "dpm++2", "dpm++3", "unipc-bh2", "unipc-bh1"] for name, m in METHODS.items()}


def sampler_opts(method, name, nfe, time_spacing=None):
    """Sampler options that spend about `nfe` network evaluations."""
    if name.startswith(("dpm++", "unipc-")):  # one evaluation per step, from the fast defaults (the method's grid)
        o = sampler_defaults(method, fast=True)
        if name.startswith("dpm++"):
            o.update(sampler="dpm++", solver_order=int(name[-1]), third_order="taylor")
        else:  # UniPC-2, bh2 / bh1
            o.update(get_method(method).samplers["unipc"].chosen, solver_order=2, unipc_variant=name.split("-")[1])
        o["num_sampling_steps"] = nfe
        if time_spacing:
            o["time_spacing"] = time_spacing
        return o
    o = sampler_defaults(method, fast=False)
    o.update(get_method(method).nfe_variants[name](nfe))
    return o


@torch.no_grad()  # a context, not torch.set_grad_enabled(False): callers (tests) keep autograd
def run(ckpt, samplers, nfes, cfgs, num_samples, seed, out, time_spacing=None, batch_size=1000,
        guidance_interval=None):
    model, method, margs = load_model_for_sampling(ckpt, device="cpu")
    calls = []
    model.x_embedder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    labels = torch.arange(num_samples) % model.num_classes
    interval = list(guidance_interval) if guidance_interval is not None else None
    done = set()
    if out and os.path.exists(out):  # resume: skip the cells already in the file for this checkpoint
        with open(out) as f:
            done = {(r["sampler"], r["nfe_target"], r["cfg"], str(r.get("guidance_interval")))
                    for r in map(json.loads, f) if r["ckpt"] == ckpt}
    records = []
    for cfg in cfgs:
        for name in samplers or SAMPLERS[method]:
            for nfe in nfes:
                if (name, nfe, cfg, str(interval)) in done:
                    continue
                opts = sampler_opts(method, name, nfe, time_spacing)
                if interval is not None:
                    opts["guidance_interval"] = interval
                calls.clear()
                stats = {}
                t = time.time()
                x = generate(method, model, labels, opts, cfg, torch.Generator().manual_seed(seed), margs,
                             batch_size=batch_size, stats=stats)
                dt = time.time() - t
                res = score_samples(x, labels, size=int(margs.get("input_size", 16)))
                n_batches = (num_samples + batch_size - 1) // batch_size
                rec = dict(ckpt=ckpt, method=method, sampler=name, nfe_target=nfe, nfe=len(calls) // n_batches,
                           cfg=cfg, fd=round(res["fd"], 3), accuracy=round(res["accuracy"], 4), seconds=round(dt, 2),
                           num_samples=num_samples, seed=seed, time_spacing=opts.get("time_spacing"),
                           steps=opts["num_sampling_steps"], guidance_interval=interval,
                           guided_nfe=stats.get("guided_nfe"))
                records.append(rec)
                print(json.dumps(rec), flush=True)
                if out:
                    with open(out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    return records


def markdown_table(path):
    """The records of a JSONL file as one markdown table per (checkpoint, cfg, guidance interval): a row per
    sampler, a column per NFE, cells "FD / accuracy" (the counted NFE in brackets where it differs from the
    column's; with an interval, the guided calls after a "g"). Where the largest NFE column is a reference
    run (>= 50 NFE, e.g. 250 steps of the method's own sampler), a line per table gives the best FD at each
    smaller NFE and its distance from it."""
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    lines = []
    label = lambda r: r["sampler"] + (f" {r['time_spacing']}" if r.get("time_spacing") else "")  # noqa: E731
    for ckpt in dict.fromkeys(r["ckpt"] for r in recs):
        mine = [r for r in recs if r["ckpt"] == ckpt]
        settings = dict.fromkeys((r["cfg"], str(r.get("guidance_interval"))) for r in mine)
        for cfg, interval in sorted(settings, key=lambda k: (k[0], k[1] != "None", k[1])):
            rows = [r for r in mine if r["cfg"] == cfg and str(r.get("guidance_interval")) == interval]
            nfes = sorted({r["nfe_target"] for r in rows})
            n = rows[0]["num_samples"]
            where = "" if interval == "None" else f", guidance interval {interval}"
            lines += ["", f"{rows[0]['method']}, cfg {cfg:g}{where}, {n} samples: FD / class accuracy ({ckpt})", "",
                      "| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                      "|---|" + "---|" * len(nfes)]
            for name in dict.fromkeys(map(label, rows)):
                cells = []
                for k in nfes:
                    r = next((r for r in rows if label(r) == name and r["nfe_target"] == k), None)
                    if r is None:
                        cells.append("")
                        continue
                    extra = f" ({r['nfe']})" if r["nfe"] != k else ""
                    if interval != "None" and cfg != 1 and r.get("guided_nfe") is not None:
                        extra += f" g{r['guided_nfe']:g}"
                    cells.append(f"{r['fd']:.1f} / {r['accuracy']:.3f}{extra}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            ref_nfe = max(nfes)
            refs = [r for r in rows if r["nfe_target"] == ref_nfe] if ref_nfe >= 50 else []
            if refs and len(nfes) > 1:
                ref = refs[0]
                best = []
                for k in nfes:
                    cell = [r for r in rows if r["nfe_target"] == k and r["fd"] == r["fd"]]
                    if k != ref_nfe and cell:
                        b = min(cell, key=lambda r: r["fd"])
                        best.append(f"NFE {k}: {label(b)} {b['fd']:.1f} ({100 * (b['fd'] / ref['fd'] - 1):+.1f}%)")
                head = f"Best against {label(ref)} at {ref['nfe']} NFE (FD {ref['fd']:.1f}): "
                lines += ["", head + "; ".join(best) + "."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--samplers", nargs="*", default=None, help="default: every sampler of the method")
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20, 50, 250])
    p.add_argument("--cfg", nargs="+", type=float, default=[1.0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-spacing", default=None, help="dpm++ / unipc grid (default: the method's)")
    p.add_argument("--guidance-interval", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="guide only where the noise level lies in [LO, HI] (dit_models/guidance_interval.py)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--table", default=None, metavar="JSONL", help="print the markdown tables of a results file and exit")
    a = p.parse_args(argv)
    if a.table:
        print(markdown_table(a.table))
        return
    if not a.ckpt:
        p.error("--ckpt is required (or --table JSONL)")
    run(a.ckpt, a.samplers, a.nfe, a.cfg, a.num_samples, a.seed, a.out, a.time_spacing,
        guidance_interval=a.guidance_interval)


if __name__ == "__main__":
    main()
