"""Generate many samples in parallel (torchrun) and pack them into an .npz for FID-style evaluation.

    torchrun --nproc_per_node 8 -m dit_models.sample_ddp --ckpt DiT-XL-2-256x256.pt --method ddpm --vae ema \
        --cfg-scale 1.5 --guided-channels 3 --num-fid-samples 50000 --per-proc-batch-size 32
    python -m dit_models.sample_ddp --ckpt results/.../0002000.pt --num-fid-samples 1000   # one process

Output: <sample-dir>/<name>.npz with arr_0 uint8 (N, H, W, 3) (grey images are repeated to 3 channels) and
labels int64 (N,). Batch b holds samples [b*B, (b+1)*B) of the global sequence, B = --per-proc-batch-size;
its labels (uniform over the classes) and noise come from a generator seeded with (seed, b), so the result
does not depend on the number of processes, and batches are assigned round-robin to ranks. Every finished
batch is written to <sample-dir>/<name>_parts/ atomically; a restarted run skips finished batches (resumable).

Resuming never mixes settings. <name>_parts/settings.json records everything that changes a sample (the
checkpoint's content fingerprint, method and its arguments, model size and classes, the sampler and every
option it resolved to, cfg scale, guided channels, per-process batch size, seed, uint8 rounding, precision,
device type, VAE); it is written on the first run, and a run whose settings differ stops with the list of
differing settings (old -> new): use another --sample-dir or --name, or delete the folder to start over. The
default name ends in a short hash of these settings, so runs with other settings land in another folder.
Not part of the settings: the number of processes (batches do not depend on it), --cuda-graph (the same
kernels), --num-fid-samples (a larger run reuses the full batches of a smaller one; a last batch of another
size is regenerated). Every reused part is checked: readable, the expected number of images, and the labels
that (seed, batch) draws; a part that fails is regenerated with a warning. Parts folders written before
settings.json existed are refused unless --reuse-unverified-parts adopts them (with --name <old name>; the
old default names had no hash).

    torchrun ... -m dit_models.sample_ddp <the same flags>   # resume: the same command again

uint8 conversion: round((x + 1) * 127.5) by default; --parity-uint8 uses the reference truncation
clamp(127.5 x + 128) of the public sample_ddp.py (for FID parity).
"""
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

from dit_models import utils
from dit_models.cli import nonnegative_float, parser as tool_parser, positive_int, run_cli
from dit_models.methods import METHODS
from dit_models.generation import add_sampler_args, decode, generate, load_model_for_sampling, sampler_opts_from_args


SETTINGS_FILE = "settings.json"
PART_FORMAT = 1  # bump when what a part file holds changes (images uint8 (n, H, W, 3), labels int64 (n,))


class PartsMismatch(ValueError):
    """A parts folder holds samples made with other (or unrecorded) settings."""


