"""SiT (Ma et al. 2024): the DiT backbone trained on a stochastic interpolant x_t = alpha_t x1 + sigma_t x0.

t is continuous in [0, 1] with t = 1 data (Linear path: alpha_t = t, sigma_t = 1 - t); the model regresses the
velocity (or score / noise). Published samplers: the probability-flow ODE with dopri5 (atol 1e-6, rtol 1e-3, 250
output times; built-in Heun without torchdiffeq) and the reverse SDE (Euler-Maruyama, diffusion D_t = sigma_t,
a last "Mean" step of size 0.04, 250 grid points).
"""
from dit_models.cli import nonnegative_float, positive_float

from .base import Flag, Method, Objective, SamplerSpec, margs, steps_nfe, unipc_options
from .ddpm import load_released_dit, model_kwargs


def _models():
    from dit_models.models.sit import SiT_models

    return SiT_models


def _sit_class():
    from dit_models.models.sit import SiT

    return SiT


class TransportObjective(Objective):
    """Interpolant path x_t = alpha_t x1 + sigma_t x0, velocity/score/noise regression."""

    def __init__(self, args):
        from dit_models.transport import create_transport

        self.transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps,
                                          args.sample_eps)

    def __call__(self, model, x, y, step):
        d = self.transport.training_losses(model, x, dict(y=y))
        return d["loss"].mean(), {}


# ---------------------------------------------------------------------------------------------- sampling

def _sampler(model, sampling):
    from dit_models.transport import Sampler, create_transport

    a = sampling.method_args
    transport = create_transport(margs(a, "path_type", "Linear"), margs(a, "prediction", "velocity"),
                                 margs(a, "loss_weight", None), margs(a, "train_eps", None), margs(a, "sample_eps", None))
    # Guidance inside the transport sampler (the fused Euler-Maruyama step mixes the 2N output itself); the
    # null label is given here because the sampler cannot read it off the counting wrapper of model.forward.
    common = dict(cfg_scale=sampling.cfg_scale, guided_channels=sampling.guided_channels,
                  cuda_graph=sampling.cuda_graph, null_label=model.y_embedder.num_classes if sampling.guided else None,
                  guidance_interval=sampling.guidance_interval)
    return Sampler(transport), common


def _run(fn, model, z, y, sampling):
    def counted(*args, **kwargs):
        sampling.count()
        return model.forward(*args, **kwargs)

    out = fn(z, counted, y=y)[-1]
    sampling.guided_calls += fn.guided_nfe
    return out


def run_ode(model, z, y, opts, sampling):
    sampler, common = _sampler(model, sampling)
    fn = sampler.sample_ode(opts.get("sampling_method", "heun"), int(opts["num_sampling_steps"]), opts["atol"],
                            opts["rtol"], **common)
    return _run(fn, model, z, y, sampling)


def run_sde(model, z, y, opts, sampling):
    sampler, common = _sampler(model, sampling)
    fn = sampler.sample_sde(opts.get("sampling_method", "Euler"), opts["diffusion_form"], opts["diffusion_norm"],
                            opts["last_step"], opts["last_step_size"], int(opts["num_sampling_steps"]),
                            generator=sampling.generator, **common)
    return _run(fn, model, z, y, sampling)


def run_dpm_solver(model, z, y, opts, sampling):
    sampler, common = _sampler(model, sampling)
    fn = sampler.sample_dpm_solver(int(opts["num_sampling_steps"]), int(opts.get("solver_order", 2)),
                                   opts.get("time_spacing") or "time_uniform",
                                   third_order=opts.get("third_order") or "taylor", **common)
    return _run(fn, model, z, y, sampling)


def run_unipc(model, z, y, opts, sampling):
    sampler, common = _sampler(model, sampling)
    fn = sampler.sample_unipc(int(opts["num_sampling_steps"]), int(opts.get("solver_order", 2)),
                              opts.get("unipc_variant", "bh2"), opts.get("time_spacing") or "time_uniform", **common)
    return _run(fn, model, z, y, sampling)


_EVALS_PER_STEP = {"euler": 1, "heun": 2, "heun2": 2, "midpoint": 2, "rk4": 4, "Euler": 1, "Heun": 2}


def ode_nfe(opts):
    """Evaluations per step times the num_sampling_steps - 1 steps; None for torchdiffeq's adaptive solvers."""
    k = _EVALS_PER_STEP.get(opts.get("sampling_method", "heun"))
    return None if k is None else k * (int(opts["num_sampling_steps"]) - 1)


