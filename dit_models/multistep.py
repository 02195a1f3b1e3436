"""Multistep exponential integrators (DPM-Solver++ 2M / 3M, UniPC) shared by DiT diffusion, SiT transport and EDM.

Written from Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (arXiv 2211.01095), Algorithm 2, and the exponential-integrator derivation of DPM-Solver (arXiv
2206.00927). The three processes of this package share one structure: the marginal at time t is
x_t = alpha_t * x_data + sigma_t * noise (DDPM: alpha = sqrt(abar), sigma = sqrt(1 - abar); SiT: the
path's alpha_t, sigma_t; EDM: alpha = 1, sigma = the noise level). With the log-SNR time
lambda = log(alpha / sigma) and the data prediction x_hat(x, t) = E[x_data | x_t = x], the probability-
flow ODE becomes
    d(x / sigma) / d lambda = e^lambda * x_hat,
so one step from lambda_i to lambda_{i+1} = lambda_i + h is exactly
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} * int_0^h e^(u - h) x_hat(lambda_i + u) du.
Expanding x_hat in a Taylor series around lambda_i and integrating term by term:
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} [phi_1 x_hat_i + phi_2 x_hat'_i + phi_3 x_hat''_i + ...]
    phi_1 = 1 - e^-h,   phi_2 = h - 1 + e^-h,   phi_3 = h^2 / 2 - h + 1 - e^-h.
The multistep solvers take the derivatives from the data predictions of earlier steps, so each step costs
ONE network evaluation:
  order 1: phi_1 only (= DDIM, = Euler in EDM's sigma, = Euler on SiT's Linear path);
  order 2: DPM-Solver++(2M) as in the paper: phi_2 x_hat' is replaced by phi_1 (h / 2) (x_hat_i -
           x_hat_{i-1}) / h_{i-1}, i.e. x_hat_i + (x_hat_i - x_hat_{i-1}) / (2 r) with r = h_{i-1} / h;
  order 3 (3M): x_hat' and x_hat'' from the quadratic through the last three data predictions (in lambda),
           with the exact phi_2, phi_3; a step longer than MAX_3M_STEP_RATIO times the previous one takes
           the 2M update instead. third_order="reference" gives instead the 3M of diffusers'
           DPMSolverMultistepScheduler and k-diffusion's sample_dpmpp_3m_sde (eta = 0): their x_hat'' term
           is phi_3 x_hat'' / 2, half the Taylor term, so that update is only second order; it has no
           step-ratio rule either. It exists to reproduce samples made with those libraries.
The first steps use the order the history allows; a step that ends at sigma = 0 (clean data, lambda = inf)
is first order (the multistep correction is unbounded there), as is a step from lambda = -inf (SiT's Linear
path at t = 0, where alpha = 0). Every coefficient is a host float computed once in float64, so the loop
does no host <-> device traffic and can be captured in a CUDA graph.

Grids are given as K + 1 points (alpha_i, sigma_i), noise end first: the network is evaluated at points
0..K-1 and step i goes from point i to point i + 1 (K evaluations for K steps).

UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
arXiv 2302.04867) uses the same integral with the derivative terms weighted through B(h) (unipc_plan): a
predictor UniP-p and a corrector UniC-p that uses the data prediction at the new point, the one the next
predictor needs, so it also costs one evaluation per step and raises the order to p + 1. Its plan has the same
form on the predicted states, with one more past prediction, and runs in the same loop (multistep_sample).
"""
import math

import numpy as np

__all__ = ["dpm_solver_plan", "unipc_plan", "multistep_sample", "log_snr", "karras_sigmas", "spaced_log_snrs",
           "SOLVER_ORDERS", "THIRD_ORDER_FORMS", "UNIPC_VARIANTS", "TIME_SPACINGS"]

SOLVER_ORDERS = (1, 2, 3)
# "taylor": the exact phi_3 term (third order); "reference": diffusers' / k-diffusion's 3M (second order).
THIRD_ORDER_FORMS = ("taylor", "reference")
# 3M falls back to the 2M update on a step more than this many times longer (in log-SNR) than the previous
# one. Such a step extrapolates the quadratic through the last three predictions far outside their span; on
# DiT's uniform-in-t grid the step to t = 0 is 4.7x the previous one, and 3M without this rule scored FD 212
# at 10 NFE (2M: 27) on the digits DiT (docs/results.md).
MAX_3M_STEP_RATIO = 2.0
# "time_uniform": equal steps in the process's own time (DDPM step number, SiT t; EDM has its own rho grid);
# "logSNR": equal steps in lambda (Lu et al.); "karras": rho = 7 spacing of sigma / alpha (Karras et al.).
TIME_SPACINGS = ("time_uniform", "logSNR", "karras")
UNIPC_VARIANTS = ("bh1", "bh2")  # B(h) = h or 1 - e^-h (Zhao et al. 2023)


