"""Datasets for training: embedded digits, ImageFolder (pixels or VAE latents) and cached latents.

Every dataset returns *deterministic* items; all randomness (horizontal flip, VAE posterior sample) is applied
to whole batches in the training loop by `Dataset.augment(x, generator)` with a generator derived from
(seed, rank, step). That is what makes `--resume` bit-exact and keeps DataLoader workers free of RNG state.

Data specs understood by `build_dataset`:
  "digits"         scikit-learn's bundled 8x8 digits (10 classes, 1797 images) upsampled to 16x16, 1 channel,
                   pixel space in [-1, 1]; 1437 training / 360 held-out images (fixed split).
  "digits32"       the same at 32x32.
  <folder>         an ImageFolder (one sub-folder per class). With a VAE the images are encoded on the fly;
                   with vae="none" the model trains in pixel space.
  <latent folder>  the output of `python -m dit_models.extract_latents` (has meta.json): cached VAE moments of
                   each image and its flip; training draws a flip and a posterior sample every step.
Bad data fails early with the offending path (unreadable images: the loader raises naming the file; nothing
is skipped silently).
"""
import glob
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
VAE_SCALE = 0.18215  # Stable Diffusion KL-f8 latent scale factor


# ---------------------------------------------------------------------------------------------------------
#                                          Embedded digits
# ---------------------------------------------------------------------------------------------------------

DIGITS_HOLDOUT = 0.2  # fraction of the 1797 images kept out of training (used by dit_models.evaluate)


def load_digits_arrays(size=16):
    """Returns (images (M, 1, size, size) float32 in [-1, 1], labels (M,) int64) for all 1797 digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # optional dependency
        raise ImportError(
            "--data digits needs scikit-learn (it ships the 8x8 digits): pip install scikit-learn "
            "(or pip install 'dit_kernels[data]')"
        ) from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (M, 1, 8, 8) in [0, 1]
    if size != 8:
        # Bilinear upsampling keeps strokes smooth; a patch-2 model then sees (size/2)^2 tokens.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return x, torch.from_numpy(d.target.astype(np.int64))


def digits_split(num=1797, holdout=DIGITS_HOLDOUT):
    """Fixed train / held-out index split (independent of library versions: own RandomState(0))."""
    perm = np.random.RandomState(0).permutation(num)
    n_hold = int(round(num * holdout))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory images (N, C, H, W) in [-1, 1] with labels; batches are gathered by index, no workers."""

    in_memory = True
    kind = "pixels"

    def __init__(self, images, labels, num_classes, name, flip=False):
        self.images, self.labels = images, labels
        self.num_classes, self.name, self.flip = num_classes, name, flip
        self.channels, self.resolution = images.shape[1], images.shape[-1]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def get_batch(self, idx):
        idx = torch.as_tensor(idx)
        return self.images[idx], self.labels[idx]

    def augment(self, x, generator=None):
        return random_flip(x, generator) if self.flip else x

    def describe(self):
        return f"{self.name}: {len(self)} images, {self.num_classes} classes, {self.channels}x{self.resolution}x{self.resolution} pixels"


def digits_dataset(split="train", size=16):
    """The embedded default dataset. split: "train" (1437 images), "test" (360 held out) or "all"."""
    x, y = load_digits_arrays(size)
    tr, te = digits_split(len(y))
    if split == "train":
        x, y = x[tr], y[tr]
    elif split == "test":
        x, y = x[te], y[te]
    elif split != "all":
        raise ValueError(f"unknown digits split {split!r} (train|test|all)")
    # Digits are not mirror symmetric: no flip augmentation.
    return TensorImageDataset(x, y, 10, f"digits{size}-{split}", flip=False)


def random_flip(x, generator=None):
    """Flips each sample horizontally with probability 1/2. x (N, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5
    flip = flip.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(flip, x.flip(-1), x)


# ---------------------------------------------------------------------------------------------------------
#                                             ImageFolder
# ---------------------------------------------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """ADM center crop: BOX-halve while the short side >= 2*size, BICUBIC resize the short side, center crop."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


class UnreadableImageError(ValueError):
    """An image file of an ImageFolder that PIL cannot decode."""


def _readable(path, channels):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB" if channels == 3 else "L").load()
        return True
    except Exception:  # noqa: BLE001  (PIL raises many types on bad files)
        return False


