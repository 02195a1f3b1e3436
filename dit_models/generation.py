"""Sampling for all four methods, below every tool: sampler options and flags, generate(), loading a
checkpoint (ours or a released file) for sampling, VAE decoding.

Used by dit_models.sample, sample_ddp, evaluate and train (in-training grids, quickstart evaluation).
"""
import os

import torch
from tqdm.auto import tqdm

from dit_models.cli import positive_int
from dit_models.guidance_interval import check_guidance_interval
from dit_models.methods import METHODS, Sampling, get_method, sampler_flags

# ---------------------------------------------------------------------------------------------------------
#                                          Sampler options
# ---------------------------------------------------------------------------------------------------------

SAMPLERS = {name: tuple(m.samplers) for name, m in METHODS.items()}


def sampler_defaults(method, fast=True):
    """Sampler options for in-training grids and evaluation (fast=True) or the published defaults (fast=False).

    fast: 20 steps = 20 NFE of the sampler the digits FD-vs-NFE table chose per method (docs/results.md, issue 20):
    UniPC bh1 for SiT, UniPC bh2 for SD-DiT, DPM-Solver++(2M) for DDPM and MaskDiT; each matches or beats the method's
    250-step sampler there. published: see each method file in dit_models/methods/.
    """
    return get_method(method).sampler_defaults(fast)


def add_sampler_args(parser):
    """Sampler flags shared by sample, sample_ddp and evaluate (None = the method's default)."""
    g = parser.add_argument_group("sampler")
    by_samplers = {}  # methods that share their samplers (EDM) are named together
    for m in METHODS.values():
        by_samplers.setdefault("|".join(k for k in m.samplers if k != "dpm++"), []).append(m.name)
    names = ", ".join(f"{k} ({', '.join(v)})" for k, v in by_samplers.items())
    g.add_argument("--sampler", default=None, help=f"{names}; dpm++ (every method: DPM-Solver++); unipc (every "
                                                    "method: UniPC, Zhao et al. 2023)")
    steps = ", ".join(dict.fromkeys(f"{m.published['sampler']} {m.published['num_sampling_steps']}"
                                    for m in METHODS.values()))
    g.add_argument("--num-sampling-steps", type=positive_int, default=None, help=f"{steps}, dpm++ 20 (= NFE)")
    g.add_argument("--solver-order", type=int, default=None, choices=[1, 2, 3],
                   help="dpm++: 2 (2M) or 3 (3M); unipc: UniPC-p, p + 1 with the corrector")
    g.add_argument("--third-order", default=None, choices=["taylor", "reference"],
                   help="dpm++ 3M update: taylor (third order; default) or reference (diffusers' / k-diffusion's 3M, "
                        "whose x0'' term is half the Taylor one: second order; to reproduce their samples)")
    g.add_argument("--unipc-variant", default=None, choices=["bh1", "bh2"], help="unipc B(h): bh2 (default) or bh1")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only where the noise level is in [LO, HI], in the process's own variable (ddpm: "
                        "step t, 0 = data, 999 = noise; sit: t, 0 = noise, 1 = data; edm: sigma); elsewhere the "
                        "network runs once on the conditional batch")
    g.add_argument("--time-spacing", default=None, choices=["logSNR", "karras", "time_uniform"],
                   help="dpm++ grid for the time-indexed processes (default time_uniform; EDM keeps its sigma grid)")
    for f in sampler_flags():
        g.add_argument(*f.names, **f.kwargs)
    g.add_argument("--guided-channels", type=positive_int, default=None,
                   help="CFG on the first N channels only (3 = public DiT/SiT parity); default all")
    g.add_argument("--cuda-graph", action="store_true", help="capture the sampling loop / network call in a CUDA graph")
    return g


def sampler_opts_from_args(args, method, fast=False):
    """Method defaults overridden by the sampler flags that were given."""
    m = get_method(method)
    opts = m.sampler_defaults(fast)
    requested = getattr(args, "sampler", None)
    if requested not in (None, opts["sampler"]):
        # Another sampler than the default one starts from its own settings: DPM-Solver++ and UniPC from the
        # fast defaults, every other sampler from the published ones (plus what choosing it sets).
        opts = m.sampler_defaults(fast=requested in ("dpm++", "unipc"))
        if requested in m.samplers:
            opts.update(m.samplers[requested].chosen)
    for k in ("sampler", "num_sampling_steps", "solver_order", "time_spacing", "third_order", "unipc_variant"):
        if getattr(args, k, None) is not None:
            opts[k] = getattr(args, k)
    for f in sampler_flags():
        if getattr(args, f.dest, None) is not None:
            opts[f.dest] = f.option(getattr(args, f.dest))
    m.sampler(opts)  # the sampler applies to the method
    if "sigma_min" in opts and not opts["sigma_min"] < opts["sigma_max"]:  # EDM's grid would run backwards
        raise ValueError(f"--sigma-min {opts['sigma_min']:g} must be below --sigma-max {opts['sigma_max']:g}")
    opts["guided_channels"] = getattr(args, "guided_channels", None)
    interval = check_guidance_interval(getattr(args, "guidance_interval", None))
    if interval is not None:
        opts["guidance_interval"] = list(interval)
    opts["cuda_graph"] = bool(getattr(args, "cuda_graph", False))
    return opts


def sampler_nfe(method, opts):
    """Network evaluations per sample (one call on the 2B CFG batch counts once); None for adaptive solvers."""
    return get_method(method).sampler(opts).nfe(opts)


