"""Sample a PNG grid from a trained DiT / SiT / MaskDiT / SD-DiT (our checkpoints or the released ones).

    python -m dit_models.sample --ckpt results/000-sit-SiT-S-2/checkpoints/0002000.pt --cfg-scale 2.0
    python -m dit_models.sample --ckpt results/.../0002000.pt --sampler sde --diffusion-form sigma
    python -m dit_models.sample --method ddpm --ckpt DiT-XL-2-256x256.pt --vae mse --cfg-scale 4.0  # released DiT
    python -m dit_models.sample --method sit --ckpt SiT-XL-2-256x256.pt --vae mse --sampler ode
    python -m dit_models.sample --method maskdit --model MaskDiT-XL/2 --ckpt imagenet256-...pt --vae mse

Samplers per method (defaults as published): ddpm: "ddpm" (250 respaced ancestral steps) or "ddim" (eta 0);
sit: "ode" (dopri5 with torchdiffeq, else built-in heun; 250 steps) or "sde" (Euler-Maruyama, diffusion form
"sigma", last step "Mean" 0.04, 250 steps); maskdit / sddit: "edm" (Heun, 40 steps = 79 NFE, sigma in
[0.002, 80], rho 7, S_churn 0). Every method also has "dpm++": DPM-Solver++ multistep (dit_models/multistep.py),
one network evaluation per step, 20 steps unless --num-sampling-steps says otherwise (--solver-order 1/2/3,
--time-spacing logSNR|karras|time_uniform for ddpm and sit; EDM uses its own sigma grid). Guidance: --cfg-scale (1 = off) on all channels of eps / velocity / F by
default; --guided-channels 3 reproduces the public DiT/SiT 3-channel guidance (needed for FID 2.27 / 2.06).
"""
import argparse
import os
import sys

import torch

from dit_models import utils

SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm++"), "sit": ("ode", "sde", "dpm++"), "maskdit": ("edm", "dpm++"),
            "sddit": ("edm", "dpm++")}
DPM_DEFAULTS = {"num_sampling_steps": 20, "solver_order": 2,
                "time_spacing": {"ddpm": "logSNR", "sit": "time_uniform", "maskdit": None, "sddit": None}}
IMAGENET_DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT sample.py


# ---------------------------------------------------------------------------------------------------------
#                                          Sampler options
# ---------------------------------------------------------------------------------------------------------

def _has_torchdiffeq():
    try:
        import torchdiffeq  # noqa: F401

        return True
    except ImportError:
        return False