def drop_unreadable(samples, channels=3):
    """The samples whose image decodes, and the paths of those that do not (decodes every file once)."""
    from tqdm.auto import tqdm

    good, bad = [], []
    for path, label in tqdm(samples, desc="checking images", unit="img", disable=None, leave=False):
        (good if _readable(path, channels) else bad).append((path, label))
    return good, [p for p, _ in bad]


def scan_image_folder(root):
    """Returns (sorted class names, [(path, class index)]). Clear errors for missing/empty folders."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"data path {root!r} does not exist (use --data digits for the embedded dataset)")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data path {root!r} is not a folder; expected an ImageFolder (root/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder {root!r} has no class sub-folders; expected root/<class>/<image files>")
    samples = []
    for ci, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), ci))
    if not samples:
        raise ValueError(f"ImageFolder {root!r} has {len(classes)} class folders but no images with extensions {IMG_EXTENSIONS}")
    return classes, samples


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> -> (C, size, size) float in [-1, 1] (ADM center crop), label.

    An unreadable image raises UnreadableImageError naming the file when it is first read (no silent skip in
    the loop: it would change batch composition and make resume inexact); skip_bad_images=True instead decodes
    every image once up front and leaves out, counted and named, those that fail. Flips are applied by `augment`.
    """

    in_memory = False
    kind = "pixels"

    def __init__(self, root, image_size, channels=3, skip_bad_images=False):
        self.root, self.image_size, self.channels = root, image_size, channels
        self.classes, self.samples = scan_image_folder(root)
        self.skipped = []
        if skip_bad_images:
            self.samples, self.skipped = drop_unreadable(self.samples, channels)
            if not self.samples:
                raise ValueError(f"ImageFolder {root!r}: none of its {len(self.skipped)} images can be read")
        self.num_classes, self.resolution, self.name = len(self.classes), image_size, os.path.basename(os.path.normpath(root))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                arr = center_crop_arr(im, self.image_size)
        except Exception as e:  # noqa: BLE001  (PIL raises many types on bad files)
            why = (str(e).strip().splitlines() or [""])[0]
            raise UnreadableImageError(f"cannot read image {path!r} ({type(e).__name__}: {why}); fix or remove it, or "
                                       "pass --skip-bad-images to leave out every unreadable image") from e
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(127.5).sub_(1.0)
        x = x.permute(2, 0, 1) if x.dim() == 3 else x[None]
        return x, label

    def augment(self, x, generator=None):
        return random_flip(x, generator)

    def describe(self):
        skipped = ""
        if self.skipped:
            shown = ", ".join(self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            skipped = f" ({len(self.skipped)} unreadable images skipped: {shown})"
        return f"ImageFolder {self.root}: {len(self)} images, {self.num_classes} classes, {self.image_size}px{skipped}"


# ---------------------------------------------------------------------------------------------------------
#                                           Cached latents
# ---------------------------------------------------------------------------------------------------------

def sample_latent(moments, scale=VAE_SCALE, generator=None):
    """z = scale * (mean + exp(logvar / 2) * eps) from moments (N, 2C, h, w) = [mean | logvar]."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
    return scale * (mean + std * eps)


class LatentCacheError(ValueError):
    """A file of a latent folder (extract_latents output) that is unreadable or disagrees with meta.json."""


def _read_npy(path, mmap_mode=None):
    """np.load naming the file on any failure (truncated or bit-flipped headers raise assorted errors)."""
    if not os.path.isfile(path):
        raise LatentCacheError(f"latent cache file {path!r} is missing (re-run extract_latents)")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as e:  # noqa: BLE001  (numpy raises ValueError, EOFError, OSError, ... on a bad file)
        why = (str(e).strip().splitlines() or [""])[0]  # one line: the CLIs print the message as their error line
        raise LatentCacheError(f"cannot read latent cache file {path!r} ({os.path.getsize(path):,} bytes): truncated or "
                               f"corrupt ({type(e).__name__}: {why}); re-run extract_latents") from e


def _read_meta(root):
    meta_path = os.path.join(root, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{root!r} has no meta.json; run python -m dit_models.extract_latents first")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        for key in ("num_images", "num_classes", "latent_channels", "latent_size"):
            if key not in meta:
                raise ValueError(f"no {key!r} entry")
            meta[key] = int(meta[key])
            if meta[key] < 0:
                raise ValueError(f"{key} = {meta[key]} is negative")
        meta["scale"] = float(meta.get("scale", VAE_SCALE))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise LatentCacheError(f"cannot read {meta_path!r}: {e}") from e
    return meta


class LatentDataset(torch.utils.data.Dataset):
    """Reads the shards written by extract_latents: per image the moments of [image, flipped image].

    Items: (moments (2, 2C, h, w), label). `augment` picks one of the two flips per sample and draws a fresh
    posterior sample, so every epoch sees new latents (unlike fast-DiT's extractor, which freezes one flip and one sample per image).
    """

    in_memory = False
    kind = "latents"

    def __init__(self, root):
        self.meta = _read_meta(root)
        n, c, size = self.meta["num_images"], self.meta["latent_channels"], self.meta["latent_size"]
        idx_files = sorted(glob.glob(os.path.join(root, "indices_r*.npy")))
        if not idx_files:
            raise ValueError(f"latent folder {root!r} has no shards (indices_r*.npy)")
        self.shards, rows = [], {}
        for f in idx_files:
            tag = os.path.basename(f)[len("indices_") : -len(".npy")]
            paths = {k: os.path.join(root, f"{k}_{tag}.npy") for k in ("moments", "labels", "done")}
            idx = _read_npy(f)
            done = _read_npy(paths["done"]) if os.path.exists(paths["done"]) else None
            mom = _read_npy(paths["moments"], mmap_mode="r")
            lab = _read_npy(paths["labels"])
            n_valid = len(idx) if done is None else int(done.reshape(-1)[0]) if done.size == 1 else -1
            # Shapes and values checked here, so that a wrong-size or corrupt shard names its file now
            # instead of failing inside a DataLoader worker (or silently reading another image's row).
            checks = [
                (idx.ndim == 1 and idx.dtype.kind in "iu", f,
                 f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}"),
                (0 <= n_valid <= len(idx), paths["done"], f"done = {done!r} is not a count in [0, {len(idx)}]"),
                (mom.shape[1:] == (2, 2 * c, size, size) and mom.dtype.kind == "f", paths["moments"],
                 f"moments must be float (rows, 2, {2 * c}, {size}, {size}) as meta.json says, got {mom.dtype} {mom.shape}"),
                (len(mom) >= n_valid, paths["moments"], f"{len(mom)} rows, fewer than the {n_valid} done"),
                (lab.ndim == 1 and lab.dtype.kind in "iu" and len(lab) >= n_valid, paths["labels"],
                 f"labels must be a 1-D integer array of >= {n_valid} rows, got {lab.dtype} {lab.shape}"),
            ]
            for ok, path, why in checks:
                if not ok:
                    raise LatentCacheError(f"latent cache file {path!r} does not match its shard: {why}; re-run extract_latents")
            valid_idx, valid_lab = idx[:n_valid], lab[:n_valid]
            if n_valid and (valid_idx.min() < 0 or valid_idx.max() >= n):
                raise LatentCacheError(f"latent cache file {f!r} holds image indices outside [0, {n}) of meta.json")
            if n_valid and (valid_lab.min() < 0 or valid_lab.max() >= self.meta["num_classes"]):
                raise LatentCacheError(f"latent cache file {paths['labels']!r} holds labels outside [0, "
                                       f"{self.meta['num_classes']}) of meta.json")
            s = len(self.shards)
            self.shards.append((mom, lab))
            for j in range(n_valid):
                rows.setdefault(int(idx[j]), (s, j))  # DistributedSampler padding duplicates: keep first
        missing = n - len(rows)
        if missing:
            raise ValueError(f"latent folder {root!r} is incomplete: {missing} of {n} images missing (re-run extract_latents to finish)")
        self.rows = [rows[i] for i in range(n)]
        self.num_classes, self.channels, self.resolution = self.meta["num_classes"], c, size
        self.scale = self.meta["scale"]
        self.root, self.name = root, os.path.basename(os.path.normpath(root))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        s, j = self.rows[i]
        mom, lab = self.shards[s]
        return torch.from_numpy(np.array(mom[j], dtype=np.float32)), int(lab[j])

    def augment(self, moments, generator=None):
        # moments (N, 2, 2C, h, w): choose the flipped copy with probability 1/2, then sample the posterior.
        pick = (torch.rand(moments.shape[0], generator=generator, device="cpu") < 0.5).long().to(moments.device)
        m = moments[torch.arange(moments.shape[0], device=moments.device), pick]  # (N, 2C, h, w)
        return sample_latent(m, self.scale, generator)

    def describe(self):
        return (f"latents {self.root}: {len(self)} images, {self.num_classes} classes, "
                f"{self.channels}x{self.resolution}x{self.resolution} (VAE {self.meta.get('vae')})")


# ---------------------------------------------------------------------------------------------------------
#                                       VAE (optional dependency)
# ---------------------------------------------------------------------------------------------------------

def load_vae(name, device):
    """diffusers AutoencoderKL for "ema"/"mse" (stabilityai/sd-vae-ft-*) or a local/hub path."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            f"--vae {name} needs diffusers (pip install diffusers, or 'dit_kernels[vae]'); "
            "use --vae none to train in pixel space"
        ) from e
    repo = f"stabilityai/sd-vae-ft-{name}" if name in ("ema", "mse") else name
    try:
        vae = AutoencoderKL.from_pretrained(repo)
    except Exception as e:
        raise RuntimeError(f"cannot load the VAE {repo!r}: {e}") from e
    return vae.to(device).eval().requires_grad_(False)


class VAEEncodedDataset(torch.utils.data.Dataset):
    """ImageFolder encoded through a VAE on the fly (in the loop, on the training device)."""

    in_memory = False
    kind = "latents"

    def __init__(self, images, vae, scale=VAE_SCALE):
        self.images, self.vae, self.scale = images, vae, scale
        self.num_classes, self.name = images.num_classes, images.name
        self.channels = int(getattr(vae.config, "latent_channels", 4))
        self.resolution = images.image_size // 8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    @torch.no_grad()
    def augment(self, x, generator=None):
        x = random_flip(x, generator)
        moments = self.vae.encode(x.to(next(self.vae.parameters()).dtype)).latent_dist.parameters
        return sample_latent(moments, self.scale, generator)

    def describe(self):
        return self.images.describe() + f" -> VAE latents {self.channels}x{self.resolution}x{self.resolution}"


def build_dataset(spec, image_size=256, vae="none", device="cpu", split="train", skip_bad_images=False):
    """Resolves a --data spec (see module docstring) to a dataset with num_classes/channels/resolution."""
    if spec in ("digits", "digits16"):
        return digits_dataset(split, 16)
    if spec == "digits32":
        return digits_dataset(split, 32)
    if spec is None or spec == "":
        raise ValueError("--data is empty; use --data digits or a folder")
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "meta.json")):
        return LatentDataset(spec)
    images = ImageFolderDataset(spec, image_size, skip_bad_images=skip_bad_images)
    if vae in (None, "none"):
        return images
    if image_size % 8:
        raise ValueError(f"--image-size {image_size} must be divisible by 8 for the f=8 VAE")
    return VAEEncodedDataset(images, load_vae(vae, device))


