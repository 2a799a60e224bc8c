"""What every console script shares: option types that check their range, and one line
(never a traceback) for bad input.

Conventions for a command module (llm.train, llm.generate_cli, ...):
  build_parser()  its argparse parser, with `prog` set to the command people type;
  main(argv)      decorated with @command(prog): a ValueError / FileNotFoundError raised for bad
                  input ends the program with "<prog>: error: <message>" and exit status 2,
                  like argparse's own errors; Ctrl-C ends it with one line and status 130.
Options are validated when parsed (the types below), so a bad value is refused before any
work starts, with a message naming the option and the valid range; --help shows each
option's range and default.

LLM_EXTRA_ARGS (environment): options added after a console script's own, so a documented
command can be tried smaller without editing it, e.g. LLM_EXTRA_ARGS="--max-steps 20"
(the README's test runs its examples that way). The command says so on stderr when it is set.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (no usage block): "prog: error: ... (see prog --help)"."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            # argparse (CPython 3.11) turns "--option=--" into [] without calling the type or
            # checking the choices.
            if action.option_strings and action.nargs is None and getattr(namespace, action.dest, None) == []:
                expected = action.type.expected if isinstance(action.type, Bounded) else "one value"
                self.error(f"argument {'/'.join(action.option_strings)}: expected {expected}")
        return namespace, extras


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and ends each option's line with the range
    its type accepts and its default, unless its help says them already."""

    def _format_action(self, action: argparse.Action) -> str:
        notes = [action.help] if action.help else []
        if isinstance(action.type, Bounded) and action.type.expected not in (action.help or ""):
            notes.append(action.type.expected)
        if action.option_strings and has_default(action) and "default" not in (action.help or ""):
            notes.append(f"default {_shown(action.default)}")
        if len(notes) > (1 if action.help else 0):
            action = copy.copy(action)
            action.help = "; ".join(notes[:1] + [note.replace("%", "%%") for note in notes[1:]])
        return super()._format_action(action)


def has_default(action: argparse.Action) -> bool:
    """Whether an option has a default worth showing: not None, a flag's False or an empty list (0 is one)."""
    default = action.default
    return not (default is None or default is False or default is argparse.SUPPRESS or default == [])


def _shown(value) -> str:
    """A default as --help shows it: text that is empty or holds spaces or newlines is quoted."""
    if isinstance(value, str) and (not value or value != value.strip() or "\n" in value):
        return repr(value)
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose usage line shows `prog` (the console script), whose help keeps the
    module docstring's layout and shows every option's range and default, and whose errors
    are one line."""
    return OneLineErrorParser(prog=prog, description=doc, formatter_class=HelpFormatter)


@dataclass(frozen=True)
class Bounded:
    """An argparse type: a number of `kind` (int, or a finite float) in a range whose ends may
    be open (None) or excluded. The bounds stay readable (tests derive invalid values from
    them), and check() applies the same rule to a value set in Python rather than parsed."""

    kind: type
    minimum: float | None = None
    maximum: float | None = None
    min_open: bool = False  # True: the minimum itself is excluded
    max_open: bool = False

    @property
    def expected(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            left, right = ("(" if self.min_open else "["), (")" if self.max_open else "]")
            return f"{noun} in {left}{low}, {high}{right}"
        if low is not None:
            return f"{noun} {'>' if self.min_open else '>='} {low}"
        if high is not None:
            return f"{noun} {'<' if self.max_open else '<='} {high}"
        return noun

    def contains(self, value) -> bool:
        if self.kind is float and not math.isfinite(value):
            return False
        if self.minimum is not None and (value <= self.minimum if self.min_open else value < self.minimum):
            return False
        return self.maximum is None or (value < self.maximum if self.max_open else value <= self.maximum)

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}")
        return value

    def check(self, name: str, value) -> None:
        """ValueError naming `name` unless value is of this type and in range."""
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or not self.contains(value):
            raise ValueError(f"{name}: expected {self.expected}, got {value!r}")


def int_in(minimum: int | None = None, maximum: int | None = None) -> Bounded:
    """An argparse type: an integer in [minimum, maximum] (either bound may be open)."""
    return Bounded(int, minimum, maximum)


def float_in(minimum: float | None = None, maximum: float | None = None, *, min_open: bool = False,
             max_open: bool = False) -> Bounded:
    """An argparse type: a finite float in [minimum, maximum]; min_open / max_open exclude a bound."""
    return Bounded(float, minimum, maximum, min_open, max_open)


# --seed of every command: what torch.manual_seed takes, less the negative half (a seed
# plus a rank or sample index stays below its 2**64 limit).
SEED = int_in(0, 2**63 - 1)


def checked_by(check, metavar: str):
    """An argparse type from a function that validates (and may convert) a value, raising
    ValueError / FileNotFoundError with a message: the message becomes argparse's error."""

    def parse(text: str):
        try:
            return check(text)
        except USER_ERRORS as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = metavar
    return parse


def existing_file(text: str) -> str:
    """An argparse type: the path of a file that exists (a folder is refused, with a hint)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file (e.g. {path / 'ckpt.pt'})")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def existing_path(text: str) -> str:
    """An argparse type: a file or folder that exists."""
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


def device_name(text: str) -> str:
    """An argparse type: a device llm.runtime.resolve_device accepts on this machine (kept as text)."""
    from llm.runtime import resolve_device

    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--device").lstrip(": ")) from None
    return text


# --progress (llm-train and llm-finetune): the tqdm bar; None = only when stderr is a terminal,
# so redirected logs get no carriage-return frames. Evaluation lines print either way.
PROGRESS_SETTINGS = {"auto": None, "on": True, "off": False}


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=list(PROGRESS_SETTINGS), default="auto",
                        help="the progress bar: auto = only on a terminal (evaluations always print)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="off", help="--progress off")


def shows_bar(progress: bool | None) -> bool:
    """Whether the progress bar draws, for a PROGRESS_SETTINGS value."""
    return sys.stderr.isatty() if progress is None else progress


def extra_args(prog: str) -> list[str]:
    """The options in LLM_EXTRA_ARGS (see the module docstring), announced on stderr."""
    extra = shlex.split(os.environ.get("LLM_EXTRA_ARGS", ""))
    if extra:
        print(f"{prog}: adding LLM_EXTRA_ARGS: {shlex.join(extra)}", file=sys.stderr)
    return extra


def command(prog: str):
    """Decorator for a console script's main(argv): bad input -> "prog: error: ..." on stderr
    and exit status 2 (argparse's own convention); Ctrl-C -> one line and status 130."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None):
            if argv is None:  # run as a console script
                argv = sys.argv[1:] + extra_args(prog)
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
