"""Corrupt files: truncated, bit-flipped, wrong-method and wrong-size checkpoints, corrupt latent caches and
images. Each either loads (a flip inside tensor data or pixels cannot be detected: no format here has a
checksum) or raises one ValueError whose single-line message names the file; the command-line tools then
print that line and exit 2, without a traceback."""
import json
import os
import random

import numpy as np
import pytest
import torch

from dit_models import checkpoint, data, sample, train
from dit_models.models.dit import DiT

TINY_DIT = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)


def _mutations(blob, rng, count):
    """(kind, bytes): truncations at random lengths and 1-3 random bit flips, plus the empty file."""
    out = [("empty", b"")]
    for _ in range(count):
        cut = rng.randrange(len(blob))
        out.append((f"truncated at {cut}", blob[:cut]))
        flipped = bytearray(blob)
        where = []
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(blob))
            flipped[i] ^= 1 << rng.randrange(8)
            where.append(i)
        out.append((f"bits flipped at {where}", bytes(flipped)))
    return out


def _assert_names_file(err, path, what):
    msg = str(err)
    assert isinstance(err, ValueError), f"{what}: {type(err).__name__} is not a ValueError: {msg}"
    assert str(path) in msg, f"{what}: the message does not name {path}: {msg}"
    assert "\n" not in msg.strip(), f"{what}: the message is not one line: {msg!r}"


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    torch.manual_seed(0)
    model = DiT(**TINY_DIT)
    path = tmp_path_factory.mktemp("ckpt") / "dit.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": {"note": "tiny"}}, path)
    return path


def test_fuzzed_checkpoints_load_or_name_the_file(dit_file, tmp_path):
    blob = dit_file.read_bytes()
    rng = random.Random(0)
    outcomes = {"loaded": 0, "error": 0}
    for i, (kind, content) in enumerate(_mutations(blob, rng, 40)):
        path = tmp_path / f"case{i}.pt"
        path.write_bytes(content)
        model = DiT(**TINY_DIT)
        try:
            checkpoint.load_checkpoint(str(path), model, which="ema")
        except Exception as e:  # noqa: BLE001  (any other type fails the assertion below)
            _assert_names_file(e, path, kind)
            outcomes["error"] += 1
        else:
            outcomes["loaded"] += 1
    assert outcomes["error"] >= 40  # every truncation, the empty file, and flips in the zip structure


def test_wrong_size_wrong_method_and_not_a_state_dict(dit_file, tmp_path):
    bigger = DiT(**dict(TINY_DIT, hidden_size=48))
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.load_checkpoint(str(dit_file), bigger)
    _assert_names_file(e.value, dit_file, "wrong size")
    assert "shape mismatch" in str(e.value)

    maskdit_like = tmp_path / "maskdit.pt"  # EDMPrecond layout: every key under "model."
    torch.save({"ema": {f"model.{k}": v for k, v in DiT(**TINY_DIT).state_dict().items()}}, maskdit_like)
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.load_checkpoint(str(maskdit_like), DiT(**TINY_DIT))
    _assert_names_file(e.value, maskdit_like, "wrong method")
    assert "load_maskdit_checkpoint" in str(e.value)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="not a DiT/SiT state_dict"):
        checkpoint.infer_config_from_state_dict(checkpoint.read_checkpoint(str(maskdit_like)))

    for name, obj in [("tensor.pt", torch.zeros(3)), ("strings.pt", {"ema": {"x_embedder.proj.weight": "abc"}}),
                      ("no_ema.pt", {"model": {}, "args": {}})]:
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(ValueError) as e:
            checkpoint.load_checkpoint(str(path), DiT(**TINY_DIT), which="ema")
        _assert_names_file(e.value, path, name)


