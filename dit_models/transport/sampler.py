"""SiT samplers: probability-flow ODE, reverse SDE, DPM-Solver++ and the ODE likelihood.

Drop-in for the public SiT `Sampler`: `Sampler(transport).sample_ode(...)`, `.sample_sde(...)` and
`.sample_ode_likelihood(...)` return callables `fn(x, model, **model_kwargs)`, and the public idiom
`samples = sample_fn(z, model_fn, **model_kwargs)[-1]` keeps working. Differences from the public
code, all deliberate:

* One network evaluation per drift evaluation (the public drift and score each call the network: 2
  evaluations per Euler-Maruyama step): the network output is turned into v and s with the affine
  conversions between predictions (Transport.drift_coeffs), f = v + D * s. Euler-Maruyama uses the
  fused dit_kernels.sde_euler_maruyama_step (x' = a x + b out + std * noise, with the CFG mix of the 2B
  output inside) with host-side fp64 coefficients.
* The time grid and every coefficient are computed once on the host in fp64; the loop does no
  host<->device traffic and no sync; noise comes from a torch.Generator on the state's device (the
  public loop draws it on the CPU and copies it every step).
* The returned list holds only the final state unless return_trajectory=True (the public loop keeps
  all 250 states alive). With
  return_trajectory=True: SDE -> num_steps states (after each step, as SiT), ODE -> num_steps
  states including the start (as torchdiffeq).
* Diffusion form "increasing-decreasing" is accepted, as is SiT's misspelling "inccreasing-decreasing";
  SBDM never starts at its singular t = 0 (see Transport.check_interval); the "Tweedie" last step uses
  each sample's own alpha_t, sigma_t (the public code reads batch element 0's).
* Likelihood: one forward per function evaluation (the public drift runs the network twice) and one
  Hutchinson probe per solve (the public one redraws it every call), from data to log p (nats) and
  bits/dim.
* Classifier-free guidance, two ways (the public samplers carry a duplicated 2B state):
    - public: model = model.forward_with_cfg on a 2B state [z; z], kwargs y = [y; y_null] and
      cfg_scale; the sampler treats it as an ordinary model (keep the first B rows at the end);
    - efficient: sample_sde(..., cfg_scale=w, guided_channels=None) (also sample_ode) with a B-row
      state and model = model.forward: each evaluation runs model(cat[x, x], t, y=cat[y, y_null])
      and guidance is applied inside the fused step (or before the drift for ODE / Heun). y_null is
      `null_label` if given, else model.num_classes (or model.y_embedder.num_classes, also through
      a bound method's owner). guided_channels=None guides all C channels; 3 reproduces the public
      quirk of guiding 3 of 4 channels. Only the `y` keyword is doubled; other keywords pass unchanged.
* reverse=True (and the likelihood) run the same interval [t0, t1] backwards, t1 -> t0. SiT maps
  the interval to (1 - t0, 1 - t1) instead; that is identical for Linear and GVP (symmetric
  intervals) and avoids the singular t = 1 of VP.
* cuda_graph=True (fixed-step methods, CUDA only); same generator state -> same samples as eager:
    - SDE "Euler": one step (forward + fused step reading its scalars from a device coefficient
      table indexed by a device step counter) is captured per call and replayed num_steps - 2 times;
      no cache;
    - every other fixed-step method: the whole loop is captured once and replayed (cuda_graph.py);
      the graph is cached module-wide (one entry) and replayed by later calls with the same
      configuration and input signature, even from a new sample function; reset_cuda_graphs()
      frees it. The model must be capturable (no host syncs,
  no CPU tensors created in forward; under autocast use cache_enabled=False). On the CPU, or for
  adaptive solvers, it is ignored with a warning.
* Sampling runs under torch.no_grad(); fp16/bf16 states are integrated in fp32 and cast back (the
  network runs in its own dtype). fn.nfe counts the network evaluations of the last eager call.
"""
import math
import warnings
from typing import NamedTuple

import torch

from dit_kernels import sde_euler_maruyama_step
from dit_models.guidance import cfg_mix

from . import cuda_graph
from .cuda_graph import GRAPH_CACHE, reset_cuda_graphs

try:  # device-table variant of the fused step (per-step CUDA-graph capture); absent in old builds
    from dit_kernels.ops.sde_step import sde_euler_maruyama_step_table
except ImportError:  # pragma: no cover
    sde_euler_maruyama_step_table = None

__all__ = ["Sampler", "LikelihoodResult", "diffusion_coefficient", "DIFFUSION_FORMS", "reset_cuda_graphs",
           "dpm_solver_grid"]

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
_FORM_ALIASES = {"inccreasing-decreasing": "increasing-decreasing"}  # the public code's spelling
SDE_METHODS = ("euler", "heun")
ODE_FIXED_METHODS = ("euler", "heun", "midpoint", "rk4")
_ODE_ALIASES = {"heun2": "heun"}  # torchdiffeq's name for the same (trapezoidal) method
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


def _norm_form(form):
    f = str(form)
    f = _FORM_ALIASES.get(f.lower(), f)
    for name in DIFFUSION_FORMS:
        if name.lower() == f.lower():
            return name
    raise ValueError(f"unknown diffusion_form {form!r}; choose one of {DIFFUSION_FORMS}")


