"""Datasets: embedded digits, step-indexed distributed batches, ImageFolder errors, cached latents."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from dit_models import data


def test_digits_dataset():
    tr, te = data.digits_dataset("train"), data.digits_dataset("test")
    assert len(tr) + len(te) == 1797 and len(te) == 359
    assert tr.images.shape[1:] == (1, 16, 16) and tr.images.dtype == torch.float32
    assert tr.images.min() >= -1 and tr.images.max() <= 1 and tr.images.min() == -1
    assert set(tr.labels.tolist()) == set(range(10)) and tr.num_classes == 10
    a, b = data.digits_split()
    assert not set(a.tolist()) & set(b.tolist())
    assert data.digits_dataset("train", 32).images.shape[-1] == 32
    with pytest.raises(ValueError, match="split"):
        data.digits_dataset("val")


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        data.build_dataset("digits")


def test_step_batches_resume_and_ranks():
    ds = data.digits_dataset("train")
    full = [(e, s, y) for e, s, _, y in data.StepBatches(ds, 64, seed=3).iterate(0, 30)]
    resumed = [(e, s, y) for e, s, _, y in data.StepBatches(ds, 64, seed=3).iterate(17, 30)]
    assert len(full) == 30 and [s for _, s, _ in full] == list(range(30))
    for (e1, s1, y1), (e2, s2, y2) in zip(full[17:], resumed):
        assert (e1, s1) == (e2, s2) and torch.equal(y1, y2)
    assert full[-1][0] == 30 // (len(ds) // 64)  # epochs advance
    # Two ranks see disjoint samples within an epoch.
    r0 = data.StepBatches(ds, 32, rank=0, world_size=2, seed=0).epoch_batches(0)
    r1 = data.StepBatches(ds, 32, rank=1, world_size=2, seed=0).epoch_batches(0)
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.StepBatches(ds, 1024, world_size=2)


def _write_images(root, spec):
    from PIL import Image

    rng = np.random.RandomState(0)
    for cls, n, size in spec:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(root, cls, f"{i}.png"))


def test_image_folder(tmp_path):
    root = str(tmp_path / "imgs")
    _write_images(root, [("cat", 3, (40, 30)), ("dog", 2, (20, 64))])
    ds = data.build_dataset(root, image_size=16, vae="none")
    assert ds.num_classes == 2 and len(ds) == 5 and ds.classes == ["cat", "dog"]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1 and -1 <= x.min() and x.max() <= 1
    flipped = data.random_flip(x[None].repeat(64, 1, 1, 1), torch.Generator().manual_seed(0))
    n_flip = sum(torch.equal(f, x.flip(-1)) for f in flipped)
    assert 10 < n_flip < 54
    # ADM center crop: a large image is BOX-halved, resized and cropped to the exact size.
    from PIL import Image

    arr = data.center_crop_arr(Image.new("RGB", (300, 200)), 64)
    assert arr.shape == (64, 64, 3)


def test_bad_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_dataset(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.build_dataset(str(empty))
    (empty / "a").mkdir()
    (empty / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        data.build_dataset(str(empty))
    bad = tmp_path / "bad"
    _write_images(str(bad), [("a", 1, (20, 20))])
    (bad / "a" / "broken.png").write_bytes(b"not a png")
    ds = data.build_dataset(str(bad), image_size=16)
    i = [p for p, _ in ds.samples].index(str(bad / "a" / "broken.png"))
    with pytest.raises(data.UnreadableImageError, match="broken.png.*--skip-bad-images"):
        ds[i]
    skipping = data.build_dataset(str(bad), image_size=16, skip_bad_images=True)
    assert len(skipping) == 1 and skipping.skipped == [str(bad / "a" / "broken.png")]
    assert "1 unreadable images skipped" in skipping.describe() and "broken.png" in skipping.describe()
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        data.build_dataset(str(f))


class _FakeEncoder:
    """Stand-in for the VAE: moments = [avg-pooled image | constant logvar]."""

    latent_channels, downsample = 3, 8

    def __call__(self, x):
        mean = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([mean, torch.full_like(mean, -4.0)], dim=1)


def test_extract_latents_shards_and_latent_dataset(tmp_path):
    from dit_models.extract_latents import extract

    root = str(tmp_path / "imgs")
    _write_images(root, [("a", 3, (32, 32)), ("b", 4, (32, 32))])
    images = data.ImageFolderDataset(root, 16)
    out = str(tmp_path / "lat")
    for rank in range(2):  # two "ranks" write their own files
        extract(images, _FakeEncoder(), out, rank=rank, world_size=2, batch_size=2, num_workers=0, log=lambda *a: None)
    files = sorted(os.listdir(out))
    assert "meta.json" in files and "moments_r0_w2.npy" in files and "moments_r1_w2.npy" in files
    ds = data.build_dataset(out)
    assert isinstance(ds, data.LatentDataset) and len(ds) == 7 and ds.num_classes == 2
    assert (ds.channels, ds.resolution) == (3, 2)
    m, y = ds[5]
    assert m.shape == (2, 6, 2, 2) and y == 1
    x5 = images[5][0]
    torch.testing.assert_close(m[0, :3], torch.nn.functional.avg_pool2d(x5[None], 8)[0])
    torch.testing.assert_close(m[1, :3], torch.nn.functional.avg_pool2d(x5.flip(-1)[None], 8)[0])
    batch = torch.stack([ds[i][0] for i in range(7)])
    z1 = ds.augment(batch, torch.Generator().manual_seed(0))
    z2 = ds.augment(batch, torch.Generator().manual_seed(1))
    assert z1.shape == (7, 3, 2, 2) and not torch.equal(z1, z2)  # fresh flip + posterior sample per step
    # Incomplete extraction is reported.
    meta = json.load(open(os.path.join(out, "meta.json")))
    meta["num_images"] = 9
    json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
    with pytest.raises(ValueError, match="incomplete"):
        data.LatentDataset(out)


def test_vae_missing_is_a_clear_error(tmp_path, monkeypatch):
    root = str(tmp_path / "imgs")
    _write_images(root, [("a", 1, (16, 16))])
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(ImportError, match="diffusers.*--vae none"):
        data.build_dataset(root, image_size=16, vae="ema")


def test_train_on_a_folder_with_a_bad_image(tmp_path, capsys):
    """The training command names the unreadable file (from a DataLoader worker too) instead of a PIL
    traceback; --skip-bad-images trains on the rest and says how many it left out."""
    from dit_models import train

    root = tmp_path / "imgs"
    _write_images(str(root), [("a", 4, (20, 20)), ("b", 4, (20, 20))])
    (root / "b" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    argv = ["--method", "sit", "--model", "SiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
            "--data", str(root), "--image-size", "16", "--global-batch-size", "9", "--max-steps", "1",
            "--sample-every", "0", "--results-dir", str(tmp_path / "runs"), "--device", "cpu", "--num-workers", "1"]
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "zz_truncated.png" in err and "Traceback" not in err, err
    out = train.cli(argv[:argv.index("--global-batch-size")] + ["--global-batch-size", "8"] +
                    argv[argv.index("--max-steps"):] + ["--skip-bad-images"])
    assert out["checkpoint"] and "1 unreadable images skipped" in open(out["log"]).read()
