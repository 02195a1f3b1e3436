"""sample_ddp's resumable parts never mix settings: settings.json beside the parts, refusal with the list of
differing settings, the settings hash in the default name, checked parts (torn, wrong labels), old folders."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from dit_models import sample_ddp, train

TINY = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16", "--device", "cpu",
        "--num-workers", "0", "--log-every", "5", "--sample-every", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny 2-step DiT checkpoint (the format matters here, not the quality)."""
    root = tmp_path_factory.mktemp("run")
    argv = ["--method", "ddpm", "--model", "DiT-S/2", "--max-steps", "2", "--results-dir", str(root), *TINY]
    p = train.get_parser()
    return train.main(train.resolve_args(p.parse_args(argv), p, argv))["checkpoint"]


def base_argv(ckpt, sample_dir, *extra, n=10, name="s"):
    argv = ["--ckpt", ckpt, "--num-fid-samples", str(n), "--per-proc-batch-size", "4", "--sample-dir", str(sample_dir),
            "--sampler", "dpm++", "--num-sampling-steps", "2", "--cfg-scale", "1.5", "--device", "cpu", *extra]
    return argv + (["--name", name] if name else [])


def run(argv):
    return sample_ddp.main(sample_ddp.get_parser().parse_args(argv))


def npz(path):
    with np.load(path) as d:
        return d["arr_0"].copy(), d["labels"].copy()


def snapshot(folder):
    """{file: bytes} of a folder, to show that a refused run touched nothing."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.fixture
def counted(monkeypatch):
    """The number of batches a run generates."""
    calls = []
    real = sample_ddp.generate
    monkeypatch.setattr(sample_ddp, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The uninterrupted run of the base settings: (images, labels)."""
    return npz(run(base_argv(ckpt, tmp_path_factory.mktemp("ref"))))


def test_interrupted_run_resumes_to_the_uninterrupted_result(ckpt, tmp_path, reference, monkeypatch, counted):
    real_save, saved = sample_ddp._save_npz_atomic, []

    def crash_after_two(path, **arrays):
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed after two batches
        saved.append(path)
        real_save(path, **arrays)

    monkeypatch.setattr(sample_ddp, "_save_npz_atomic", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(base_argv(ckpt, tmp_path))
    monkeypatch.setattr(sample_ddp, "_save_npz_atomic", real_save)
    parts = tmp_path / "s_parts"
    assert sorted(os.listdir(parts)) == ["000000.npz", "000001.npz", "settings.json"]
    counted.clear()
    images, labels = npz(run(base_argv(ckpt, tmp_path)))
    assert len(counted) == 1  # only the missing batch 2 was generated; 0 and 1 were reused
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])
    assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8
    record = json.load(open(parts / "settings.json"))
    assert record["settings"]["per_proc_batch_size"] == 4 and record["info"]["num_fid_samples"] == 10
    assert record["settings"]["sampler"]["sampler"] == "dpm++" and "cuda_graph" not in record["settings"]["sampler"]


CHANGES = [
    (["--per-proc-batch-size", "3"], "per_proc_batch_size: 4 -> 3"),
    (["--solver-order", "3"], "sampler.solver_order: 2 -> 3"),
    (["--time-spacing", "logSNR"], 'sampler.time_spacing: "time_uniform" -> "logSNR"'),
    (["--guided-channels", "1"], "sampler.guided_channels: null -> 1"),
    (["--parity-uint8"], "parity_uint8: false -> true"),
    (["--sampler", "ddim"], 'sampler.sampler: "dpm++" -> "ddim"'),
    (["--cfg-scale", "2.0"], "cfg_scale: 1.5 -> 2.0"),
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--num-sampling-steps", "3"], "sampler.num_sampling_steps: 2 -> 3"),
    (["--precision", "bf16"], 'precision: "fp32" -> "bf16"'),
]


@pytest.mark.parametrize("extra,line", CHANGES, ids=[" ".join(c[0]) for c in CHANGES])
def test_changed_setting_is_refused_under_the_same_name(ckpt, tmp_path, extra, line):
    out = run(base_argv(ckpt, tmp_path))
    before, result = snapshot(tmp_path / "s_parts"), open(out, "rb").read()
    with pytest.raises(sample_ddp.PartsMismatch) as e:
        run(base_argv(ckpt, tmp_path, *extra))  # the later flag wins
    msg = str(e.value)
    assert line in msg and "old -> new" in msg and "--sample-dir" in msg and "delete" in msg, msg
    assert snapshot(tmp_path / "s_parts") == before and open(out, "rb").read() == result  # nothing touched


