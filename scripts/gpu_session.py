#!/usr/bin/env python3
"""One GPU lease's work in one command of under 8 minutes: build, correctness, sanitizers,
headline figures, then the rest while time is left.

Next GPU session (15 minutes of device time in all, machine start included), first thing:
  1. run(command="bash scripts/gpu_session.sh", timeout_s=540)
     ~7.5 minutes: the script stops itself after 450 s; $OUT is set by the device tool.
  2. If the machine is still warm and 4+ minutes are left, the stages it had no time for
     (the build is then a no-op; the outputs go to that call's fresh $OUT), e.g.
     run(command="bash scripts/gpu_session.sh --stages build,backends,tests-rest,bench-full --budget 200",
         timeout_s=260)
     or rerun what failed after a fix: --stages build,backends,tests (or sanitizers, bench).
  3. give_back; then copy $OUT/bench/* and $OUT/sanitizers.txt to benchmarks/results/<date>-h200/.

Stages, in priority order, each with its own time cap (seconds) inside the session budget:
  device      30  nvidia-smi; python, torch, triton, pytest plugin versions; nvcc, ninja, compute-sanitizer
  build      180  llmkernels._C for sm_90a only (MAX_JOBS=16, LLMKERNELS_BUILD_CUDA=1: no silent skip)
  backends    30  import llmkernels._C; llmkernels.available_backends()
  tests      120  GPU correctness subset: pytest -m gpu without the slow tests, each Triton
                  autotuner on its first config (every kernel, fwd+bwd, ragged seq, both dtypes,
                  head dims 64/128, causal and not, determinism, strided inputs; new test files'
                  gpu tests are picked up by their mark)
  sanitizers 100  compute-sanitizer memcheck and racecheck on each kernel file's tiny subset
                  (tests named test_sanitizer_subset*, and the attention sweep), 6 runs:
                  CUDA LayerNorm+GELU and CUDA attention (each filtered to its kernels), then
                  the other kernel files (CUDA add_layer_norm; Triton attention, LayerNorm,
                  add_layer_norm, GELU, linear_cross_entropy) unfiltered; Triton autotuners
                  on their first config, TRITON_INTERPRET unset
  bench      180  python -m benchmarks --headline: ceilings, attention, LayerNorm, GELU,
                  bias-GELU and GPT-2 training steps, each against same-run baselines
  tests-rest 150  the rest of the GPU lane: the slow tests, Triton tests with every config
  bench-full 400  every benchmark suite, added to the headline run (--extend)
A stage reaching its cap is interrupted (SIGINT, then SIGTERM, then SIGKILL), recorded as
"timeout", and the next stage runs; a stage with too little time left is recorded as skipped.

Outputs under --out, each rewritten as soon as it changes (7 files; the device returns 8):
  session.log        every command and its full output
  summary.txt        the stage table, sanitizer lines and the headline table (printed last)
  session.json       the stage records
  sanitizers.txt     one line per compute-sanitizer run with its error summary
  bench/results.json, bench/results.md, bench/summary.png   the benchmark run

CPU rehearsal, the same code at tiny sizes (tests/test_gpu_session.py runs it in CI):
    python scripts/gpu_session.py --device cpu --out /tmp/rehearsal
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "python"))
from llm.files import write_text  # noqa: E402  (this checkout's llm package)

BUDGET_S = {"cuda": 450.0, "cpu": 300.0}
SUMMARY_RESERVE_S = 10.0  # kept back from the last stage for the summary
INTERRUPT_GRACE_S = 12.0  # after SIGINT, time to write partial outputs before SIGTERM
# GPU tests left out of the correctness subset: tensors past 2^31 elements, a million rows.
SLOW_TESTS = ("past_2_to_the_31", "past_int32", "million_rows")
SANITIZER_SUBSET = "test_sanitizer_subset"  # the name prefix of a kernel file's sanitizer tests


@dataclass
class Stage:
    name: str
    caps_s: dict  # {"cuda": seconds, "cpu": seconds}
    min_s: float  # not started with less time than this left
    run: Callable[["Session", float], "Outcome"]


@dataclass
class Outcome:
    status: str  # ok | failed | timeout | skipped | error
    detail: str
    data: dict = field(default_factory=dict)


@dataclass
class Completed:
    command: list[str]
    rc: int
    output: str
    seconds: float
    timed_out: bool


class Session:
    """The run's clock, log and records; runs commands with a cap each."""

    def __init__(self, out: Path, device: str, budget_s: float, caps: dict):
        self.out, self.device, self.budget_s, self.caps = out, device, budget_s, caps
        self.rehearsal = device == "cpu"
        self.t0 = time.monotonic()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.records: list[dict] = []
        self.sanitizer_lines: list[str] = []
        self.log = open(out / "session.log", "a", buffering=1)
        # This checkout's packages first; no inherited backend choice or Triton interpreter
        # (the tests' conftest turns the interpreter on itself where there is no GPU).
        inherited = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLMKERNELS_BACKEND")}
        self.env = dict(inherited, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), str(REPO_ROOT / "python"),
                                                                 os.environ.get("PYTHONPATH")])))

    def elapsed_s(self) -> float:
        return time.monotonic() - self.t0

    def left_s(self) -> float:
        return self.budget_s - self.elapsed_s()

    def say(self, text: str) -> None:
        line = f"[{self.elapsed_s():5.0f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def run(self, command: list[str], cap_s: float, env: dict | None = None) -> Completed:
        """Runs `command` in its own process group, its output streamed into the log; at
        `cap_s` the group gets SIGINT (the benchmarks then write what they measured), and
        SIGTERM and SIGKILL if it does not end."""
        self.say(f"$ {' '.join(command)}   (cap {cap_s:.0f} s)")
        started = time.monotonic()
        try:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env={**self.env, **(env or {})}, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                       errors="replace")
        except OSError as error:
            self.say(f"cannot start: {error}")
            return Completed(command, 127, str(error), 0.0, False)
        lines: list[str] = []

        def pump():
            for line in process.stdout:
                lines.append(line)
                self.log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=max(cap_s, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"cap of {cap_s:.0f} s reached: interrupting")
            _stop(process, INTERRUPT_GRACE_S)
        except KeyboardInterrupt:
            _stop(process, INTERRUPT_GRACE_S)
            raise
        finally:
            _kill_leftovers(process)
        reader.join(timeout=5)
        seconds = time.monotonic() - started
        self.say(f"exit {process.returncode} after {seconds:.1f} s")
        return Completed(command, process.returncode, "".join(lines), seconds, timed_out)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def write_state(self) -> str:
        """Rewrites session.json, sanitizers.txt and summary.txt; returns the summary."""
        state = {"device": self.device, "rehearsal": self.rehearsal, "started": self.started.isoformat(timespec="seconds"),
                 "budget_s": self.budget_s, "elapsed_s": round(self.elapsed_s(), 1), "stages": self.records}
        write_text(self.out / "session.json", json.dumps(state, indent=1))
        write_text(self.out / "sanitizers.txt", "\n".join(self.sanitizer_lines) + "\n" if self.sanitizer_lines else
               "(no sanitizer run yet)\n")
        summary = summary_text(self)
        write_text(self.out / "summary.txt", summary)
        return summary


