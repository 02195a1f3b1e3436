"""dit_models.cli: parse-time argument types and the one-line error / Ctrl-C reporting of the tools."""
import argparse

import pytest

from dit_models import cli


def _parser():
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--batch-size", type=cli.positive_int)
    p.add_argument("--every", type=cli.nonnegative_int)
    p.add_argument("--lr", type=cli.positive_float)
    p.add_argument("--cfg-scale", type=cli.nonnegative_float)
    p.add_argument("--ema-decay", type=cli.probability)
    p.add_argument("--mask-ratio", type=cli.fraction_below_one)
    return p


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
    (["--batch-size", "2.5"], "argument --batch-size: expected an integer, got '2.5'"),
    (["--every", "-3"], "argument --every: must be 0 or more, got -3"),
    (["--lr", "0"], "argument --lr: must be greater than 0, got 0"),
    (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["--cfg-scale", "-2"], "argument --cfg-scale: must be 0 or more, got -2"),
    (["--ema-decay", "1.5"], "argument --ema-decay: must be between 0 and 1, got 1.5"),
    (["--mask-ratio", "1"], "argument --mask-ratio: must be at least 0 and below 1, got 1"),
])
def test_bad_values_are_one_line_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tool: error: {message}"


def test_good_values_parse():
    a = _parser().parse_args(["--batch-size", "1", "--every", "0", "--lr", "1e-4", "--cfg-scale", "0",
                              "--ema-decay", "0.9999", "--mask-ratio", "0.5"])
    assert (a.batch_size, a.every, a.lr, a.cfg_scale, a.ema_decay, a.mask_ratio) == (1, 0, 1e-4, 0.0, 0.9999, 0.5)


def test_run_cli_turns_errors_and_ctrl_c_into_one_line(capsys):
    def fails(_):
        raise ValueError("--model: no such model 'DiT-Q/2'\n")

    def interrupted(_):
        raise KeyboardInterrupt

    cleaned = []
    with pytest.raises(SystemExit) as e:
        cli.run_cli(fails, None, cleanup=lambda: cleaned.append(1))
    assert e.value.code == 2 and cleaned == [1]
    assert capsys.readouterr().err == "error: --model: no such model 'DiT-Q/2'\n"
    with pytest.raises(SystemExit) as e:
        cli.run_cli(interrupted, None, interrupted=lambda: "last checkpoint: results/000/checkpoints/0000100.pt")
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted: last checkpoint: results/000/checkpoints/0000100.pt\n"
    with pytest.raises(RuntimeError):  # not a user error: the traceback stays
        cli.run_cli(lambda _: (_ for _ in ()).throw(RuntimeError("bug")), None)
    assert cli.run_cli(lambda a: a + 1, 1) == 2
