"""Sampling for all four methods, below every tool: sampler options and flags, generate(), loading a
checkpoint (ours or a released file) for sampling, VAE decoding.

Used by dit_models.sample, sample_ddp, evaluate and train (in-training grids, quickstart evaluation).
"""
import torch
from tqdm.auto import tqdm

SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm++"), "sit": ("ode", "sde", "dpm++"), "maskdit": ("edm", "dpm++"),
            "sddit": ("edm", "dpm++")}
# --sampler dpm++ (DPM-Solver++ multistep, dit_models/multistep.py): one network evaluation per step.
# Time grids: uniform in t for DDPM (evaluations from T - 1 down to t = 0, then the step to clean data; on the
# digits DiT it beat uniform-logSNR and Karras grids at 10 and 20 NFE, docs/results.md) and for SiT; EDM steps
# on its own Karras sigma grid (rho 7).
DPM_DEFAULTS = {"num_sampling_steps": 20, "solver_order": 2,
                "time_spacing": {"ddpm": "time_uniform", "sit": "time_uniform", "maskdit": None, "sddit": None}}


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

    published: ddpm 250 respaced ancestral steps; sit ODE dopri5 (heun without torchdiffeq), 250 steps; edm Heun
    40 steps (79 NFE). fast: DPM-Solver++(2M), 20 steps = 20 NFE, for every method: on the digits checkpoints
    it matches or beats each method's 250-step sampler (docs/results.md).
    """
    if method == "ddpm":
        d = {"sampler": "ddpm", "num_sampling_steps": 250, "ddim_eta": 0.0}
    elif method == "sit":
        d = {"sampler": "ode", "num_sampling_steps": 250, "atol": 1e-6, "rtol": 1e-3,
             "sampling_method": "dopri5" if _has_torchdiffeq() else "heun",
             "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04}
    elif method in ("maskdit", "sddit"):
        d = {"sampler": "edm", "num_sampling_steps": 40, "sigma_min": 0.002, "sigma_max": 80.0,
             "rho": 7.0, "S_churn": 0.0, "S_min": 0.0, "S_max": float("inf"), "S_noise": 1.0}
    else:
        raise ValueError(f"unknown method {method!r}")
    if fast:
        d.update(sampler="dpm++", num_sampling_steps=DPM_DEFAULTS["num_sampling_steps"],
                 solver_order=DPM_DEFAULTS["solver_order"], time_spacing=DPM_DEFAULTS["time_spacing"][method])
    return d


def add_sampler_args(parser):
    """Sampler flags shared by sample, sample_ddp and evaluate (None = the method's default)."""
    g = parser.add_argument_group("sampler")
    g.add_argument("--sampler", default=None,
                   help="ddpm|ddim (ddpm), ode|sde (sit), edm (maskdit, sddit); dpm++ (every method: DPM-Solver++)")
    g.add_argument("--num-sampling-steps", type=int, default=None, help="ddpm 250, sit 250, edm 40, dpm++ 20 (= NFE)")
    g.add_argument("--solver-order", type=int, default=None, choices=[1, 2, 3], help="dpm++: 2 (2M) or 3 (3M)")
    g.add_argument("--time-spacing", default=None, choices=["logSNR", "karras", "time_uniform"],
                   help="dpm++ grid for ddpm and sit (default time_uniform)")
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
    requested = getattr(args, "sampler", None)
    if requested not in (None, opts["sampler"]):
        # Another sampler than the default one starts from its own settings: DPM-Solver++'s are the fast
        # defaults, every other sampler's the published ones.
        opts = sampler_defaults(method, fast=requested == "dpm++")
    for k in ("sampler", "num_sampling_steps", "solver_order", "time_spacing", "ddim_eta", "sampling_method", "atol",
              "rtol", "diffusion_form", "diffusion_norm", "last_step_size", "S_churn", "sigma_min", "sigma_max", "rho"):
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
    if getattr(args, "last_step", None) is not None:
        opts["last_step"] = None if args.last_step.lower() == "none" else args.last_step
    if opts["sampler"] not in SAMPLERS[method]:
        raise ValueError(f"--sampler {opts['sampler']} does not apply to --method {method}; choose from {SAMPLERS[method]}")
    if method == "sit" and "sampler" in opts and opts["sampler"] == "sde" and getattr(args, "sampling_method", None) is None:
        opts["sampling_method"] = "Euler"
    opts["guided_channels"] = getattr(args, "guided_channels", None)
    opts["cuda_graph"] = bool(getattr(args, "cuda_graph", False))
    return opts


def sampler_nfe(method, opts):
    """Network evaluations per sample (one call on the 2B CFG batch counts once); None for adaptive solvers."""
    steps = int(opts["num_sampling_steps"])
    kind = opts["sampler"]
    if method == "ddpm" or kind == "dpm++":
        return steps
    if method == "sit":
        per_step = {"euler": 1, "heun": 2, "heun2": 2, "midpoint": 2, "rk4": 4, "Euler": 1, "Heun": 2}
        k = per_step.get(opts.get("sampling_method", "Euler" if kind == "sde" else "heun"))
        if k is None:
            return None  # torchdiffeq's adaptive solvers
        return k * (steps - 1) + (1 if kind == "sde" and opts.get("last_step") else 0)
    if method in ("maskdit", "sddit"):
        return 2 * steps - 1  # Heun, Euler on the last step
    raise ValueError(f"unknown method {method!r}")


class _CountingNet:
    """Wraps a network for a sampler: counts its calls (one per NFE) into a progress bar. Pure Python
    bookkeeping, no device sync, so CUDA-graph capture and async execution are unaffected."""

    def __init__(self, net, bar, forward_with_cfg=None):
        self.net, self.bar, self._cfg = net, bar, forward_with_cfg

    def __call__(self, *args, **kwargs):
        self.bar.update(1)
        return self.net(*args, **kwargs)

    def forward_with_cfg(self, *args, **kwargs):
        self.bar.update(1)
        return self._cfg(*args, **kwargs)


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
             noise=None, progress=False):
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
        progress: a tqdm bar of network evaluations on stderr (shown on a terminal only).
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
    nfe = sampler_nfe(method, opts)
    batches = -(-len(labels) // batch_size)
    bar = tqdm(total=nfe * batches if nfe else None, unit="NFE", disable=None if progress else True, leave=False,
               desc=f"{method} {opts['sampler']}: {len(labels)} samples, cfg {cfg_scale:g}")
    try:
        for i in range(0, len(labels), batch_size):
            y = labels[i : i + batch_size].to(device)
            n = len(y)
            z = torch.randn(n, C, H, W, generator=generator) if noise is None else noise[i : i + batch_size].cpu()
            z = z.to(device)
            dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            out.append(_sample_batch(method, model, z, y, opts, cfg_scale, guided, gch, dev_gen, method_args, bar).float())
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)


