"""python -m benchmarks [attention|layernorm|gelu|linear_cross_entropy|e2e|all] [--quick] [--out DIR] ...

Measures the device ceilings, then every case of the chosen suites against the baselines,
in one process, and writes results.json, results.md and summary.png to --out. Cases run
in priority order (each suite's first dtype, bf16 on a GPU, then the end-to-end steps,
then the other dtypes), so a run cut short by --time-budget keeps the headline figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from . import e2e, kernels, linear_cross_entropy, report
from .measure import REPO_ROOT, device_slug, environment, make_timer, measure_ceilings

SUITES = ("attention", "layernorm", "gelu", "linear_cross_entropy", "e2e")
# Rough wall time of one measurement and of one torch.compile, for --time-budget.
MEASUREMENT_S = {"cuda": 0.15, "cpu": 0.05}
COMPILE_S = 5.0
CHECKPOINT_S = 30.0
NOTES = [
    "Rates count the work a pass must do: attention 4*B*H*S*S*D FLOPs halved for causal, backward 2.5x; "
    "memory-bound ops the bytes they must read and write (LayerNorm includes weight/bias and the fp32 mean/rstd).",
    "Gradients come from torch.autograd.grad (no .grad accumulation kernels); 'bwd' replays retained graphs.",
    "torch:compile is torch.compile(dynamic=False) of torch:eager, recompiled for each shape and dtype.",
    "Score-materialising attention (torch:eager, torch:compile, ours:reference) is skipped when one (B,H,S,S) "
    f"score tensor exceeds {kernels.MAX_SCORE_BYTES >> 30} GiB.",
    "Anchor memory-bound figures count 2*M*N (fwd) / 5*M*N (fwd+bwd) elements; the comparison converts our "
    "times with their count. The anchors' fwd+bwd calls .backward() and so also pays for .grad accumulation.",
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"one or more of {', '.join(SUITES + ('all',))} (default: all)")
    parser.add_argument("--suite", action="append", choices=SUITES + ("all",), default=[], help="same as positional")
    parser.add_argument("--quick", action="store_true", help="few shapes, bf16 only, few reps, no torch.compile")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<date>-<device>)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when there is a device, else the small CPU comparison")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="time torch.compile baselines (auto: on for full GPU runs, off for --quick and CPU)")
    parser.add_argument("--anchors", type=Path, action="append",
                        help="anchor JSON file(s) to compare our baselines with (default benchmarks/anchors/*.json)")
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float16", "float32"),
                        help="time only these dtypes (repeatable; default: every dtype of each op)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="skip (and record as skipped) the cases that would start past this many seconds")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES + ("all",)]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES + ('all',))}")
    chosen = args.suites + args.suite or ["all"]
    args.suites = list(SUITES) if "all" in chosen else list(dict.fromkeys(chosen))
    return args


def plan(suites: list[str], device: str, quick: bool, use_compile: bool,
         dtypes: list[str] | None = None) -> list[tuple[float, str, object]]:
    """(priority, kind, item) in the order they run: each op's first dtype, then e2e, then the rest."""
    items = []
    for suite in suites:
        if suite == "e2e":
            items += [(0.5, "e2e", item) for item in e2e.plan(device, quick, use_compile)]
            continue
        if suite == "linear_cross_entropy":  # runs after these items: linear_cross_entropy.run_suite
            continue
        cases = kernels.cases_for(suite, device, quick)
        for case in cases:
            op_dtypes = list(dict.fromkeys(c.dtype for c in cases if c.op == case.op))
            if dtypes is None or kernels.dtype_name(case.dtype) in dtypes:
                items.append((op_dtypes.index(case.dtype), "kernel", case))
    return sorted(items, key=lambda item: item[0])  # stable: suite and shape order kept within a priority


def estimate_s(kind: str, item, device: str, use_compile: bool) -> float:
    if kind == "e2e":
        return item["estimate_s"] if device == "cuda" else 5.0
    providers = 8 if item.op == "attention" else 5
    return providers * len(item.passes) * MEASUREMENT_S[device] + (COMPILE_S if use_compile else 0.0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        why = "CPU run requested (--device cpu)" if args.device == "cpu" else "No CUDA device"
        print(f"{why}: running a small CPU comparison of the reference providers "
              "(tiny shapes, time.perf_counter wall-clock; these are not GPU figures).", flush=True)
        torch.set_num_threads(1)  # steadier than 2+ threads on a shared CI core pair; recorded in env
    use_compile = args.compile == "on" or (args.compile == "auto" and device == "cuda" and not args.quick)
    timer = make_timer(device, args.quick)
    env = environment(device)
    env["torch_threads"] = torch.get_num_threads()
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or (REPO_ROOT / "benchmarks" / "results" /
                           f"{started:%Y-%m-%d}-{device_slug(env)}{'-quick' if args.quick else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    run = {"schema": 1, "started": started.isoformat(timespec="seconds"), "command": ["python", "-m", "benchmarks", *argv],
           "mode": device, "quick": args.quick, "suites": args.suites,
           "torch_compile": use_compile, "time_budget_s": args.time_budget, "env": env, "timer": timer.settings(),
           "notes": NOTES, "records": [], "e2e": []}
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | out: {out_dir}", flush=True)
    run["ceilings"] = measure_ceilings(device, timer)
    for name, c in run["ceilings"].items():
        print(f"ceiling {name}: {report.fmt(c['value'])} {c['unit']} ({c['what']})", flush=True)

    from tqdm import tqdm

    items = plan(args.suites, device, args.quick, use_compile, args.dtype)
    last_checkpoint = t0
    progress = tqdm(items, desc="cases", unit="case", file=sys.stderr, mininterval=2.0)
    for _, kind, item in progress:
        label = e2e.label(item) if kind == "e2e" else item.label
        progress.set_postfix_str(label)
        elapsed = time.monotonic() - t0
        over_budget = args.time_budget is not None and elapsed + estimate_s(kind, item, device, use_compile) > args.time_budget
        if kind == "e2e":
            if over_budget:
                item = dict(item, skipped=f"time budget ({args.time_budget:.0f} s) spent")
            run["e2e"].append(e2e.run(item, device))
        elif over_budget:
            for provider in kernels.providers_for(item.op, device, use_compile=False):
                for pass_ in item.passes:
                    item.record(provider, pass_, skipped=f"time budget ({args.time_budget:.0f} s) spent")
            run["records"] += item.records
        else:
            torch._dynamo.reset()  # each case compiles afresh: no recompile limits, no shared guards
            providers = kernels.providers_for(item.op, device, use_compile)
            run["records"] += kernels.run_case(item, providers, timer, device)
        if time.monotonic() - last_checkpoint > CHECKPOINT_S:  # partial results survive a killed run
            report.write_text(out_dir / "results.json", json.dumps(run))
            last_checkpoint = time.monotonic()
    progress.close()
    if "linear_cross_entropy" in args.suites:
        budget_left = None if args.time_budget is None else args.time_budget - (time.monotonic() - t0)
        run["linear_cross_entropy"] = linear_cross_entropy.run_suite(device, args.quick, use_compile, timer, out_dir,
                                                                     budget_left)

    run["elapsed_s"] = time.monotonic() - t0
    report.summarise(run["records"], run["ceilings"])
    anchor_paths = args.anchors or sorted(report.ANCHORS_DIR.glob("*.json"))
    run["anchors"] = report.compare_with_anchors(run, anchor_paths)
    paths = report.write_outputs(run, out_dir)
    print(report.stdout_markdown(run))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({run['elapsed_s']:.0f} s)", flush=True)
    return 0
