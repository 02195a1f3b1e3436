"""Cache VAE latents of an ImageFolder for training (`--data <out-dir>` in dit_models.train).

    torchrun --nproc_per_node 8 -m dit_models.extract_latents --data /path/to/imagenet/train --image-size 256 \
        --vae ema --out-dir latents/imagenet256

For every image (ADM center crop) and its horizontal flip the VAE posterior **moments** (mean, logvar) are
stored, not a sample: training draws the flip and z = 0.18215 (mean + exp(logvar / 2) eps) afresh every step
(fast-DiT's extractor instead freezes one flip and one posterior sample per image for all epochs). Layout:
    meta.json                       num_images, num_classes, classes, latent_channels, latent_size, vae, scale
    moments_r{rank}_w{world}.npy    (n_r, 2, 2C, h, w) float16/float32 [image, flip] x [mean | logvar]
    labels_r{rank}_w{world}.npy     (n_r,) int64
    indices_r{rank}_w{world}.npy    (n_r,) int64 dataset index of each row
    done_r{rank}_w{world}.npy       rows finished (resumable: a restarted run continues from there)
Each rank writes only its own files (no collisions); rows are assigned with DistributedSampler(shuffle=False),
whose padding duplicates are dropped when reading.
"""
import json
import os

import numpy as np
import torch

from dit_models import utils
from dit_models.cli import nonnegative_int, parser as tool_parser, positive_int, run_cli


class VAEMomentsEncoder:
    """images (N, 3, H, W) in [-1, 1] -> moments (N, 2C, H/8, W/8) through a diffusers AutoencoderKL."""

    def __init__(self, vae):
        self.vae = vae
        self.latent_channels = int(getattr(vae.config, "latent_channels", 4))
        self.downsample = 8

    @torch.no_grad()
    def __call__(self, x):
        return self.vae.encode(x.to(next(self.vae.parameters()).dtype)).latent_dist.parameters.float()


def extract(dataset, encoder, out_dir, rank=0, world_size=1, batch_size=32, device="cpu", dtype="float32",
            num_workers=4, vae_name="custom", scale=0.18215, log=print):
    """Writes this rank's shard of moments for `dataset` (ImageFolderDataset-like: (image, label) items).

    encoder: callable images (N, C, H, W) -> moments (N, 2C', h, w), with attributes latent_channels and
    downsample. Resumable through done_r*.npy.
    """
    from torch.utils.data.distributed import DistributedSampler

    os.makedirs(out_dir, exist_ok=True)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
    indices = np.fromiter(iter(sampler), dtype=np.int64)
    n = len(indices)
    C, size = encoder.latent_channels, dataset.image_size // encoder.downsample
    tag = f"r{rank}_w{world_size}"
    paths = {k: os.path.join(out_dir, f"{k}_{tag}.npy") for k in ("moments", "labels", "indices", "done")}
    if os.path.exists(paths["done"]) and os.path.exists(paths["moments"]):
        start = int(np.load(paths["done"]))
        moments = np.lib.format.open_memmap(paths["moments"], mode="r+")
        labels = np.load(paths["labels"])
    else:
        start = 0
        moments = np.lib.format.open_memmap(paths["moments"], mode="w+", dtype=np.dtype(dtype), shape=(n, 2, 2 * C, size, size))
        labels = np.zeros(n, dtype=np.int64)
        np.save(paths["indices"], indices)
    if rank == 0:
        meta = dict(num_images=len(dataset), num_classes=dataset.num_classes, classes=getattr(dataset, "classes", None),
                    latent_channels=C, latent_size=size, image_size=dataset.image_size, vae=vae_name, scale=scale,
                    world_size=world_size, layout="moments (n, 2 [image, flip], 2C [mean | logvar], h, w)")
        with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    todo = list(range(start, n))
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices.tolist()), batch_sampler=batches,
                                         num_workers=num_workers)
    done = start
    for rows, (x, y) in zip(batches, loader):
        x = x.to(device)
        m = encoder(torch.cat([x, x.flip(-1)]))  # (2B, 2C, h, w): images, then their flips
        m = torch.stack(m.chunk(2), dim=1)  # (B, 2, 2C, h, w)
        moments[rows[0] : rows[-1] + 1] = m.cpu().numpy().astype(moments.dtype)
        labels[rows[0] : rows[-1] + 1] = y.numpy()
        done = rows[-1] + 1
        moments.flush()
        np.save(paths["labels"], labels)
        np.save(paths["done"], np.array(done))
        if rank == 0 and (done // batch_size) % 50 == 0:
            log(f"rank 0: {done}/{n} images")
    moments.flush()
    np.save(paths["labels"], labels)
    np.save(paths["done"], np.array(done))
    return paths


def main(args):
    from dit_models.data import ImageFolderDataset, load_vae

    rank, world, _, device = utils.setup_distributed(args.device)
    dataset = ImageFolderDataset(args.data, args.image_size)
    if args.image_size % 8:
        raise ValueError(f"--image-size {args.image_size} must be divisible by 8")
    encoder = VAEMomentsEncoder(load_vae(args.vae, device))
    if rank == 0:
        print(f"{dataset.describe()} -> {args.out_dir} ({world} process(es))", flush=True)
    extract(dataset, encoder, args.out_dir, rank, world, args.batch_size, device, args.dtype, args.num_workers,
            vae_name=args.vae)
    utils.barrier()
    if rank == 0:
        print(f"done: {len(dataset)} images -> {args.out_dir}; train with --data {args.out_dir}", flush=True)
    utils.cleanup_distributed()


def get_parser():
    p = tool_parser("extract_latents", "Cache VAE moments (image + flip) of an ImageFolder")
    p.add_argument("--data", required=True, help="ImageFolder root (root/<class>/<image>)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--vae", default="ema", help="ema | mse | diffusers path")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--num-workers", type=nonnegative_int, default=4)
    p.add_argument("--device", default="auto")
    return p


def cli(argv=None):
    run_cli(main, get_parser().parse_args(argv),
            errors=(FileNotFoundError, NotADirectoryError, ValueError, ImportError, RuntimeError),
            cleanup=utils.cleanup_distributed)


if __name__ == "__main__":
    cli()