def test_sample_cli_prints_one_line_for_a_truncated_checkpoint(dit_file, tmp_path, capsys):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(dit_file.read_bytes()[: len(dit_file.read_bytes()) // 2])
    with pytest.raises(SystemExit) as e:
        sample.cli(["--ckpt", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1, err


# ---- latent caches ---------------------------------------------------------------------------------------

def _latent_folder(root, n=5, c=2, size=2, classes=3):
    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(0)
    json.dump({"num_images": n, "num_classes": classes, "latent_channels": c, "latent_size": size, "vae": "test"},
              open(os.path.join(root, "meta.json"), "w"))
    np.save(os.path.join(root, "indices_r0_w1.npy"), np.arange(n, dtype=np.int64))
    np.save(os.path.join(root, "moments_r0_w1.npy"), rng.randn(n, 2, 2 * c, size, size).astype(np.float32))
    np.save(os.path.join(root, "labels_r0_w1.npy"), rng.randint(0, classes, n).astype(np.int64))
    np.save(os.path.join(root, "done_r0_w1.npy"), np.array(n))
    return root


def _read_all(root):
    ds = data.LatentDataset(root)
    return [ds[i] for i in range(len(ds))]


def test_fuzzed_latent_caches_load_or_name_the_file(tmp_path):
    clean = _latent_folder(str(tmp_path / "clean"))
    assert len(_read_all(clean)) == 5
    rng = random.Random(1)
    errors = 0
    for name in sorted(os.listdir(clean)):
        blob = open(os.path.join(clean, name), "rb").read()
        for i, (kind, content) in enumerate(_mutations(blob, rng, 6)):
            root = _latent_folder(str(tmp_path / f"{name}-{i}"))
            path = os.path.join(root, name)
            with open(path, "wb") as f:
                f.write(content)
            try:
                items = _read_all(root)
            except Exception as e:  # noqa: BLE001
                _assert_names_file(e, root if name == "indices_r0_w1.npy" and "incomplete" in str(e) else path,
                                   f"{name} {kind}")
                errors += 1
            else:
                assert len(items) == 5 and all(m.shape == (2, 4, 2, 2) for m, _ in items), f"{name} {kind}"
    assert errors >= 5 * 7  # every truncation and empty file of the five files


@pytest.mark.parametrize("change, culprit", [
    (lambda r: np.save(os.path.join(r, "moments_r0_w1.npy"), np.zeros((5, 2, 4, 3, 3), np.float32)), "moments_r0_w1.npy"),
    (lambda r: np.save(os.path.join(r, "moments_r0_w1.npy"), np.zeros((3, 2, 4, 2, 2), np.float32)), "moments_r0_w1.npy"),
    (lambda r: np.save(os.path.join(r, "labels_r0_w1.npy"), np.zeros(2, np.int64)), "labels_r0_w1.npy"),
    (lambda r: np.save(os.path.join(r, "labels_r0_w1.npy"), np.full(5, 7, np.int64)), "labels_r0_w1.npy"),
    (lambda r: np.save(os.path.join(r, "indices_r0_w1.npy"), np.arange(5) + 10), "indices_r0_w1.npy"),
    (lambda r: np.save(os.path.join(r, "done_r0_w1.npy"), np.array(9)), "done_r0_w1.npy"),
    (lambda r: os.remove(os.path.join(r, "labels_r0_w1.npy")), "labels_r0_w1.npy"),
    (lambda r: open(os.path.join(r, "meta.json"), "w").write("{not json"), "meta.json"),
    (lambda r: open(os.path.join(r, "meta.json"), "w").write('{"num_images": 5}'), "meta.json"),
    (lambda r: open(os.path.join(r, "meta.json"), "w").write("[1, 2]"), "meta.json"),
], ids=["other latent size", "fewer rows", "fewer labels", "label out of range", "index out of range",
        "done past the end", "missing labels", "meta not json", "meta missing keys", "meta not an object"])
def test_inconsistent_latent_cache_names_the_file(tmp_path, change, culprit):
    root = _latent_folder(str(tmp_path / "lat"))
    change(root)
    with pytest.raises(ValueError) as e:
        data.LatentDataset(root)
    _assert_names_file(e.value, os.path.join(root, culprit), culprit)


def test_train_cli_prints_one_line_for_a_corrupt_latent_cache(tmp_path, capsys):
    root = _latent_folder(str(tmp_path / "lat"), c=4, size=4)
    path = os.path.join(root, "moments_r0_w1.npy")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 3])
    argv = ["--data", root, "--results-dir", str(tmp_path / "runs"), "--depth", "1", "--hidden-size", "32",
            "--num-heads", "2", "--global-batch-size", "2", "--device", "cpu", "--num-workers", "0", "--max-steps", "1"]
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and path in err and len(err.strip().splitlines()) == 1, err


# ---- images ----------------------------------------------------------------------------------------------

def test_fuzzed_images_decode_or_name_the_file(tmp_path):
    from PIL import Image

    rng = random.Random(2)
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    arr = np.random.RandomState(0).randint(0, 255, (12, 12, 3)).astype(np.uint8)
    blobs = {}
    for ext, fmt in (("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP")):
        Image.fromarray(arr).save(root / f"clean.{ext}", fmt)
        blobs[ext] = (root / f"clean.{ext}").read_bytes()
    count = 0
    for ext, blob in blobs.items():
        for i, (kind, content) in enumerate(_mutations(blob, rng, 8)):
            (root / "a" / f"m{i}.{ext}").write_bytes(content)
            count += 1
    (root / "a" / "text.png").write_text("not an image\n")
    ds = data.ImageFolderDataset(str(root), 8, channels=3)
    errors = 0
    for i, (path, _) in enumerate(ds.samples):
        try:
            x, _ = ds[i]
        except Exception as e:  # noqa: BLE001
            _assert_names_file(e, path, os.path.basename(path))
            assert isinstance(e, data.UnreadableImageError)
            errors += 1
        else:
            assert x.shape == (3, 8, 8) and torch.isfinite(x).all()
    assert errors >= 4  # the empty files and the text file at least


def test_sampling_loader_names_the_file_for_a_wrong_size_checkpoint(dit_file, tmp_path):
    from dit_models.generation import load_model_for_sampling

    # Released-file path: a DiT file sampled as SiT with the wrong --num-heads still loads; an EDM layout as ddpm
    # cannot, and the message names the file.
    maskdit_like = tmp_path / "edm.pt"
    torch.save({"ema": {f"model.{k}": v for k, v in DiT(**TINY_DIT).state_dict().items()}}, maskdit_like)
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        load_model_for_sampling(str(maskdit_like), method="ddpm")
    _assert_names_file(e.value, maskdit_like, "released file of another method")
    # Our container whose recorded sizes do not fit its weights (edited by hand, or a bad merge).
    from dit_models import train
    from test_train import make_args

    out = train.main(make_args("sit", tmp_path / "run", "--max-steps", "1", "--ckpt-every", "1"))
    ck = torch.load(out["checkpoint"], map_location="cpu")
    ck["args"]["hidden_size"] = 2 * ck["args"]["hidden_size"]
    edited = tmp_path / "edited.pt"
    torch.save(ck, edited)
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        load_model_for_sampling(str(edited))
    _assert_names_file(e.value, edited, "our checkpoint with other sizes")