def diffusion_coefficient(form, path, t, norm=1.0):
    """D(t) of the reverse SDE dX = [v + D s] dt + sqrt(2 D) dW; t = 1 is data.

    constant: norm; SBDM: norm * drift_var(t); sigma: norm * sigma_t; linear: norm * (1 - t);
    decreasing: (norm * cos(pi t) + 1)^2 / 4; increasing-decreasing: norm * sin(pi t)^2.
    """
    form = _norm_form(form)
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "SBDM":
        return norm * path.drift_var(t)
    if form == "sigma":
        return norm * path.sigma_t(t)
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    return norm * torch.sin(math.pi * t) ** 2


class LikelihoodResult(NamedTuple):
    """Output of sample_ode_likelihood: log p(x) in nats (N,), bits per dimension (N,), latent z."""

    logp: torch.Tensor
    bpd: torch.Tensor
    z: torch.Tensor


# torchdiffeq's adaptive Runge-Kutta solvers may step past the last output time and interpolate back;
# step_t makes them land exactly on it, so the network is never evaluated outside [t0, t1] (VP is
# undefined beyond t = 1).
_ADAPTIVE_RK = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _odeint_options(solver, t_grid):
    return dict(options=dict(step_t=t_grid[-1:])) if solver in _ADAPTIVE_RK else {}


def _torchdiffeq(solver):
    try:
        import torchdiffeq
    except ImportError as e:
        raise ImportError(
            f"sampling_method={solver!r} needs torchdiffeq (pip install torchdiffeq); without it use one of "
            f"the built-in fixed-step methods {ODE_FIXED_METHODS}") from e
    return torchdiffeq


def _resolve_null_label(model, null_label):
    if null_label is not None:
        return int(null_label)
    for obj in (model, getattr(model, "__self__", None)):
        if obj is None:
            continue
        n = getattr(obj, "num_classes", None)
        if n is None:
            n = getattr(getattr(obj, "y_embedder", None), "num_classes", None)
        if n is not None:
            return int(n)
    raise ValueError("cfg_scale != 1 needs the null (unconditional) label: pass null_label=... to the sampler "
                     "or use a model with a num_classes attribute (null label = num_classes)")


def _lin(x, a, o, b):
    """a * x + b * o for host floats a, b (o cast to x's dtype)."""
    o = o.to(x.dtype)
    if a == 0:
        return o * b
    return (o * b).add_(x, alpha=a)


class _SampleFn:
    """Shared machinery: host time grid -> device time table, network call with optional CFG."""

    def __init__(self, transport, times, cfg_scale=1.0, guided_channels=None, null_label=None, generator=None,
                 cuda_graph=False, return_trajectory=False, guidance_interval=None):
        from dit_models.guidance_interval import check_guidance_interval

        self.transport = transport
        self.times = list(times)  # host floats; row r of the device time table is times[r]
        self.cfg_scale = float(cfg_scale)
        self.cfg = self.cfg_scale != 1.0
        self.guided_channels = guided_channels
        self.null_label = null_label
        self.generator = generator
        self.cuda_graph = cuda_graph
        self.return_trajectory = return_trajectory
        # Guide only at times t in [lo, hi] (dit_models/guidance_interval.py); elsewhere the network runs on the
        # B conditional rows only. Decided from the host grid, so captured loops bake it in.
        self.guidance_interval = check_guidance_interval(guidance_interval) if self.cfg else None
        self.nfe = 0  # network evaluations of the last eager call (for tests and benchmarks)
        self.guided_nfe = 0  # of which on the 2B [cond; uncond] batch
        self._tables = {}

    def graph_key(self):
        """Everything a captured loop bakes in besides its tensor inputs, each named here: a cached graph is
        replayed only when every item is equal (cuda_graph.LoopGraph). Subclasses append their coefficients."""
        return (type(self).__name__, tuple(self.times), self.cfg_scale, self.guided_channels, self.null_label,
                self.return_trajectory, self.guidance_interval)

    # ------------------------------------------------------------------ network

    def _time_table(self, n, device, dtype):
        key = (n, device, dtype)
        if key not in self._tables:
            tab = torch.tensor(self.times, dtype=torch.float64).to(dtype)[:, None].expand(len(self.times), n)
            self._tables[key] = tab.contiguous().to(device)
        return self._tables[key]

    def _prepare(self, x, model, model_kwargs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor")
        if self.cfg:
            if "y" not in model_kwargs:
                raise ValueError("cfg_scale != 1 needs the class labels as keyword y")
            model_kwargs = dict(model_kwargs, y_null=_resolve_null_label(model, self.null_label))
        n_net = x.shape[0] * (2 if self.cfg else 1)
        tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return model_kwargs, self._time_table(n_net, x.device, tdtype)

    @staticmethod
    def _net_kwargs(kw, cfg):
        """Split off y_null and build the 2B label batch [y; y_null] (inside the loop: graph-capturable)."""
        kw = dict(kw)
        if cfg:
            y_null = kw.pop("y_null")
            y = kw["y"]
            kw["y"] = torch.cat([y, torch.full_like(y, y_null)])
        return kw

    def _guides_at(self, t_host):
        """Whether the call at host time t_host runs guided (the 2B batch)."""
        if not self.cfg:
            return False
        if self.guidance_interval is None:
            return True
        lo, hi = self.guidance_interval
        return lo <= t_host <= hi

    def _forward(self, model, x, t_row, kw, t_host=None):
        """Raw network output: (B, C_out, ...) or, guided, (2B, C_out, ...) laid out [cond; uncond]. With CFG,
        t_row and kw["y"] hold 2B rows; outside the guidance interval only their first (conditional) B run."""
        self.nfe += 1
        if self._guides_at(t_host):
            self.guided_nfe += 1
            return model(torch.cat([x, x]), t_row, **kw)
        if not self.cfg:
            return model(x, t_row, **kw)
        b = x.shape[0]
        return model(x, t_row[:b], **{k: v[:b] if k == "y" else v for k, v in kw.items()})

    def _guide(self, out, x):
        """First C channels of the output with CFG applied (when it ran guided): (B, C, ...) in x's dtype."""
        b, c = x.shape[:2]
        o = out[:, :c].to(x.dtype)
        if out.shape[0] == b:
            return o
        return cfg_mix(o[:b], o[b:], self.cfg_scale, self.guided_channels)

    def _model_out(self, model, x, t_row, kw, t_host=None):
        return self._guide(self._forward(model, x, t_row, kw, t_host), x)

    # ------------------------------------------------------------------ entry point

    def __call__(self, x, model, **model_kwargs):
        """Run the sampler from x (B, C, H, W); returns a list (see module docstring).

        Runs under torch.no_grad(). The state is integrated in x's dtype, except that fp16/bf16 x is
        integrated in fp32 (the network still runs in its own dtype) and the states are cast back.
        """
        in_dtype = x.dtype
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        model_kwargs, table = self._prepare(x, model, model_kwargs)
        self.nfe = self.guided_nfe = 0

        def loop(x_, kw_, max_steps=None):
            return self._loop(x_, model, kw_, table, max_steps)

        with torch.no_grad():
            if self.cuda_graph and self._graph_ok(x):
                out = GRAPH_CACHE.run(loop, x, model, model_kwargs, self.generator, self.graph_key(), owner=self)
            else:
                out = loop(x, model_kwargs)
        return out if in_dtype == x.dtype else [o.to(in_dtype) for o in out]

    def _graph_ok(self, x):
        if x.device.type != "cuda":
            warnings.warn("cuda_graph=True is ignored on a non-CUDA device", stacklevel=3)
            return False
        return True

    def _loop(self, x, model, kw, table, max_steps):
        raise NotImplementedError


def _check_finite(name, values):
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name}: non-finite sampler coefficient at grid index {bad[0]} (t at a singular end of "
                         "the path?); raise sample_eps or pick another diffusion form")