def log_snr(alpha, sigma):
    """lambda = log(alpha / sigma) as a host float (-inf at alpha = 0, +inf at sigma = 0)."""
    if sigma == 0:
        return math.inf
    if alpha == 0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def _phis(h):
    """phi_1, phi_2, phi_3 of the step size h (h = inf gives 1, inf, inf); expm1 avoids cancellation."""
    if math.isinf(h):
        return 1.0, math.inf, math.inf
    em1 = math.expm1(-h)  # e^-h - 1
    return -em1, h + em1, h * h / 2 - h - em1


def _checked_grid(alphas, sigmas, order):
    """(alphas, sigmas, log-SNRs) as host floats after checking the order and the grid's shape and direction."""
    if order not in SOLVER_ORDERS:
        raise ValueError(f"solver order must be one of {SOLVER_ORDERS}, got {order}")
    alphas, sigmas = [float(a) for a in alphas], [float(s) for s in sigmas]
    if len(alphas) != len(sigmas) or len(alphas) < 2:
        raise ValueError("alphas and sigmas need the same length K + 1 >= 2")
    if any(s <= 0 for s in sigmas[:-1]) or sigmas[-1] < 0 or any(a < 0 for a in alphas):
        raise ValueError("need sigma_i > 0 before the last point, sigma_K >= 0 and alpha_i >= 0")
    lams = [log_snr(a, s) for a, s in zip(alphas, sigmas)]
    if any(l1 <= l0 for l0, l1 in zip(lams[:-1], lams[1:])):
        raise ValueError("the grid must run from noise to data (strictly increasing alpha / sigma)")
    return alphas, sigmas, lams


def dpm_solver_plan(alphas, sigmas, order=2, third_order="taylor"):
    """Per-step coefficients of DPM-Solver++ on a grid of K + 1 points.

    Args:
        alphas, sigmas: K + 1 host floats each, noise end first; sigma_i > 0 for i < K (sigma_K may be 0:
            clean data); alpha_0 may be 0 (pure noise).
        order: 1, 2 (DPM-Solver++(2M), the paper's update) or 3 (3M).
        third_order: the 3M update, "taylor" (default) or "reference" (diffusers / k-diffusion; module docstring).
    Returns:
        list of K tuples (c_x, (c_0, c_1, c_2)) meaning
        x_{i+1} = c_x * x_i + c_0 * x_hat_i + c_1 * x_hat_{i-1} + c_2 * x_hat_{i-2}.
    """
    alphas, sigmas, lams = _checked_grid(alphas, sigmas, order)
    if third_order not in THIRD_ORDER_FORMS:
        raise ValueError(f"third_order must be one of {THIRD_ORDER_FORMS}, got {third_order!r}")
    reference = third_order == "reference"
    plan = []
    for i in range(len(lams) - 1):
        h = lams[i + 1] - lams[i]
        a_next = alphas[i + 1]
        c_x = sigmas[i + 1] / sigmas[i]
        phi1, phi2, phi3 = _phis(h)
        # Usable order: history available and every step size involved finite.
        hs = [lams[i - j] - lams[i - j - 1] for j in range(min(order - 1, i))]  # h_{i-1}, h_{i-2}
        k = 1 if math.isinf(h) else 1 + len(hs)
        for j, hj in enumerate(hs):
            if math.isinf(hj):
                k = min(k, 1 + j)
        if k == 3 and not reference and h > MAX_3M_STEP_RATIO * hs[0]:
            k = 2  # the quadratic extrapolated far beyond its data amplifies their errors
        c = [a_next * phi1, 0.0, 0.0]
        if k == 2:
            # Paper's 2M: alpha phi_1 (h / 2) (x_hat_i - x_hat_{i-1}) / h_{i-1}.
            w = a_next * phi1 * h / (2 * hs[0])
            c[0] += w
            c[1] -= w
        elif k == 3:
            h0, h1 = hs
            # Quadratic through (lambda_{i-2}, lambda_{i-1}, lambda_i): x_hat' = d1 + h0 q, x_hat'' = 2 q,
            # d1 = (x_i - x_{i-1}) / h0, q = (d1 - d2) / (h0 + h1), d2 = (x_{i-1} - x_{i-2}) / h1.
            # The reference form weights x_hat'' by phi_3 / 2 instead of phi_3.
            A = a_next * phi2
            B = a_next * (phi2 * h0 + (1 if reference else 2) * phi3) / (h0 + h1)
            c[0] += (A + B) / h0
            c[1] -= (A + B) / h0 + B / h1
            c[2] += B / h1
        plan.append((c_x, tuple(c)))
    return plan


