"""Digits metrics for class-conditional samples: class accuracy and a Frechet distance in a small
classifier's feature space (see dit_models.evaluate for what they mean). Below the tools that report them.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_VERSION = 1


class DigitsClassifier(nn.Module):
    """Conv net for 1-channel digits (16x16 or 32x32) -> 10 logits; `features` gives the 64-d embedding."""

    def __init__(self, size=16, num_classes=10, feat_dim=64):
        super().__init__()
        self.size = size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),   # size/2
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),   # size/4
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x):
        return self.fc(self.conv(x))  # (N, feat_dim)

    def forward(self, x):
        return self.head(self.features(x))


def cache_dir():
    return os.environ.get("DIT_MODELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dit_models"))


@torch.enable_grad()
def train_classifier(size=16, epochs=20, seed=0, verbose=True):
    """Trains the classifier on the digits training split (random 1-pixel shifts as augmentation)."""
    from dit_models.data import digits_dataset

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tr, te = digits_dataset("train", size), digits_dataset("test", size)
    net = DigitsClassifier(size)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = tr.images, tr.labels
    shift = max(1, size // 16)
    for ep in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            xb = x[idx]
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(te.images).argmax(1) == te.labels).float().mean().item()
    if verbose:
        print(f"digits classifier ({size}x{size}): held-out accuracy {acc:.4f}", flush=True)
    return net, acc


def get_classifier(size=16, path=None, verbose=True):
    """Loads the cached classifier (training and caching it on first use). Returns (net, held-out accuracy)."""
    path = path or os.path.join(cache_dir(), f"digits{size}_classifier_v{CLASSIFIER_VERSION}.pt")
    if os.path.exists(path):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitsClassifier(size)
            net.load_state_dict(ck["state_dict"])
            return net.eval(), float(ck["test_accuracy"])
        except Exception as e:  # corrupt cache: retrain
            print(f"warning: ignoring unreadable classifier cache {path}: {e}", file=sys.stderr)
    net, acc = train_classifier(size, verbose=verbose)
    from dit_models.utils import save_atomic

    try:
        save_atomic({"state_dict": net.state_dict(), "test_accuracy": torch.tensor(acc)}, path)
    except OSError as e:
        print(f"warning: cannot cache the classifier at {path}: {e}", file=sys.stderr)
    return net, acc


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64 with symmetric eigh."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@torch.no_grad()
def _features(net, x, bs=512):
    feats, preds = [], []
    for i in range(0, len(x), bs):
        xb = x[i : i + bs].float()
        f = net.features(xb)
        feats.append(f)
        preds.append(net.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def _to_model_space(samples, size):
    """Accepts (N, C, H, W) float in [-1, 1] or uint8 (N, H, W, C); returns (N, 1, size, size) float in [-1, 1]."""
    x = torch.as_tensor(samples)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.float().clamp(-1, 1)
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def score_samples(samples, labels, size=16, classifier=None):
    """Accuracy and Frechet distance of conditional samples against the held-out digits. Returns a dict."""
    from dit_models.data import digits_dataset

    net, test_acc = classifier or get_classifier(size)
    x = _to_model_space(samples, size)
    labels = torch.as_tensor(labels).long().cpu()
    f_gen, pred = _features(net, x)
    real_tr, real_te = digits_dataset("train", size), digits_dataset("test", size)
    f_te, _ = _features(net, real_te.images)
    f_tr, _ = _features(net, real_tr.images)
    return {
        "num_samples": int(len(labels)),
        "accuracy": float((pred == labels).float().mean()),
        "fd": frechet_distance(f_gen, f_te),
        "fd_real": frechet_distance(f_tr, f_te),
        "classifier_test_accuracy": float(test_acc),
        "per_class_accuracy": [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else None
                               for c in range(10)],
    }


@torch.no_grad()
def evaluate_model(method, model, num_samples=500, cfg_scale=1.0, method_args=None, seed=0, size=16,
                   sampler_opts=None, batch_size=100, device=None, progress=False):
    """Samples balanced labels (i % 10) from `model` and scores them; '_samples' holds the images."""
    from dit_models.generation import generate, sampler_defaults, sampler_nfe
    from dit_models.methods import get_method

    device = device or next(model.parameters()).device
    labels = (torch.arange(num_samples) % 10).long().to(device)
    opts = sampler_defaults(method)
    opts.update(sampler_opts or {})
    gen = torch.Generator().manual_seed(seed + 777)
    t0 = time.time()
    counts = {}
    x = generate(method, model, labels, opts, cfg_scale=cfg_scale, generator=gen, method_args=method_args,
                 batch_size=batch_size, progress=progress, stats=counts)
    seconds = time.time() - t0
    res = score_samples(x.cpu(), labels.cpu(), size)
    # guided_nfe: of the nfe evaluations, those on the 2B guided batch (fewer with a guidance interval)
    res.update(cfg_scale=cfg_scale, sampler=get_method(method).sampler_settings(opts), nfe=sampler_nfe(method, opts),
               guided_nfe=counts.get("guided_nfe"), sampling_seconds=seconds, seed=seed)
    res["_samples"] = x.cpu()
    return res


# The digits report: what the quickstart prints and `python -m dit_models.evaluate` computes by default.
# Each number at the guidance where it means something: the Frechet distance measures closeness to the
# data, which guidance trades away for class adherence (on the quickstart SiT: FD 10 at cfg 1, 78 at
# cfg 3), so it is taken at cfg 1; class accuracy measures adherence, which saturates near cfg 3.
REPORT_NUM_SAMPLES = 2000  # FD is biased upwards at small N: 1000 samples read about 0.7 higher
FIDELITY_CFG = 1.0
ADHERENCE_CFG = 3.0


def digits_report(method, model, method_args=None, num_samples=REPORT_NUM_SAMPLES, sampler_opts=None, seed=0,
                  size=16, fidelity_cfg=FIDELITY_CFG, adherence_cfg=ADHERENCE_CFG, progress=False):
    """{fd (at fidelity_cfg), accuracy (at adherence_cfg), fd_real, nfe, sampling_seconds, sampler, fidelity: {...},
    adherence: {...}, _samples: the adherence samples}."""
    kw = dict(method_args=method_args, seed=seed, size=size, sampler_opts=sampler_opts, progress=progress)
    fidelity = evaluate_model(method, model, num_samples, fidelity_cfg, **kw)
    adherence = evaluate_model(method, model, num_samples, adherence_cfg, **kw)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("_") and k != "sampler"}  # noqa: E731
    return {
        "num_samples": num_samples,
        "fd": fidelity["fd"], "fd_cfg_scale": fidelity_cfg,
        "accuracy": adherence["accuracy"], "accuracy_cfg_scale": adherence_cfg,
        "fd_real": fidelity["fd_real"],
        "nfe": fidelity["nfe"],
        "sampling_seconds": fidelity["sampling_seconds"] + adherence["sampling_seconds"],
        "sampler": fidelity["sampler"],
        "fidelity": strip(fidelity), "adherence": strip(adherence),
        "_samples": adherence["_samples"], "_labels": (torch.arange(num_samples) % 10).tolist(),
    }


def format_report(r):
    """One line for logs and the quickstart summary."""
    nfe = f"{r['nfe']} NFE" if r.get("nfe") else "adaptive NFE"
    return (f"Frechet distance {r['fd']:.1f} at cfg {r['fd_cfg_scale']:g} (real digits: {r['fd_real']:.1f}), "
            f"class accuracy {r['accuracy']:.3f} at cfg {r['accuracy_cfg_scale']:g}; {r['num_samples']} samples each, "
            f"{r['sampler']['sampler']} sampler, {nfe}, {r['sampling_seconds']:.0f}s of sampling")
