"""Linear + cross-entropy (an LM head and its loss: x (N, C), W (V, C), targets (N,)):
llmkernels.linear_cross_entropy against eager F.cross_entropy(x @ W.T), its torch.compile
and Liger-Kernel's fused linear cross-entropy (where importable), forward + backward time
and peak memory.

    python -m benchmarks linear_cross_entropy       a suite of the benchmark run (cli.py)
    python -m benchmarks.linear_cross_entropy       CPU peak memory at N=8192, C=768, V=50257

How it is measured:
- Time (GPU): the run's timer (CUDA events, L2 flushed before each call, median) of one
  forward + backward, gradients by torch.autograd.grad (no .grad accumulation).
- Peak memory (GPU): torch.cuda.max_memory_allocated during one forward + backward, minus
  what was allocated just before (the inputs), so it counts the logits, the temporaries
  and the gradients themselves.
- Peak memory (CPU, this module's command): each provider in a fresh subprocess, fp32;
  the peak resident set size during one forward + backward (VmHWM, reset through
  /proc/self/clear_refs just before the call) minus the resident size at that moment.
  The Triton provider runs its kernel in Triton's interpreter there: the same buffers as
  on a GPU (the interpreter works in place on CPU tensors), but no speed figure.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llm.files import write_text
from llm.plots import save_png

from .kernels import recording_error
from .measure import REPO_ROOT
from .report import fmt, markdown_table

IGNORE_INDEX = -1
# (N rows, C hidden, V vocabulary): GPT-2 124M at 8 and 16 x 1024 tokens, and a Llama-3-like head.
GPU_SHAPES = [(8192, 768, 50257), (16384, 768, 50257), (4096, 4096, 128256)]
GPU_QUICK_SHAPES = GPU_SHAPES[:1]
CPU_SHAPES = [(512, 64, 2048)]  # the suite on CPU: the reference path works, no figures to read
CPU_MEMORY_SHAPE = (8192, 768, 50257)
PROVIDERS = ("ours:triton", "ours:reference", "torch:eager", "torch:compile", "liger")


def eager(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x @ weight.T, targets, ignore_index=IGNORE_INDEX)  # materialises the (N, V) logits


def provider_fn(name: str, use_compile: bool = True) -> tuple[Optional[Callable], Optional[str]]:
    """(loss function of (x, weight, targets), None) or (None, why it is not available)."""
    if name.startswith("ours:"):
        import llmkernels

        backend = name.removeprefix("ours:")
        usable, reason = llmkernels.available_backends()[backend]
        if not usable:
            return None, reason

        def ours(x, weight, targets):
            return llmkernels.linear_cross_entropy(x, weight, targets, ignore_index=IGNORE_INDEX, backend=backend)

        return ours, None
    if name == "torch:eager":
        return eager, None
    if name == "torch:compile":
        if not use_compile:
            return None, "torch.compile off for this run (--compile)"
        return torch.compile(eager, dynamic=False), None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None, "liger_kernel is not installed"
    liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return (lambda x, w, t: liger(w, x, t)), None


def make_inputs(rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """x (rows, hidden) and W (vocab, hidden), both requiring grad, with logits of about unit
    scale; targets (rows,) with every 8th ignored. Fresh random values, never zeros."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    targets[::8] = IGNORE_INDEX
    return x, weight, targets


