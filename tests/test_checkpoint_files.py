"""Our checkpoints outside the CLI: torch.load's safe default reads them, the RNG state round-trips,
and a loaded container prints a few lines."""
import random

import numpy as np
import torch

from dit_models import builders, load_checkpoint, train, utils
from test_train import make_args


def test_checkpoint_loads_with_weights_only_and_restores_rng(tmp_path):
    out = train.main(make_args("sit", tmp_path, "--max-steps", "2", "--ckpt-every", "2"))
    ckpt = torch.load(out["checkpoint"], map_location="cpu")  # torch's default: weights_only=True
    assert isinstance(ckpt["rng"][0]["numpy"]["keys"], torch.Tensor)

    utils.set_rng_states(ckpt["rng"][0])
    expected = (torch.rand(3), np.random.rand(3), random.random())
    utils.set_rng_states(ckpt["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]

    loaded = load_checkpoint(out["checkpoint"], builders.build_model_from_args(ckpt["args"], 16, 1))
    text = repr(loaded)
    assert text.startswith("Checkpoint(") and "ema: " in text and "tensors" in text and "method 'sit'" in text
    assert len(text) < 400 and "tensor(" not in text
    assert "state dict: " in repr(type(loaded)(ckpt["ema"]))


def test_rng_state_of_older_checkpoints_still_restores():
    # Checkpoints written before the RNG state became tensors hold numpy's own tuple.
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = np.random.rand(2)
    utils.set_rng_states(old)
    assert np.array_equal(np.random.rand(2), expected)
