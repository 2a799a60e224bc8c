"""How a figure is measured: the timers, the device ceilings and the run's environment.

On a GPU every sample is one call timed with CUDA events by triton.testing.do_bench,
which flushes the L2 cache before each call; the callers also rotate among several input
sets, so memory-bound ops read from HBM as they would inside a model. The median of the
samples is the figure. On CPU the samples are time.perf_counter wall-clock times.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Samples:
    """Per-call times of one measurement, in milliseconds."""

    ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


class CudaTimer:
    """CUDA-event timing through triton.testing.do_bench, L2 flushed before every call.

    do_bench repeats the call for `rep_ms` of device time; slow calls get at least
    `min_samples` samples (capped at `max_ms` per measurement)."""

    description = "CUDA events via triton.testing.do_bench (L2 flushed before each call), median"

    def __init__(self, warmup_ms: float, rep_ms: float, min_samples: int, max_ms: float = 3000.0):
        self.warmup_ms, self.rep_ms, self.min_samples, self.max_ms = warmup_ms, rep_ms, min_samples, max_ms

    def time(self, fn: Callable[[], object]) -> Samples:
        from triton.testing import do_bench

        fn()  # first call: compilation, autotuning, allocator growth
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end)
        rep_ms = min(max(self.rep_ms, self.min_samples * estimate_ms), self.max_ms)
        times = do_bench(fn, warmup=self.warmup_ms, rep=rep_ms, return_mode="all")
        return Samples([round(t, 5) for t in times])

    def settings(self) -> dict:
        return {"timer": self.description, "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                "min_samples": self.min_samples, "max_ms_per_measurement": self.max_ms}


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
        # Measured budget: about 0.1 s of wall time per measurement (quick: 0.05 s).
        return CudaTimer(warmup_ms=5, rep_ms=20, min_samples=5) if quick else CudaTimer(10, 40, 10)
    return CpuTimer(warmup=1, reps=3) if quick else CpuTimer(warmup=2, reps=10)


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