# ---------------------------------------------------------------------------------------------------------
#                                 Step-indexed distributed batches
# ---------------------------------------------------------------------------------------------------------

class StepBatches:
    """Yields (epoch, step, x, y) for global steps start_step, start_step+1, ...; exact under resume.

    Uses DistributedSampler(shuffle=True, drop_last=True, seed) per epoch; step s reads batch s % steps_per_epoch
    of epoch s // steps_per_epoch, so a run resumed at step s sees the same batches as an uninterrupted run.
    """

    def __init__(self, dataset, local_batch, rank=0, world_size=1, seed=0, num_workers=0):
        from torch.utils.data.distributed import DistributedSampler

        if local_batch < 1:
            raise ValueError(f"the batch per process must be at least 1, got {local_batch}")
        if len(dataset) < world_size * local_batch:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than one global batch ({world_size} x {local_batch})")
        self.dataset, self.local_batch, self.num_workers = dataset, local_batch, num_workers
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // local_batch

    def epoch_batches(self, epoch):
        self.sampler.set_epoch(epoch)
        idx = list(iter(self.sampler))
        b = self.local_batch
        return [idx[i * b : (i + 1) * b] for i in range(self.steps_per_epoch)]

    def iterate(self, start_step, end_step):
        step = start_step
        while step < end_step:
            epoch, first = divmod(step, self.steps_per_epoch)
            batches = self.epoch_batches(epoch)[first : first + (end_step - step)]
            if getattr(self.dataset, "in_memory", False):
                it = (self.dataset.get_batch(b) for b in batches)
            else:
                it = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                                      pin_memory=torch.cuda.is_available()))
            for x, y in it:
                yield epoch, step, x, y
                step += 1