class _ODESampleFn(_SampleFn):
    """Fixed-step probability-flow ODE (euler, heun, midpoint, rk4) or a torchdiffeq solver."""

    def __init__(self, transport, t_start, t_end, num_steps, solver, atol, rtol, **kw):
        self.solver = solver
        self.num_steps = num_steps
        self.atol, self.rtol = atol, rtol
        grid = torch.linspace(t_start, t_end, num_steps, dtype=torch.float64)
        self.dt = float(grid[1] - grid[0]) if num_steps > 1 else 0.0
        times = grid
        if solver in ("midpoint", "rk4"):
            times = torch.cat([grid, grid[:-1] + self.dt / 2])  # rows S.. are the half steps
        super().__init__(transport, times.tolist(), **kw)
        self.adaptive = solver not in ODE_FIXED_METHODS
        if self.adaptive:
            self.torchdiffeq = _torchdiffeq(solver)
        a, b = transport.drift_coeffs(times)
        self.a, self.b = a.tolist(), b.tolist()
        _check_finite("ODE drift", self.a + self.b)
        self.grid = grid

    def graph_key(self):
        return super().graph_key() + (self.solver, self.num_steps, self.dt, tuple(self.a), tuple(self.b))

    def _graph_ok(self, x):
        if self.adaptive:
            warnings.warn(f"cuda_graph=True is ignored for the adaptive solver {self.solver!r}", stacklevel=3)
            return False
        return super()._graph_ok(x)

    def _drift(self, model, x, table, row, kw):
        return _lin(x, self.a[row], self._model_out(model, x, table[row], kw, self.times[row]), self.b[row])

    def _loop(self, x, model, kw, table, max_steps):
        kw = self._net_kwargs(kw, self.cfg)
        if self.adaptive:
            return self._adaptive(x, model, kw, table)
        s, dt = self.num_steps, self.dt
        traj = [x] if self.return_trajectory else None
        steps = s - 1 if max_steps is None else min(max_steps, s - 1)
        for k in range(steps):
            k1 = self._drift(model, x, table, k, kw)
            if self.solver == "euler":
                x = x + dt * k1
            elif self.solver == "heun":
                k2 = self._drift(model, x + dt * k1, table, k + 1, kw)
                x = x + (dt / 2) * (k1 + k2)
            elif self.solver == "midpoint":
                x = x + dt * self._drift(model, x + (dt / 2) * k1, table, s + k, kw)
            else:  # classic fourth-order Runge-Kutta
                k2 = self._drift(model, x + (dt / 2) * k1, table, s + k, kw)
                k3 = self._drift(model, x + (dt / 2) * k2, table, s + k, kw)
                k4 = self._drift(model, x + dt * k3, table, k + 1, kw)
                x = x + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            if traj is not None:
                traj.append(x)
        return traj if traj is not None else [x]

    def _adaptive(self, x, model, kw, table):
        n_net = table.shape[1]
        t_grid = self.grid.to(device=x.device, dtype=table.dtype)

        def f(t, x_):
            a, b = self.transport.drift_coeffs(t.reshape(1))
            t_host = float(t) if self.guidance_interval is not None else None  # the solver syncs anyway
            out = self._model_out(model, x_, t.reshape(1).expand(n_net).clone(), kw, t_host)
            return a.to(x_.dtype) * x_ + b.to(x_.dtype) * out

        traj = self.torchdiffeq.odeint(f, x, t_grid, method=self.solver, atol=self.atol, rtol=self.rtol,
                                       **_odeint_options(self.solver, t_grid))
        return list(traj) if self.return_trajectory else [traj[-1]]