def _save_npz_atomic(path, **arrays):
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def checkpoint_fingerprint(path, chunk=4 << 20):
    """sha256 of a file's size and its first and last 4 MiB: for torch's zip format the tail is the central
    directory, which holds the CRC-32 of every tensor record, so this tells checkpoints apart without reading
    gigabytes (and a moved or copied checkpoint keeps its fingerprint)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def _jsonable(obj):
    """obj as json.loads(json.dumps(obj)) gives it back (tuples -> lists, unknown types -> str), so that a
    record read from settings.json compares equal to a fresh one."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def sample_settings(args, method, margs, model, opts, device, latent):
    """Everything that changes a sample (see the module docstring for what is left out and why)."""
    return _jsonable({
        "part_format": PART_FORMAT,
        "checkpoint_fingerprint": checkpoint_fingerprint(args.ckpt),
        "method": method,
        "method_args": margs,
        "model": {"num_classes": model.num_classes, "input_size": model.input_size,
                  "in_channels": model.in_channels},
        "sampler": {k: v for k, v in opts.items() if k != "cuda_graph"},  # includes guided_channels
        "cfg_scale": args.cfg_scale,
        "per_proc_batch_size": args.per_proc_batch_size,
        "seed": args.seed,
        "parity_uint8": bool(args.parity_uint8),
        "precision": args.precision,
        "device_type": device.type,  # the per-batch sampler noise comes from a generator on the device
        "vae": args.vae if latent else None,
    })


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(old, new):
    """["key: old -> new", ...] for every setting (nested ones as a.b) that differs."""
    old, new = _flat(old), _flat(new)
    missing = object()
    return [f"{k}: {json.dumps(old.get(k)) if k in old else '(absent)'} -> "
            f"{json.dumps(new.get(k)) if k in new else '(absent)'}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


def _part_files(parts):
    return sorted(glob.glob(os.path.join(glob.escape(parts), "[0-9]" * 6 + ".npz")))


def prepare_parts(parts, settings, info, reuse_unverified=False):
    """Rank 0: creates the parts folder and writes settings.json (settings, plus info that is not compared)
    atomically when it has none, unless the folder already holds unrecorded parts (reuse_unverified adopts
    them). Then barrier, then check_parts on every rank."""
    os.makedirs(parts, exist_ok=True)
    path = os.path.join(parts, SETTINGS_FILE)
    if os.path.exists(path):
        return
    if _part_files(parts) and not reuse_unverified:
        return  # check_parts refuses, on every rank
    info = dict(info, adopted_unverified_parts=len(_part_files(parts)))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"settings": settings, "info": info}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_parts(parts, settings):
    """Raises PartsMismatch unless the folder's settings.json records exactly these settings."""
    path = os.path.join(parts, SETTINGS_FILE)
    how = (f"Use another --sample-dir (or --name) for these settings, or delete {parts} to start over "
           f"(or go back to the old settings to resume).")
    if not os.path.exists(path):
        raise PartsMismatch(
            f"{parts} holds {len(_part_files(parts))} part file(s) but no {SETTINGS_FILE} (written by an older "
            f"version): their settings are unknown, so they are not mixed with new samples. If they were made "
            f"with exactly these settings, pass --reuse-unverified-parts to adopt them (each part's labels are "
            f"still checked). {how}")
    try:
        with open(path) as f:
            old = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PartsMismatch(f"cannot read {path} ({type(e).__name__}: {e}). {how}") from e
    diff = settings_diff(old, settings)
    if diff:
        raise PartsMismatch(f"{parts} holds samples made with other settings; these differ (old -> new):\n  "
                            + "\n  ".join(diff) + f"\n{how}")


