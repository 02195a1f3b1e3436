"""Anchor: our DPM-Solver++ against diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler.

The same DiT (DDPM) digits checkpoint, the same initial noise and labels, the same guidance (one network
forward per step on the 2B batch, all channels guided), the same number of network evaluations; only the
solver differs. diffusers is optional (pip install diffusers); without it the script says so and exits 0.

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
OURS = {"ours dpm++2M logSNR": (2, "logSNR"), "ours dpm++2M karras": (2, "karras"),
        "ours dpm++2M time_uniform": (2, "time_uniform"), "ours dpm++3M logSNR": (3, "logSNR"),
        "ours dpm++3M time_uniform": (3, "time_uniform"), "ours dpm++3M karras": (3, "karras")}


def diffusers_available():
    try:
        import diffusers  # noqa: F401

        return True
    except ImportError:
        return False


def make_scheduler(name, diffusion_steps=1000, beta_start=1e-4, beta_end=0.02):
    """A diffusers scheduler on DiT's linear beta schedule (betas 1e-4 .. 0.02 over 1000 steps)."""
    import diffusers

    cls_name, kw = DIFFUSERS_CONFIGS[name]
    return getattr(diffusers, cls_name)(num_train_timesteps=diffusion_steps, beta_start=beta_start,
                                        beta_end=beta_end, beta_schedule="linear", prediction_type="epsilon", **kw)


@torch.no_grad()
def diffusers_sample(scheduler, eps_fn, z, num_steps, y):
    """The standard diffusers loop: one eps_fn call per scheduler step."""
    scheduler.set_timesteps(num_steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        x = scheduler.step(eps_fn(scheduler.scale_model_input(x, t), tt, y), t, x).prev_sample
    return x


def guided_eps(model, cfg_scale):
    """eps of the first C channels with guidance on all of them (one 2B forward when cfg_scale != 1)."""
    C = model.in_channels

    def eps(x, t, y):
        if cfg_scale == 1.0:
            return model(x, t, y)[:, :C]
        return model.forward_guided(x, t, y, cfg_scale)[:, :C]
    return eps


@torch.no_grad()  # a context, not torch.set_grad_enabled(False): callers (tests) keep autograd
def run(ckpt, nfes, cfgs, num_samples, seed, out, configs=None, batch_size=500):
    from dit_models.diffusion import create_diffusion
    from dit_models.metrics import score_samples
    from dit_models.generation import load_model_for_sampling
    from dit_models.methods import get_method

    model, method, margs = load_model_for_sampling(ckpt, device="cpu")
    if not get_method(method).eps_on_beta_schedule:
        raise ValueError(f"{ckpt} is a {method} checkpoint; the diffusers anchor needs a DiT (ddpm) one")
    calls = []
    model.x_embedder.register_forward_hook(lambda m, a, o: calls.append(1))
    C, H = model.in_channels, model.input_size
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % model.num_classes
    z = torch.randn(num_samples, C, H, H, generator=g)
    diffusion = create_diffusion("", noise_schedule=margs.get("noise_schedule", "linear"),
                                 diffusion_steps=margs.get("diffusion_steps", 1000))
    names = configs or (list(OURS) + list(DIFFUSERS_CONFIGS))
    done = set()
    if out and os.path.exists(out):  # resume: skip (solver, nfe, cfg) already measured
        with open(out) as f:
            done = {(r["solver"], r["nfe"], r["cfg"]) for r in map(json.loads, f)}
    records = []
    for cfg in cfgs:
        eps_fn = guided_eps(model, cfg)
        for nfe in nfes:
            for name in names:
                if (name, nfe, cfg) in done:
                    continue
                calls.clear()
                t0 = time.time()
                xs = []
                for i in range(0, num_samples, batch_size):
                    zb, yb = z[i:i + batch_size], labels[i:i + batch_size]
                    if name in OURS:
                        order, spacing = OURS[name]
                        xs.append(diffusion.dpm_solver_sample_loop(eps_fn, zb.shape, noise=zb, clip_denoised=False,
                                                                   model_kwargs=dict(y=yb), num_steps=nfe,
                                                                   order=order, time_spacing=spacing))
                    else:
                        xs.append(diffusers_sample(make_scheduler(name), eps_fn, zb, nfe, yb))
                x = torch.cat(xs)
                dt = time.time() - t0
                bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
                res = score_samples(x, labels, size=H) if bad == 0 else {"fd": float("nan"), "accuracy": float("nan")}
                rec = dict(solver=name, nfe=len(calls) // ((num_samples + batch_size - 1) // batch_size), cfg=cfg,
                           fd=round(res["fd"], 3), accuracy=round(res["accuracy"], 4), seconds=round(dt, 1),
                           num_samples=num_samples, seed=seed, ckpt=ckpt, non_finite_samples=bad)
                records.append(rec)
                print(json.dumps(rec), flush=True)
                if out:
                    with open(out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a dit_models.train DiT (ddpm) checkpoint trained on digits")
    p.add_argument("--nfe", nargs="+", type=int, default=[10, 20])
    p.add_argument("--cfg", nargs="+", type=float, default=[1.0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="*", default=None, help="subset of the solver names (default: all)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    a = p.parse_args(argv)
    if not diffusers_available():
        print("diffusers is not installed (pip install diffusers): nothing to compare against, skipping",
              file=sys.stderr)
        return []
    return run(a.ckpt, a.nfe, a.cfg, a.num_samples, a.seed, a.out, a.configs)


if __name__ == "__main__":
    main()