def sde_nfe(opts):
    """num_sampling_steps - 1 stochastic steps, plus one evaluation for the last step (if any)."""
    k = _EVALS_PER_STEP.get(opts.get("sampling_method", "Euler"))
    return None if k is None else k * (int(opts["num_sampling_steps"]) - 1) + (1 if opts.get("last_step") else 0)


def _has_torchdiffeq():
    try:
        import torchdiffeq  # noqa: F401

        return True
    except ImportError:
        return False


PUBLISHED = {"sampler": "ode", "num_sampling_steps": 250, "atol": 1e-6, "rtol": 1e-3,
             "sampling_method": "dopri5" if _has_torchdiffeq() else "heun",
             "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04}

# The in-training / evaluation sampler: UniPC bh1 of order 2, 20 steps = 20 NFE. On the digits SiT (docs/results.md,
# issue 20) it had the lowest FD of every sampler at 5-20 NFE at cfg 1 (10.2 at 10 NFE, 10.0 at 20, against 10.1
# for 250 Heun evaluations; DPM-Solver++(2M) 10.5 / 10.2, bh2 10.3 / 10.1) and no worse at cfg 3. `--sampler
# dpm++` gives the previous default.
FAST = unipc_options(PUBLISHED, "time_uniform", variant="bh1")

METHOD = Method(
    name="sit",
    family="SiT",
    models=_models,
    default_model="SiT-XL/2",
    global_batch_size=256,
    cuda_precision="tf32",
    train_defaults={"learn_sigma": True},
    model_kwargs=model_kwargs,
    objective=TransportObjective,
    published=PUBLISHED,
    fast=FAST,
    samplers={"ode": SamplerSpec(run_ode, ode_nfe, options=("sampling_method", "atol", "rtol")),
              "sde": SamplerSpec(run_sde, sde_nfe, {"sampling_method": "Euler"}, ("sampling_method", "diffusion_form",
                                 "diffusion_norm", "last_step", "last_step_size")),
              "dpm++": SamplerSpec(run_dpm_solver, steps_nfe, options=("solver_order", "time_spacing", "third_order")),
              "unipc": SamplerSpec(run_unipc, steps_nfe, FAST,
                                   ("solver_order", "time_spacing", "unipc_variant"))},
    load_released=load_released_dit(_sit_class, "SiT"),
    train_flags=(
        Flag(("--path-type",), dict(default="Linear", choices=["Linear", "GVP", "VP"], help="sit")),
        Flag(("--prediction",), dict(default="velocity", choices=["velocity", "score", "noise"], help="sit")),
        Flag(("--loss-weight",), dict(default=None, choices=[None, "velocity", "likelihood"], help="sit")),
        Flag(("--train-eps",), dict(type=nonnegative_float, default=None, help="sit (default per path/prediction)")),
        Flag(("--sample-eps",), dict(type=nonnegative_float, default=None, help="sit (default per path/prediction)")),
    ),
    linear_flow=lambda a: (margs(a, "path_type", "Linear"),
                           margs(a, "prediction", "velocity")) == ("Linear", "velocity"),
    nfe_variants={  # euler: NFE + 1 grid points; heun: NFE / 2 + 1; sde (Euler-Maruyama): NFE grid points
        "euler": lambda nfe: dict(sampler="ode", sampling_method="euler", num_sampling_steps=nfe + 1),
        "heun": lambda nfe: dict(sampler="ode", sampling_method="heun", num_sampling_steps=max(2, nfe // 2 + 1)),
        "sde": lambda nfe: dict(sampler="sde", sampling_method="Euler", num_sampling_steps=max(2, nfe)),
    },
    sampler_flags=(
        Flag(("--sampling-method",), dict(default=None, help="sit ode: dopri5 (torchdiffeq) | euler | heun | midpoint "
                                                               "| rk4; sit sde: Euler | Heun")),
        Flag(("--atol",), dict(type=positive_float, default=None, help="sit ode adaptive (1e-6)")),
        Flag(("--rtol",), dict(type=positive_float, default=None, help="sit ode adaptive (1e-3)")),
        Flag(("--diffusion-form",), dict(default=None, help="sit sde: sigma (CLI default) | SBDM | constant | linear | "
                                                              "decreasing | increasing-decreasing")),
        Flag(("--diffusion-norm",), dict(type=nonnegative_float, default=None, help="sit sde (1.0)")),
        Flag(("--last-step",), dict(default=None, help="sit sde: Mean | Tweedie | Euler | none"),
             lambda v: None if v.lower() == "none" else v),
        Flag(("--last-step-size",), dict(type=nonnegative_float, default=None, help="sit sde (0.04)")),
    ),
)
