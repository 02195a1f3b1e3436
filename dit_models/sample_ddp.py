"""Generate many samples in parallel (torchrun) and pack them into an .npz for FID-style evaluation.

    torchrun --nproc_per_node 8 -m dit_models.sample_ddp --ckpt DiT-XL-2-256x256.pt --method ddpm --vae ema \
        --cfg-scale 1.5 --guided-channels 3 --num-fid-samples 50000 --per-proc-batch-size 32
    python -m dit_models.sample_ddp --ckpt results/.../0002000.pt --num-fid-samples 1000   # one process

Output: <sample-dir>/<name>.npz with arr_0 uint8 (N, H, W, 3) (grey images are repeated to 3 channels) and
labels int64 (N,). Batch b holds samples [b*B, (b+1)*B) of the global sequence, B = --per-proc-batch-size;
its labels (uniform over the classes) and noise come from a generator seeded with (seed, b), so the result
does not depend on the number of processes, and batches are assigned round-robin to ranks. Every finished
batch is written to <sample-dir>/<name>_parts/ atomically; a restarted run skips finished batches (resumable).
uint8 conversion: round((x + 1) * 127.5) by default; --parity-uint8 uses the reference truncation
clamp(127.5 x + 128) of the public sample_ddp.py (for FID parity).
"""
import argparse
import os
import sys

import numpy as np
import torch

from dit_models import utils
from dit_models.cli import nonnegative_float, positive_int
from dit_models.methods import METHODS
from dit_models.generation import add_sampler_args, decode, generate, load_model_for_sampling, sampler_opts_from_args


def _save_npz_atomic(path, **arrays):
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


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
    name = args.name or (f"{method}-{str(margs.get('model')).replace('/', '-')}-cfg{args.cfg_scale}-"
                         f"{opts['sampler']}{opts['num_sampling_steps']}-seed{args.seed}")
    parts = os.path.join(args.sample_dir, f"{name}_parts")
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        print(f"{method} {margs.get('model')}: {N} samples in {num_batches} batches of {B} over {world} process(es), "
              f"sampler {opts}", flush=True)
    utils.barrier()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    done = 0
    for b in range(rank, num_batches, world):
        part = os.path.join(parts, f"{b:06d}.npz")
        if os.path.exists(part):
            continue  # resumed run: finished batch
        n = min(B, N - b * B)
        gen = torch.Generator().manual_seed(utils.derive_seed(args.seed, b))
        labels = torch.randint(0, K, (n,), generator=gen)
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
    p = argparse.ArgumentParser(description="Parallel sampling into an .npz (arr_0 uint8 (N, H, W, 3), labels)")
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
    add_sampler_args(p)
    return p


def cli(argv=None):
    args = get_parser().parse_args(argv)
    try:
        return main(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        utils.cleanup_distributed()
        sys.exit(2)


if __name__ == "__main__":
    cli()