# ---------------------------------------------------------------------------------------------------------
#                                              Generation
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(method, model, labels, opts=None, cfg_scale=1.0, generator=None, method_args=None, batch_size=64,
             noise=None, progress=False, stats=None):
    """Class-conditional samples in the model's input space (pixels or latents), (N, C, H, W) float32.

    Args:
        method: a dit_models.methods name ("ddpm", "sit", "maskdit", "sddit").
        model: the (EMA) network, any device; put in eval mode here.
        labels: (N,) int64 class labels.
        opts: sampler options (sampler_defaults / sampler_opts_from_args).
        cfg_scale: classifier-free guidance scale (1 = conditional model only).
        generator: CPU torch.Generator for the initial noise (device independent); the per-batch sampler noise
            comes from a generator on the model's device seeded from it.
        method_args: the training args (dict or namespace) for the noise process (path type, prediction...).
        noise: optional (N, C, H, W) initial noise (overrides the generator draw).
        progress: a tqdm bar of network evaluations on stderr (shown on a terminal only).
        stats: optional dict, filled with the network calls per batch ("nfe") and how many of them ran the 2B
            guided batch ("guided_nfe"; fewer than nfe with a guidance interval), averaged over the batches.
    """
    m = get_method(method)
    opts = dict(m.sampler_defaults() if opts is None else opts)
    sampler = m.sampler(opts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    C = model.in_channels
    H = W = model.input_size
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    nfe = sampler.nfe(opts)
    batches = -(-len(labels) // batch_size)
    bar = tqdm(total=nfe * batches if nfe else None, unit="NFE", disable=None if progress else True, leave=False,
               desc=f"{method} {opts['sampler']}: {len(labels)} samples, cfg {cfg_scale:g}")
    sampling = Sampling(cfg_scale=cfg_scale, guided_channels=opts.get("guided_channels"), method_args=method_args,
                        bar=bar, cuda_graph=bool(opts.get("cuda_graph")) and device.type == "cuda",
                        guidance_interval=check_guidance_interval(opts.get("guidance_interval")))
    try:
        for i in range(0, len(labels), batch_size):
            y = labels[i : i + batch_size].to(device)
            n = len(y)
            z = torch.randn(n, C, H, W, generator=generator) if noise is None else noise[i : i + batch_size].cpu()
            z = z.to(device)
            sampling.generator = torch.Generator(device=device).manual_seed(
                int(torch.randint(0, 2**62, (1,), generator=generator)))
            out.append(sampler.run(model, z, y, opts, sampling).float())
    finally:
        bar.close()
        model.train(was_training)
    if stats is not None:
        stats.update(nfe=sampling.calls / max(batches, 1), guided_nfe=sampling.guided_calls / max(batches, 1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
#                                              Loading
# ---------------------------------------------------------------------------------------------------------

def load_model_for_sampling(ckpt_path, method=None, device="cpu", model_name=None, num_heads=None, image_size=None,
                            num_classes=None):
    """Returns (EMA model in eval mode, method, args dict) from our checkpoint or a released file.

    Our checkpoints carry their configuration (args). Released DiT/SiT files are raw state_dicts: the
    architecture is inferred from the tensor shapes (learn_sigma from final_layer, resolution from pos_embed;
    the public SiT scripts build learn_sigma=False for --ckpt and fail on its own files); MaskDiT files need
    --model. Loading is always onto the CPU first (map_location="cpu").
    """
    from dit_models.checkpoint import CheckpointMismatchError, load_checkpoint, read_checkpoint

    ckpt = read_checkpoint(ckpt_path)
    path = ckpt_path if isinstance(ckpt_path, (str, os.PathLike)) else None  # for error messages
    ours = isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "method" in ckpt["args"] and "ema" in ckpt
    if ours:
        from dit_models.builders import build_model_from_args

        a = dict(ckpt["args"])
        if method is not None and method != a["method"]:
            raise ValueError(f"{ckpt_path} is a {a['method']} checkpoint, not {method}")
        method = a["method"]
        model = build_model_from_args(a, a["input_size"], a["in_channels"])
        load_checkpoint(ckpt, model, which="ema", path=path)
        return model.to(device).eval(), method, a
    if method is None:
        known = ", ".join(f"{m.name} for {m.family} files" for m in METHODS.values() if m.load_released)
        raise ValueError(f"{ckpt_path} is not a dit_models.train checkpoint: pass --method ({known})")
    load = get_method(method).load_released
    if load is None:
        raise ValueError(f"no released checkpoints are known for --method {method}; use a dit_models.train checkpoint")
    try:
        model, a = load(ckpt, device, model_name, num_heads, image_size, num_classes)
    except (ValueError, KeyError) as e:  # name the file: the loader only sees its contents
        if path is None or str(path) in str(e):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointMismatchError(f"checkpoint {str(path)!r} does not fit --method {method}: {msg}") from e
    return model, method, {"method": method, **a}


def decode(x, vae=None, scale=None):
    """Latents -> images in [-1, 1] through the VAE (z / 0.18215); pixel-space samples pass through."""
    if vae is None:
        return x.clamp(-1, 1)
    from dit_models.data import VAE_SCALE

    return vae.decode(x.to(next(vae.parameters()).dtype) / (scale or VAE_SCALE)).sample.float().clamp(-1, 1)