def forward_backward(fn: Callable, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    loss = fn(x, weight, targets)
    return loss, torch.autograd.grad(loss, (x, weight))


def shape_label(rows: int, hidden: int, vocab: int) -> str:
    return f"N{rows} C{hidden} V{vocab}"


# ------------------------------------------------------------------- the GPU suite
def _cuda_peak_bytes(fn: Callable, inputs) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = forward_backward(fn, *inputs)
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def run_suite(device: str, quick: bool, use_compile: bool, timer, out_dir: Optional[Path] = None,
              time_budget_s: Optional[float] = None) -> list[dict]:
    """Times every provider on every shape (bf16 on a GPU, fp32 on CPU), prints the table,
    returns the records; writes linear_cross_entropy.{json,md,png} to out_dir when one is given
    (`python -m benchmarks` keeps them in its own results instead). Shapes that would start
    after time_budget_s seconds are recorded as skipped."""
    from tqdm import tqdm

    shapes = (GPU_QUICK_SHAPES if quick else GPU_SHAPES) if device == "cuda" else CPU_SHAPES
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start, records = time.monotonic(), []
    for rows, hidden, vocab in tqdm(shapes, desc="linear_cross_entropy", unit="shape", file=sys.stderr):
        inputs = make_inputs(rows, hidden, vocab, dtype, device)
        for name in PROVIDERS:
            record = {"shape": shape_label(rows, hidden, vocab), "rows": rows, "hidden": hidden, "vocab": vocab,
                      "dtype": str(dtype).removeprefix("torch."), "provider": name, "pass": "fwd+bwd",
                      "ms": None, "peak_mib": None, "error": None, "skipped": None}
            records.append(record)
            fn, reason = provider_fn(name, use_compile)
            if fn is not None and device == "cpu" and name == "ours:triton":
                fn, reason = None, "CPU run: the Triton kernels are timed on a GPU only"
            if time_budget_s is not None and time.monotonic() - start > time_budget_s:
                fn, reason = None, f"time budget ({time_budget_s:.0f} s) spent"
            if fn is None:
                record["skipped"] = reason
                continue
            with recording_error(record, device):
                if device == "cuda":
                    forward_backward(fn, *inputs)  # compile, autotune, allocator growth
                    record["peak_mib"] = _cuda_peak_bytes(fn, inputs) / 2**20
                record["ms"] = timer.time(lambda: forward_backward(fn, *inputs)).median
        del inputs
    if out_dir is not None:
        write_outputs(records, out_dir, "GPU" if device == "cuda" else "CPU (reference path only; no GPU figures)")
    print(markdown(records), flush=True)
    return records


# ------------------------------------------------------------------------ reports
def markdown(records: list[dict]) -> str:
    """One row per shape and provider: time and peak memory, and both as ratios to eager."""
    eager_by_shape = {r["shape"]: r for r in records if r["provider"] == "torch:eager"}
    compile_by_shape = {r["shape"]: r for r in records if r["provider"] == "torch:compile"}
    rows = []
    for r in records:
        base, compiled = eager_by_shape.get(r["shape"], {}), compile_by_shape.get(r["shape"], {})

        def ratio(key, other):
            return fmt(r[key] / other[key]) if r.get(key) and other.get(key) else "-"

        note = (r.get("error") or r.get("skipped") or "").replace("|", "/")
        rows.append([r["shape"], r["dtype"], r["provider"], fmt(r.get("ms")), ratio("ms", base), ratio("ms", compiled),
                     fmt(r.get("peak_mib")), ratio("peak_mib", base), note])
    header = ["shape", "dtype", "provider", "ms", "ms / eager", "ms / compile", "peak MiB", "peak / eager", "note"]
    return "### linear_cross_entropy: forward + backward\n\n" + markdown_table(header, rows)


def plot(records: list[dict], path: Path, title: str) -> None:
    """Forward + backward time and peak memory (the panels that have figures), per shape and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in records))
    panels = [(key, label) for key, label in (("ms", "fwd+bwd ms"), ("peak_mib", "peak MiB beyond the inputs"))
              if any(r.get(key) for r in records)] or [("ms", "nothing measured")]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4 + 4 * len(panels), 3.5 * len(shapes)), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        providers = [p for p in PROVIDERS if any(r["provider"] == p and r.get(key) for r in records)]
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            values = {r["shape"]: r[key] for r in records if r["provider"] == provider and r.get(key)}
            xs = [s for s, shape in enumerate(shapes) if shape in values]
            ax.bar([x + (i - (len(providers) - 1) / 2) * width for x in xs], [values[shapes[x]] for x in xs],
                   width, label=provider)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if providers:
            ax.legend(fontsize=7)
    fig.suptitle(f"linear + cross-entropy: {title}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(records: list[dict], out_dir: Path, title: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "linear_cross_entropy.json", "markdown": out_dir / "linear_cross_entropy.md",
             "plot": out_dir / "linear_cross_entropy.png"}
    write_text(paths["json"], json.dumps({"title": title, "records": records}, indent=1))
    write_text(paths["markdown"], f"# {title}\n\n{markdown(records)}\n")
    plot(records, paths["plot"], title)
    return paths


# ----------------------------------------------------------------- CPU peak memory
def _resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_worker(provider: str, rows: int, hidden: int, vocab: int) -> dict:
    """In a fresh process: peak resident memory of one fp32 forward + backward beyond the
    resident memory just before it (after a small warm-up call of the same provider)."""
    fn, reason = provider_fn(provider)
    if fn is None:
        return {"provider": provider, "skipped": reason}
    forward_backward(fn, *make_inputs(64, 16, 128, torch.float32, "cpu", seed=1))  # imports, lazy init
    inputs = make_inputs(rows, hidden, vocab, torch.float32, "cpu")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _resident_kib("VmRSS")
    start = time.perf_counter()
    loss, grads = forward_backward(fn, *inputs)
    seconds = time.perf_counter() - start
    peak = _resident_kib("VmHWM") - before
    return {"provider": provider, "peak_mib": peak / 1024, "seconds": seconds, "loss": loss.item(),
            "grad_weight_norm": grads[1].norm().item()}


def measure_cpu_memory(rows: int, hidden: int, vocab: int, providers: list[str]) -> list[dict]:
    from tqdm import tqdm

    results = []
    for provider in tqdm(providers, desc="providers", unit="process", file=sys.stderr):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), str(REPO_ROOT / "python"),
                                                                          os.environ.get("PYTHONPATH")])))
        if provider == "ours:triton":
            env["TRITON_INTERPRET"] = "1"
        command = [sys.executable, "-m", "benchmarks.linear_cross_entropy", "--worker", provider,
                   "--rows", str(rows), "--hidden", str(hidden), "--vocab", str(vocab)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        if done.returncode != 0:
            results.append({"provider": provider, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.linear_cross_entropy",
        description="Peak CPU memory of one fp32 forward + backward of linear + cross-entropy, each provider "
                    "in a fresh process (see the module docstring for the method).")
    rows, hidden, vocab = CPU_MEMORY_SHAPE
    parser.add_argument("--rows", type=int, default=rows, help=f"N, rows of x (default {rows})")
    parser.add_argument("--hidden", type=int, default=hidden, help=f"C, columns of x (default {hidden})")
    parser.add_argument("--vocab", type=int, default=vocab, help=f"V, rows of the weight (default {vocab})")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        default=["ours:reference", "ours:triton", "torch:eager"])
    parser.add_argument("--out", type=Path,
                        help="output folder (default benchmarks/results/<date>-cpu-linear-cross-entropy)")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)  # one measurement, in a subprocess
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("rows", "hidden", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.rows, args.hidden, args.vocab)))
        return 0
    results = measure_cpu_memory(args.rows, args.hidden, args.vocab, args.providers)
    label = shape_label(args.rows, args.hidden, args.vocab)
    records = [{"shape": label, "dtype": "float32", "provider": r["provider"], "pass": "fwd+bwd",
                "ms": None, "peak_mib": r.get("peak_mib"), "wall_s": r.get("seconds"), "loss": r.get("loss"),
                "error": r.get("error") and " ".join(r["error"]), "skipped": r.get("skipped")} for r in results]
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or REPO_ROOT / "benchmarks" / "results" / f"{started:%Y-%m-%d}-cpu-linear-cross-entropy"
    paths = write_outputs(records, out_dir, "CPU peak resident memory, fp32")
    for r in records:
        wall = f", {r['wall_s']:.1f} s wall" if r.get("wall_s") else ""
        print(f"{r['provider']:16s} peak {fmt(r['peak_mib'])} MiB{wall}, loss {r['loss']}"
              if r["peak_mib"] else f"{r['provider']:16s} {r['error'] or r['skipped']}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