# Log-SNR range used to space "logSNR" / "karras" grids when an end of the interval is at lambda = +-inf
# (t = 0 or t = 1 on the Linear / GVP paths): EDM's sigma / alpha range [0.002, 80].
DPM_LOG_SNR_RANGE = (-math.log(80.0), -math.log(0.002))


def _time_of_log_snr(path, lams, lo, hi, iters=100):
    """Times t in [lo, hi] with log(alpha_t / sigma_t) = lams (bisection in float64; lambda increases with t)."""
    lams = torch.tensor(lams, dtype=torch.float64)
    a = torch.full_like(lams, lo)
    b = torch.full_like(lams, hi)
    for _ in range(iters):
        m = (a + b) / 2
        lam_m = torch.log(path.alpha_t(m)) - torch.log(path.sigma_t(m))
        below = lam_m < lams
        a, b = torch.where(below, m, a), torch.where(below, b, m)
    return ((a + b) / 2).tolist()


def dpm_solver_grid(transport, t0, t1, num_steps, time_spacing="time_uniform", denoise_final=True):
    """Times of the SiT DPM-Solver++ grid: (times of the num_steps evaluations, alphas, sigmas of all points).

    The points run from t0 (noise) to t1 in the chosen spacing; if sigma(t1) > 0 and denoise_final, the
    num_steps evaluations span [t0, t1] and one more point at clean data (t = 1: alpha = 1, sigma = 0)
    ends the grid; otherwise num_steps + 1 points span [t0, t1] (for Linear/GVP velocity t1 = 1 is already
    clean data). "logSNR" / "karras" spacing is computed between the interval's log-SNRs clipped to
    DPM_LOG_SNR_RANGE, with the exact ends t0, t1 kept.
    """
    from dit_models.multistep import TIME_SPACINGS, spaced_log_snrs

    if time_spacing not in TIME_SPACINGS:
        raise ValueError(f"unknown time spacing {time_spacing!r}; choose one of {TIME_SPACINGS}")
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    path = transport.path

    def alpha_sigma(ts):
        t = torch.tensor(ts, dtype=torch.float64)
        al, si = path.alpha_t(t), path.sigma_t(t)
        si = torch.where(si < 1e-12, torch.zeros_like(si), si)  # GVP: cos(pi / 2) = 6e-17 is clean data
        return al.tolist(), si.tolist()

    clean_end = alpha_sigma([t1])[1][0] == 0
    extra = denoise_final and not clean_end
    n = num_steps + (0 if extra else 1)
    if n == 1:
        ts = [t0]
    elif time_spacing == "time_uniform":
        ts = torch.linspace(t0, t1, n, dtype=torch.float64).tolist()
    else:
        (a0, a1), (s0, s1) = alpha_sigma([t0, t1])
        lo, hi = DPM_LOG_SNR_RANGE
        lam0 = max(lo, math.log(a0) - math.log(s0)) if a0 > 0 else lo
        lam1 = min(hi, math.log(a1) - math.log(s1)) if s1 > 0 else hi
        ts = _time_of_log_snr(path, spaced_log_snrs(time_spacing, n, lam0, lam1), t0, t1)
        ts[0], ts[-1] = t0, t1
    alphas, sigmas = alpha_sigma(ts)
    if extra:
        alphas, sigmas = alphas + [1.0], sigmas + [0.0]
    return ts[:num_steps], alphas, sigmas


class _DPMSolverSampleFn(_SampleFn):
    """DPM-Solver++ multistep (dit_models/multistep.py) in the interpolant's own time: one evaluation per step.

    The data prediction E[x1 | x_t] = a x + b out comes from Transport.tweedie_coeffs (finite at t = 0 for
    velocity models), so every prediction type on every path works.
    """

    def __init__(self, transport, t0, t1, num_steps, order, time_spacing, denoise_final, third_order="taylor", **kw):
        self.third_order = third_order
        times, alphas, sigmas = dpm_solver_grid(transport, t0, t1, num_steps, time_spacing, denoise_final)
        super().__init__(transport, times, **kw)
        self.num_steps = num_steps
        self.solver, self.plan = self._make_plan(alphas, sigmas, order)
        a, b = transport.tweedie_coeffs(torch.tensor(times, dtype=torch.float64))
        self.a, self.b = a.tolist(), b.tolist()
        _check_finite("DPM-Solver data prediction", self.a + self.b)

    def _make_plan(self, alphas, sigmas, order):
        from dit_models.multistep import dpm_solver_plan

        name = f"dpm++{order}" + ("-reference" if order == 3 and self.third_order == "reference" else "")
        return name, dpm_solver_plan(alphas, sigmas, order, self.third_order)

    def graph_key(self):
        return super().graph_key() + (self.solver, self.num_steps, tuple(self.plan), tuple(self.a), tuple(self.b))

    def _loop(self, x, model, kw, table, max_steps):
        from dit_models.multistep import multistep_sample

        kw = self._net_kwargs(kw, self.cfg)
        traj = [x] if self.return_trajectory else None

        def data_prediction(x_, i):
            if traj is not None and i > 0:
                traj.append(x_)
            return _lin(x_, self.a[i], self._model_out(model, x_, table[i], kw, self.times[i]), self.b[i])

        x = multistep_sample(x, data_prediction, self.plan, max_steps)
        if traj is None:
            return [x]
        traj.append(x)
        return traj


