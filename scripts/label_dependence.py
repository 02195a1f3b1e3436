"""How much does a trained digits model use its class label? (docs/results.md, "Why ...")

For held-in digits x with label y, noise them to a few signal-to-noise ratios, let the EMA model predict
the clean image with the true label, a wrong label ((y + 3) mod 10) and the null label, and print the
mean squared error of each prediction. A model that uses the label is clearly better with the true
one at low SNR, where the class is decided during sampling.

Supports DiT/DDPM (eps prediction: x = (x_t - sqrt(1 - abar) eps) / sqrt(abar)) and SiT with velocity
prediction on any path (x = (sigma' x_t - sigma u) / (alpha sigma' - sigma alpha')).

    PYTHONPATH=. python scripts/label_dependence.py results/000-ddpm-DiT-S-2/checkpoints/0000800.pt
"""
import argparse

import torch

from dit_models.data import digits_dataset
from dit_models.generation import load_model_for_sampling

# abar = SNR / (1 + SNR) of the rows (DDPM cosine-schedule levels at t = 100, 300, 500, 700, 900)
ABARS = (0.9716, 0.7856, 0.4923, 0.2019, 0.0236)


def _time_with_snr(path, snr, iters=60):
    """t on the SiT path with alpha_t^2 / sigma_t^2 = snr (bisection; the ratio grows from noise to data)."""
    lo, hi = 1e-6, 1 - 1e-6
    for _ in range(iters):
        mid = torch.tensor((lo + hi) / 2, dtype=torch.float64)
        ratio = (path.alpha_t(mid) / path.sigma_t(mid)) ** 2
        lo, hi = (mid.item(), hi) if ratio < snr else (lo, mid.item())
    return (lo + hi) / 2


def _ddpm_prediction(args, model, x, abar, y, noise):
    n, c = x.shape[:2]
    from dit_models.diffusion import create_diffusion

    diffusion = create_diffusion("", noise_schedule=args.get("noise_schedule", "linear"), learn_sigma=True,
                                 diffusion_steps=args.get("diffusion_steps", 1000))
    t = int((torch.from_numpy(diffusion.alphas_cumprod) - abar).abs().argmin())
    ab = float(diffusion.alphas_cumprod[t])
    xt = ab ** 0.5 * x + (1 - ab) ** 0.5 * noise
    eps = model(xt, torch.full((n,), t), y)[:, :c]
    return (xt - (1 - ab) ** 0.5 * eps) / ab ** 0.5


def _sit_prediction(args, model, x, abar, y, noise):
    n, c = x.shape[:2]
    if args.get("prediction", "velocity") != "velocity":
        raise SystemExit("SiT: only velocity prediction is supported here")
    from dit_models.transport import create_transport

    path = create_transport(args.get("path_type", "Linear"), "velocity").path_sampler
    t = torch.tensor(_time_with_snr(path, abar / (1 - abar)), dtype=torch.float64)
    a, s, da, ds = (float(f(t)) for f in (path.alpha_t, path.sigma_t, path.d_alpha_t, path.d_sigma_t))
    xt = a * x + s * noise
    u = model(xt, torch.full((n,), float(t)), y)[:, :c]
    return (ds * xt - s * u) / (a * ds - s * da)


PREDICTIONS = {"ddpm": _ddpm_prediction, "sit": _sit_prediction}


def clean_prediction(method, args, model, x, abar, y, noise):
    """The model's prediction of x given label y at this abar (the noisy input is built inside)."""
    if method not in PREDICTIONS:
        raise SystemExit(f"method {method!r} is not supported here ({', '.join(PREDICTIONS)})")
    return PREDICTIONS[method](args, model, x, abar, y, noise)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model, method, args = load_model_for_sampling(a.ckpt)
    data = digits_dataset("train")
    xs, ys = zip(*[data[i] for i in range(a.num_images)])
    x, y = torch.stack(xs), torch.tensor(ys)  # (N, 1, 16, 16), (N,)
    labels = {"true": y, "wrong": (y + 3) % 10, "null": torch.full_like(y, model.num_classes)}
    gen = torch.Generator().manual_seed(a.seed)
    print(f"{method} {a.ckpt}\n| abar | " + " | ".join(f"MSE {k} label" for k in labels) + " |")
    print("|---|" + "---|" * len(labels))
    with torch.no_grad():
        for abar in ABARS:
            noise = torch.randn(x.shape, generator=gen)
            mse = [((clean_prediction(method, args, model, x, abar, lab, noise) - x) ** 2).mean().item()
                   for lab in labels.values()]
            print(f"| {abar:.4f} | " + " | ".join(f"{m:.4f}" for m in mse) + " |")


if __name__ == "__main__":
    main()
