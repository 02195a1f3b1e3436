"""What the command-line tools share: argument types that reject bad values at parse time, and one way to
turn the errors a user can fix (and Ctrl-C) into one line instead of a traceback.

    p.add_argument("--global-batch-size", type=positive_int, default=256)
    ...
    return run_cli(main, args, errors=(FileNotFoundError, ValueError))
"""
import argparse
import copy
import math
import sys

__all__ = ["finite_float", "positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "probability",
           "fraction_below_one", "run_cli", "HelpFormatter", "parser"]


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def finite_float(text):
    """Any finite number (a log-normal mean)."""
    return _number(float, text)


def positive_int(text):
    """An integer >= 1 (sizes, counts, steps)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text):
    """An integer >= 0 (intervals where 0 means off, worker counts)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text):
    """A finite number > 0 (learning rates, noise levels)."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def nonnegative_float(text):
    """A finite number >= 0 (guidance scales: 0 is unconditional, 1 is no guidance)."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def probability(text):
    """A number in [0, 1] (EMA decay, label dropout)."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def fraction_below_one(text):
    """A number in [0, 1) (mask ratios: at least one token must stay)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {value:g}")
    return value


def run_cli(main, args, errors=(FileNotFoundError, ValueError), interrupted=None, cleanup=None):
    """main(args), with the errors a user can act on printed as one `error: ...` line (exit status 2) and
    Ctrl-C as one line (exit status 130) instead of a traceback.

    Args:
        errors: exception types whose message is the whole story (bad input, a missing file).
        interrupted: callable () -> str, what to say after Ctrl-C (e.g. where the last checkpoint is).
        cleanup: callable run before exiting on an error or Ctrl-C (e.g. tearing down a process group).
    """
    try:
        return main(args)
    except KeyboardInterrupt:
        if cleanup is not None:
            cleanup()
        note = interrupted() if interrupted is not None else ""
        print("interrupted" + (f": {note}" if note else ""), file=sys.stderr)
        sys.exit(130)
    except errors as e:
        if cleanup is not None:
            cleanup()
        print(f"error: {str(e).strip()}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default shown once: "(default: X)" is added unless the help text already names
    the default, or there is none to show (None, an off switch)."""

    @staticmethod
    def _has_default(action):
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        return not (off or action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))

    def _format_action(self, action):
        if not action.help and action.option_strings and self._has_default(action):  # a flag without help text
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or not self._has_default(action):
            return text
        return super()._get_help_string(action)


def parser(tool, description, **kwargs):
    """The ArgumentParser of `python -m dit_models.<tool>` (its usage line names that command)."""
    return argparse.ArgumentParser(prog=f"python -m dit_models.{tool}", description=description,
                                   formatter_class=kwargs.pop("formatter_class", HelpFormatter), **kwargs)
