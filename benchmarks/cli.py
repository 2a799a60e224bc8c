"""python -m benchmarks [attention|layernorm|gelu|linear_cross_entropy|e2e|all] [--quick|--headline] [--out DIR] ...

Measures the device ceilings, then every case of the chosen suites against the baselines,
in one process, then the ceilings again (the higher of each is kept), and writes
results.json, results.md and summary.png to a new folder per run
(benchmarks/results/<date>-<time>-<device>). Cases run in priority order (each suite's
first dtype, bf16 on a GPU, then the end-to-end steps, then the other dtypes), so a run cut
short by --time-budget or Ctrl-C keeps the headline figures; the outputs are rewritten
every 30 s and on an interrupt.
"""
from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config  # not imported by `import torch`; main() sets donated_buffer in it

from llm.runtime import resolve_device

from . import e2e, kernels, linear_cross_entropy, report
from .measure import REPO_ROOT, device_slug, environment, keep_best_ceilings, make_timer, measure_ceilings, warm_up_clocks

# One entry per suite: its name on the command line -> the ops it times (kernels.SUITE_OPS),
# linear_cross_entropy (its own time and peak-memory suite, benchmarks/linear_cross_entropy.py),
# or the end-to-end training steps.
SUITES = tuple(kernels.SUITE_OPS) + ("linear_cross_entropy", "e2e")
CHECKPOINT_S = 30.0
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
NOTES = [
    "Rates count the work a pass must do: attention 4*B*H*S*S*D FLOPs halved for causal, backward 2.5x; "
    "memory-bound ops the bytes they must read and write (LayerNorm includes weight/bias and the fp32 mean/rstd).",
    "Gradients come from torch.autograd.grad (no .grad accumulation kernels); 'bwd' replays retained graphs.",
    "torch:compile is torch.compile(dynamic=False) of torch:eager, recompiled for each shape and dtype.",
    "Score-materialising attention (torch:eager, torch:compile, ours:reference) is skipped when one (B,H,S,S) "
    f"score tensor exceeds {kernels.MAX_SCORE_BYTES >> 30} GiB.",
    "fwd+bwd of memory-bound ops re-reads x right after its forward; below the L2 size (60 MB on the H200) that "
    "read can hit the cache, so the bwd row is the cleaner % of the copy ceiling.",
    "host-bound: the call took longer to launch from Python than the L2 flush kept the GPU busy, so launch gaps "
    "may be inside its time (marked in the tables).",
    "Anchors are compared as a fraction of each device's own ceilings: the anchors were measured on another GPU.",
    "Anchor memory-bound figures count 2*M*N (fwd) / 5*M*N (fwd+bwd) elements; the comparison converts our "
    "times with their count. The anchors' fwd+bwd calls .backward() and so also pays for .grad accumulation.",
]
# Where the e2e rows of each (model, mode) fall in the run order (see plan).
E2E_PRIORITY = {("llm", "eager"): 0.5, ("transformers", "eager"): 0.68, ("llm", "compile"): 0.7}
# Wall seconds a measurement or a torch.compile takes before any has been seen in this run.
DEFAULT_MEASUREMENT_S = {"cuda": 0.3, "cpu": 0.05}
DEFAULT_COMPILE_S = 10.0