def _stop(process: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the process group, then SIGTERM, then SIGKILL, each after a wait."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_leftovers(process: subprocess.Popen) -> None:
    """Whatever the command left running in its process group (a compile worker, a test
    worker) would hold GPU memory into the next stage."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _python_probe(session: Session, code: str, cap_s: float) -> tuple[Completed, dict | None]:
    """Runs `code`, which prints one JSON line last; returns it parsed (None on failure)."""
    done = session.run(session.python("-c", code), cap_s)
    try:
        return done, json.loads(done.output.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return done, None


# ------------------------------------------------------------------------------ stages
def stage_device(session: Session, cap_s: float) -> Outcome:
    """What the later stages need, found without importing torch (the backends stage does)."""
    tools = {name: shutil.which(name) for name in ("nvidia-smi", "nvcc", "ninja", "compute-sanitizer")}
    packages = {name: _installed_version(name) for name in
                ("torch", "triton", "pytest", "pytest-xdist", "pytest-timeout", "matplotlib", "tqdm", "setuptools")}
    facts = {"tools": tools, "packages": packages, "python": sys.version.split()[0]}
    gpu = "no nvidia-smi"
    if tools["nvidia-smi"]:
        smi = session.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm",
                           "--format=csv,noheader"], cap_s)
        gpu = facts["nvidia_smi"] = smi.output.strip() if smi.rc == 0 else f"nvidia-smi rc={smi.rc}"
    missing = [name for name, path in {**tools, **packages}.items() if not path]
    detail = (f"{gpu} | python {facts['python']}, torch {packages['torch']}, triton {packages['triton']}"
              f" | missing: {', '.join(missing) or 'nothing'}")
    if session.device == "cuda" and (not tools["nvidia-smi"] or not packages["torch"]):
        return Outcome("failed", detail, facts)
    return Outcome("ok", detail, facts)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def stage_build(session: Session, cap_s: float) -> Outcome:
    """setup.py build_ext --inplace: llmkernels/_C*.so next to the package, for this
    checkout (PYTHONPATH points here). On the GPU: sm_90a only, failing loudly; in the
    rehearsal: the same command with the CUDA build off (nvcc would take minutes on CPU)."""
    env = {"MAX_JOBS": "16", "TORCH_CUDA_ARCH_LIST": "9.0a", "LLMKERNELS_BUILD_CUDA": "1"}
    nvcc = shutil.which("nvcc")
    if nvcc:  # the toolkit that nvcc belongs to, not torch's guess
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parents[1])
        env["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if session.rehearsal:
        env["LLMKERNELS_BUILD_CUDA"] = "0"
    done = session.run(session.python("setup.py", "build_ext", "--inplace"), cap_s, env)
    built = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "llmkernels").glob("_C*.so"))
    data = {"env": env, "rc": done.rc, "extension_files": built}
    if done.timed_out:
        return Outcome("timeout", f"build not finished in {cap_s:.0f} s", data)
    if done.rc != 0:
        return Outcome("failed", f"rc={done.rc}: {_tail(done.output)}", data)
    what = "CUDA build off (rehearsal)" if session.rehearsal else "sm_90a"
    return Outcome("ok", f"{what} in {done.seconds:.0f} s; {', '.join(built) or 'no extension file'}", data)


def stage_backends(session: Session, cap_s: float) -> Outcome:
    code = ("import json, importlib, torch\n"
            "try:\n    importlib.import_module('llmkernels._C'); ext = ''\n"
            "except Exception as e:\n    ext = f'{type(e).__name__}: {e}'\n"
            "import llmkernels\n"
            "print(json.dumps({'extension_error': ext, 'backends': llmkernels.available_backends(), "
            "'torch_cuda': torch.version.cuda, "
            "'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    done, facts = _python_probe(session, code, cap_s)
    if done.timed_out:
        return Outcome("timeout", f"import llmkernels not done in {cap_s:.0f} s")
    if facts is None:
        return Outcome("failed", f"import llmkernels failed: {_tail(done.output)}")
    usable = [name for name, (ok, _) in facts["backends"].items() if ok]
    detail = (f"{facts['device'] or 'no CUDA device'} (torch CUDA {facts['torch_cuda']}) | usable: {', '.join(usable)}"
              f" | llmkernels._C: {facts['extension_error'] or 'imports'}")
    if session.device == "cuda" and (facts["extension_error"] or "cuda" not in usable or "triton" not in usable):
        return Outcome("failed", detail, facts)
    return Outcome("ok", detail, facts)


def _pytest_options(timeout_s: int) -> list[str]:
    """Quiet, no cache files, failures listed; parallel and per-test timeouts when the
    plugins are installed (they are on the GPU machine)."""
    options = ["-q", "-p", "no:cacheprovider", "-rfE"]
    workers = min(8, (os.cpu_count() or 1) // 2)  # 8 on the GPU machine's 16 cores; none on CI's 2
    if importlib.util.find_spec("xdist") and workers > 1:
        options += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout"):
        options += ["--timeout", str(timeout_s)]
    return options


def _pytest_counts(output: str) -> dict:
    """{'passed': 3, 'skipped': 2, ...} from pytest's last summary line."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found:
            for number, what in found:
                counts["error" if what.startswith("error") else what] = int(number)
            break
    return counts


def _pytest_outcome(done: Completed, cap_s: float) -> Outcome:
    counts = _pytest_counts(done.output)
    failures = [line.strip() for line in done.output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    text = ", ".join(f"{n} {what}" for what, n in counts.items()) or "no summary line"
    data = {"counts": counts, "failures": failures[:50], "rc": done.rc}
    if done.timed_out:
        return Outcome("timeout", f"cap {cap_s:.0f} s reached; {text}", data)
    if done.rc == 0:
        return Outcome("ok", text, data)
    if done.rc == 5:
        return Outcome("failed", "no tests selected", data)
    first = f"; first: {failures[0]}" if failures else f"; {_tail(done.output)}"
    return Outcome("failed", f"rc={done.rc}: {text}{first}", data)


def stage_tests(session: Session, cap_s: float) -> Outcome:
    slow = " or ".join(SLOW_TESTS)
    command = session.python("-m", "pytest", "tests", "-m", "gpu", "-k", f"not ({slow})", "--triton-first-config",
                             *_pytest_options(timeout_s=60))
    return _pytest_outcome(session.run(command, cap_s), cap_s)


def stage_tests_rest(session: Session, cap_s: float) -> Outcome:
    slow = " or ".join(SLOW_TESTS)
    command = session.python("-m", "pytest", "tests", "-m", "gpu", "-k", f"{slow} or triton",
                             *_pytest_options(timeout_s=180))
    return _pytest_outcome(session.run(command, cap_s), cap_s)


def has_sanitizer_subset(test_file: Path) -> bool:
    return re.search(rf"^def {SANITIZER_SUBSET}", test_file.read_text(), re.M) is not None


def sanitizer_runs() -> list[dict]:
    """compute-sanitizer runs in priority order: memcheck before racecheck, CUDA attention
    (shared-memory tiles) first for racecheck. --kernel-name instruments only one file's
    kernels (LayerNorm/GELU live in namespace llmkernels; attention kernels all contain
    "attention"). The other kernel files (CUDA add_layer_norm, every Triton kernel file) get
    both tools without a filter: Triton kernels have plain names and stage reductions and dot
    operands through shared memory, and at these tiny sizes PyTorch's own kernels add little.
    Test files added later join those runs by naming tests test_sanitizer_subset*."""
    norm_gelu = {"label": "CUDA LayerNorm+GELU", "files": ["tests/test_cuda_norm_gelu.py"],
                 "select": SANITIZER_SUBSET, "kernels": "kns=llmkernels", "env": {}}
    attention = {"label": "CUDA attention", "files": ["tests/test_cuda_attention.py"], "select": "reference_sweep",
                 "kernels": "kns=attention", "env": {"LLMKERNELS_SANITIZER_SWEEP": "1"}}
    others = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_*.py")
                    if p.name != "test_cuda_norm_gelu.py" and has_sanitizer_subset(p))
    runs = [dict(norm_gelu, tool="memcheck"), dict(attention, tool="memcheck"),
            dict(attention, tool="racecheck"), dict(norm_gelu, tool="racecheck")]
    if others:
        other = {"label": "other kernel files", "files": others, "select": SANITIZER_SUBSET, "kernels": None, "env": {}}
        runs += [dict(other, tool="memcheck"), dict(other, tool="racecheck")]
    return runs


def _sanitizer_errors(output: str) -> int | None:
    """Errors reported by compute-sanitizer ('ERROR SUMMARY: 0 errors', racecheck's
    'RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)'); None if no summary."""
    found = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    found += re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", output)
    return sum(int(n) for n in found) if found else None


def stage_sanitizers(session: Session, cap_s: float) -> Outcome:
    sanitizer = shutil.which("compute-sanitizer")
    if not sanitizer and not session.rehearsal:
        return Outcome("failed", "compute-sanitizer not found on PATH")
    deadline = time.monotonic() + cap_s
    results, rehearsed = [], set()
    runs = sanitizer_runs()
    for index, spec in enumerate(runs):
        left = deadline - time.monotonic()
        key = (spec["label"], tuple(spec["files"]))
        if session.rehearsal and key in rehearsed:  # without the sanitizer the two tools run the same tests
            results.append(dict(spec, status="skipped", errors=None, seconds=0.0, note="rehearsal: same tests as memcheck"))
            continue
        if left < 10:
            results.append(dict(spec, status="skipped", errors=None, seconds=0.0, note="no time left"))
            continue
        # One autotuner config: no config benchmarking under the sanitizer, and the kernels the
        # tests stage compiled (also on its first configs) come from Triton's cache.
        pytest = session.python("-m", "pytest", *spec["files"], "-m", "gpu", "-k", spec["select"], "-x",
                                "-q", "-p", "no:cacheprovider", "--triton-first-config")
        prefix = []
        if sanitizer:
            prefix = [sanitizer, "--tool", spec["tool"], "--error-exitcode", "99", "--print-limit", "20"]
            prefix += ["--kernel-name", spec["kernels"]] if spec["kernels"] else []
        # Without the caching allocator each tensor is its own allocation, so memcheck sees an
        # access past a tensor that would otherwise land inside a pooled block.
        env = dict(spec["env"], PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        share = left / (len(runs) - index) if index < len(runs) - 1 else left  # later runs keep a share
        done = session.run(prefix + pytest, max(share, min(left, 30.0)), env)
        rehearsed.add(key)
        errors = _sanitizer_errors(done.output)
        counts = _pytest_counts(done.output)
        if done.timed_out:
            status = "timeout"
        elif errors:
            status = "errors"
        elif done.rc == 0 and (errors == 0 or not sanitizer):
            status = "ok"
        else:
            status = "failed"
        results.append(dict(spec, status=status, errors=errors, seconds=round(done.seconds, 1),
                            note=", ".join(f"{n} {w}" for w, n in counts.items()) or _tail(done.output, 1)))
        _record_sanitizer_lines(session, results, bool(sanitizer))
        session.write_state()
    _record_sanitizer_lines(session, results, bool(sanitizer))
    statuses = [r["status"] for r in results]
    ran = [r for r in results if r["status"] != "skipped"]
    detail = "; ".join(f"{r['tool']} {r['label']}: {r['status']}"
                       f"{'' if r['errors'] is None else ' (' + str(r['errors']) + ' errors)'}" for r in results)
    data = {"runs": [{k: r[k] for k in ("tool", "label", "files", "status", "errors", "seconds", "note")}
                     for r in results]}
    if not sanitizer:
        detail = "rehearsal without compute-sanitizer: " + detail
    if any(s in ("errors", "failed") for s in statuses):
        return Outcome("failed", detail, data)
    if "timeout" in statuses or len(ran) < len(results) and not session.rehearsal:
        return Outcome("timeout", detail, data)
    return Outcome("ok", detail, data)


def _record_sanitizer_lines(session: Session, results: list[dict], real: bool) -> None:
    head = "compute-sanitizer runs" if real else "rehearsal: the pytest selections, without compute-sanitizer"
    session.sanitizer_lines = [head] + [
        f"{r['tool']:<10} {r['label']:<22} {r['status']:<8} errors={'-' if r['errors'] is None else r['errors']:<4} "
        f"{r['seconds']:6.1f} s  {r['note']}" for r in results]


def _bench_command(session: Session, *args: str, budget_s: float) -> list[str]:
    sizes = ["--device", "cpu"] if session.rehearsal else ["--device", "cuda"]
    return session.python("-m", "benchmarks", *args, *sizes, "--time-budget", f"{max(budget_s, 5):.0f}")


def _bench_outcome(session: Session, done: Completed, cap_s: float) -> Outcome:
    results = session.out / "bench" / "results.json"
    if not results.is_file():
        return Outcome("timeout" if done.timed_out else "failed", f"rc={done.rc}, no results.json: {_tail(done.output)}")
    run = json.loads(results.read_text())
    records = run["records"]
    counts = {"timed": sum(r["ms"] is not None for r in records), "failed": sum(bool(r["error"]) for r in records),
              "skipped": sum(bool(r["skipped"]) for r in records),
              "skipped for time": sum(str(r["skipped"]).startswith("time budget") for r in records),
              "e2e rows timed": sum(bool(e.get("tokens_per_s")) for e in run["e2e"])}
    text = ", ".join(f"{n} {what}" for what, n in counts.items())
    if run.get("interrupted") or done.timed_out:
        return Outcome("timeout", f"cap {cap_s:.0f} s reached; {text}", counts)
    if done.rc != 0:
        return Outcome("failed", f"rc={done.rc}; {text}; {_tail(done.output)}", counts)
    return Outcome("failed" if counts["failed"] else "ok", text, counts)


def stage_bench(session: Session, cap_s: float) -> Outcome:
    # The command stops starting cases 25 s before the cap and writes its outputs; the cap's
    # SIGINT is the backstop (it writes them too).
    command = _bench_command(session, "all", "--headline", "--out", str(session.out / "bench"),
                             budget_s=cap_s - 25)
    return _bench_outcome(session, session.run(command, cap_s), cap_s)


def stage_bench_full(session: Session, cap_s: float) -> Outcome:
    """Every suite: added to the headline run, or on its own when this session has none
    (a second call that runs `--stages bench-full`)."""
    sizes = ["--quick"] if session.rehearsal else []
    extend = ["--extend"] if (session.out / "bench" / "results.json").is_file() else []
    command = _bench_command(session, "all", *sizes, *extend, "--out", str(session.out / "bench"),
                             budget_s=cap_s - 25)
    return _bench_outcome(session, session.run(command, cap_s), cap_s)


STAGES = [
    Stage("device", {"cuda": 30, "cpu": 60}, 5, stage_device),
    Stage("build", {"cuda": 180, "cpu": 60}, 20, stage_build),
    Stage("backends", {"cuda": 30, "cpu": 60}, 5, stage_backends),
    Stage("tests", {"cuda": 120, "cpu": 90}, 30, stage_tests),
    Stage("sanitizers", {"cuda": 100, "cpu": 90}, 30, stage_sanitizers),
    Stage("bench", {"cuda": 180, "cpu": 90}, 40, stage_bench),
    Stage("tests-rest", {"cuda": 150, "cpu": 90}, 30, stage_tests_rest),
    Stage("bench-full", {"cuda": 400, "cpu": 90}, 40, stage_bench_full),
]
STAGE_NAMES = [stage.name for stage in STAGES]


# ------------------------------------------------------------------------------ summary
def summary_text(session: Session) -> str:
    mode = "CPU rehearsal (tiny sizes; no GPU figures)" if session.rehearsal else "GPU session"
    lines = [f"{mode}, started {session.started:%Y-%m-%d %H:%M:%S} UTC, {session.elapsed_s():.0f} s of a "
             f"{session.budget_s:.0f} s budget", "",
             f"{'stage':<11} {'status':<8} {'seconds':>7} {'cap':>5}  detail"]
    for r in session.records:
        lines.append(f"{r['stage']:<11} {r['status']:<8} {r['seconds']:7.1f} {r['cap_s']:5.0f}  {r['detail']}")
    if session.sanitizer_lines:
        lines += [""] + session.sanitizer_lines
    results_md = session.out / "bench" / "results.md"
    if results_md.is_file():
        text = results_md.read_text()
        headline = re.search(r"^## Headline\n(.*?)(?=^#)", text, re.S | re.M)
        if headline:
            lines += ["", "Headline (bench/results.md)", headline.group(1).strip()]
    return "\n".join(lines) + "\n"


def run_stages(session: Session, chosen: list[str]) -> None:
    """Every stage in order, each ending with its record (a stage in progress shows as
    "running", so a session killed mid-stage still says where it was)."""
    for stage in STAGES:
        cap = min(session.caps.get(stage.name, stage.caps_s[session.device]),
                  session.left_s() - SUMMARY_RESERVE_S - INTERRUPT_GRACE_S)
        record = {"stage": stage.name, "status": "running", "seconds": 0.0, "cap_s": round(max(cap, 0), 1),
                  "detail": "", "data": {}}
        session.records.append(record)
        started = time.monotonic()
        if stage.name not in chosen:
            outcome = Outcome("skipped", "not chosen (--stages)")
        elif cap < min(stage.min_s, session.caps.get(stage.name, stage.min_s)):
            outcome = Outcome("skipped", f"no time left ({session.left_s():.0f} s of the budget)")
        else:
            session.say(f"=== {stage.name} (cap {cap:.0f} s)")
            session.write_state()
            try:
                outcome = stage.run(session, cap)
            except KeyboardInterrupt:
                record.update(status="stopped", seconds=round(time.monotonic() - started, 1),
                              detail="session interrupted")
                raise
            except Exception as error:  # a fault of this script: recorded, and the next stage runs
                outcome = Outcome("error", f"{type(error).__name__}: {error}")
        record.update(status=outcome.status, seconds=round(time.monotonic() - started, 1), detail=outcome.detail,
                      data=outcome.data)
        session.say(f"--- {stage.name}: {outcome.status}: {outcome.detail}")
        session.write_state()


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_session.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder, new or empty (default out/gpu-session-<date>-<time>)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: the GPU session; cpu: the rehearsal at tiny sizes (auto: cuda when nvidia-smi "
                             "is on PATH)")
    parser.add_argument("--budget", type=float, help="seconds for the whole session (default 450 on the GPU, 300 on CPU)")
    parser.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                        help=f"a stage's time cap (repeatable); stages: {', '.join(STAGE_NAMES)}")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES),
                        help="comma-separated stages to run, in the fixed order (default: all)")
    return parser


def parse_args(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    caps = {}
    for spec in args.cap:
        name, _, seconds = spec.partition("=")
        if name not in STAGE_NAMES:
            parser.error(f"--cap {spec}: stage must be one of {', '.join(STAGE_NAMES)}")
        try:
            caps[name] = float(seconds)
        except ValueError:
            parser.error(f"--cap {spec}: SECONDS must be a number")
        if not caps[name] > 0:
            parser.error(f"--cap {spec}: SECONDS must be positive")
    args.caps = caps
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGE_NAMES]
    if unknown or not args.stages:
        parser.error(f"--stages: {', '.join(unknown) or 'none given'}; choose from {', '.join(STAGE_NAMES)}")
    if args.device == "auto":
        args.device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    if args.out is None:
        args.out = REPO_ROOT / "out" / f"gpu-session-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not an empty folder; give a new one")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, args.device, args.budget or BUDGET_S[args.device], args.caps)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops like Ctrl-C: summary first
    status = 0
    try:
        run_stages(session, args.stages)
    except KeyboardInterrupt:
        session.say("session interrupted: writing the summary")
        status = 130
    print("\n" + session.write_state(), flush=True)
    session.log.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
