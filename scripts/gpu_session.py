#!/usr/bin/env python3
"""One GPU lease's work in two calls, headline first: call 1 (<= 7 minutes) builds, smoke-checks
every kernel and measures the headline figures; call 2 (<= 5 minutes, right after, while the
machine is warm) runs the GPU test lane in priority order and the sanitizers.

Next GPU session (15 minutes of device time in all, machine start included), first thing,
before any other work:
  1. run(command="bash scripts/gpu_session.sh --call 1", timeout_s=450)
     ~7 minutes: the script stops itself after 420 s; $OUT is set by the device tool.
  2. run(command="bash scripts/gpu_session.sh --call 2", timeout_s=330)
     ~5 minutes: reuses call 1's build and Triton cache (kept under /tmp on the machine).
  3. give_back; then copy call 1's $OUT/bench/* (results.json, results.md, summary.png) and
     call 2's sanitizers.txt to benchmarks/results/<date>-h200/.
  If the machine went back between the calls, call 2 rebuilds first (about a minute). A stage
  can be rerun after a fix with --stages, e.g. --call 2 --stages build,backends,tests.

Call 1 stages, in order, each with its time cap (seconds, GPU):
  device      10  nvidia-smi; python, torch, triton, pytest plugins, setuptools; nvcc, ninja, compute-sanitizer
  build      120  llmkernels._C for sm_90a only (MAX_JOBS=16, LLMKERNELS_BUILD_CUDA=1: no silent skip);
                  objects, the built extension and the Triton cache kept under --work-dir
  backends    15  import llmkernels._C, its build stamp current; llmkernels.available_backends()
  smoke       60  tests/test_kernel_smoke.py: every kernel of every backend, one ragged shape, forward and
                  backward, fp16 and bf16, against float64 under the numerics rule (-> smoke.jsonl)
  bench      205  python -m benchmarks all --headline: ceilings, attention, LayerNorm, add+LayerNorm, GELU,
                  bias-GELU (one shape each), GPT-2 training steps (llm's model; Hugging Face's, stock and
                  patched), linear_cross_entropy time and peak memory, each against same-run baselines
                  (eager, torch.compile, SDPA); takes what is left
Call 2 stages:
  build       60  call 1's extension, when the sources and torch are the same (seconds); else the build
  backends    15  as in call 1
  tests      130  the GPU lane (pytest -m gpu) over an explicit file list, attention first, each test
                  capped (pytest-timeout, else scripts/pytest_per_test_timeout.py), Triton autotuners on
                  their first config; skips counted, an unexpected skip fails the stage
  memcheck    50  compute-sanitizer memcheck on the CUDA kernel files (LayerNorm+GELU+add_layer_norm,
                  attention), each filtered to its kernels
  sanitizers  35  racecheck on the CUDA files, then memcheck and racecheck on the Triton kernel files;
                  takes what is left
A stage reaching its cap is interrupted (SIGINT, then SIGTERM, then SIGKILL), recorded as
"timeout", and the next stage runs; a stage with too little time left is recorded as skipped.

Outputs under --out, each rewritten as soon as it changes (the device returns 8 files):
  session.log        every command and its full output
  summary.txt        the stage table (with test and skip counts), sanitizer lines, the headline (printed last)
  session.json       the stage records
  smoke.jsonl        call 1: one line per smoke comparison (error, PyTorch's error, bound)
  bench/results.json, bench/results.md, bench/summary.png   call 1: the benchmark run
  sanitizers.txt     call 2: one line per compute-sanitizer run with its error summary

CPU rehearsal of both calls, the same code at tiny sizes (tests/test_gpu_session.py runs it in CI):
    python scripts/gpu_session.py --device cpu --call 1 --out /tmp/rehearsal-1
    python scripts/gpu_session.py --device cpu --call 2 --out /tmp/rehearsal-2
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

# Seconds per call: the budget each call keeps to, by device.
BUDGET_S = {1: {"cuda": 420.0, "cpu": 300.0}, 2: {"cuda": 300.0, "cpu": 300.0}}
SUMMARY_RESERVE_S = 10.0  # kept back from the last stage for the summary
INTERRUPT_GRACE_S = 12.0  # after SIGINT, time to write partial outputs before SIGTERM
# What outlives a call on the machine (a carried path would replace a folder in the checkout).
DEFAULT_WORK_DIR = Path("/tmp/llmkernels-gpu-session")
# GPU tests left out of the lane: tensors past 2^31 elements, a million rows.
SLOW_TESTS = ("past_2_to_the_31", "past_int32", "million_rows")
SANITIZER_SUBSET = "test_sanitizer_subset"  # the name prefix of a kernel file's sanitizer tests
SMOKE_FILE = "tests/test_kernel_smoke.py"
# The GPU lane's files in priority order: attention first (the kernels the headline rests on),
# then the other kernels, then the model and the op boundary; any other test file follows.
GPU_TEST_PRIORITY = [
    "tests/test_cuda_attention.py", "tests/test_triton_attention.py", "tests/test_cuda_norm_gelu.py",
    "tests/test_add_layer_norm.py", "tests/test_triton_layer_norm.py", "tests/test_triton_gelu.py",
    "tests/test_linear_cross_entropy.py", "tests/test_op_boundary.py", "tests/test_backends.py",
    "tests/test_llm_model.py", "tests/test_triton_compile.py",
]
PER_TEST_TIMEOUT_S = 60
# Skips the GPU lane may have: a module whose test-only package the GPU machine lacks
# (pytest.importorskip); in the rehearsal also every gpu test (no CUDA device).
EXPECTED_SKIPS = (r"could not import '(fastapi|uvicorn|httpx|hypothesis|peft|transformers)'",)
REHEARSAL_SKIPS = (r"CUDA device",)  # "needs a CUDA device", "needs the CUDA extension and a CUDA device", ...


@dataclass
class Stage:
    name: str
    caps_s: dict  # {"cuda": seconds, "cpu": seconds}
    min_s: float  # not started with less time than this left
    run: Callable[["Session", float], "Outcome"]
    takes_rest: bool = False  # the call's last stage: its cap grows by what earlier stages left unused


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

    def __init__(self, out: Path, device: str, call: int, budget_s: float, caps: dict, work_dir: Path):
        self.out, self.device, self.call, self.budget_s, self.caps = out, device, call, budget_s, caps
        self.work_dir = work_dir
        self.rehearsal = device == "cpu"
        self.t0 = time.monotonic()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.records: list[dict] = []
        self.sanitizer_lines: list[str] = []
        self.sanitizer_results: list[dict] = []  # every sanitizer run of this call, in order
        self.log = open(out / "session.log", "a", buffering=1)
        # This checkout's packages first; no inherited backend choice or Triton interpreter
        # (the tests' conftest turns the interpreter on itself where there is no GPU).
        # Triton's and inductor's compile caches under the work folder: call 2 reuses call 1's.
        # scripts/ on the path for the per-test timeout plugin.
        inherited = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLMKERNELS_BACKEND")}
        self.env = dict(inherited, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(work_dir / "triton-cache"),
                        TORCHINDUCTOR_CACHE_DIR=str(work_dir / "inductor-cache"),
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), str(REPO_ROOT / "python"),
                                                                 str(REPO_ROOT / "scripts"),
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
        """Rewrites session.json, sanitizers.txt (once a sanitizer ran) and summary.txt; returns
        the summary."""
        state = {"device": self.device, "call": self.call, "rehearsal": self.rehearsal,
                 "started": self.started.isoformat(timespec="seconds"), "budget_s": self.budget_s,
                 "elapsed_s": round(self.elapsed_s(), 1), "stages": self.records}
        write_text(self.out / "session.json", json.dumps(state, indent=1))
        if self.sanitizer_lines:
            write_text(self.out / "sanitizers.txt", "\n".join(self.sanitizer_lines) + "\n")
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
    detail = (f"{gpu} | python {facts['python']}, torch {packages['torch']}, triton {packages['triton']}, "
              f"setuptools {packages['setuptools']} | missing: {', '.join(missing) or 'nothing'}")
    if session.device == "cuda" and (not tools["nvidia-smi"] or not packages["torch"]):
        return Outcome("failed", detail, facts)
    return Outcome("ok", detail, facts)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _build_stamp():
    spec = importlib.util.spec_from_file_location("llmkernels_build_stamp", REPO_ROOT / "llmkernels" / "build_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_key(arch_list: str) -> str:
    """What a build depends on: the kernel sources, torch, python and the architectures."""
    return "-".join([_build_stamp().sources_digest(REPO_ROOT / "csrc")[:16], f"torch{_installed_version('torch')}",
                     f"py{sys.version_info.major}{sys.version_info.minor}", arch_list.replace(";", "_")])


def stage_build(session: Session, cap_s: float) -> Outcome:
    """llmkernels/_C*.so for this checkout (PYTHONPATH points here): an earlier call's build of
    the same sources and torch, copied back from --work-dir (call 2 on a warm machine), or
    setup.py build_ext --inplace with its objects under --work-dir. On the GPU: sm_90a only,
    failing loudly; in the rehearsal: the same command with the CUDA build off (nvcc would take
    minutes on CPU)."""
    env = {"MAX_JOBS": "16", "TORCH_CUDA_ARCH_LIST": "9.0a", "LLMKERNELS_BUILD_CUDA": "1"}
    nvcc = shutil.which("nvcc")
    if nvcc:  # the toolkit that nvcc belongs to, not torch's guess
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parents[1])
        env["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if session.rehearsal:
        env["LLMKERNELS_BUILD_CUDA"] = "0"
    key = build_key(env["TORCH_CUDA_ARCH_LIST"])
    kept = session.work_dir / "extension" / key
    data = {"env": env, "key": key, "kept": str(kept)}
    manifest = kept / "built.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        for name in files:  # copy, then rename: an import never sees half a file
            shutil.copyfile(kept / name, REPO_ROOT / "llmkernels" / f".{name}.partial")
            os.replace(REPO_ROOT / "llmkernels" / f".{name}.partial", REPO_ROOT / "llmkernels" / name)
        data.update(reused=True, extension_files=files)
        return Outcome("ok", f"reused the build in {kept} ({', '.join(files) or 'no extension: rehearsal'})", data)
    build_temp = session.work_dir / "build-temp"
    done = session.run(session.python("setup.py", "build_ext", "--inplace", "--build-temp", str(build_temp)), cap_s, env)
    package = REPO_ROOT / "llmkernels"
    built = sorted(p.name for p in package.glob("_C*.so")) if not session.rehearsal else []
    stamp = package / _build_stamp().STAMP_NAME
    data.update(rc=done.rc, reused=False, extension_files=built)
    if done.timed_out:
        return Outcome("timeout", f"build not finished in {cap_s:.0f} s", data)
    if done.rc != 0:
        return Outcome("failed", f"rc={done.rc}: {_tail(done.output)}", data)
    kept.mkdir(parents=True, exist_ok=True)
    files = built + ([stamp.name] if built and stamp.is_file() else [])
    for name in files:
        shutil.copyfile(package / name, kept / name)
    write_text(manifest, json.dumps({"files": files}))
    what = "CUDA build off (rehearsal)" if session.rehearsal else "sm_90a"
    return Outcome("ok", f"{what} in {done.seconds:.0f} s; {', '.join(built) or 'no extension file'}; kept in {kept}", data)


def stage_backends(session: Session, cap_s: float) -> Outcome:
    code = ("import json, importlib, pathlib, torch\n"
            "try:\n    ext = importlib.import_module('llmkernels._C'); error = ''\n"
            "except Exception as e:\n    ext, error = None, f'{type(e).__name__}: {e}'\n"
            "import llmkernels\nfrom llmkernels import build_stamp\n"
            "stale = build_stamp.staleness(pathlib.Path(ext.__file__).parent, pathlib.Path('csrc')) if ext else ''\n"
            "print(json.dumps({'extension_error': error, 'stale': stale, 'backends': llmkernels.available_backends(), "
            "'torch_cuda': torch.version.cuda, "
            "'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    done, facts = _python_probe(session, code, cap_s)
    if done.timed_out:
        return Outcome("timeout", f"import llmkernels not done in {cap_s:.0f} s")
    if facts is None:
        return Outcome("failed", f"import llmkernels failed: {_tail(done.output)}")
    usable = [name for name, (ok, _) in facts["backends"].items() if ok]
    extension = facts["extension_error"] or (f"stale: {facts['stale']}" if facts["stale"] else "imports, current")
    detail = (f"{facts['device'] or 'no CUDA device'} (torch CUDA {facts['torch_cuda']}) | usable: {', '.join(usable)}"
              f" | llmkernels._C: {extension}")
    if session.device == "cuda" and (facts["extension_error"] or facts["stale"] or "cuda" not in usable
                                     or "triton" not in usable):
        return Outcome("failed", detail, facts)
    return Outcome("ok", detail, facts)


def _pytest_options(session: Session, timeout_s: int) -> list[str]:
    """Quiet, no cache files, failures and skip reasons listed, every Triton autotuner on its
    first config, a per-test timeout (pytest-timeout, else this folder's plugin); parallel when
    pytest-xdist is installed and the machine has the cores."""
    options = ["-q", "-p", "no:cacheprovider", "-rfEs", "--triton-first-config"]
    workers = min(8, (os.cpu_count() or 1) // 2)
    if importlib.util.find_spec("xdist") and workers > 1:
        options += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout"):
        options += ["--timeout", str(timeout_s)]
    else:
        options += ["-p", "pytest_per_test_timeout", "--per-test-timeout", str(timeout_s)]
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


def _pytest_skips(output: str) -> dict:
    """{reason: count} from the short summary's 'SKIPPED [n] file:line: reason' lines (-rs)."""
    skips = {}
    for count, reason in re.findall(r"^SKIPPED \[(\d+)\] [^:\n]+:\d+: (.*)$", output, re.M):
        skips[reason.strip()] = skips.get(reason.strip(), 0) + int(count)
    return skips


def unexpected_skips(skips: dict, rehearsal: bool) -> dict:
    expected = EXPECTED_SKIPS + (REHEARSAL_SKIPS if rehearsal else ())
    return {reason: n for reason, n in skips.items() if not any(re.search(p, reason) for p in expected)}


def _pytest_outcome(session: Session, done: Completed, cap_s: float) -> Outcome:
    counts = _pytest_counts(done.output)
    skips = _pytest_skips(done.output)
    unexpected = unexpected_skips(skips, session.rehearsal)
    failures = [line.strip() for line in done.output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    text = ", ".join(f"{n} {what}" for what, n in counts.items()) or "no summary line"
    if counts.get("skipped"):
        text += f" ({sum(unexpected.values())} skips unexpected)"
    data = {"counts": counts, "skips": skips, "unexpected_skips": unexpected, "failures": failures[:50], "rc": done.rc}
    if done.timed_out:
        return Outcome("timeout", f"cap {cap_s:.0f} s reached; {text}", data)
    if done.rc == 5:
        return Outcome("failed", "no tests selected", data)
    if done.rc != 0:
        first = f"; first: {failures[0]}" if failures else f"; {_tail(done.output)}"
        return Outcome("failed", f"rc={done.rc}: {text}{first}", data)
    if unexpected:
        reason, n = next(iter(unexpected.items()))
        return Outcome("failed", f"{text}; unexpected skip: {n} x {reason!r}", data)
    return Outcome("ok", text, data)


def _lane_env(session: Session) -> dict:
    """On the GPU the lane fails without a current llmkernels._C (test_op_boundary's guard)."""
    return {} if session.rehearsal else {"LLMKERNELS_EXPECT_EXTENSION": "1"}


def stage_smoke(session: Session, cap_s: float) -> Outcome:
    """Every kernel once, forward and backward, against float64 (tests/test_kernel_smoke.py):
    the GPU tests there, the interpreter ones in the rehearsal."""
    lane = "not gpu" if session.rehearsal else "gpu"
    record = session.out / "smoke.jsonl"
    command = session.python("-m", "pytest", SMOKE_FILE, "-m", lane, *_pytest_options(session, 30))
    done = session.run(command, cap_s, {**_lane_env(session), "LLMKERNELS_SMOKE_RECORD": str(record)})
    outcome = _pytest_outcome(session, done, cap_s)
    checks = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    outcome.data["checks"] = len(checks)
    outcome.data["worst"] = max(checks, key=lambda c: c["error"] / c["bound"] if c["bound"] else 0, default=None)
    outcome.detail += f"; {len(checks)} comparisons in smoke.jsonl"
    return outcome


def gpu_test_files() -> list[str]:
    """Every test file with GPU tests, GPU_TEST_PRIORITY first (the smoke ran in call 1)."""
    listed = [f for f in GPU_TEST_PRIORITY if (REPO_ROOT / f).is_file()]
    others = sorted(f"tests/{p.name}" for p in (REPO_ROOT / "tests").glob("test_*.py")
                    if f"tests/{p.name}" not in listed + [SMOKE_FILE])
    return listed + others


def stage_tests(session: Session, cap_s: float) -> Outcome:
    slow = " or ".join(SLOW_TESTS)
    command = session.python("-m", "pytest", *gpu_test_files(), "-m", "gpu", "-k", f"not ({slow})",
                             *_pytest_options(session, PER_TEST_TIMEOUT_S))
    return _pytest_outcome(session, session.run(command, cap_s, _lane_env(session)), cap_s)


def has_sanitizer_subset(test_file: Path) -> bool:
    return re.search(rf"^def {SANITIZER_SUBSET}", test_file.read_text(), re.M) is not None


def sanitizer_runs() -> dict[str, list[dict]]:
    """compute-sanitizer runs per stage, in priority order. memcheck: the CUDA kernel files,
    --kernel-name instrumenting only their kernels (LayerNorm, add_layer_norm and GELU live
    in namespace llmkernels; the attention kernels all contain "attention"). sanitizers:
    racecheck on the same, CUDA attention (shared-memory tiles) first, then the Triton kernel
    files under both tools without a filter (Triton kernels have plain names and stage
    reductions and dot operands through shared memory; at these tiny sizes PyTorch's own
    kernels add little). Test files added later join the Triton runs by naming tests
    test_sanitizer_subset*."""
    cuda_files = ["tests/test_cuda_norm_gelu.py", "tests/test_add_layer_norm.py"]
    norm_gelu = {"label": "CUDA LN+GELU+add", "files": cuda_files, "select": SANITIZER_SUBSET,
                 "kernels": "kns=llmkernels", "env": {}}
    attention = {"label": "CUDA attention", "files": ["tests/test_cuda_attention.py"], "select": "reference_sweep",
                 "kernels": "kns=attention", "env": {"LLMKERNELS_SANITIZER_SWEEP": "1"}}
    triton_files = sorted(f"tests/{p.name}" for p in (REPO_ROOT / "tests").glob("test_*.py")
                          if f"tests/{p.name}" != "tests/test_cuda_norm_gelu.py" and has_sanitizer_subset(p))
    runs = {"memcheck": [dict(norm_gelu, tool="memcheck"), dict(attention, tool="memcheck")],
            "sanitizers": [dict(attention, tool="racecheck"), dict(norm_gelu, tool="racecheck")]}
    if triton_files:
        triton = {"label": "Triton kernel files", "files": triton_files, "select": SANITIZER_SUBSET,
                  "kernels": None, "env": {}}
        runs["sanitizers"] += [dict(triton, tool="memcheck"), dict(triton, tool="racecheck")]
    return runs


def _sanitizer_errors(output: str) -> int | None:
    """Errors reported by compute-sanitizer ('ERROR SUMMARY: 0 errors', racecheck's
    'RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)'); None if no summary."""
    found = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    found += re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", output)
    return sum(int(n) for n in found) if found else None


def run_sanitizers(session: Session, cap_s: float, runs: list[dict]) -> Outcome:
    sanitizer = shutil.which("compute-sanitizer")
    if not sanitizer and not session.rehearsal:
        return Outcome("failed", "compute-sanitizer not found on PATH")
    deadline = time.monotonic() + cap_s
    results, rehearsed = [], {tuple(r["files"]) for r in session.sanitizer_results}
    for index, spec in enumerate(runs):
        left = deadline - time.monotonic()
        if session.rehearsal and tuple(spec["files"]) in rehearsed:  # without the sanitizer: the same tests again
            results.append(dict(spec, status="skipped", errors=None, seconds=0.0, note="rehearsal: these tests ran"))
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
        share = left / (len(runs) - index)  # the later runs keep their share
        done = session.run(prefix + pytest, max(share, min(left, 20.0)), env)
        rehearsed.add(tuple(spec["files"]))
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
    session.sanitizer_results += results
    _record_sanitizer_lines(session, [], bool(sanitizer))
    statuses = [r["status"] for r in results]
    detail = "; ".join(f"{r['tool']} {r['label']}: {r['status']}"
                       f"{'' if r['errors'] is None else ' (' + str(r['errors']) + ' errors)'}" for r in results)
    data = {"runs": [{k: r[k] for k in ("tool", "label", "files", "status", "errors", "seconds", "note")}
                     for r in results]}
    if not sanitizer:
        detail = "rehearsal without compute-sanitizer: " + detail
    if any(s in ("errors", "failed") for s in statuses):
        return Outcome("failed", detail, data)
    if "timeout" in statuses or (any(r["note"] == "no time left" for r in results)):
        return Outcome("timeout", detail, data)
    return Outcome("ok", detail, data)


def _record_sanitizer_lines(session: Session, results: list[dict], real: bool) -> None:
    head = "compute-sanitizer runs" if real else "rehearsal: the pytest selections, without compute-sanitizer"
    session.sanitizer_lines = [head] + [
        f"{r['tool']:<10} {r['label']:<22} {r['status']:<8} errors={'-' if r['errors'] is None else r['errors']:<4} "
        f"{r['seconds']:6.1f} s  {r['note']}" for r in session.sanitizer_results + results]


def stage_memcheck(session: Session, cap_s: float) -> Outcome:
    return run_sanitizers(session, cap_s, sanitizer_runs()["memcheck"])


def stage_sanitizers(session: Session, cap_s: float) -> Outcome:
    return run_sanitizers(session, cap_s, sanitizer_runs()["sanitizers"])


def stage_bench(session: Session, cap_s: float) -> Outcome:
    """The headline benchmarks (python -m benchmarks all --headline): they stop starting cases
    25 s before the cap and write their outputs; the cap's SIGINT is the backstop (they write
    them then too)."""
    device = ["--device", "cpu"] if session.rehearsal else ["--device", "cuda"]
    command = session.python("-m", "benchmarks", "all", "--headline", *device, "--out", str(session.out / "bench"),
                             "--time-budget", f"{max(cap_s - 25, 5):.0f}")
    done = session.run(command, cap_s)
    results = session.out / "bench" / "results.json"
    if not results.is_file():
        return Outcome("timeout" if done.timed_out else "failed", f"rc={done.rc}, no results.json: {_tail(done.output)}")
    run = json.loads(results.read_text())
    records = run["records"]
    lce = run.get("linear_cross_entropy") or []
    counts = {"timed": sum(r["ms"] is not None for r in records), "failed": sum(bool(r["error"]) for r in records),
              "skipped": sum(bool(r["skipped"]) for r in records),
              "skipped for time": sum(str(r["skipped"]).startswith("time budget") for r in records),
              "e2e rows timed": sum(bool(e.get("tokens_per_s")) for e in run["e2e"]),
              "e2e rows failed": sum(bool(e.get("error")) for e in run["e2e"]),
              "linear_cross_entropy timed": sum(r["ms"] is not None for r in lce),
              "linear_cross_entropy failed": sum(bool(r["error"]) for r in lce)}
    text = ", ".join(f"{n} {what}" for what, n in counts.items())
    if run.get("interrupted") or done.timed_out:
        return Outcome("timeout", f"cap {cap_s:.0f} s reached; {text}", counts)
    if done.rc != 0:
        return Outcome("failed", f"rc={done.rc}; {text}; {_tail(done.output)}", counts)
    failed = counts["failed"] + counts["e2e rows failed"] + counts["linear_cross_entropy failed"]
    return Outcome("failed" if failed else "ok", text, counts)


BUILD = Stage("build", {"cuda": 120, "cpu": 60}, 20, stage_build)
BACKENDS = Stage("backends", {"cuda": 15, "cpu": 45}, 5, stage_backends)
CALLS = {
    1: [Stage("device", {"cuda": 10, "cpu": 30}, 3, stage_device),
        BUILD,
        BACKENDS,
        Stage("smoke", {"cuda": 60, "cpu": 90}, 15, stage_smoke),
        Stage("bench", {"cuda": 205, "cpu": 80}, 40, stage_bench, takes_rest=True)],
    2: [Stage("build", {"cuda": 60, "cpu": 30}, 20, stage_build),  # a reuse; a fresh machine's build fits too
        BACKENDS,
        Stage("tests", {"cuda": 130, "cpu": 120}, 30, stage_tests),
        Stage("memcheck", {"cuda": 50, "cpu": 80}, 15, stage_memcheck),
        Stage("sanitizers", {"cuda": 35, "cpu": 40}, 15, stage_sanitizers, takes_rest=True)],
}


def stage_names(call: int) -> list[str]:
    return [stage.name for stage in CALLS[call]]


# ------------------------------------------------------------------------------ summary
def summary_text(session: Session) -> str:
    mode = "CPU rehearsal (tiny sizes; no GPU figures)" if session.rehearsal else "GPU session"
    lines = [f"{mode}, call {session.call}, started {session.started:%Y-%m-%d %H:%M:%S} UTC, "
             f"{session.elapsed_s():.0f} s of a {session.budget_s:.0f} s budget", "",
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


def stage_cap(session: Session, stage: Stage) -> float:
    """The stage's cap, within what the budget has left after the summary's reserve and the
    interrupt grace (a capped stage still gets SIGINT's grace to write its outputs); the
    call's last stage takes everything left unless --cap names it."""
    left = session.left_s() - SUMMARY_RESERVE_S - INTERRUPT_GRACE_S
    cap = session.caps.get(stage.name, stage.caps_s[session.device])
    return left if stage.takes_rest and stage.name not in session.caps else min(cap, left)


def run_stages(session: Session, chosen: list[str]) -> None:
    """Every stage of the call in order, each ending with its record (a stage in progress
    shows as "running", so a session killed mid-stage still says where it was)."""
    for stage in CALLS[session.call]:
        cap = stage_cap(session, stage)
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
    parser.add_argument("--call", type=int, choices=sorted(CALLS), required=True,
                        help="1: build, smoke and the headline benchmarks; 2: the GPU test lane and the sanitizers")
    parser.add_argument("--out", type=Path, help="output folder, new or empty (default out/gpu-session-<date>-<time>)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: the GPU session; cpu: the rehearsal at tiny sizes (auto: cuda when nvidia-smi "
                             "is on PATH)")
    parser.add_argument("--budget", type=float, help="seconds for the call (default 420 for call 1, 300 for call 2 "
                                                     "on the GPU; 300 each in the rehearsal)")
    parser.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                        help="a stage's time cap (repeatable)")
    parser.add_argument("--stages", help="comma-separated stages of the call to run, in its fixed order (default: all)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help=f"what outlives a call on the machine: build objects, the built extension, the Triton "
                             f"and inductor caches (default {DEFAULT_WORK_DIR})")
    return parser


def parse_args(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = stage_names(args.call)
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    caps = {}
    for spec in args.cap:
        name, _, seconds = spec.partition("=")
        if name not in names:
            parser.error(f"--cap {spec}: stage must be one of call {args.call}'s {', '.join(names)}")
        try:
            caps[name] = float(seconds)
        except ValueError:
            parser.error(f"--cap {spec}: SECONDS must be a number")
        if not caps[name] > 0:
            parser.error(f"--cap {spec}: SECONDS must be positive")
    args.caps = caps
    args.stages = names if args.stages is None else [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in names]
    if unknown or not args.stages:
        parser.error(f"--stages: {', '.join(unknown) or 'none given'}; call {args.call} has {', '.join(names)}")
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
    args.work_dir.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, args.device, args.call, args.budget or BUDGET_S[args.call][args.device], args.caps,
                      args.work_dir)
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
