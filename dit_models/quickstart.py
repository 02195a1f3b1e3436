"""Quickstart: train a small SiT on the embedded digits, then write samples, a loss plot and the evaluation score.

    python -m dit_models.quickstart                  # a few minutes on a laptop CPU
    python -m dit_models.quickstart --max-steps 20   # smoke test (any dit_models.train flag overrides the preset)

Same as `python -m dit_models.train --quickstart ...`; the preset is dit_models.train.QUICKSTART.
"""
import sys

from dit_models.train import cli as _train_cli


def cli(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    return _train_cli(["--quickstart"] + argv)


if __name__ == "__main__":
    cli()
