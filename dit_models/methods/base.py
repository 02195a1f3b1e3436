"""What a method is: the record every method file (ddpm, sit, maskdit, sddit) fills in.

A new method is one file with one `Method`; a new sampler is one `SamplerSpec` entry in each method file that
offers it plus its run function there (e.g. "unipc": SamplerSpec(run_unipc, steps_nfe) calling the process's
UniPC loop, as "dpm++" calls its DPM-Solver++ loop). Nothing outside dit_models/methods/ branches on the
method name.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional


class MethodUnavailable(RuntimeError):
    """The method's model or loss cannot be imported in this build."""


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler of a method.

    run(model, z, y, opts, sampling) -> (N, C, H, W) samples from initial noise z (N, C, H, W) and labels y (N,);
        `sampling` is a Sampling (guidance, device generator, noise-process args, progress bar, CUDA graph).
    nfe(opts) -> network evaluations per sample (one call on the 2N guidance batch counts once); None when
        the solver is adaptive.
    chosen: options set when --sampler picks this sampler and their own flags are not given.
    options: the options run() reads besides sampler and num_sampling_steps (what a result records).
    """

    run: Callable
    nfe: Callable
    chosen: dict = field(default_factory=dict)
    options: tuple = ()


@dataclass(frozen=True)
class Flag:
    """A command-line flag a method adds: add_argument(*names, **kwargs); option(value) is what a given sampler
    flag puts in the sampler options."""

    names: tuple
    kwargs: dict
    option: Callable = lambda v: v

    @property
    def dest(self):
        return self.names[0].lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Method:
    """Everything that differs between noise processes.

    name: the --method value. family: the model family, for help texts.
    models(): the model registry {name: factory} (imported lazily, so each family stands alone).
    default_model, global_batch_size, cuda_precision: training defaults (the published recipes).
    train_defaults: further defaults for flags left unset (None) on the command line.
    model_kwargs(args dict) -> constructor arguments besides the size (label dropout, learned sigma).
    derived_size(cfg, overrides) -> sizes that follow the --depth/--hidden-size/--num-heads overrides.
    objective(args) -> the training Objective (below).
    find_unused_parameters: DDP flag (some parameters get no gradient in a step).
    published: the published sampler options; fast: the in-training / evaluation options (DPM-Solver++).
    samplers: {--sampler name: SamplerSpec}, the published one first.
    load_released(ckpt, device, model_name, num_heads, image_size, num_classes) -> (model, args dict), or None
        when the method has no released checkpoints.
    train_flags, sampler_flags: the flags this method adds to dit_models.train and to the sampling tools.
    eps_on_beta_schedule: the network predicts eps on a discrete DDPM beta schedule (what diffusers' schedulers
        step, benchmarks/compare_diffusers.py).
    linear_flow(args dict) -> True when the network predicts the velocity data - noise on the linear path
        x_t = t data + (1 - t) noise (what diffusers' flow-matching schedulers step, with sigma = 1 - t).
    nfe_variants: {name: fn(nfe) -> option updates on `published`} that spend about nfe network evaluations
        with each published solver (benchmarks/sampler_nfe.py; DPM-Solver++ is one evaluation per step anywhere).
    """

    name: str
    family: str
    models: Callable
    default_model: str
    global_batch_size: int
    cuda_precision: str
    model_kwargs: Callable
    objective: Callable
    published: dict
    fast: dict
    samplers: dict
    train_defaults: dict = field(default_factory=dict)
    derived_size: Callable = lambda cfg, overrides: {}
    find_unused_parameters: bool = False
    load_released: Optional[Callable] = None
    train_flags: tuple = ()
    sampler_flags: tuple = ()
    nfe_variants: dict = field(default_factory=dict)
    eps_on_beta_schedule: bool = False
    linear_flow: Callable = lambda args: False

    def registry(self):
        try:
            return self.models()
        except ImportError as e:
            raise MethodUnavailable(f"--method {self.name} is not available in this build: {e}") from e

    def sampler_defaults(self, fast=True):
        return dict(self.fast if fast else self.published)

    def sampler_settings(self, opts):
        """The options of opts that its sampler uses (e.g. no SDE settings for a DPM-Solver++ run): what a
        result records."""
        keys = ("sampler", "num_sampling_steps", *self.sampler(opts).options, "guided_channels", "guidance_interval")
        return {k: opts[k] for k in keys if k in opts}

    def sampler(self, opts):
        kind = opts["sampler"]
        if kind not in self.samplers:
            raise ValueError(f"--sampler {kind} does not apply to --method {self.name}; choose from {tuple(self.samplers)}")
        return self.samplers[kind]


def unipc_options(published, time_spacing, variant="bh2"):
    """UniPC of order 2, 20 steps = 20 NFE; bh2 is diffusers' default variant (what --sampler unipc starts from
    where the method does not choose another)."""
    return dict(fast_options(published, time_spacing), sampler="unipc", unipc_variant=variant)


def fast_options(published, time_spacing):
    """DPM-Solver++(2M), 20 steps = 20 NFE: the in-training / evaluation sampler of DDPM and MaskDiT, which on
    the digits checkpoints matches or beats each method's 250-step sampler (docs/results.md, issue 20's table:
    UniPC bh2 ties with it there, bh1 is far worse below 15 NFE). SiT and SD-DiT use UniPC (their files)."""
    return dict(published, sampler="dpm++", num_sampling_steps=20, solver_order=2, time_spacing=time_spacing,
                third_order="taylor")


def steps_nfe(opts):
    """One network evaluation per step (ancestral, DDIM, DPM-Solver++)."""
    return int(opts["num_sampling_steps"])


def margs(method_args, key, default):
    """A noise-process setting of the training args (dict or namespace), default where unset."""
    if method_args is None:
        return default
    v = method_args.get(key) if isinstance(method_args, dict) else getattr(method_args, key, None)
    return default if v is None else v


@dataclass
class Sampling:
    """What a sampler's run() gets besides the model, noise, labels and options.

    cfg_scale: classifier-free guidance scale (1 = conditional model only); guided_channels: guide the first N
    output channels only (None = all). generator: torch.Generator on the model's device for the sampler's noise.
    method_args: the training args (dict or namespace) of the noise process. bar: progress bar (one update per
    network evaluation). cuda_graph: capture the network call / loop in a CUDA graph (CUDA only).
    guidance_interval: (lo, hi) in the process's own noise variable (DDPM step t, SiT t, EDM sigma): guide only
    there; elsewhere the network runs once on the B conditional rows (dit_models/guidance_interval.py).
    calls, guided_calls: network evaluations so far, and how many of them ran the 2B guided batch (counted on
    eager runs; a replayed CUDA graph of a whole SiT loop counts its capture only).
    """

    cfg_scale: float = 1.0
    guided_channels: Optional[int] = None
    generator: object = None
    method_args: object = None
    bar: object = None
    cuda_graph: bool = False
    guidance_interval: Optional[tuple] = None
    calls: int = 0
    guided_calls: int = 0

    @property
    def guided(self):
        return self.cfg_scale != 1.0

    def guides_at(self, t):
        """Whether the network call at noise level t (a tensor of equal entries) runs guided. With an interval
        this reads t on the host: one sync per network call (DDPM and EDM sampling only)."""
        if not self.guided:
            return False
        if self.guidance_interval is None:
            return True
        lo, hi = self.guidance_interval
        return lo <= float(t.reshape(-1)[0]) <= hi

    def count(self):
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)


class Objective:
    """The training loss of a method: __call__(model, x, y, step) -> (scalar loss, {name: float tensor})."""

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass

    def after_step(self, model, step, max_steps):
        pass

    def __call__(self, model, x, y, step):
        raise NotImplementedError


def given(args, names):
    """{keyword: args.<attribute>} for the (keyword, attribute) pairs whose flag was given (not None)."""
    return {k: getattr(args, a) for k, a in names.items() if getattr(args, a, None) is not None}


def network(model, sampling, guided_channels=True):
    """net(x, t, y): the model's output for a sampler, guided on the unduplicated batch
    (model.forward_guided builds the [cond; uncond] network batch) when cfg_scale != 1, replayed from a CUDA
    graph per input shape with sampling.cuda_graph, each call counted on the progress bar (no device sync).

    guided_channels=False guides every channel whatever --guided-channels says (EDM guides all of F).
    """
    channels = sampling.guided_channels if guided_channels else None

    def guided(x, t, y):
        return model.forward_guided(x, t, y, sampling.cfg_scale, cfg_channels=channels)

    def conditional(x, t, y):
        return model(x, t, y)

    if sampling.cuda_graph:  # one graph per call kind: the interval's choice is made outside them
        from dit_models.transport.cuda_graph import GraphedCall

        guided, conditional = GraphedCall(guided), GraphedCall(conditional)

    def counted(x, t, y):
        sampling.count()
        if sampling.guides_at(t):
            sampling.guided_calls += 1
            return guided(x, t, y)
        return conditional(x, t, y)

    return counted
