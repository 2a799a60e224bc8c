"""scripts/mutate.py, the curated mutation check, on a tiny fake repository: a mutation its
test catches is reported killed (naming the test), one nothing tests survives and fails the
check, and malformed entries or a test failing unmutated are refused with one clear error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutate.py"

CALC = '''def add(a, b):
    return a + b


def untested(a):
    return a * 2
'''

TEST_CALC = '''from calc import add


def test_add():
    assert add(2, 3) == 5


def test_broken():
    assert False
'''


def entry(name, find, replace, tests=("tests/test_calc.py::test_add",), file="calc.py"):
    return {"name": name, "file": file, "find": find, "replace": replace, "tests": list(tests), "why": "test"}


@pytest.fixture
def fake_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests" / "mutations").mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    (repo / "kernel.cu").write_text("// a + b\n")
    (repo / "tests" / "test_calc.py").write_text(TEST_CALC)
    (repo / "pytest.ini").write_text("[pytest]\npythonpath = .\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def mutate(repo, entries, *args):
    (repo / "tests" / "mutations" / "fake.json").write_text(json.dumps(entries))
    done = subprocess.run([sys.executable, str(SCRIPT), "--repo", str(repo), "--jobs", "2", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def table_row(output, name):
    return next(line for line in output.splitlines() if line.startswith(name + " "))


def test_killed_and_surviving_mutations_are_reported(fake_repo):
    returncode, output = mutate(fake_repo, [entry("add-subtracts", "a + b", "a - b"),
                                            entry("untested-changed", "a * 2", "a * 3")])  # fmt: skip
    assert returncode == 1, output
    killed, survived = table_row(output, "add-subtracts"), table_row(output, "untested-changed")
    assert "killed" in killed and "tests/test_calc.py::test_add" in killed
    assert "survived" in survived
    assert "untested-changed (tests/mutations/fake.json) SURVIVED" in output
    assert "1/2 mutations killed" in output
    assert (fake_repo / "calc.py").read_text() == CALC  # the repository itself is never touched


def test_all_killed_passes(fake_repo):
    returncode, output = mutate(fake_repo, [entry("add-subtracts", "a + b", "a - b")])
    assert returncode == 0 and "1/1 mutations killed" in output, output


@pytest.mark.parametrize("bad, message", [
    (entry("twice", "return a", "return b"), "'find' occurs 2 times in calc.py; it must occur exactly once"),
    (entry("absent", "a / b", "a * b"), "'find' occurs 0 times"),
    (entry("Not_Kebab", "a + b", "a - b"), "short-kebab-case"),
    (entry("same", "a + b", "a + b"), "'replace' equals 'find'"),
    (entry("no-tests", "a + b", "a - b", tests=()), "'tests' must be a non-empty list"),
    (entry("elsewhere", "a + b", "a - b", file="../calc.py"), "is not a file relative to the repository root"),
    ({**entry("extra", "a + b", "a - b"), "comment": "x"}, "unknown keys ['comment']"),
    ({"name": "short", "file": "calc.py"}, "missing keys ['find', 'replace', 'tests', 'why']"),
    (entry("kernel", "a + b", "a - b", file="kernel.cu"), "kernel.cu is compiled into the extension"),
])  # fmt: skip
def test_malformed_entries_are_refused(fake_repo, bad, message):
    returncode, output = mutate(fake_repo, [entry("add-subtracts", "a + b", "a - b"), bad])
    assert returncode == 2 and message in output, output
    assert "mutations killed" not in output  # refused before anything runs


def test_duplicate_names_and_empty_files_are_refused(fake_repo):
    (fake_repo / "tests" / "mutations" / "other.json").write_text(json.dumps([entry("add-subtracts", "a + b", "a-b")]))
    returncode, output = mutate(fake_repo, [entry("add-subtracts", "a + b", "a - b")])
    assert returncode == 2 and "name 'add-subtracts' is also used in" in output, output
    (fake_repo / "tests" / "mutations" / "other.json").write_text("[]")
    returncode, output = mutate(fake_repo, [entry("add-subtracts", "a + b", "a - b")])
    assert returncode == 2 and "other.json: expected a non-empty JSON list" in output, output


def test_a_test_failing_unmutated_is_not_counted_as_a_kill(fake_repo):
    returncode, output = mutate(fake_repo, [entry("add-subtracts", "a + b", "a - b",
                                                  tests=["tests/test_calc.py::test_broken"])])  # fmt: skip
    assert returncode == 2 and "fails unmutated" in output and "test_broken" in output, output


def test_only_selects_by_name(fake_repo):
    entries = [entry("add-subtracts", "a + b", "a - b"), entry("untested-changed", "a * 2", "a * 3")]
    returncode, output = mutate(fake_repo, entries, "--only", "add-subtracts")
    assert returncode == 0 and "1/1 mutations killed" in output, output
    returncode, output = mutate(fake_repo, entries, "--only", "nope")
    assert returncode == 2 and "--only: no mutation named nope" in output, output


def test_this_repositorys_entries_are_well_formed():
    """Every tests/mutations/*.json here parses and each 'find' occurs exactly once (what
    `make mutate` checks before running anything; cheap, so the test suite catches drift)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import mutate as runner
    finally:
        sys.path.remove(str(SCRIPT.parent))
    repo = SCRIPT.parent.parent
    assert runner.load_mutations(repo, repo / "tests" / "mutations")