def _sample_batch(method, model, z, y, opts, cfg_scale, guided, gch, dev_gen, method_args, bar):
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
        net = _CountingNet(net, bar)
        kw = dict(noise=z, clip_denoised=False, model_kwargs=dict(y=y), device=z.device, generator=dev_gen)
        if kind == "dpm++":
            return diffusion.dpm_solver_sample_loop(net, z.shape, num_steps=steps, order=int(opts.get("solver_order", 2)),
                                                    time_spacing=opts.get("time_spacing") or "time_uniform", **kw)
        if kind == "ddim":
            return diffusion.ddim_sample_loop(net, z.shape, eta=float(opts.get("ddim_eta") or 0.0), **kw)
        return diffusion.p_sample_loop(net, z.shape, **kw)
    if method == "sit":
        from dit_models.transport import Sampler, create_transport

        transport = create_transport(_margs(method_args, "path_type", "Linear"), _margs(method_args, "prediction", "velocity"),
                                     _margs(method_args, "loss_weight", None), _margs(method_args, "train_eps", None),
                                     _margs(method_args, "sample_eps", None))
        sampler = Sampler(transport)
        # null_label given here: the sampler cannot read it off the counting wrapper of model.forward.
        common = dict(cfg_scale=cfg_scale, guided_channels=gch, cuda_graph=cuda_graph,
                      null_label=model.y_embedder.num_classes if guided else None)
        if kind == "dpm++":
            fn = sampler.sample_dpm_solver(steps, int(opts.get("solver_order", 2)),
                                           opts.get("time_spacing") or "time_uniform", **common)
        elif kind == "sde":
            fn = sampler.sample_sde(opts.get("sampling_method", "Euler"), opts["diffusion_form"], opts["diffusion_norm"],
                                    opts["last_step"], opts["last_step_size"], steps, generator=dev_gen, **common)
        else:
            fn = sampler.sample_ode(opts.get("sampling_method", "heun"), steps, opts["atol"], opts["rtol"], **common)
        return fn(z, _CountingNet(model.forward, bar), y=y)[-1]
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
        net = _CountingNet(net, bar, getattr(net, "forward_with_cfg", None))
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

    ckpt = read_checkpoint(ckpt_path)
    ours = isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "method" in ckpt["args"] and "ema" in ckpt
    if ours:
        from dit_models.builders import build_model_from_args

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