class _UniPCSampleFn(_DPMSolverSampleFn):
    """UniPC (dit_models/multistep.py:unipc_plan) on the DPM-Solver++ grid and data prediction; the trajectory holds
    the predicted states, at which the network is evaluated."""

    def __init__(self, transport, t0, t1, num_steps, order, variant, time_spacing, denoise_final, lower_order_final,
                 **kw):
        self.variant, self.lower_order_final = variant, lower_order_final
        super().__init__(transport, t0, t1, num_steps, order, time_spacing, denoise_final, **kw)

    def _make_plan(self, alphas, sigmas, order):
        from dit_models.multistep import unipc_plan

        plan = unipc_plan(alphas, sigmas, order, self.variant, self.lower_order_final)
        return f"unipc{order}-{self.variant}" + ("" if self.lower_order_final else "-full"), plan


class _SDESampleFn(_SampleFn):
    """Euler-Maruyama or stochastic Heun on num_steps - 1 steps, then the last step (Mean, Tweedie, Euler)."""

    def __init__(self, transport, solver, form, norm, last_step, last_step_size, num_steps, t0, t1, **kw):
        self.solver = solver
        self.num_steps = num_steps
        self.last_step = last_step
        grid = torch.linspace(t0, t1, num_steps, dtype=torch.float64)
        super().__init__(transport, grid.tolist(), **kw)
        self.dt = dt = float(grid[1] - grid[0])
        diffusion = diffusion_coefficient(form, transport.path, grid, norm)
        _check_finite(f"diffusion form {form!r}", diffusion.tolist())
        a, b = transport.drift_coeffs(grid, diffusion)  # f = a x + b out at every grid time
        self.a, self.b = a.tolist(), b.tolist()
        # Euler-Maruyama: x_mean = (1 + a dt) x + b dt out, noise std sqrt(2 D dt) (the fused step's scalars).
        self.coef_x = (1 + a * dt).tolist()
        self.coef_out = (b * dt).tolist()
        self.noise_std = torch.sqrt(2 * diffusion * dt).tolist()
        _check_finite("SDE drift", self.a[:-1] + self.b[:-1] + (self.a[-1:] + self.b[-1:] if solver == "heun" else []))
        # Last step at t1 with size h (identity for None).
        t_last = grid[-1:]
        if last_step == "Mean":
            la, lb = transport.drift_coeffs(t_last, diffusion[-1:])
            la, lb = 1 + la * last_step_size, lb * last_step_size
        elif last_step == "Euler":
            la, lb = transport.drift_coeffs(t_last)
            la, lb = 1 + la * last_step_size, lb * last_step_size
        elif last_step == "Tweedie":
            la, lb = transport.tweedie_coeffs(t_last)
        else:
            la, lb = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self.last_coeffs = (float(la), float(lb))
        _check_finite(f"last step {last_step!r}", list(self.last_coeffs))

    def graph_key(self):
        return super().graph_key() + (self.solver, self.num_steps, self.last_step, self.dt, tuple(self.a),
                                      tuple(self.b), tuple(self.coef_x), tuple(self.coef_out), tuple(self.noise_std),
                                      self.last_coeffs)

    def _randn(self, x):
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def _em_step(self, model, x, table, k, kw, noise=None):
        """One Euler-Maruyama step from grid index k: one network evaluation, fused CFG + update."""
        out = self._forward(model, x, table[k], kw, self.times[k])  # (B or 2B, C_out, ...), any float dtype
        x_next, _ = sde_euler_maruyama_step(
            x, out, self.coef_x[k], self.coef_out[k], self.noise_std[k],
            cfg_scale=self.cfg_scale if out.shape[0] != x.shape[0] else 1.0, guided_channels=self.guided_channels,
            noise=noise, generator=self.generator)
        return x_next

    def _heun_step(self, model, x, table, k, kw, noise=None):
        """Stochastic Heun as in SiT: noise first, then a trapezoidal drift step (two evaluations)."""
        dt = self.dt
        x_hat = x + self.noise_std[k] * (self._randn(x) if noise is None else noise)
        k1 = _lin(x_hat, self.a[k], self._model_out(model, x_hat, table[k], kw, self.times[k]), self.b[k])
        x_p = x_hat + dt * k1
        k2 = _lin(x_p, self.a[k + 1], self._model_out(model, x_p, table[k + 1], kw, self.times[k + 1]), self.b[k + 1])
        return x_hat + (dt / 2) * (k1 + k2)

    def _last(self, model, x, table, kw):
        if self.last_step is None:
            return x
        la, lb = self.last_coeffs
        row = self.num_steps - 1
        return _lin(x, la, self._model_out(model, x, table[row], kw, self.times[row]), lb)

    def _use_step_graph(self):
        # One captured step replayed for every step: it cannot switch between the guided and conditional batch.
        return self.solver == "euler" and sde_euler_maruyama_step_table is not None and self.guidance_interval is None

    def __call__(self, x, model, **model_kwargs):
        if not (self.cuda_graph and self._use_step_graph() and self._graph_ok(x)):
            return super().__call__(x, model, **model_kwargs)
        in_dtype = x.dtype
        if x.element_size() < 4:
            x = x.float()
        model_kwargs, table = self._prepare(x, model, model_kwargs)
        self.nfe = self.guided_nfe = 0
        with torch.no_grad():
            out = self._em_step_graph_loop(x, model, self._net_kwargs(model_kwargs, self.cfg), table)
        return out if in_dtype == x.dtype else [o.to(in_dtype) for o in out]

    def _em_step_graph_loop(self, x, model, kw, table):
        """Euler-Maruyama with one captured step replayed; equals _loop (same kernels and noise stream)."""
        s = self.num_steps
        coeffs = torch.tensor([self.coef_x[:s - 1], self.coef_out[:s - 1], self.noise_std[:s - 1]],
                              dtype=torch.float64).t().contiguous().to(x.device)  # (S - 1, 3)
        step = torch.zeros(1, dtype=torch.int64, device=x.device)
        x_buf = x.clone()
        n_net = table.shape[1]

        def one_step():
            t_row = table.index_select(0, step).reshape(n_net)  # (N_net,), read on the device
            out = self._forward(model, x_buf, t_row, kw)
            x_next, _ = sde_euler_maruyama_step_table(
                x_buf, out, coeffs, step, cfg_scale=self.cfg_scale if self.cfg else 1.0,
                guided_channels=self.guided_channels, generator=self.generator)
            x_buf.copy_(x_next)
            step.add_(1)

        traj = [] if self.return_trajectory else None
        cuda_graph.warmup(one_step, x.device)  # a real step: step 0
        if traj is not None:
            traj.append(x_buf.clone())
        if s > 2:
            replay = cuda_graph.capture_replay(one_step, self.generator, x.device)
            for _ in range(s - 2):
                replay()
                if traj is not None:
                    traj.append(x_buf.clone())
            del replay
        x = self._last(model, x_buf.clone(), table, kw)
        if traj is None:
            return [x]
        traj.append(x)
        return traj

    def _loop(self, x, model, kw, table, max_steps):
        kw = self._net_kwargs(kw, self.cfg)
        step = self._em_step if self.solver == "euler" else self._heun_step
        traj = [] if self.return_trajectory else None
        steps = self.num_steps - 1 if max_steps is None else min(max_steps, self.num_steps - 1)
        for k in range(steps):
            x = step(model, x, table, k, kw)
            if traj is not None:
                traj.append(x)
        if max_steps is not None:
            return [x]
        x = self._last(model, x, table, kw)
        if traj is None:
            return [x]
        traj.append(x)
        return traj