def _phi(k, z):
    """phi_k(z) = sum_n z^n / (n + k)! (phi_0 = e^z, phi_{k+1} = (phi_k - 1 / k!) / z), accurate near z = 0."""
    if abs(z) < 1:
        return sum(z ** n / math.factorial(n + k) for n in range(30))
    v = math.exp(z)
    for j in range(k):
        v = (v - 1 / math.factorial(j)) / z
    return v


def _unipc_update(lams, alpha_t, s, t, order, variant, corrector):
    """Weights {grid point: w} of the data predictions in one UniP-order update (corrector=False) or UniC-order
    update (corrector=True: the prediction at t joins with r = 1) from point s to point t; the x_s weight is
    sigma_t / sigma_s. See the UniPC notes above unipc_plan."""
    h = lams[t] - lams[s]
    cols = [s - k for k in range(1, order)] + ([t] if corrector else [])
    rs = [(lams[j] - lams[s]) / h for j in cols]
    if len(cols) == 1:
        rhos = [0.5]  # UniP-2 and UniC-1: the paper's (and diffusers') fixed a_1 = 1/2
    elif cols:
        # sum_k rho_k r_k^(j-1) = j! phi_{j+1}(-h) / (1 | phi_1(-h)) for j = 1..n (B(h) = h | 1 - e^-h).
        scale = 1.0 if variant == "bh1" else _phi(1, -h)
        b = [math.factorial(j) * _phi(j + 1, -h) / scale for j in range(1, len(cols) + 1)]
        rhos = np.linalg.solve(np.array([[r ** (j - 1) for r in rs] for j in range(1, len(cols) + 1)]), b).tolist()
    else:
        rhos = []
    phi1 = -math.expm1(-h)  # 1 - e^-h (1 at h = inf)
    g = h if variant == "bh1" else phi1  # B(h)
    w = {s: alpha_t * phi1}
    for j, r, rho in zip(cols, rs, rhos):  # alpha_t B(h) rho_k (x_hat_k - x_hat_s) / r_k
        c = alpha_t * g * rho / r
        w[j] = w.get(j, 0.0) + c
        w[s] -= c
    return w


