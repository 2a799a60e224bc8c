"""The curated mutation check (`make mutate`): every named mutation must be caught by its tests.

Each file tests/mutations/*.json is a JSON list of entries

    {"name": "short-kebab-name", "file": "path/relative/to/repo",
     "find": "text occurring exactly once in that file", "replace": "the mutated text",
     "tests": ["tests/test_x.py::test_y", "-k", "expr"], "why": "one line"}

For every entry this script
  1. runs `tests` (pytest arguments) on an unmutated scratch copy of the repository: they must
     pass, so a broken or skipped test is never counted as catching anything;
  2. replaces `find` by `replace` in `file` in the scratch copy and runs `tests` again: they must
     fail (the mutation is "killed"); a mutation whose tests still pass "survived".
It prints a table of which tests killed each mutation and exits 1 if any survived, 2 if the
entries are malformed or a test does not pass unmutated.

The scratch copy holds the files git knows of (tracked, plus new files not ignored) and the
built CUDA extension llmkernels/_C*.so if there is one; PYTHONPATH points the same Python at
the copy's `llm` and `llmkernels`, ahead of the editable install. --jobs copies run in
parallel, one pytest at a time each.

    python scripts/mutate.py                 # every entry
    python scripts/mutate.py --only ln-eps-ignored --jobs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ENTRY_KEYS = ("name", "file", "find", "replace", "tests", "why")
NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
SLOW_SECONDS = 20.0  # an entry's tests should take at most this long (warned, not failed)
COMPILED_SUFFIXES = {".cu", ".cuh", ".cpp", ".cc", ".h"}  # the prebuilt extension's sources
TIMEOUT_SECONDS = 300.0  # a run past this is stopped: unmutated it is an error, mutated a kill


class MutationError(Exception):
    """The entries are malformed or cannot be checked (exit 2)."""


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str
    source: str  # the json file it came from


@dataclass
class Run:
    """One pytest run: its exit code, the failing and passing test ids, and its duration."""

    returncode: int
    failed: list[str] = field(default_factory=list)
    passed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    output: str = ""


# ---------------------------------------------------------------- reading entries
def load_mutations(repo: Path, mutations_dir: Path) -> list[Mutation]:
    """Every entry of mutations_dir/*.json, checked strictly: any problem raises MutationError
    naming the file and the entry."""
    files = sorted(mutations_dir.glob("*.json"))
    if not files:
        raise MutationError(f"no mutation files: {mutations_dir}/*.json")
    mutations: list[Mutation] = []
    seen: dict[str, str] = {}
    for path in files:
        where = path.relative_to(repo) if path.is_relative_to(repo) else path
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise MutationError(f"{where}: not valid JSON ({error})") from error
        if not isinstance(entries, list) or not entries:
            raise MutationError(f"{where}: expected a non-empty JSON list of mutation entries")
        for index, entry in enumerate(entries):
            mutation = check_entry(repo, entry, f"{where} entry {index}")
            if mutation.name in seen:
                raise MutationError(f"{where} entry {index}: name {mutation.name!r} is also used in {seen[mutation.name]}")
            seen[mutation.name] = str(where)
            mutations.append(dataclasses.replace(mutation, source=str(where)))
    return mutations


def check_entry(repo: Path, entry, where: str) -> Mutation:
    if not isinstance(entry, dict):
        raise MutationError(f"{where}: expected an object with keys {list(ENTRY_KEYS)}, got {type(entry).__name__}")
    missing = [key for key in ENTRY_KEYS if key not in entry]
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if missing or unknown:
        raise MutationError(f"{where}: missing keys {missing}, unknown keys {unknown}; expected {list(ENTRY_KEYS)}")
    for key in ("name", "file", "find", "replace", "why"):
        if not isinstance(entry[key], str):
            raise MutationError(f"{where}: {key!r} must be a string, got {type(entry[key]).__name__}")
    where = f"{where} ({entry['name']!r})"
    if not NAME_PATTERN.match(entry["name"]):
        raise MutationError(f"{where}: name must be short-kebab-case (a-z, 0-9, single dashes)")
    if not entry["find"]:
        raise MutationError(f"{where}: 'find' is empty")
    if entry["find"] == entry["replace"]:
        raise MutationError(f"{where}: 'replace' equals 'find', so nothing would change")
    if not entry["why"].strip():
        raise MutationError(f"{where}: 'why' is empty; say in one line what the mutation breaks")
    tests = entry["tests"]
    if not isinstance(tests, list) or not tests or not all(isinstance(arg, str) and arg for arg in tests):
        raise MutationError(f"{where}: 'tests' must be a non-empty list of pytest arguments (strings)")
    if not any(arg.startswith("tests/") for arg in tests):
        raise MutationError(f"{where}: 'tests' names no test path under tests/")
    target = repo / entry["file"]
    if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts or not target.is_file():
        raise MutationError(f"{where}: 'file' {entry['file']!r} is not a file relative to the repository root")
    if target.suffix in COMPILED_SUFFIXES:
        raise MutationError(f"{where}: {entry['file']} is compiled into the extension, which the scratch copy does "
                            f"not rebuild; mutate Python or Triton code")
    count = target.read_text().count(entry["find"])
    if count != 1:
        raise MutationError(f"{where}: 'find' occurs {count} times in {entry['file']}; it must occur exactly once")
    return Mutation(entry["name"], entry["file"], entry["find"], entry["replace"], tuple(tests), entry["why"], "")


# ---------------------------------------------------------------- the scratch copies
def repository_files(repo: Path) -> list[str]:
    """Tracked files plus new files git does not ignore, and the built extension if present."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    files = [name for name in listed if name and (repo / name).is_file()]
    files += [str(path.relative_to(repo)) for path in sorted(repo.glob("llmkernels/_C*.so"))]
    return sorted(set(files))


def make_copy(repo: Path, files: list[str], destination: Path) -> Path:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)
    return destination


def run_tests(copy: Path, tests: tuple[str, ...], env: dict[str, str]) -> Run:
    """pytest on the copy with `tests`; the junit report says which tests failed."""
    report = copy / ".mutate-report.xml"
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *tests]  # fmt: skip
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as timeout:
        returncode, output = -1, f"timed out after {TIMEOUT_SECONDS:.0f} s\n{timeout.stdout or ''}"
    run = Run(returncode, seconds=time.monotonic() - start, output=output)
    if report.is_file():
        for case in ElementTree.parse(report).iter("testcase"):
            module = case.get("classname", "").replace(".", "/")  # tests.test_x -> tests/test_x
            test_id = f"{module}.py::{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                run.failed.append(test_id)
            elif case.find("skipped") is not None:
                run.skipped += 1
            else:
                run.passed += 1
    return run


def copy_environment(copy: Path, jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "python"), str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def check_imports_from_copy(copy: Path, env: dict[str, str]) -> None:
    """The copy's packages, not the editable install's, are what its tests import."""
    probe = "import llm, llmkernels; print(llm.__file__); print(llmkernels.__file__)"
    if not (copy / "python" / "llm").is_dir():
        return  # not this repository's layout (the runner's own tests use a tiny fake repo)
    done = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True)
    paths = done.stdout.split()
    if done.returncode != 0 or not paths or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        raise MutationError(f"the scratch copy's packages are not the ones imported there: {done.stdout}{done.stderr}")


# ---------------------------------------------------------------- checking
@dataclass
class Result:
    mutation: Mutation
    status: str  # killed, survived, error
    run: Run
    detail: str = ""


def mutate_and_run(copy: Path, mutation: Mutation, env: dict[str, str]) -> Result:
    target = copy / mutation.file
    original = target.read_text()
    target.write_text(original.replace(mutation.find, mutation.replace, 1))
    try:
        run = run_tests(copy, mutation.tests, env)
    finally:
        target.write_text(original)
    if run.returncode == 0:
        return Result(mutation, "survived", run, f"{run.passed} passed, {run.skipped} skipped under the mutation")
    if run.returncode in (1, 2, -1):  # tests failed, errors (e.g. an import broken by it), or timed out
        killers = run.failed or [{2: "collection error", -1: "timeout"}.get(run.returncode, "failed")]
        more = f" (+{len(killers) - 3} more)" if len(killers) > 3 else ""
        return Result(mutation, "killed", run, ", ".join(killers[:3]) + more)
    return Result(mutation, "error", run, f"pytest exit code {run.returncode} under the mutation")


def baseline_problem(run: Run) -> str | None:
    """Why an unmutated run does not count as passing, or None."""
    if run.returncode != 0:
        return f"fails unmutated (pytest exit code {run.returncode}; failing: {', '.join(run.failed) or 'see output'})"
    if run.passed == 0:
        return f"runs no passing test unmutated ({run.skipped} skipped)"
    return None


def check(repo: Path, mutations: list[Mutation], jobs: int, out=sys.stdout) -> int:
    files = repository_files(repo)
    missing = sorted({m.file for m in mutations} - set(files))
    if missing:
        raise MutationError(f"mutated files that git does not know of: {missing}")
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        copies: queue.Queue[Path] = queue.Queue()
        for worker in range(jobs):
            copies.put(make_copy(repo, files, Path(scratch) / f"copy{worker}"))
        envs = {}
        for copy in list(copies.queue):
            envs[copy] = copy_environment(copy, jobs)
            check_imports_from_copy(copy, envs[copy])

        def on_a_copy(work, *args):
            copy = copies.get()
            try:
                return work(copy, *args, envs[copy])
            finally:
                copies.put(copy)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            # 1. every distinct test selection passes unmutated
            selections = sorted({m.tests for m in mutations})
            baselines = dict(zip(selections, pool.map(lambda tests: on_a_copy(run_tests, tests), selections)))
            problems = {tests: baseline_problem(run) for tests, run in baselines.items()}
            broken = [(tests, problem) for tests, problem in problems.items() if problem]
            for tests, problem in broken:
                users = ", ".join(m.name for m in mutations if m.tests == tests)
                print(f"mutate: tests {' '.join(tests)} (for {users}) {problem}\n{baselines[tests].output[-3000:]}",
                      file=out)  # fmt: skip
            if broken:
                raise MutationError(f"{len(broken)} test selection(s) do not pass unmutated; see above")
            # 2. every mutation is caught
            results = list(pool.map(lambda m: on_a_copy(mutate_and_run, m), mutations))
    print_table(results, baselines, out)
    survived = [r for r in results if r.status != "killed"]
    for result in survived:
        print(f"\nmutate: {result.mutation.name} ({result.mutation.source}) {result.status.upper()}: "
              f"{result.detail}\n  {result.mutation.why}\n{result.run.output[-2000:]}", file=out)  # fmt: skip
    slow = [m.name for m in mutations if baselines[m.tests].seconds > SLOW_SECONDS]
    if slow:
        print(f"mutate: warning: tests slower than {SLOW_SECONDS:.0f} s unmutated for {', '.join(slow)}", file=out)
    killed = len(results) - len(survived)
    print(f"mutate: {killed}/{len(results)} mutations killed", file=out)
    return 1 if survived else 0


def print_table(results: list[Result], baselines: dict, out) -> None:
    width = max(len("mutation"), *(len(r.mutation.name) for r in results))
    print(f"{'mutation':<{width}}  {'result':<8}  {'base s':>6}  {'mut s':>6}  killed by", file=out)
    for r in results:
        print(f"{r.mutation.name:<{width}}  {r.status:<8}  {baselines[r.mutation.tests].seconds:6.1f}  "
              f"{r.run.seconds:6.1f}  {r.detail}", file=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Apply each curated mutation to a scratch copy and check its tests catch it.")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="repository root")
    parser.add_argument("--mutations", type=Path, default=None, help="folder of *.json entries (default REPO/tests/mutations)")
    parser.add_argument("--jobs", type=int, default=2, help="scratch copies checked in parallel (default 2)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="check only these mutations")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    repo = args.repo.resolve()
    start = time.monotonic()
    try:
        mutations = load_mutations(repo, (args.mutations or repo / "tests" / "mutations").resolve())
        if args.only:
            unknown = sorted(set(args.only) - {m.name for m in mutations})
            if unknown:
                raise MutationError(f"--only: no mutation named {', '.join(unknown)}")
            mutations = [m for m in mutations if m.name in args.only]
        status = check(repo, mutations, min(args.jobs, len(mutations)))
    except MutationError as error:
        print(f"mutate: error: {error}", file=sys.stderr)
        return 2
    print(f"mutate: took {time.monotonic() - start:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
