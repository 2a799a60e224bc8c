"""Random invalid values for every typed option of every console script: each is refused
while the options are parsed (nothing runs), with exit status 2 and one line on stderr that
names the option (and, for a number, the valid range).

Commands come from pyproject's [project.scripts]; each module follows llm.cli's convention
(build_parser() and main(argv)). Invalid values are derived from each option's declared type:
a number outside the bounds an llm.cli.Bounded type carries, text that is not a number, a
choice not offered, a path that does not exist.
"""

import argparse
import importlib
import re
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")  # not on the GPU machine; CI requires it (conftest)

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.cli import Bounded

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def console_scripts() -> dict[str, str]:
    """{command: "module:function"} from pyproject's [project.scripts] table."""
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", PYPROJECT.read_text(), re.M | re.S).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))


def command_params() -> list:
    return [
        pytest.param(name, target, id=name) for name, target in sorted(console_scripts().items())
    ]


def load_command(target: str):
    module_name, function = target.split(":")
    module = importlib.import_module(module_name)
    return module.build_parser(), getattr(module, function)


def parses_as(number_type: type, text: str) -> bool:
    try:
        number_type(text)
    except ValueError:
        return False
    return True


def words(alphabet_size=12):
    return st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=alphabet_size)


def invalid_numbers(kind: Bounded):
    """Text for a number outside kind's range (by construction, not by asking the type), or
    text that is not a number of its kind at all."""
    outside = []
    if kind.kind is int:
        if kind.minimum is not None:
            outside.append(st.integers(max_value=kind.minimum - 1))
        if kind.maximum is not None:
            outside.append(st.integers(min_value=kind.maximum + 1))
        outside.append(st.floats(allow_nan=True).map(repr))  # "1.5", "nan", "inf"
    else:
        if kind.minimum is not None:
            outside.append(st.floats(max_value=kind.minimum, exclude_max=not kind.min_open))
        if kind.maximum is not None:
            outside.append(st.floats(min_value=kind.maximum, exclude_min=not kind.max_open))
        outside.append(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    outside.append(words().filter(lambda text: not parses_as(kind.kind, text)))
    return st.one_of(outside).map(str)


def invalid_value_strategy(action: argparse.Action):
    """A strategy of (text, what the error must also say) for one option, or None if any text is valid."""
    if isinstance(action.type, Bounded):
        return invalid_numbers(action.type).map(lambda text: (text, action.type.expected))
    if action.choices is not None:
        return words().filter(lambda text: text not in action.choices).map(lambda text: (text, ""))
    if action.type is not None:  # paths, devices, tokenizer specs: a path that does not exist is none of them
        return words().map(lambda text: ("/nonexistent-llm-fuzz/" + text, ""))
    return None


def typed_options(parser: argparse.ArgumentParser, subcommand: tuple[str, ...] = ()):
    """(subcommand words, option string, strategy of invalid values) for every option whose
    value is checked, the options of each subcommand (llm-rag index|ask|eval) included."""
    options = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, subparser in action.choices.items():
                options += typed_options(subparser, subcommand + (word,))
            continue
        if not action.option_strings or action.nargs == 0:
            continue  # positionals, flags
        strategy = invalid_value_strategy(action)
        if strategy is not None:
            options.append((subcommand, action.option_strings[-1], strategy))
    return options


@pytest.mark.parametrize("name, target", command_params())
def test_command_follows_the_convention(name, target):
    parser, main = load_command(target)
    assert parser.prog == name  # --help and errors show the command people type
    assert typed_options(parser), f"{name} has no checked option"


@pytest.mark.parametrize("name, target", command_params())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_invalid_option_values_are_refused_in_one_line(name, target, data, capsys):
    parser, main = load_command(target)
    for subcommand, option, strategy in typed_options(parser):  # every option, a fresh invalid value each example
        text, expected = data.draw(strategy, label=option)
        with pytest.raises(SystemExit) as exited:
            main([*subcommand, f"{option}={text}"])  # the = form, so values such as "-1e-05" reach the option
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{' '.join((name, *subcommand))}: error: ") and err.count("\n") == 1, err
        assert option in err and expected in err, err