def unipc_plan(alphas, sigmas, order=2, variant="bh2", lower_order_final=True, corrector=True):
    """Per-step coefficients of UniPC (Zhao et al. 2023, data-prediction UniPC-p with B(h) = bh1 or bh2).

    UniP-p, the predictor from point i to i + 1 (h = lambda_{i+1} - lambda_i, r_k = (lambda_{i-k} - lambda_i) / h):
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i^c + alpha_{i+1} [(1 - e^-h) x_hat_i
                  + B(h) sum_{k=1}^{p-1} rho_k (x_hat_{i-k} - x_hat_i) / r_k],
    B(h) = h ("bh1") or 1 - e^-h ("bh2"), rho = 1/2 for p = 2, else the solution of
    sum_k rho_k r_k^(j-1) = j! phi_{j+1}(-h) / (B(h) / h), j = 1..p-1. UniC-p, the corrector at point i + 1,
    repeats the update from x_i^c with the new prediction x_hat_{i+1} (r = 1) as one more column and j = 1..p
    (rho = 1/2 for p = 1), and raises the order to p + 1. x_hat_{i+1} is evaluated at the PREDICTED x_{i+1} and is
    the one the next predictor uses: one network evaluation per step. Both updates start from x_i^c with the same
    sigma ratio, so x_{i+1}^c = x_{i+1} + sum_j (corrector - predictor weights) x_hat_j, and the whole step folds
    into the multistep form on the predicted states (those the network sees):
        x_{i+1} = c_x x_i + sum_j c_j x_hat_{i-j},   c_j = predictor_j + c_x (corrector_i - predictor_{i-1})_j.
    There is no corrector after the last step (no evaluation there). Step i uses order
    p_i = min(order, i + 1, K - i with lower_order_final); steps with h = inf (from alpha = 0 or to sigma = 0) are
    first order and not corrected, and history points at lambda = -inf are not used. These are the conventions
    of diffusers' UniPCMultistepScheduler(predict_x0=True, solver_type=variant, disable_corrector=[]).

    Args:
        alphas, sigmas: K + 1 host floats each, as dpm_solver_plan.
        order: 1, 2 or 3 (UniPC-p; with the corrector the global order is p + 1, without it p).
        variant: "bh1" or "bh2".
        lower_order_final: lower the order on the last steps (min(order, K - i)), as diffusers; this makes the
            last step first order, which caps the global order at 2 (harmless when it is the step to sigma = 0).
        corrector: apply UniC (False: UniP only).
    Returns:
        list of K tuples (c_x, (c_0, ..., c_{n-1})) for multistep_sample (n = 2 for order 1, else order + 1).
    """
    alphas, sigmas, lams = _checked_grid(alphas, sigmas, order)
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"UniPC variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
    K = len(lams) - 1
    orders = []
    for i in range(K):
        p = min(order, i + 1, K - i) if lower_order_final else min(order, i + 1)
        if math.isinf(lams[i + 1] - lams[i]):
            p = 1
        while p > 1 and math.isinf(lams[i - p + 1]):
            p -= 1
        orders.append(p)
    width = min(K, max(2 if corrector else 1, order + (1 if corrector else 0)))
    plan, prev = [], None
    for i in range(K):
        c_x = sigmas[i + 1] / sigmas[i]
        pred = _unipc_update(lams, alphas[i + 1], i, i + 1, orders[i], variant, False)
        w = dict(pred)
        if corrector and i > 0 and not math.isinf(lams[i] - lams[i - 1]):
            corr = _unipc_update(lams, alphas[i], i - 1, i, orders[i - 1], variant, True)
            for j in set(corr) | set(prev):
                w[j] = w.get(j, 0.0) + c_x * (corr.get(j, 0.0) - prev.get(j, 0.0))
        prev = pred
        plan.append((c_x, tuple(w.get(i - j, 0.0) for j in range(width))))
    return plan


def multistep_sample(x, data_prediction, plan, max_steps=None, progress=None):
    """Run a plan from dpm_solver_plan or unipc_plan: x_{i+1} = c_x x_i + sum_j c_j x_hat_{i-j}.

    Args:
        x: initial state (any shape; the update is elementwise).
        data_prediction: callable (x, i) -> x_hat at grid point i (one network evaluation), like x.
        plan: list of (c_x, (c_0, c_1, ...)) host floats (the history kept is as long as the tuple).
        max_steps: stop after this many steps (CUDA-graph warm-up).
        progress: optional wrapper of the step iterator (e.g. tqdm).
    Returns the state after the last step.
    """
    history = []  # newest first
    steps = plan if max_steps is None else plan[:max_steps]
    steps = list(enumerate(steps))
    for i, (c_x, cs) in (steps if progress is None else progress(steps)):
        history.insert(0, data_prediction(x, i))
        del history[len(cs):]
        out = history[0] * cs[0] if c_x == 0 else (history[0] * cs[0]).add_(x, alpha=c_x)
        for c, d in zip(cs[1:], history[1:]):
            if c != 0:
                out.add_(d, alpha=c)
        x = out
    return x


def spaced_log_snrs(spacing, n, lam_min, lam_max, rho=7.0):
    """n increasing log-SNRs from lam_min to lam_max (finite): "logSNR" uniform, "karras" rho-spaced in e^-lambda."""
    if n == 1:
        return [float(lam_min)]
    if spacing == "logSNR":
        return [lam_min + i / (n - 1) * (lam_max - lam_min) for i in range(n)]
    if spacing == "karras":
        return [-math.log(s) for s in karras_sigmas(n, math.exp(-lam_max), math.exp(-lam_min), rho)]
    raise ValueError(f"unknown time spacing {spacing!r}; choose one of {TIME_SPACINGS}")


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """n noise levels (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, host floats."""
    if n == 1:
        return [float(sigma_max)]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)]