def sampler_defaults(method, fast=True):
    """Sampler options for in-training grids and evaluation (fast=True) or the published defaults (fast=False).

    fast: ddpm 100 respaced DDPM steps; sit ODE heun 50 grid points (98 NFE); edm Heun 18 steps (35 NFE).
    """
    if method == "ddpm":
        return {"sampler": "ddpm", "num_sampling_steps": 100 if fast else 250, "ddim_eta": 0.0}
    if method == "sit":
        d = {"sampler": "ode", "num_sampling_steps": 50 if fast else 250, "atol": 1e-6, "rtol": 1e-3,
             "sampling_method": "heun" if (fast or not _has_torchdiffeq()) else "dopri5",
             "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04}
        return d
    if method in ("maskdit", "sddit"):
        return {"sampler": "edm", "num_sampling_steps": 18 if fast else 40, "sigma_min": 0.002, "sigma_max": 80.0,
                "rho": 7.0, "S_churn": 0.0, "S_min": 0.0, "S_max": float("inf"), "S_noise": 1.0}
    raise ValueError(f"unknown method {method!r}")


def add_sampler_args(parser):
    """Sampler flags shared by sample, sample_ddp and evaluate (None = the method's default)."""
    g = parser.add_argument_group("sampler")
    g.add_argument("--sampler", default=None,
                   help="ddpm|ddim (ddpm), ode|sde (sit), edm (maskdit, sddit); dpm++ (every method: DPM-Solver++)")
    g.add_argument("--num-sampling-steps", type=int, default=None, help="ddpm 250, sit 250, edm 40, dpm++ 20 (= NFE)")
    g.add_argument("--solver-order", type=int, default=None, choices=[1, 2, 3], help="dpm++: 2 (2M) or 3 (3M)")
    g.add_argument("--time-spacing", default=None, choices=["logSNR", "karras", "time_uniform"],
                   help="dpm++ grid for ddpm (logSNR) and sit (time_uniform)")
    g.add_argument("--ddim-eta", type=float, default=None, help="ddim: eta (0 = deterministic)")
    g.add_argument("--sampling-method", default=None,
                   help="sit ode: dopri5 (torchdiffeq) | euler | heun | midpoint | rk4; sit sde: Euler | Heun")
    g.add_argument("--atol", type=float, default=None, help="sit ode adaptive (1e-6)")
    g.add_argument("--rtol", type=float, default=None, help="sit ode adaptive (1e-3)")
    g.add_argument("--diffusion-form", default=None,
                   help="sit sde: sigma (CLI default) | SBDM | constant | linear | decreasing | increasing-decreasing")
    g.add_argument("--diffusion-norm", type=float, default=None, help="sit sde (1.0)")
    g.add_argument("--last-step", default=None, help="sit sde: Mean | Tweedie | Euler | none")
    g.add_argument("--last-step-size", type=float, default=None, help="sit sde (0.04)")
    g.add_argument("--S-churn", type=float, default=None, help="edm churn (0 = deterministic)")
    g.add_argument("--sigma-min", type=float, default=None, help="edm (0.002)")
    g.add_argument("--sigma-max", type=float, default=None, help="edm (80)")
    g.add_argument("--rho", type=float, default=None, help="edm (7)")
    g.add_argument("--guided-channels", type=int, default=None,
                   help="CFG on the first N channels only (3 = public DiT/SiT parity); default all")
    g.add_argument("--cuda-graph", action="store_true", help="capture the sampling loop / network call in a CUDA graph")
    return g


def sampler_opts_from_args(args, method, fast=False):
    """Method defaults overridden by the sampler flags that were given."""
    opts = sampler_defaults(method, fast=fast)
    for k in ("sampler", "num_sampling_steps", "ddim_eta", "sampling_method", "atol", "rtol", "diffusion_form",
              "diffusion_norm", "last_step_size", "S_churn", "sigma_min", "sigma_max", "rho"):
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
    if getattr(args, "last_step", None) is not None:
        opts["last_step"] = None if args.last_step.lower() == "none" else args.last_step
    if opts["sampler"] not in SAMPLERS[method]:
        raise ValueError(f"--sampler {opts['sampler']} does not apply to --method {method}; choose from {SAMPLERS[method]}")
    if opts["sampler"] == "dpm++":
        if getattr(args, "num_sampling_steps", None) is None:
            opts["num_sampling_steps"] = DPM_DEFAULTS["num_sampling_steps"]
        opts["solver_order"] = getattr(args, "solver_order", None) or DPM_DEFAULTS["solver_order"]
        opts["time_spacing"] = getattr(args, "time_spacing", None) or DPM_DEFAULTS["time_spacing"][method]
    if method == "sit" and "sampler" in opts and opts["sampler"] == "sde" and getattr(args, "sampling_method", None) is None:
        opts["sampling_method"] = "Euler"
    opts["guided_channels"] = getattr(args, "guided_channels", None)
    opts["cuda_graph"] = bool(getattr(args, "cuda_graph", False))
    return opts


# ---------------------------------------------------------------------------------------------------------
#                                              Generation
# ---------------------------------------------------------------------------------------------------------

def _margs(method_args, key, default):
    if method_args is None:
        return default
    v = method_args.get(key) if isinstance(method_args, dict) else getattr(method_args, key, None)
    return default if v is None else v


class _GraphedNet:
    """Replays one CUDA graph of a network call per input shape (static input buffers; inference only)."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype) if torch.is_tensor(a) else a for a in args)
        if key not in self.graphs:
            static_in = [a.clone() if torch.is_tensor(a) else a for a in args]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # warm-up outside the graph (cuBLAS workspaces, autotuning)
                    self.fn(*static_in)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = self.fn(*static_in)
            self.graphs[key] = (g, static_in, static_out)
        g, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, args):
            if torch.is_tensor(src):
                dst.copy_(src)
        g.replay()
        return static_out.clone()


@torch.no_grad()
def generate(method, model, labels, opts=None, cfg_scale=1.0, generator=None, method_args=None, batch_size=64,
             noise=None):
    """Class-conditional samples in the model's input space (pixels or latents), (N, C, H, W) float32.

    Args:
        method: "ddpm" | "sit" | "maskdit" | "sddit".
        model: the (EMA) network, any device; put in eval mode here.
        labels: (N,) int64 class labels.
        opts: sampler options (sampler_defaults / sampler_opts_from_args).
        cfg_scale: classifier-free guidance scale (1 = conditional model only).
        generator: CPU torch.Generator for the initial noise (device independent); the per-batch sampler noise
            comes from a generator on the model's device seeded from it.
        method_args: the training args (dict or namespace) for the noise process (path type, prediction...).
        noise: optional (N, C, H, W) initial noise (overrides the generator draw).
    """
    opts = dict(sampler_defaults(method) if opts is None else opts)
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    device = p.device
    C = model.in_channels
    H = W = model.input_size
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    guided = cfg_scale != 1.0
    gch = opts.get("guided_channels")
    out = []
    try:
        for i in range(0, len(labels), batch_size):
            y = labels[i : i + batch_size].to(device)
            n = len(y)
            z = torch.randn(n, C, H, W, generator=generator) if noise is None else noise[i : i + batch_size].cpu()
            z = z.to(device)
            dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            out.append(_sample_batch(method, model, z, y, opts, cfg_scale, guided, gch, dev_gen, method_args).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def _sample_batch(method, model, z, y, opts, cfg_scale, guided, gch, dev_gen, method_args):
    kind = opts["sampler"]
    steps = int(opts["num_sampling_steps"])
    cuda_graph = bool(opts.get("cuda_graph")) and z.device.type == "cuda"
    if method == "ddpm":
        from dit_models.diffusion import create_diffusion

        respacing = "" if kind == "dpm++" else str(steps)  # DPM-Solver++ runs on the base schedule
        diffusion = create_diffusion(respacing, noise_schedule=_margs(method_args, "noise_schedule", "linear"),
                                     learn_sigma=getattr(model, "learn_sigma", True),
                                     diffusion_steps=_margs(method_args, "diffusion_steps", 1000))
        if guided:
            def net(x, t, y):
                return model.forward_guided(x, t, y, cfg_scale, cfg_channels=gch)
        else:
            def net(x, t, y):
                return model(x, t, y)
        if cuda_graph:
            net = _GraphedNet(net)
        kw = dict(noise=z, clip_denoised=False, model_kwargs=dict(y=y), device=z.device, generator=dev_gen)
        if kind == "dpm++":
            return diffusion.dpm_solver_sample_loop(net, z.shape, num_steps=steps, order=int(opts.get("solver_order", 2)),
                                                    time_spacing=opts.get("time_spacing") or "logSNR", **kw)
        if kind == "ddim":
            return diffusion.ddim_sample_loop(net, z.shape, eta=float(opts.get("ddim_eta") or 0.0), **kw)
        return diffusion.p_sample_loop(net, z.shape, **kw)
    if method == "sit":
        from dit_models.transport import Sampler, create_transport

        transport = create_transport(_margs(method_args, "path_type", "Linear"), _margs(method_args, "prediction", "velocity"),
                                     _margs(method_args, "loss_weight", None), _margs(method_args, "train_eps", None),
                                     _margs(method_args, "sample_eps", None))
        sampler = Sampler(transport)
        common = dict(cfg_scale=cfg_scale, guided_channels=gch, cuda_graph=cuda_graph)
        if kind == "dpm++":
            fn = sampler.sample_dpm_solver(steps, int(opts.get("solver_order", 2)),
                                           opts.get("time_spacing") or "time_uniform", **common)
        elif kind == "sde":
            fn = sampler.sample_sde(opts.get("sampling_method", "Euler"), opts["diffusion_form"], opts["diffusion_norm"],
                                    opts["last_step"], opts["last_step_size"], steps, generator=dev_gen, **common)
        else:
            fn = sampler.sample_ode(opts.get("sampling_method", "heun"), steps, opts["atol"], opts["rtol"], **common)
        return fn(z, model.forward, y=y)[-1]
    if method in ("maskdit", "sddit"):
        from dit_models.edm import edm_dpm_solver_sampler, edm_sampler

        net = model
        if cuda_graph:
            graphed = _GraphedNet(model.forward_with_cfg if guided else model.forward)

            class _Net:
                def __call__(self, x, sigma, class_labels):
                    return graphed(x, sigma, class_labels)

                def forward_with_cfg(self, x, sigma, class_labels, s):
                    return graphed(x, sigma, class_labels, s)

            net = _Net()
        if kind == "dpm++":
            return edm_dpm_solver_sampler(net, z, class_labels=y, cfg_scale=cfg_scale, num_steps=steps,
                                          sigma_min=opts["sigma_min"], sigma_max=opts["sigma_max"], rho=opts["rho"],
                                          order=int(opts.get("solver_order", 2))).float()
        x = edm_sampler(net, z, class_labels=y, cfg_scale=cfg_scale, num_steps=steps, sigma_min=opts["sigma_min"],
                        sigma_max=opts["sigma_max"], rho=opts["rho"], S_churn=opts["S_churn"], S_min=opts["S_min"],
                        S_max=opts["S_max"], S_noise=opts["S_noise"], generator=dev_gen)
        return x.float()
    raise ValueError(f"unknown method {method!r}")


# ---------------------------------------------------------------------------------------------------------
#                                              Loading
# ---------------------------------------------------------------------------------------------------------

def load_model_for_sampling(ckpt_path, method=None, device="cpu", model_name=None, num_heads=None, image_size=None,
                            num_classes=None):
    """Returns (EMA model in eval mode, method, args dict) from our checkpoint or a released file.

    Our checkpoints carry their configuration (args). Released DiT/SiT files are raw state_dicts: the
    architecture is inferred from the tensor shapes (learn_sigma from final_layer, resolution from pos_embed;
    spec D3 #14); MaskDiT files need --model. Loading is always onto the CPU first (map_location="cpu").
    """
    from dit_models.checkpoint import read_checkpoint

    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    ckpt = read_checkpoint(ckpt_path)
    ours = isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "method" in ckpt["args"] and "ema" in ckpt
    if ours:
        from dit_models.train import build_model_from_args

        a = dict(ckpt["args"])
        if method is not None and method != a["method"]:
            raise ValueError(f"{ckpt_path} is a {a['method']} checkpoint, not {method}")
        method = a["method"]
        model = build_model_from_args(a, a["input_size"], a["in_channels"])
        model.load_state_dict(ckpt["ema"])
        return model.to(device).eval(), method, a
    if method is None:
        raise ValueError(f"{ckpt_path} is not a dit_models.train checkpoint: pass --method (ddpm for DiT files, "
                         "sit for SiT files, maskdit for MaskDiT files)")
    a = {"method": method}
    if method in ("ddpm", "sit"):
        from dit_models.checkpoint import infer_config_from_state_dict, load_checkpoint
        from dit_models.models.dit import DiT
        from dit_models.models.sit import SiT

        cfg = infer_config_from_state_dict(ckpt)
        heads = num_heads or cfg["num_heads"]
        if heads is None:
            raise ValueError(f"hidden size {cfg['hidden_size']} is not a registry width: pass --num-heads")
        if image_size is not None and cfg["input_size"] != image_size // 8 and cfg["input_size"] != image_size:
            raise ValueError(f"checkpoint is for {cfg['input_size']}x{cfg['input_size']} latents ({cfg['input_size'] * 8}px), "
                             f"not --image-size {image_size}")
        if num_classes is not None and num_classes != cfg["num_classes"]:
            raise ValueError(f"checkpoint has {cfg['num_classes']} classes, not --num-classes {num_classes}")
        cls = DiT if method == "ddpm" else SiT
        model = cls(input_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                    hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=heads, mlp_ratio=cfg["mlp_ratio"],
                    num_classes=cfg["num_classes"], learn_sigma=cfg["learn_sigma"],
                    class_dropout_prob=0.1 if cfg["num_classes"] else 0.0)
        load_checkpoint(ckpt, model, which="ema")
        a.update(cfg, model=(("DiT-" if method == "ddpm" else "SiT-") + cfg["size_name"]) if cfg["size_name"] else None,
                 data="imagenet", data_kind="latents")
        return model.to(device).eval(), method, a
    if method == "maskdit":
        from dit_models.models.maskdit import MaskDiT_models, load_maskdit_checkpoint

        name = model_name or "MaskDiT-XL/2"
        size = (image_size or 256) // 8
        model = MaskDiT_models[name](input_size=size, num_classes=num_classes or 1000, in_channels=4)
        load_maskdit_checkpoint(model, ckpt, key="ema")
        a.update(model=name, input_size=size, in_channels=4, num_classes=model.num_classes, data="imagenet",
                 data_kind="latents")
        return model.to(device).eval(), method, a
    raise ValueError(f"no released checkpoints are known for --method {method}; use a dit_models.train checkpoint")


def decode(x, vae=None, scale=None):
    """Latents -> images in [-1, 1] through the VAE (z / 0.18215); pixel-space samples pass through."""
    if vae is None:
        return x.clamp(-1, 1)
    from dit_models.data import VAE_SCALE

    return vae.decode(x.to(next(vae.parameters()).dtype) / (scale or VAE_SCALE)).sample.float().clamp(-1, 1)


def parse_labels(text, num_classes):
    labels = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside [0, {num_classes - 1}]")
    return labels


def get_parser():
    p = argparse.ArgumentParser(description="Sample a PNG grid from a DiT / SiT / MaskDiT / SD-DiT checkpoint")
    p.add_argument("--ckpt", required=True, help="dit_models.train checkpoint or a released DiT/SiT/MaskDiT file")
    p.add_argument("--method", default=None, choices=["ddpm", "sit", "maskdit", "sddit"],
                   help="needed for released files (our checkpoints know their method)")
    p.add_argument("--model", default=None, help="registry name for released MaskDiT files")
    p.add_argument("--num-heads", type=int, default=None, help="released files with a non-registry width")
    p.add_argument("--image-size", type=int, default=None, help="released files: 256 or 512 (checked against pos_embed)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--class-labels", default=None, help="comma-separated labels (default: every class of a small "
                   "dataset, else DiT's 8 demo classes)")
    p.add_argument("--samples-per-class", type=int, default=None, help="default: fill a 10-16 wide grid")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="4.0 for visuals (DiT/SiT sample.py), 1.5 for FID")
    p.add_argument("--vae", default=None, help="ema | mse | diffusers path; default mse for latent models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="sample.png")
    add_sampler_args(p)
    return p


def main(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and device.type != "cuda":
        print("warning: --cuda-graph needs CUDA; ignored on the CPU", file=sys.stderr)
        args.cuda_graph = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    model, method, margs = load_model_for_sampling(args.ckpt, args.method, device, args.model, args.num_heads,
                                                   args.image_size, args.num_classes)
    opts = sampler_opts_from_args(args, method)
    K = model.num_classes
    if args.class_labels:
        labels = parse_labels(args.class_labels, K)
    else:
        labels = list(range(K)) if K <= 16 else [v for v in IMAGENET_DEMO_LABELS if v < K]
    per = args.samples_per_class or (max(1, 40 // len(labels)) if len(labels) <= 16 else 1)
    ncol = len(labels) if len(labels) <= 16 else 8
    labels = torch.tensor([l for _ in range(per) for l in labels], dtype=torch.long)
    vae = None
    if margs.get("data_kind") == "latents":
        from dit_models.data import load_vae

        vae = load_vae(args.vae or "mse", device)
    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with autocast:
        x = generate(method, model, labels, opts, args.cfg_scale, gen, margs, args.batch_size)
        imgs = decode(x, vae)
    path = utils.save_image_grid(imgs.float().cpu(), args.out, nrow=ncol)
    print(f"{method} {margs.get('model')}: {len(labels)} samples ({opts['sampler']}, {opts['num_sampling_steps']} steps, "
          f"cfg {args.cfg_scale}) -> {path}")
    return path


def cli(argv=None):
    args = get_parser().parse_args(argv)
    try:
        return main(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