class UsageError(Exception):
    """A bad option: reported as one line naming it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"one or more of {', '.join(SUITES + ('all',))} (default: all)")
    parser.add_argument("--suite", action="append", choices=SUITES + ("all",), default=[], help="same as positional")
    parser.add_argument("--quick", action="store_true", help="few shapes, bf16 only, few reps, no torch.compile")
    parser.add_argument("--headline", action="store_true",
                        help="only the headline cases (kernels.HEADLINE: two attention shapes, one per memory-bound "
                             "op, fwd and fwd+bwd, the main baselines; e2e with few steps; one linear_cross_entropy "
                             "shape)")
    parser.add_argument("--out", type=Path,
                        help="output folder; it must be new or empty unless --overwrite or --extend "
                             "(default: a new benchmarks/results/<date>-<time>-<device>)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing its results")
    parser.add_argument("--extend", action="store_true",
                        help="add to the run saved in --out: its measured cases are kept, not timed again")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when there is a device, else the small CPU comparison")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="time torch.compile baselines (auto: on for full and headline GPU runs, "
                             "off for --quick and CPU)")
    parser.add_argument("--anchors", type=Path, action="append",
                        help="anchor JSON file(s) to compare our baselines with (default benchmarks/anchors/*.json)")
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float16", "float32"),
                        help="time only these dtypes (repeatable; default: every dtype of each op)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="do not start (record as skipped) a case expected to end past this many seconds")
    return parser


def parse_args(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES + ("all",)]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES + ('all',))}")
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget must be a positive number of seconds, got {args.time_budget:g}")
    if args.overwrite and args.extend:
        parser.error("--overwrite and --extend exclude each other: replace the results in --out, or add to them")
    if (args.overwrite or args.extend) and args.out is None:
        parser.error(f"--{'overwrite' if args.overwrite else 'extend'} needs --out (the folder to write into)")
    if args.quick and args.headline:
        parser.error("--quick and --headline exclude each other (each is its own selection of cases)")
    chosen = args.suites + args.suite or ["all"]
    args.suites = list(SUITES) if "all" in chosen else list(dict.fromkeys(chosen))
    return args


def output_dir(args, device: str, env: dict, started: datetime.datetime) -> Path:
    """A new folder per run, never an earlier run's: the default is named by date and time
    (with -2, -3, ... if that second is taken); an explicit --out must be new or empty
    unless --overwrite or --extend says what to do with what is there."""
    if args.out is None:
        kind = "-quick" if args.quick else "-headline" if args.headline else ""
        base = RESULTS_DIR / f"{started:%Y-%m-%d-%H%M%S}-{device_slug(env)}{kind}"
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        return out
    out = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if args.extend and not (out / "results.json").is_file():
        raise UsageError(f"--extend: no results.json in --out {out} to add to")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite or args.extend):
        raise UsageError(f"--out {out} is not empty (an earlier run?); pass --overwrite to replace its results, "
                         "--extend to add to them, or choose a new folder")
    return out


def plan(suites: list[str], device: str, quick: bool, use_compile: bool,
         dtypes: list[str] | None = None, headline: bool = False) -> list[tuple[float, str, object]]:
    """(priority, kind, item) in the order they run: each op's first dtype, then llm's e2e eager
    steps, the linear_cross_entropy suite (time and peak memory), the Hugging Face GPT-2 e2e
    steps, llm's compiled e2e steps, then the other dtypes. A headline run times llm's e2e
    eager steps right after attention, before the memory-bound ops and their torch.compile
    baselines."""
    items = []
    for suite in suites:
        if suite == "e2e":
            items += [(E2E_PRIORITY[item["model"], item["mode"]], "e2e", item)
                      for item in e2e.plan(device, quick or headline, use_compile)]
            continue
        if suite == "linear_cross_entropy":  # one item: linear_cross_entropy.run_suite, every shape
            items.append((0.65, "linear_cross_entropy", None))
            continue
        cases = kernels.cases_for(suite, device, quick, headline)
        for case in cases:
            op_dtypes = list(dict.fromkeys(c.dtype for c in cases if c.op == case.op))
            if dtypes is None or kernels.dtype_name(case.dtype) in dtypes:
                after_e2e = 0.6 if headline and case.op != "attention" else 0.0
                items.append((op_dtypes.index(case.dtype) + after_e2e, "kernel", case))
    return sorted(items, key=lambda item: item[0])  # stable: suite and shape order kept within a priority


class Estimator:
    """Expected wall seconds of the next case, from the cases of the same kind this run has
    already timed (Triton autotuning and torch.compile make the first cases slow), else
    from defaults."""

    def __init__(self, device: str):
        self.device = device
        self.seen: dict[str, list[float]] = {}

    @staticmethod
    def key(kind: str, item) -> str:
        return f"e2e {item['model']} {item['mode']}" if kind == "e2e" else item.op

    def add(self, kind: str, item, seconds: float) -> None:
        self.seen.setdefault(self.key(kind, item), []).append(seconds)

    def estimate_s(self, kind: str, item, providers: list | None = None) -> float:
        seen = self.seen.get(self.key(kind, item))
        if seen:
            return max(seen) if kind == "e2e" else sum(seen) / len(seen)
        if kind == "e2e":
            return item["estimate_s"] if self.device == "cuda" else 5.0
        timed = [p for p in providers if p.fn is not None]
        compiles = sum(p.name == "torch:compile" for p in timed) * len(item.passes)
        return len(timed) * len(item.passes) * DEFAULT_MEASUREMENT_S[self.device] + compiles * DEFAULT_COMPILE_S


def _measured_keys(previous: dict) -> tuple[set, set]:
    """What an earlier run in --out already has: kernel (op, shape, dtype, pass, provider)
    and e2e labels that were timed, failed, or skipped for a lasting reason (not for time)."""
    def lasting(r: dict) -> bool:
        return r.get("ms") is not None or bool(r.get("error")) or not str(r.get("skipped") or "").startswith("time budget")

    kernel = {kernels.record_key(r) for r in previous["records"] if lasting(r)}
    steps = {r["label"] for r in previous.get("e2e", []) if lasting(r)}
    return kernel, steps


def _interrupt_on_sigterm() -> None:
    """SIGTERM (timeout, a scheduler) ends the run like Ctrl-C: its outputs are written first."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def finish(run: dict, out_dir: Path, t0: float) -> dict:
    """Summaries, anchors and the three output files, from what the run holds now."""
    run["elapsed_s"] = run.get("elapsed_before_s", 0.0) + time.monotonic() - t0
    report.summarise(run["records"], run["ceilings"])
    run["anchors"] = report.compare_with_anchors(run, run["anchor_paths"])
    return report.write_outputs(run, out_dir)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # llm-serve's load test, with its own options (benchmarks/serve.py)
        from .serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["hf"]:  # a Hugging Face GPT-2: stock vs llmkernels vs torch.compile (benchmarks/hf.py)
        from .hf import main as hf_main

        return hf_main(argv[1:])
    args = parse_args(argv)
    try:
        device = resolve_device(args.device).type
    except ValueError as error:  # --device cuda without a CUDA device
        print(f"error: {error}", file=sys.stderr)
        return 2
    env = environment(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        out_dir = output_dir(args, device, env, started)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if device == "cpu":
        why = "CPU run requested (--device cpu)" if args.device == "cpu" else "No CUDA device"
        print(f"{why}: running a small CPU comparison of the reference providers "
              "(tiny shapes, time.perf_counter wall-clock; these are not GPU figures).", flush=True)
        torch.set_num_threads(1)  # steadier than 2+ threads on a shared CI core pair; recorded in env
    torch._functorch.config.donated_buffer = False  # compiled backward replayed with retain_graph (the bwd pass)
    use_compile = args.compile == "on" or (args.compile == "auto" and device == "cuda" and not args.quick)
    timer = make_timer(device, args.quick)
    env["torch_threads"] = torch.get_num_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    _interrupt_on_sigterm()
    t0 = time.monotonic()

    previous = json.loads((out_dir / "results.json").read_text()) if args.extend else None
    done_kernels, done_steps = _measured_keys(previous) if previous else (set(), set())
    run = {"schema": 1, "started": started.isoformat(timespec="seconds"), "command": ["python", "-m", "benchmarks", *argv],
           "mode": device, "quick": args.quick, "headline": args.headline, "suites": args.suites,
           "torch_compile": use_compile, "time_budget_s": args.time_budget, "env": env, "timer": timer.settings(),
           "notes": NOTES, "records": [], "e2e": [], "interrupted": None,
           "anchor_paths": [str(p) for p in args.anchors or sorted(report.ANCHORS_DIR.glob("*.json"))]}
    if previous:  # keep what the earlier run measured; time budget skips are retried
        run["records"] = [r for r in previous["records"] if kernels.record_key(r) in done_kernels]
        run["e2e"] = [r for r in previous.get("e2e", []) if r["label"] in done_steps]
        run["extends"] = {"started": previous["started"], "command": previous["command"]}
        run["suites"] = list(dict.fromkeys(previous["suites"] + args.suites))
        run["elapsed_before_s"] = previous.get("elapsed_s", 0.0)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | out: {out_dir}", flush=True)

    try:
        warm_up_clocks(device)
        first_ceilings = measure_ceilings(device, timer)
        run["ceilings"] = keep_best_ceilings(previous["ceilings"], first_ceilings) if previous else first_ceilings
        for name, c in run["ceilings"].items():
            print(f"ceiling {name}: {report.fmt(c['value'])} {c['unit']} ({c['what']})", flush=True)
        run_items(args, run, device, use_compile, timer, done_kernels, done_steps, out_dir, t0)
        run["ceilings"] = keep_best_ceilings(run["ceilings"], measure_ceilings(device, timer))
    except KeyboardInterrupt as stop:
        run["interrupted"] = f"interrupted ({stop or 'Ctrl-C'}) after {time.monotonic() - t0:.0f} s"
        print(f"\n{run['interrupted']}: writing what was measured", file=sys.stderr, flush=True)
        paths = finish(run, out_dir, t0)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr, flush=True)
        return 130
    paths = finish(run, out_dir, t0)
    print(report.stdout_markdown(run))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({run['elapsed_s']:.0f} s)", flush=True)
    return 0


