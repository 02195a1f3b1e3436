"""Small training utilities: logging, EMA, atomic checkpoints, distributed setup, seeding, plots and grids."""
import datetime
import logging
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------------------
#                                             Distributed
# ---------------------------------------------------------------------------------------------------------

def setup_distributed(device_arg="auto", timeout_s=None):
    """Initialises torch.distributed when launched by torchrun (WORLD_SIZE > 1).

    Returns (rank, world_size, local_rank, device). The device is the *local* GPU (LOCAL_RANK), which also
    works across nodes (the reference DiT used the global rank, which breaks on more than one node). Backend: nccl on
    CUDA, gloo on CPU so a 2-process run works on a laptop. timeout_s bounds every collective: when a rank
    dies, the others raise within it instead of waiting forever (None: torch's default, 10 minutes for
    nccl and 30 for gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        device = torch.device("cuda", local_rank if device_arg == "cuda" else torch.device(device_arg).index)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, **kwargs)
    return rank, world, local_rank, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_mean(t):
    """Mean of a tensor over ranks (returns t unchanged when not distributed)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def unwrap(model):
    """The bare module under DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------------------
#                                              Seeding
# ---------------------------------------------------------------------------------------------------------

def derive_seed(*parts):
    """A 63-bit seed from integers (e.g. (seed, rank, step)); stable across platforms and Python versions."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts] + [len(parts)])
    lo, hi = (int(v) for v in ss.generate_state(2, dtype=np.uint32))
    return (lo | (hi << 32)) & ((1 << 63) - 1)


def seed_everything(seed):
    """Seeds torch (CPU + all GPUs), numpy and random from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def get_rng_states():
    """The torch, numpy, Python (and CUDA) generator states, as tensors and plain Python values only, so
    that a checkpoint holding them loads with torch.load's default weights_only=True."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    if not states:
        return
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple with a numpy array in checkpoints written before 2026-12-03
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------------------------------
#                                                EMA
# ---------------------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a model's trainable parameters, updated with multi-tensor ops.

    ema <- decay * ema + (1 - decay) * param, as torch._foreach_mul_ + torch._foreach_add_ (same arithmetic
    as the reference per-parameter loop, no Python loop over tensors). Frozen parameters (the fixed pos-embed)
    are skipped: they never change, so their EMA copy stays exactly equal to the model's. Buffers are copied.
    """

    def __init__(self, model, ema_model):
        src = dict(model.named_parameters())
        names = [n for n, p in ema_model.named_parameters() if n in src and src[n].requires_grad]
        self.ema_params = [dict(ema_model.named_parameters())[n] for n in names]
        self.params = [src[n] for n in names]
        self.ema_buffers = list(ema_model.buffers())
        self.buffers = list(model.buffers())

    @torch.no_grad()
    def update(self, decay):
        if self.params:
            torch._foreach_mul_(self.ema_params, decay)
            torch._foreach_add_(self.ema_params, self.params, alpha=1.0 - decay)
        for b_ema, b in zip(self.ema_buffers, self.buffers):
            b_ema.copy_(b)


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """One-shot functional form of EMA.update (builds the tensor lists each call)."""
    EMA(model, ema_model).update(decay)


def requires_grad(model, flag=True):
    for p in model.parameters():
        p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------------
#                                          Logging and checkpoints
# ---------------------------------------------------------------------------------------------------------

def create_logger(logging_dir=None, rank=0, name="dit_models"):
    """Rank 0 logs to stdout and <logging_dir>/log.txt; other ranks get a silent logger."""
    logger = logging.getLogger(f"{name}.{rank}.{logging_dir}")
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        logger.addHandler(h)
        if logging_dir is not None:
            fh = logging.FileHandler(os.path.join(logging_dir, "log.txt"))
            fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
            logger.addHandler(fh)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.ERROR)
    return logger


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, flushed to disk, then os.replace: a killed process or a
    crashed machine never leaves a torn file under the final name (a killed one may leave `<path>.tmp.<pid>`,
    which remove_stale_temp_files clears)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # the rename itself is durable once the folder is synced
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(folder):
    """Remove the `*.pt.tmp.<pid>` files a killed save_atomic left; returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(f for f in os.listdir(folder) if ".pt.tmp." in f)
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


def checkpoint_files(run_dir):
    """The NNNNNNN.pt files of a run folder (or its checkpoints/ sub-folder), newest first."""
    for d in (os.path.join(run_dir, "checkpoints"), run_dir):
        if os.path.isdir(d):
            files = sorted((f for f in os.listdir(d) if f.endswith(".pt") and f[:-3].isdigit()), reverse=True)
            if files:
                return [os.path.join(d, f) for f in files]
    return []


def newest_complete_checkpoint(run_dir, log=None):
    """(path, checkpoint) of the newest checkpoint of a run folder that loads as a resumable training
    checkpoint, skipping torn or corrupt ones (each named through `log`). FileNotFoundError when none loads."""
    from dit_models.checkpoint import CheckpointReadError

    skipped = []
    for path in checkpoint_files(run_dir):
        try:
            return path, load_training_checkpoint(path)
        except (CheckpointReadError, ValueError) as e:
            skipped.append(path)
            if log is not None:
                log(f"skipping {path}: {str(e).splitlines()[0]}")
    more = f" ({len(skipped)} unreadable: {', '.join(os.path.basename(p) for p in skipped)})" if skipped else ""
    raise FileNotFoundError(f"no complete checkpoint in {run_dir!r}{more}")


