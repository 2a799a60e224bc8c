"""How a figure is measured: the timers, the device ceilings and the run's environment.

On a GPU every sample is one call between two CUDA events, after a 1 GiB write that evicts
the L2 cache (60 MB on the H200) and keeps the GPU busy for ~0.25 ms, long enough for the
host to queue the call's kernels before the start event runs: the Python launch time of
autograd wrappers stays outside the window unless it exceeds the flush, and then the
record is flagged host-bound. The callers also rotate among several input sets. The median
of the samples is the figure, p10 and p90 its spread. On CPU the samples are
time.perf_counter wall-clock times.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llm.runtime import resolve_device

REPO_ROOT = Path(__file__).resolve().parents[1]
FLUSH_BYTES = 1 << 30


@dataclass
class Samples:
    """Per-call times of one measurement, in milliseconds; on a GPU also the host time
    each call took to return (its launches), and the device time of one flush."""

    ms: list[float]
    host_ms: list[float] = field(default_factory=list)
    flush_ms: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def host_bound(self) -> bool:
        """The host took longer to launch the call than the flush kept the GPU busy, so the
        GPU may have waited for launches inside the timed window."""
        return bool(self.host_ms and self.flush_ms is not None and statistics.median(self.host_ms) > self.flush_ms)

    def fields(self) -> dict:
        """What a benchmark record keeps of the measurement."""
        host = statistics.median(self.host_ms) if self.host_ms else None
        return {"ms": self.median, "p10_ms": self.quantile(0.1), "p90_ms": self.quantile(0.9),
                "samples_ms": self.ms, "host_ms": host, "host_bound": self.host_bound}


class CudaTimer:
    """CUDA events around each call, the L2 flushed by a 1 GiB write before each.

    Warm-up runs for `warmup_ms`; then `rep_ms` of calls, at least `min_samples` of them
    (at most `max_ms` of device time per measurement)."""

    description = "CUDA events per call after a 1 GiB L2-flushing write (host launches queued behind it), median"

    def __init__(self, warmup_ms: float, rep_ms: float, min_samples: int, max_ms: float = 3000.0,
                 max_samples: int = 200):
        self.warmup_ms, self.rep_ms, self.min_samples = warmup_ms, rep_ms, min_samples
        self.max_ms, self.max_samples = max_ms, max_samples
        self._flush: torch.Tensor | None = None
        self._flush_ms: float | None = None

    def _timed_flush(self) -> float:
        if self._flush is None:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
            self._flush_ms = min(self._event_ms(self._flush.zero_) for _ in range(5))
        return self._flush_ms

    @staticmethod
    def _event_ms(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def time(self, fn: Callable[[], object]) -> Samples:
        fn()  # first call: compilation, autotuning, allocator growth
        torch.cuda.synchronize()
        flush_ms = self._timed_flush()
        estimate_ms = max(self._event_ms(fn), 1e-3)
        for _ in range(max(1, min(self.max_samples, int(self.warmup_ms / estimate_ms)))):
            fn()
        count = max(self.min_samples, int(self.rep_ms / estimate_ms))
        count = max(1, min(count, self.max_samples, int(self.max_ms / estimate_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        host_ms = []
        for start, end in zip(starts, ends):
            self._flush.zero_()
            launched = time.perf_counter()
            start.record()
            fn()
            end.record()
            host_ms.append((time.perf_counter() - launched) * 1e3)
        torch.cuda.synchronize()
        return Samples([round(a.elapsed_time(b), 5) for a, b in zip(starts, ends)],
                       [round(t, 4) for t in host_ms], flush_ms)

    def settings(self) -> dict:
        return {"timer": self.description, "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                "min_samples": self.min_samples, "max_ms_per_measurement": self.max_ms,
                "flush_bytes": FLUSH_BYTES, "flush_ms": self._flush_ms}


class CpuTimer:
    """Wall-clock timing on CPU (time.perf_counter), `reps` samples after `warmup` calls."""

    description = "CPU wall-clock via time.perf_counter, median"

    def __init__(self, warmup: int, reps: int):
        self.warmup, self.reps = warmup, reps

    def time(self, fn: Callable[[], object]) -> Samples:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return Samples([round(t, 5) for t in times])

    def settings(self) -> dict:
        return {"timer": self.description, "warmup_calls": self.warmup, "reps": self.reps}


def make_timer(device: str, quick: bool):
    if device == "cuda":
        # About 0.1 s of wall time per measurement (quick: 0.05 s).
        return CudaTimer(warmup_ms=5, rep_ms=20, min_samples=5) if quick else CudaTimer(10, 40, 10)
    return CpuTimer(warmup=1, reps=3) if quick else CpuTimer(warmup=2, reps=10)


def resolve_device_and_model(parser, args) -> None:
    """--device and --model of a benchmark with its own options (hf, serve) made concrete:
    --device through llm.runtime.resolve_device (auto -> cuda when torch sees a device, else
    cpu; cuda without one is a usage error); --model auto -> gpt2 (124M) on a GPU, tiny on CPU."""
    try:
        args.device = resolve_device(args.device).type
    except ValueError as error:
        parser.error(str(error))
    if args.model == "auto":
        args.model = "gpt2" if args.device == "cuda" else "tiny"


def warm_up_clocks(device: str, seconds: float = 1.0) -> None:
    """Matmuls for about `seconds`, so the first ceilings are not measured at idle clocks."""
    if device != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def measure_ceilings(device: str, timer) -> dict:
    """What the device can do at best, measured now: copy bandwidth and matmul rate.

    GPU: a 512 MiB bf16 device-to-device copy (bytes read + written) and a bf16 8192^3
    matmul. CPU: a 64 MiB fp32 copy and an fp32 1024^3 matmul (CPU figures, labelled so)."""
    if device == "cuda":
        copy_numel, matmul_n, dtype = 1 << 28, 8192, torch.bfloat16
    else:
        copy_numel, matmul_n, dtype = 1 << 24, 1024, torch.float32
    src = torch.randn(copy_numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy = timer.time(lambda: dst.copy_(src))
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    matmul = timer.time(lambda: a @ b)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "copy": {"what": f"{device} copy of {copy_bytes // 2 >> 20} MiB {dtype_name} (read + write counted)",
                 "value": copy_bytes / copy.median / 1e6, "unit": "GB/s", "ms": copy.median, "samples_ms": copy.ms},
        "matmul": {"what": f"{device} {dtype_name} matmul {matmul_n}^3",
                   "value": 2 * matmul_n**3 / matmul.median / 1e9, "unit": "TFLOP/s", "ms": matmul.median,
                   "samples_ms": matmul.ms},
    }


def keep_best_ceilings(first: dict, last: dict) -> dict:
    """The ceilings measured at the start and the end of a run: the higher of each is the
    device's ceiling (a low one, e.g. from clocks still ramping up, would inflate every %)."""
    best = {}
    for name, early in first.items():
        late = last[name]
        best[name] = dict(max(early, late, key=lambda c: c["value"]), first_value=early["value"],
                          last_value=late["value"])
    return best


def _command_output(args: list[str]) -> str | None:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment(device: str) -> dict:
    """Device, driver, versions and git commit, saved with every run."""
    info = {
        "device_kind": device,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_commit": _command_output(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_command_output(["git", "status", "--porcelain", "--untracked-files=no"])),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        info["device"] = f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        info["driver"] = None
    try:
        import llmkernels

        info["llmkernels_backends"] = {name: {"usable": usable, "reason": reason}
                                       for name, (usable, reason) in llmkernels.available_backends().items()}
    except Exception as error:  # the package under test may be broken; the run still reports it
        info["llmkernels_backends"] = {"import_error": f"{type(error).__name__}: {error}"}
    return info


def device_slug(env: dict) -> str:
    """'nvidia-h100-80gb-hbm3' or 'cpu': the device part of the default output folder name."""
    if env["device_kind"] != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-").replace("--", "-")
