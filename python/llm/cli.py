"""What every console script shares: option types that check their range, and one line
(never a traceback) for bad input.

Conventions for a command module (llm.train, llm.generate, ...):
  build_parser()  its argparse parser, with `prog` set to the command people type;
  main(argv)      decorated with @command(prog): a ValueError / FileNotFoundError raised for bad
                  input ends the program with "<prog>: error: <message>" and exit status 2,
                  like argparse's own errors; Ctrl-C ends it with one line and status 130.
Options are validated when parsed (the types below), so a bad value is refused before any
work starts, with a message naming the option and the valid range.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose usage line shows `prog` (the console script) and whose help keeps the
    module docstring's layout."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def int_in(minimum: int | None = None, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum] (either bound may be open)."""
    return _bounded(int, "an integer", minimum, maximum, True, True)


def float_in(minimum: float | None = None, maximum: float | None = None, *, min_open: bool = False,
             max_open: bool = False):
    """An argparse type: a finite float in [minimum, maximum]; min_open / max_open exclude a bound."""
    return _bounded(float, "a number", minimum, maximum, not min_open, not max_open)


def _bounded(kind, noun: str, low, high, low_closed: bool, high_closed: bool):
    left, right = ("[" if low_closed else "("), ("]" if high_closed else ")")
    if low is not None and high is not None:
        expected = f"{noun} in {left}{low}, {high}{right}"
    elif low is not None:
        expected = f"{noun} {'>=' if low_closed else '>'} {low}"
    elif high is not None:
        expected = f"{noun} {'<=' if high_closed else '<'} {high}"
    else:
        expected = noun

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        too_low = low is not None and (value < low if low_closed else value <= low)
        too_high = high is not None and (value > high if high_closed else value >= high)
        if (kind is float and not math.isfinite(value)) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


def command(prog: str):
    """Decorator for a console script's main(argv): bad input -> "prog: error: ..." on stderr
    and exit status 2 (argparse's own convention); Ctrl-C -> one line and status 130."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None):
            try:
                return main(argv)
            except USER_ERRORS as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                raise SystemExit(2) from None
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                raise SystemExit(130) from None

        return run

    return decorate