def part_problem(path, labels):
    """None if the part file holds len(labels) uint8 RGB images with exactly these labels, else why not."""
    try:
        with np.load(path) as d:
            images, stored = d["images"], d["labels"]
    except Exception as e:  # noqa: BLE001  (a torn zip raises BadZipFile, EOFError, ValueError, OSError...)
        return f"unreadable ({type(e).__name__}: {e})"
    n = len(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        return f"images {images.dtype} {images.shape}, expected uint8 ({n}, H, W, 3)"
    if not np.array_equal(stored, labels):
        return "its labels are not the ones this seed and batch size draw"
    return None


def main(args):
    rank, world, _, device = utils.setup_distributed(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    if args.cuda_graph and device.type != "cuda":
        args.cuda_graph = False
    model, method, margs = load_model_for_sampling(args.ckpt, args.method, device, args.model, args.num_heads,
                                                   args.image_size, args.num_classes)
    opts = sampler_opts_from_args(args, method)
    vae = None
    if margs.get("data_kind") == "latents":
        from dit_models.data import load_vae

        vae = load_vae(args.vae, device)
    K = model.num_classes
    B, N = args.per_proc_batch_size, args.num_fid_samples
    num_batches = (N + B - 1) // B
    settings = sample_settings(args, method, margs, model, opts, device, vae is not None)
    name = args.name or (f"{method}-{str(margs.get('model')).replace('/', '-')}-cfg{args.cfg_scale}-"
                         f"{opts['sampler']}{opts['num_sampling_steps']}-seed{args.seed}-{settings_hash(settings)}")
    parts = os.path.join(args.sample_dir, f"{name}_parts")
    if rank == 0:
        info = {"checkpoint": os.path.abspath(args.ckpt), "checkpoint_mtime": os.path.getmtime(args.ckpt),
                "num_fid_samples": N, "world_size": world, "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        prepare_parts(parts, settings, info, args.reuse_unverified_parts)
        print(f"{method} {margs.get('model')}: {N} samples in {num_batches} batches of {B} over {world} process(es), "
              f"sampler {opts}; parts in {parts}", flush=True)
    utils.barrier()
    check_parts(parts, settings)  # every rank, so that all stop together
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    done = 0
    for b in range(rank, num_batches, world):
        part = os.path.join(parts, f"{b:06d}.npz")
        n = min(B, N - b * B)
        gen = torch.Generator().manual_seed(utils.derive_seed(args.seed, b))
        labels = torch.randint(0, K, (n,), generator=gen)
        if os.path.exists(part):
            problem = part_problem(part, labels.numpy())
            if problem is None:
                continue  # resumed run: finished batch
            print(f"rank {rank}: regenerating {part}: {problem}", file=sys.stderr, flush=True)
        with autocast:
            x = generate(method, model, labels, opts, args.cfg_scale, gen, margs, batch_size=n)
            imgs = decode(x, vae).float()
        arr = utils.to_uint8(imgs, parity=args.parity_uint8)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        _save_npz_atomic(part, images=arr, labels=labels.numpy())
        done += 1
        if rank == 0 and (done % args.log_every == 0):
            print(f"rank 0: {done} batches written ({b + 1}/{num_batches} overall position)", flush=True)
    utils.barrier()
    out = os.path.join(args.sample_dir, f"{name}.npz")
    if rank == 0:
        imgs, labs = [], []
        for b in range(num_batches):
            part = os.path.join(parts, f"{b:06d}.npz")
            if not os.path.exists(part):
                raise RuntimeError(f"missing batch {part}; re-run to finish")
            with np.load(part) as d:
                imgs.append(d["images"])
                labs.append(d["labels"])
        arr = np.concatenate(imgs)[:N]
        _save_npz_atomic(out, arr_0=arr, labels=np.concatenate(labs)[:N])
        print(f"saved {out} with arr_0 {arr.shape} {arr.dtype} and labels", flush=True)
    utils.barrier()
    utils.cleanup_distributed()
    return out


def get_parser():
    p = tool_parser("sample_ddp", "Parallel sampling into an .npz (arr_0 uint8 (N, H, W, 3), labels)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--method", default=None, choices=tuple(METHODS))
    p.add_argument("--model", default=None, help="registry name for released MaskDiT files")
    p.add_argument("--num-heads", type=positive_int, default=None)
    p.add_argument("--image-size", type=positive_int, default=None)
    p.add_argument("--num-classes", type=positive_int, default=None)
    p.add_argument("--vae", default="ema", help="ema (DiT FID protocol) | mse | path; latent models only")
    p.add_argument("--cfg-scale", type=nonnegative_float, default=1.5)
    p.add_argument("--num-fid-samples", type=positive_int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=positive_int, default=32)
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--name", default=None, help="output name (default: built from the settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--parity-uint8", action="store_true", help="reference truncation instead of rounding")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--reuse-unverified-parts", action="store_true",
                   help="resume from a parts folder written before settings.json existed (no record of its "
                        "settings): adopt it with the current settings (each part's labels are still checked)")
    add_sampler_args(p)
    return p


def cli(argv=None):
    args = get_parser().parse_args(argv)
    return run_cli(main, args, errors=(FileNotFoundError, ValueError, ImportError), cleanup=utils.cleanup_distributed,
                   interrupted=lambda: "finished batches are kept; run the same command again to resume")


if __name__ == "__main__":
    cli()
