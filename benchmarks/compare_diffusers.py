"""Anchor: our DPM-Solver++ and UniPC against diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler.

The same digits checkpoint, the same initial noise and labels, the same guidance (one network forward per
step on the 2B batch, all channels guided), the same number of network evaluations; only the solver differs.
diffusers is optional (pip install diffusers); without it the script says so and exits 0.

Two kinds of checkpoint:
  DiT (ddpm): diffusers' schedulers on DiT's linear betas, epsilon prediction (DIFFUSERS_CONFIGS).
  SiT with the Linear path and velocity prediction: diffusers' flow-matching configuration (FLOW_CONFIGS:
    use_flow_sigmas, flow_shift 1, prediction_type "flow_prediction", and FlowMatchEulerDiscreteScheduler).
    diffusers' sample is x = (1 - sigma) data + sigma noise and its flow output is noise - data; SiT's is
    x_t = t data + (1 - t) noise with velocity data - noise, so sigma = 1 - t and the flow output is minus
    SiT's velocity, the network called at t = 1 - timestep / 1000.

    python benchmarks/compare_diffusers.py --ckpt /work/ckpt12/ddpm/.../checkpoints/0008000.pt \
        --nfe 10 20 --cfg 1 --num-samples 1000 --out /work/ckpt12/diffusers.jsonl

diffusers configurations tried (its defaults first, then its documented options): DPM-Solver++ 2M with
timestep_spacing linspace (default) / trailing, Karras sigmas, Lu's uniform-lambda steps, order 3, and
final_sigmas_type sigma_min; UniPC bh2 (default) / bh1, Karras, order 3. "diffusers' best" in
docs/results.md is the lowest FD over these at each NFE.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sampler_nfe, beside this file

DIFFUSERS_CONFIGS = {
    "dpm++2M": ("DPMSolverMultistepScheduler", {}),
    "dpm++2M trailing": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    "dpm++2M karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2M lu_lambdas": ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    "dpm++3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "dpm++2M karras sigma_min": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                                 "final_sigmas_type": "sigma_min"}),
    "unipc bh2": ("UniPCMultistepScheduler", {}),
    "unipc bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "unipc karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc trailing": ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
    "unipc order3": ("UniPCMultistepScheduler", {"solver_order": 3}),
}
FLOW_CONFIGS = {
    "flow euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow dpm++2M": ("DPMSolverMultistepScheduler", {}),
    "flow dpm++3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "flow unipc bh2": ("UniPCMultistepScheduler", {}),
    "flow unipc bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "flow unipc order3": ("UniPCMultistepScheduler", {"solver_order": 3}),
}
# name: (sampler, solver order, time grid) of ours
OURS = {"ours dpm++2M logSNR": ("dpm++", 2, "logSNR"), "ours dpm++2M karras": ("dpm++", 2, "karras"),
        "ours dpm++2M time_uniform": ("dpm++", 2, "time_uniform"), "ours dpm++3M logSNR": ("dpm++", 3, "logSNR"),
        "ours dpm++3M time_uniform": ("dpm++", 3, "time_uniform"), "ours dpm++3M karras": ("dpm++", 3, "karras"),
        "ours unipc bh2 time_uniform": ("unipc-bh2", 2, "time_uniform"),
        "ours unipc bh1 time_uniform": ("unipc-bh1", 2, "time_uniform"),
        "ours unipc bh2 karras": ("unipc-bh2", 2, "karras")}
# ours on a SiT checkpoint: its DPM-Solver++ / UniPC on the interpolant's own time grid
# (the sampler names of benchmarks/sampler_nfe.py)
OURS_FLOW = {"ours dpm++2M": "dpm++2", "ours dpm++3M": "dpm++3", "ours unipc bh2": "unipc-bh2",
             "ours unipc bh1": "unipc-bh1"}


def diffusers_available():
    try:
        import diffusers  # noqa: F401

        return True
    except ImportError:
        return False


def make_scheduler(name, diffusion_steps=1000, beta_start=1e-4, beta_end=0.02):
    """A diffusers scheduler on DiT's linear beta schedule (betas 1e-4 .. 0.02 over 1000 steps), or (a
    FLOW_CONFIGS name) on the flow-matching sigmas 1 -> 0 with shift 1."""
    import diffusers

    if name in FLOW_CONFIGS:
        cls_name, kw = FLOW_CONFIGS[name]
        if cls_name == "FlowMatchEulerDiscreteScheduler":
            return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, **kw)
        return getattr(diffusers, cls_name)(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=1.0, **kw)
    cls_name, kw = DIFFUSERS_CONFIGS[name]
    return getattr(diffusers, cls_name)(num_train_timesteps=diffusion_steps, beta_start=beta_start,
                                        beta_end=beta_end, beta_schedule="linear", prediction_type="epsilon", **kw)


@torch.no_grad()
def diffusers_sample(scheduler, eps_fn, z, num_steps, y):
    """The standard diffusers loop: one eps_fn call per scheduler step (eps_fn gets the scheduler's time step:
    an integer DDPM step, or for the flow schedulers sigma * 1000 as a float)."""
    scheduler.set_timesteps(num_steps)
    x = z * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        if torch.is_floating_point(t) and not float(t).is_integer():
            tt = torch.full((x.shape[0],), float(t))
        else:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x, t)
        else:  # FlowMatchEulerDiscreteScheduler has no input scaling
            x_in = x
        x = scheduler.step(eps_fn(x_in, tt, y), t, x).prev_sample
    return x


def guided_eps(model, cfg_scale):
    """eps of the first C channels with guidance on all of them (one 2B forward when cfg_scale != 1)."""
    C = model.in_channels

    def eps(x, t, y):
        if cfg_scale == 1.0:
            return model(x, t, y)[:, :C]
        return model.forward_guided(x, t, y, cfg_scale)[:, :C]
    return eps


def sit_flow_output(model, cfg_scale):
    """diffusers' flow output (noise - data) from a SiT velocity network: minus v at t = 1 - timestep / 1000."""
    velocity = guided_eps(model, cfg_scale)

    def flow(x, timestep, y):
        return -velocity(x, 1.0 - timestep.to(torch.float32) / 1000.0, y)
    return flow