def nonfinite_step(loss, parameters):
    """True when the loss or any gradient holds a NaN or inf: the step must not reach the optimizer or the EMA.

    One host read per call (the flag), agreed across ranks with a max all-reduce so that every rank skips
    the same steps. The gradient test is the finiteness of the per-tensor norms (a NaN or inf anywhere
    makes its tensor's norm non-finite), one fused foreach kernel instead of one check per tensor.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    bad = ~torch.isfinite(loss.detach()).all()
    if grads:
        bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    bad = bad.float().reshape(1)
    if is_distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


class StopSignals:
    """Turns SIGTERM / SIGUSR1 (what cluster schedulers send before preempting a job) into a request to stop
    at the next step boundary: the training loop saves a checkpoint there and exits 0.

        with StopSignals() as stop:
            for step in ...:
                ...
                if stop.requested():
                    save; break

    requested() agrees across ranks (a max all-reduce, one tiny collective per call when distributed), so
    every rank stops at the same step even when the signal reaches them at different times.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self, device="cpu"):
        self.received = None  # the signal's name, once one arrived
        self._device = device
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return False

    def requested(self):
        flag = self.received is not None
        if is_distributed():
            t = torch.tensor([1.0 if flag else 0.0], device=self._device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.received is None:
                self.received = "another rank's signal"
        return flag


def latest_checkpoint(path):
    """A checkpoint file, or the newest NNNNNNN.pt in a run folder or its checkpoints/ sub-folder."""
    if os.path.isfile(path):
        return path
    files = checkpoint_files(path)
    if files:
        return files[0]
    raise FileNotFoundError(f"no checkpoint found at {path!r}")


def load_training_checkpoint(path):
    """Loads one of our training checkpoints on the CPU (map_location='cpu' avoids GPU OOM on resume)."""
    from dit_models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    missing = {"model", "ema", "opt", "step"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise ValueError(f"{path!r} is not a resumable training checkpoint (missing {sorted(missing)}); "
                         "released weights can be sampled from but not resumed")
    return ckpt


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class Timer:
    """Wall time between marks, with a device sync so GPU work is counted."""

    def __init__(self, device):
        self.device = device
        self.t = time.time()

    def lap(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.time()
        dt, self.t = now - self.t, now
        return dt


# ---------------------------------------------------------------------------------------------------------
#                                          Images and plots
# ---------------------------------------------------------------------------------------------------------

def to_uint8(x, parity=False):
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C). parity=True truncates like the reference sample_ddp."""
    if parity:
        y = torch.clamp(127.5 * x + 128.0, 0, 255)
    else:
        y = torch.clamp((x + 1) * 127.5 + 0.5, 0, 255)
    return y.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images, nrow=8, padding=2, pad_value=255):
    """uint8 (N, H, W, C) -> one uint8 (H', W', C) grid image."""
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + k * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = images[i]
    return grid


def column_labels(labels, ncol):
    """The class of each grid column when every column holds one class (the layout of our sample grids),
    else None."""
    if labels is None:
        return None
    labels = [int(v) for v in labels]
    ncol = min(ncol, len(labels))
    cols = [labels[k::ncol] for k in range(ncol)]
    return [c[0] for c in cols] if all(len(set(c)) == 1 for c in cols) else None


def _add_column_header(grid, names, cell_w, padding=2):
    """Adds a white strip above the grid with one name centred over each column (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    header = 14
    img = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    img.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(img)
    for k, name in enumerate(names):
        text = str(name)
        x0 = padding + k * (cell_w + padding)
        width = draw.textlength(text)
        draw.text((x0 + max(0, (cell_w - width) / 2), 1), text, fill="black")
    return np.asarray(img)


def save_image_grid(x, path, nrow=8, upscale=None, labels=None, class_names=None):
    """Saves samples (N, C, H, W) in [-1, 1] as a PNG grid (PIL, else matplotlib); returns path or None.

    labels: the (N,) class of each sample; when every grid column holds one class, a header row names it
    (class_names[label] if given, else the label number). Needs PIL.
    """
    imgs = to_uint8(x.float())
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    if upscale is None:  # small images (digits) are upscaled so the grid is readable
        upscale = max(1, 64 // imgs.shape[1])
    if upscale > 1:
        imgs = imgs.repeat(upscale, axis=1).repeat(upscale, axis=2)
    grid = make_grid(imgs, nrow=nrow)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        from PIL import Image

        header = column_labels(labels, nrow)
        if header is not None:
            names = [class_names[c] if class_names else c for c in header]
            grid = _add_column_header(grid, names, imgs.shape[2])
        Image.fromarray(grid).save(path)
        return path
    except ImportError:
        pass
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(path, grid)
        return path
    except ImportError:
        return None


def plot_loss_curve(steps, losses, path, step_losses=None, title="training loss"):
    """Loss-curve PNG (matplotlib, optional; None without it): the per-step losses of rank 0 (thin; they make
    a short run's curve visible) and the interval means over ranks at each log step (points joined)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    step_losses = list(step_losses or [])
    if not steps and not step_losses:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    first = steps[-1] - len(step_losses) + 1 if steps else 1  # a resumed run's step_loss may start late
    if step_losses:
        ax.plot(range(first, first + len(step_losses)), step_losses, lw=0.6, alpha=0.45, label="every step (rank 0)")
    if steps:
        ax.plot(steps, losses, "o-" if len(steps) < 30 else "-", lw=1.4, ms=3, label="mean over log interval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    values = [v for v in list(losses) + step_losses if v == v]
    if values and min(values) > 0 and max(values) / max(min(values), 1e-12) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