class _LikelihoodFn(_SampleFn):
    """log p(x) by the instantaneous change of variables along the PF-ODE, data (t1) -> noise (t0)."""

    def __init__(self, transport, t0, t1, num_steps, solver, atol, rtol, generator=None):
        grid = torch.linspace(t1, t0, num_steps, dtype=torch.float64)  # backwards in time
        super().__init__(transport, grid.tolist(), generator=generator)
        self.solver, self.num_steps, self.atol, self.rtol = solver, num_steps, atol, rtol
        self.dt = float(grid[1] - grid[0])
        self.adaptive = solver not in ("euler", "heun")
        if self.adaptive:
            self.torchdiffeq = _torchdiffeq(solver)
        a, b = transport.drift_coeffs(grid)
        self.a, self.b = a.tolist(), b.tolist()
        _check_finite("likelihood drift", self.a + self.b)
        self.grid = grid

    def _v_div(self, model, x, t_row, a, b, probe, kw):
        """Velocity and Hutchinson divergence e^T (dv/dx) e from ONE forward and one backward."""
        self.nfe += 1
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            out = model(xr, t_row, **kw)[:, :x.shape[1]].to(x.dtype)
            v = a * xr + b * out
            if v.requires_grad:
                (g,) = torch.autograd.grad(v, xr, grad_outputs=probe, allow_unused=True)
            else:
                g = None
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if g is None else (g * probe).flatten(1).sum(1)
        return v.detach(), div.detach()

    def __call__(self, x, model, **model_kwargs):
        """x: (N, ...) data. Returns LikelihoodResult(logp (N,) nats, bpd (N,), z like x)."""
        if float(model_kwargs.get("cfg_scale", 1.0)) != 1.0:
            raise ValueError("the likelihood is only defined without guidance (cfg_scale must be 1)")
        if x.element_size() < 4:
            x = x.float()  # integrate fp16/bf16 data in fp32
        model_kwargs, table = self._prepare(x, model, model_kwargs)
        self.nfe = self.guided_nfe = 0
        # One Rademacher probe per solve (SiT redraws it at every function call).
        probe = torch.randint(0, 2, x.shape, generator=self.generator, device=x.device).to(x.dtype) * 2 - 1
        if self.adaptive:
            z, acc = self._adaptive(x, model, model_kwargs, table, probe)
        else:
            z, acc = self._fixed(x, model, model_kwargs, table, probe)
        d = x[0].numel()
        logp = self.transport.prior_logp(z) + acc  # acc = integral over t1 -> t0 of div v = -int_{t0}^{t1} div v dt
        return LikelihoodResult(logp, -logp / (d * math.log(2)), z)

    def _fixed(self, x, model, kw, table, probe):
        dt = self.dt
        acc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(self.num_steps - 1):
            v1, d1 = self._v_div(model, x, table[k], self.a[k], self.b[k], probe, kw)
            if self.solver == "euler":
                x, acc = x + dt * v1, acc + dt * d1
            else:
                v2, d2 = self._v_div(model, x + dt * v1, table[k + 1], self.a[k + 1], self.b[k + 1], probe, kw)
                x, acc = x + (dt / 2) * (v1 + v2), acc + (dt / 2) * (d1 + d2)
        return x, acc

    def _adaptive(self, x, model, kw, table, probe):
        n = table.shape[1]
        t_grid = self.grid[[0, -1]].to(device=x.device, dtype=table.dtype)

        def f(t, state):
            a, b = self.transport.drift_coeffs(t.reshape(1))
            v, div = self._v_div(model, state[0], t.reshape(1).expand(n).clone(), a.to(x.dtype), b.to(x.dtype),
                                 probe, kw)
            return v, div

        acc0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        xs, accs = self.torchdiffeq.odeint(f, (x, acc0), t_grid, method=self.solver, atol=self.atol, rtol=self.rtol,
                                           **_odeint_options(self.solver, t_grid))
        return xs[-1], accs[-1]