def run_items(args, run: dict, device: str, use_compile: bool, timer, done_kernels: set, done_steps: set,
              out_dir: Path, t0: float) -> None:
    """Times every planned case not measured before, in priority order, within the time
    budget; rewrites the outputs every CHECKPOINT_S seconds."""
    from tqdm import tqdm

    estimator = Estimator(device)
    items = plan(args.suites, device, args.quick, use_compile, args.dtype, args.headline)
    last_checkpoint = time.monotonic()
    progress = tqdm(items, desc="cases", unit="case", file=sys.stderr, mininterval=2.0, disable=not sys.stderr.isatty())
    for _, kind, item in progress:
        if kind == "linear_cross_entropy":
            _announce(progress, "linear_cross_entropy", t0)
            _run_linear_cross_entropy(args, run, device, use_compile, timer, t0)
            continue
        if kind == "e2e":
            if e2e.label(item) in done_steps:
                continue
            providers = None
        else:
            providers = [p for p in item.providers(device, use_compile)
                         if any(item.key(pass_, p.name) not in done_kernels for pass_ in item.passes)]
            redo = {item.key(pass_, p.name) for p in providers for pass_ in item.passes}
            run["records"] = [r for r in run["records"] if kernels.record_key(r) not in redo]
            if not providers:
                continue
        label = e2e.label(item) if kind == "e2e" else item.label
        _announce(progress, label, t0)
        started = time.monotonic()
        expected = estimator.estimate_s(kind, item, providers)
        over_budget = args.time_budget is not None and started - t0 + expected > args.time_budget
        skip = f"time budget ({args.time_budget:.0f} s) spent: expected {expected:.0f} s more" if over_budget else None
        if kind == "e2e":
            run["e2e"].append(e2e.run(dict(item, skipped=skip) if skip else item, device,
                                      run["ceilings"]["matmul"]["value"] if device == "cuda" else None))
        elif skip:
            for provider in providers:
                for pass_ in item.passes:
                    item.record(provider, pass_, skipped=skip)
            run["records"] += item.records
        else:
            torch._dynamo.reset()  # each case compiles afresh: no recompile limits, no shared guards
            run["records"] += kernels.run_case(item, providers, timer, device)
        if not skip:
            estimator.add(kind, item, time.monotonic() - started)
        if time.monotonic() - last_checkpoint > CHECKPOINT_S:  # partial results survive a killed run
            finish(run, out_dir, t0)
            last_checkpoint = time.monotonic()
    progress.close()


def _announce(progress, label: str, t0: float) -> None:
    """The case starting: in the progress bar on a terminal, else as a log line."""
    progress.set_postfix_str(label)
    if not sys.stderr.isatty():
        print(f"[{time.monotonic() - t0:.0f} s] {label}", file=sys.stderr, flush=True)


def _run_linear_cross_entropy(args, run: dict, device: str, use_compile: bool, timer, t0: float) -> None:
    """The linear_cross_entropy suite (its own time and peak-memory table) within what is left
    of the time budget."""
    budget_left = None if args.time_budget is None else args.time_budget - (time.monotonic() - t0)
    run["linear_cross_entropy"] = linear_cross_entropy.run_suite(
        device, args.quick or args.headline, use_compile, timer, time_budget_s=budget_left)
    run["extra_markdown"] = [linear_cross_entropy.markdown(run["linear_cross_entropy"])]