def test_refusal_lists_every_difference_and_the_cli_exits_2(ckpt, tmp_path, capsys):
    run(base_argv(ckpt, tmp_path))
    with pytest.raises(SystemExit) as e:
        sample_ddp.cli(base_argv(ckpt, tmp_path, "--per-proc-batch-size", "5", "--parity-uint8", "--solver-order", "3"))
    err = capsys.readouterr().err
    assert e.value.code == 2
    for line in ("per_proc_batch_size: 4 -> 5", "parity_uint8: false -> true", "sampler.solver_order: 2 -> 3"):
        assert line in err, err


@pytest.mark.parametrize("extra", [c[0] for c in CHANGES if c[0][0] != "--sampler"][:4])
def test_default_names_of_other_settings_land_in_another_folder(ckpt, tmp_path, reference, extra):
    first = run(base_argv(ckpt, tmp_path, name=None))
    second = run(base_argv(ckpt, tmp_path, *extra, name=None))
    assert first != second and os.path.exists(first) and os.path.exists(second)
    assert np.array_equal(npz(first)[0], reference[0])  # the first run's file and parts are intact
    folders = sorted(f for f in os.listdir(tmp_path) if f.endswith("_parts"))
    assert len(folders) == 2 and all(os.path.exists(tmp_path / f / "settings.json") for f in folders)
    assert run(base_argv(ckpt, tmp_path, name=None)) == first  # same settings, same name: resumed


def test_other_checkpoint_is_refused_a_copied_one_is_not(ckpt, tmp_path):
    run(base_argv(ckpt, tmp_path))
    copy = str(tmp_path / "moved.pt")
    shutil.copy(ckpt, copy)
    run(base_argv(copy, tmp_path))  # same content elsewhere: reused
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    next(iter(state["ema"].values())).add_(1.0)
    other = str(tmp_path / "other.pt")
    torch.save(state, other)
    with pytest.raises(sample_ddp.PartsMismatch, match="checkpoint_fingerprint"):
        run(base_argv(other, tmp_path))


def test_torn_or_foreign_part_is_regenerated_not_reused(ckpt, tmp_path, reference, capsys, counted):
    out = run(base_argv(ckpt, tmp_path))
    parts = tmp_path / "s_parts"
    data = open(parts / "000000.npz", "rb").read()
    open(parts / "000000.npz", "wb").write(data[: len(data) // 2])  # torn (e.g. a crash without fsync)
    other = tmp_path / "other"
    run(base_argv(ckpt, other, "--seed", "3"))
    shutil.copy(other / "s_parts" / "000001.npz", parts / "000001.npz")  # a part of another seed
    os.remove(out)
    counted.clear()
    images, labels = npz(run(base_argv(ckpt, tmp_path)))
    err = capsys.readouterr().err
    assert "regenerating" in err and "000000.npz: unreadable" in err and "000001.npz: its labels" in err, err
    assert len(counted) == 2
    assert np.array_equal(images, reference[0]) and np.array_equal(labels, reference[1])


def test_more_samples_reuse_full_batches_and_redo_the_short_last_one(ckpt, tmp_path, reference, counted, capsys):
    run(base_argv(ckpt, tmp_path, n=10))  # batches of 4, 4, 2
    counted.clear()
    images, _ = npz(run(base_argv(ckpt, tmp_path, n=14)))  # batches of 4, 4, 4, 2
    assert len(counted) == 2 and "000002.npz: images" in capsys.readouterr().err
    assert np.array_equal(images, npz(run(base_argv(ckpt, tmp_path / "fresh", n=14)))[0])
    assert np.array_equal(images[:8], reference[0][:8])


def test_parts_of_an_older_version_need_the_flag(ckpt, tmp_path, reference, counted):
    run(base_argv(ckpt, tmp_path))
    parts = tmp_path / "s_parts"
    os.remove(parts / "settings.json")  # as an older sample_ddp left it
    os.remove(parts / "000002.npz")
    with pytest.raises(sample_ddp.PartsMismatch, match="--reuse-unverified-parts") as e:
        run(base_argv(ckpt, tmp_path))
    assert "no settings.json" in str(e.value)
    assert not os.path.exists(parts / "settings.json")
    counted.clear()
    images, _ = npz(run(base_argv(ckpt, tmp_path, "--reuse-unverified-parts")))
    assert len(counted) == 1 and np.array_equal(images, reference[0])
    record = json.load(open(parts / "settings.json"))
    assert record["info"]["adopted_unverified_parts"] == 2
    run(base_argv(ckpt, tmp_path))  # adopted: later resumes need no flag
    with pytest.raises(sample_ddp.PartsMismatch):
        run(base_argv(ckpt, tmp_path, "--cfg-scale", "1.0"))