class Sampler:
    """Samplers for a Transport; each method returns a callable fn(x, model, **model_kwargs).

    Args:
        transport: a Transport from create_transport.
    """

    def __init__(self, transport):
        self.transport = transport

    def sample_ode(self, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False,
                   cuda_graph=False, return_trajectory=False, cfg_scale=1.0, guided_channels=None,
                   null_label=None, guidance_interval=None):
        """Probability-flow ODE sampler dx = v dt, noise (t0) -> data (t1), or data -> noise with reverse=True.

        Args:
            sampling_method: "euler", "heun" (alias "heun2"), "midpoint", "rk4" (built in, num_steps - 1
                steps on linspace(t0, t1, num_steps)); any other name (default "dopri5") goes to
                torchdiffeq.odeint, where num_steps is the number of output times.
            num_steps, atol, rtol: as in SiT (atol/rtol only for adaptive solvers).
            reverse: integrate t1 -> t0 (data to noise).
            cuda_graph: capture the fixed-step loop in a CUDA graph (see module docstring).
            return_trajectory: return all num_steps states (start included) instead of [final].
            cfg_scale, guided_channels, null_label: efficient guidance on a B-row state (module docstring).
            guidance_interval: (lo, hi) in t: guide only there, elsewhere the conditional B rows alone
                (dit_models/guidance_interval.py); None guides every call.
        Returns:
            fn(x, model, **model_kwargs) -> list of states (the last one is the sample).
        """
        solver = _ODE_ALIASES.get(sampling_method.lower(), sampling_method.lower())
        if num_steps < 2:
            raise ValueError("num_steps must be >= 2")
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                               sde=False, eval=True)
        start, end = (t1, t0) if reverse else (t0, t1)
        return _ODESampleFn(self.transport, start, end, num_steps, solver, atol, rtol, cfg_scale=cfg_scale,
                            guided_channels=guided_channels, null_label=null_label, cuda_graph=cuda_graph,
                            return_trajectory=return_trajectory, guidance_interval=guidance_interval)

    def sample_dpm_solver(self, num_steps=20, order=2, time_spacing="time_uniform", denoise_final=True,
                          cuda_graph=False, return_trajectory=False, cfg_scale=1.0, guided_channels=None,
                          null_label=None, third_order="taylor", guidance_interval=None):
        """DPM-Solver++ multistep (Lu et al. 2022) on the probability-flow ODE, noise (t0) -> data: ONE network
        evaluation per step (num_steps = NFE), for every path and prediction type.

        Exponential-integrator form in the path's log-SNR lambda = log(alpha_t / sigma_t) with the data
        prediction E[x1 | x_t] (dit_models/multistep.py); order 1 on the Linear path equals Euler on the same
        grid. Grid: dpm_solver_grid (t0, t1 from the transport's sampling interval, as sample_ode).

        Args:
            num_steps: network evaluations.
            order: 1, 2 (DPM-Solver++(2M), default) or 3 (3M).
            third_order: "taylor" or "reference" (diffusers' 3M; dit_models.multistep.dpm_solver_plan).
            time_spacing: "time_uniform" (SiT's own t, default), "logSNR" or "karras".
            denoise_final: when the interval ends before clean data (VP; score/noise models), finish with a
                first-order step to t = 1 (sigma = 0) instead of stopping at t1.
            cuda_graph, return_trajectory (the state before each step and the final one), cfg_scale,
                guided_channels, null_label, guidance_interval: as sample_ode.
        Returns:
            fn(x, model, **model_kwargs) -> list of states (the last one is the sample).
        """
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                               sde=False, eval=True)
        return _DPMSolverSampleFn(self.transport, t0, t1, num_steps, order, time_spacing, denoise_final, third_order,
                                  cfg_scale=cfg_scale, guided_channels=guided_channels, null_label=null_label,
                                  cuda_graph=cuda_graph, return_trajectory=return_trajectory,
                                  guidance_interval=guidance_interval)

    def sample_unipc(self, num_steps=20, order=2, variant="bh2", time_spacing="time_uniform", denoise_final=True,
                     lower_order_final=True, cuda_graph=False, return_trajectory=False, cfg_scale=1.0,
                     guided_channels=None, null_label=None, guidance_interval=None):
        """UniPC (Zhao et al. 2023) on the probability-flow ODE, noise (t0) -> data: ONE network evaluation per step
        (num_steps = NFE), for every path and prediction type; same grid and data prediction as sample_dpm_solver.

        Args:
            order: 1, 2 (default) or 3: UniPC-p (predictor order p, p + 1 with the corrector).
            variant: "bh1" or "bh2" (B(h) = h or 1 - e^-h).
            lower_order_final: lower the order on the last steps, as diffusers (dit_models/multistep.py:unipc_plan).
            num_steps, time_spacing, denoise_final, cuda_graph, return_trajectory (the states the network is
                evaluated at, then the final one), cfg_scale, guided_channels, null_label, guidance_interval: as
                sample_dpm_solver.
        Returns:
            fn(x, model, **model_kwargs) -> list of states (the last one is the sample).
        """
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                               sde=False, eval=True)
        return _UniPCSampleFn(self.transport, t0, t1, num_steps, order, variant, time_spacing, denoise_final,
                              lower_order_final, cfg_scale=cfg_scale, guided_channels=guided_channels,
                              null_label=null_label, cuda_graph=cuda_graph, return_trajectory=return_trajectory,
                              guidance_interval=guidance_interval)

    def sample_sde(self, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0, last_step="Mean",
                   last_step_size=0.04, num_steps=250, cuda_graph=False, return_trajectory=False, cfg_scale=1.0,
                   guided_channels=None, null_label=None, generator=None, guidance_interval=None):
        """Reverse-SDE sampler: dX = [v + D s] dt + sqrt(2 D) dW from t0 (noise) to t1, then a last step.

        Args:
            sampling_method: "Euler" (Euler-Maruyama, fused kernel, 1 evaluation per step) or "Heun"
                (2 evaluations per step).
            diffusion_form: "constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"
                (or the public misspelling "inccreasing-decreasing"); D = diffusion_norm * ... (diffusion_coefficient).
                SiT's CLI default, used for its reported SDE numbers, is "sigma".
            last_step: None, "Mean" (x + f h), "Tweedie" (E[x1 | x]) or "Euler" (x + v h), at t1 = 1 - h.
            last_step_size: h (ignored, set to 0, when last_step is None).
            num_steps: grid points on [t0, t1]; num_steps - 1 stochastic steps plus the last step.
            cuda_graph, return_trajectory, cfg_scale, guided_channels, null_label, guidance_interval: see
                module docstring and sample_ode.
            generator: torch.Generator on the state's device for the noise (default: the global one).
        Returns:
            fn(x, model, **model_kwargs) -> list of states (the last one is the sample).
        """
        solver = sampling_method.lower()
        if solver not in SDE_METHODS:
            raise ValueError(f"unknown SDE sampling_method {sampling_method!r}; choose 'Euler' or 'Heun'")
        form = _norm_form(diffusion_form)
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last_step {last_step!r}; choose one of {LAST_STEPS}")
        if num_steps < 2:
            raise ValueError("num_steps must be >= 2")
        if last_step is None:
            last_step_size = 0.0
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                               diffusion_form=form, sde=True, eval=True,
                                               last_step_size=last_step_size)
        return _SDESampleFn(self.transport, solver, form, diffusion_norm, last_step, last_step_size, num_steps,
                            t0, t1, cfg_scale=cfg_scale, guided_channels=guided_channels, null_label=null_label,
                            generator=generator, cuda_graph=cuda_graph, return_trajectory=return_trajectory,
                            guidance_interval=guidance_interval)

    def sample_ode_likelihood(self, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3,
                              generator=None):
        """Log-likelihood of data under the PF-ODE (instantaneous change of variables), Hutchinson trace with one
        probe per solve.

        Args:
            sampling_method: "euler" or "heun" (built in, num_steps grid points) or a torchdiffeq method
                (default "dopri5"; num_steps unused).
            generator: torch.Generator for the Rademacher probe.
        Returns:
            fn(x, model, **model_kwargs) -> LikelihoodResult(logp (N,) nats, bpd (N,) bits/dim, z).
        """
        solver = _ODE_ALIASES.get(sampling_method.lower(), sampling_method.lower())
        if num_steps < 2:
            raise ValueError("num_steps must be >= 2")
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps,
                                               sde=False, eval=True)
        return _LikelihoodFn(self.transport, t0, t1, num_steps, solver, atol, rtol, generator=generator)