@torch.no_grad()  # a context, not torch.set_grad_enabled(False): callers (tests) keep autograd
def run(ckpt, nfes, cfgs, num_samples, seed, out, configs=None, batch_size=500):
    from dit_models.diffusion import create_diffusion
    from dit_models.generation import generate, load_model_for_sampling
    from dit_models.methods import get_method
    from dit_models.metrics import score_samples
    from sampler_nfe import sampler_opts

    model, method, margs = load_model_for_sampling(ckpt, device="cpu")
    flow = get_method(method).linear_flow(margs)
    if not (flow or get_method(method).eps_on_beta_schedule):
        raise ValueError(f"{ckpt} is a {method} checkpoint; the diffusers anchor needs a DiT (ddpm) one or a SiT "
                         "one with the Linear path and velocity prediction")
    calls = []
    model.x_embedder.register_forward_hook(lambda m, a, o: calls.append(1))
    C, H = model.in_channels, model.input_size
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % model.num_classes
    z = torch.randn(num_samples, C, H, H, generator=g)
    if flow:
        ours, theirs = OURS_FLOW, FLOW_CONFIGS
    else:
        ours, theirs = OURS, DIFFUSERS_CONFIGS
        diffusion = create_diffusion("", noise_schedule=margs.get("noise_schedule", "linear"),
                                     diffusion_steps=margs.get("diffusion_steps", 1000))
    names = configs or (list(ours) + list(theirs))
    unknown = [n for n in names if n not in ours and n not in theirs]
    if unknown:
        raise ValueError(f"unknown solver names for a {method} checkpoint: {unknown}; "
                         f"choose from {list(ours) + list(theirs)}")
    done = set()
    if out and os.path.exists(out):  # resume: skip (solver, nfe, cfg) already measured on this checkpoint
        with open(out) as f:
            done = {(r["solver"], r["nfe"], r["cfg"]) for r in map(json.loads, f) if r.get("ckpt") == ckpt}
    records = []
    for cfg in cfgs:
        net = sit_flow_output(model, cfg) if flow else guided_eps(model, cfg)
        for nfe in nfes:
            for name in names:
                if (name, nfe, cfg) in done:
                    continue
                calls.clear()
                t0 = time.time()
                xs = []
                for i in range(0, num_samples, batch_size):
                    zb, yb = z[i:i + batch_size], labels[i:i + batch_size]
                    if flow and name in ours:  # the sampling tools' own path (generate), from the same noise
                        xs.append(generate(method, model, yb, sampler_opts(method, ours[name], nfe), cfg,
                                           method_args=margs, batch_size=len(yb), noise=zb))
                    elif name in ours:
                        sampler, order, spacing = ours[name]
                        kw = dict(noise=zb, clip_denoised=False, model_kwargs=dict(y=yb), num_steps=nfe, order=order,
                                  time_spacing=spacing)
                        if sampler == "dpm++":
                            xs.append(diffusion.dpm_solver_sample_loop(net, zb.shape, **kw))
                        else:
                            xs.append(diffusion.unipc_sample_loop(net, zb.shape, variant=sampler.split("-")[1], **kw))
                    else:
                        xs.append(diffusers_sample(make_scheduler(name), net, zb, nfe, yb))
                x = torch.cat(xs)
                dt = time.time() - t0
                bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
                res = score_samples(x, labels, size=H) if bad == 0 else {"fd": float("nan"), "accuracy": float("nan")}
                rec = dict(solver=name, nfe=len(calls) // ((num_samples + batch_size - 1) // batch_size), cfg=cfg,
                           fd=round(res["fd"], 3), accuracy=round(res["accuracy"], 4), seconds=round(dt, 1),
                           num_samples=num_samples, seed=seed, ckpt=ckpt, method=method, non_finite_samples=bad)
                records.append(rec)
                print(json.dumps(rec), flush=True)
                if out:
                    with open(out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    return records


def markdown_table(path):
    """The records of a JSONL file as one markdown table per (checkpoint, cfg): a row per solver, a column per
    NFE, cells "FD / accuracy" (bold: the best of ours and the best of diffusers' per column), then a line
    per table: both sides' best at each NFE."""
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    lines = []
    for ckpt in dict.fromkeys(r["ckpt"] for r in recs):
        for cfg in sorted({r["cfg"] for r in recs if r["ckpt"] == ckpt}):
            rows = [r for r in recs if r["ckpt"] == ckpt and r["cfg"] == cfg]
            nfes = sorted({r["nfe"] for r in rows})
            ours = lambda r: r["solver"].startswith("ours")  # noqa: E731
            best = {}
            for k in nfes:
                for side in (True, False):
                    cell = [r for r in rows if r["nfe"] == k and ours(r) == side and r["fd"] == r["fd"]]
                    if cell:
                        best[k, side] = min(cell, key=lambda r: r["fd"])
            lines += ["", f"{rows[0].get('method', 'ddpm')}, cfg {cfg:g}, {rows[0]['num_samples']} samples: "
                      f"FD / class accuracy ({ckpt})", "",
                      "| solver | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
            for name in dict.fromkeys(r["solver"] for r in rows):
                cells = []
                for k in nfes:
                    r = next((r for r in rows if r["solver"] == name and r["nfe"] == k), None)
                    if r is None:
                        cells.append("")
                    elif r["fd"] != r["fd"]:
                        cells.append(f"non-finite ({r['non_finite_samples']})")
                    else:
                        fd = f"{r['fd']:.1f}"
                        cells.append(f"{'**' + fd + '**' if best.get((k, ours(r))) is r else fd} / {r['accuracy']:.3f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            summary = []
            for k in nfes:
                if (k, True) in best and (k, False) in best:
                    o, d = best[k, True]["fd"], best[k, False]["fd"]
                    summary.append(f"NFE {k}: ours {o:.1f}, diffusers {d:.1f} ({100 * (o / d - 1):+.1f}%)")
            lines += ["", "Best of each side: " + "; ".join(summary) + "."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="a dit_models.train DiT (ddpm) or SiT (Linear, velocity) digits "
                                                 "checkpoint")
    p.add_argument("--nfe", nargs="+", type=int, default=[10, 20])
    p.add_argument("--cfg", nargs="+", type=float, default=[1.0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="*", default=None, help="subset of the solver names (default: all)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--table", default=None, metavar="JSONL", help="print the markdown tables of a results file and exit")
    a = p.parse_args(argv)
    if a.table:
        print(markdown_table(a.table))
        return []
    if not a.ckpt:
        p.error("--ckpt is required (or --table JSONL)")
    if not diffusers_available():
        print("diffusers is not installed (pip install diffusers): nothing to compare against, skipping",
              file=sys.stderr)
        return []
    return run(a.ckpt, a.nfe, a.cfg, a.num_samples, a.seed, a.out, a.configs)


if __name__ == "__main__":
    main()
