"""Turning a run into figures people read: ratios and % of ceiling, markdown tables,
the JSON record, one PNG of plots, and the comparison with the saved anchor figures."""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from llm.files import write_text
from llm.plots import save_png

PROVIDER_ORDER = ["ours:cuda", "ours:triton", "ours:reference", "torch:eager", "torch:compile",
                  "sdpa:flash", "sdpa:cudnn", "sdpa:efficient"]
# One colour per provider in every plot, whichever providers a run has.
PROVIDER_COLOURS = dict(zip(PROVIDER_ORDER, ["tab:red", "tab:orange", "tab:pink", "tab:blue", "tab:cyan",
                                             "tab:green", "tab:olive", "tab:purple"]))
OP_ORDER = ["attention", "layer_norm", "add_layer_norm", "gelu", "bias_gelu"]
DTYPE_ORDER = ["bfloat16", "float16", "float32"]
PASS_ORDER = ["fwd", "bwd", "fwd+bwd"]
ANCHORS_DIR = Path(__file__).resolve().parent / "anchors"
ANCHOR_DEVICE = "NVIDIA H100 80GB HBM3"


def _rank(order: list[str], name: str) -> int:
    """Position in a display order; names it does not list (ops added later) come after."""
    return order.index(name) if name in order else len(order)


def _provider_rank(name: str) -> int:
    return _rank(PROVIDER_ORDER, name)


def _ops(records: list[dict]) -> list[str]:
    return sorted({r["op"] for r in records}, key=lambda op: (_rank(OP_ORDER, op), op))


def _case_key(r: dict) -> tuple:
    return (r["op"], r["shape_label"], r["dtype"], r["pass"])


def _ordered(records: list[dict]) -> list[dict]:
    """By op, dtype, shape (in the order the run defines them), pass, provider."""
    shape_rank = {}
    for r in records:
        shape_rank.setdefault((r["op"], r["shape_label"]), len(shape_rank))
    return sorted(records, key=lambda r: (_rank(OP_ORDER, r["op"]), r["op"], _rank(DTYPE_ORDER, r["dtype"]),
                                          shape_rank[(r["op"], r["shape_label"])], _rank(PASS_ORDER, r["pass"]),
                                          _provider_rank(r["provider"])))


def fmt(value, digits: int = 3) -> str:
    """Three significant digits, no exponent for everyday magnitudes: 2965, 412, 13.7, 0.0521."""
    if value is None:
        return "-"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


# --------------------------------------------------------------------------- summary
def summarise(records: list[dict], ceilings: dict) -> None:
    """Adds to each timed record its % of the measured ceiling and, for llmkernels'
    providers, the speed ratio to every baseline timed on the same case (>1 = faster)."""
    ceiling = {"TFLOP/s": ceilings["matmul"]["value"], "GB/s": ceilings["copy"]["value"]}
    by_case = defaultdict(list)
    for r in records:
        by_case[_case_key(r)].append(r)
        r["pct_of_ceiling"] = 100 * r["rate"] / ceiling[r["unit"]] if r["rate"] else None
    for group in by_case.values():
        baselines = {r["provider"]: r["ms"] for r in group if r["kind"] == "baseline" and r["ms"]}
        for r in group:
            if r["kind"] != "baseline" and r["ms"]:
                r["speedup_vs"] = {name: ms / r["ms"] for name, ms in baselines.items()}


def _best(group: list[dict], kinds: tuple) -> dict | None:
    timed = [r for r in group if r["kind"] in kinds and r["ms"]]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def _best_ours(group: list[dict]) -> dict | None:
    """The fastest fused llmkernels backend; its reference path only where none ran (CPU)."""
    return _best(group, ("fused",)) or _best(group, ("reference",))


def _comparison(ours: dict | None, base: dict | None) -> str:
    """'1.83x' (baseline time / ours), or why there is no ratio: the reference path is
    plain PyTorch, not a kernel, so its ratio would read as our kernels' speed."""
    if not (ours and base):
        return "-"
    if ours["kind"] == "reference":
        return "no fused kernel timed"
    return f"{base['ms'] / ours['ms']:.2f}x"


def _primary_dtype(records: list[dict], op: str) -> str | None:
    dtypes = {r["dtype"] for r in records if r["op"] == op}
    return next((d for d in DTYPE_ORDER if d in dtypes), None)


# -------------------------------------------------------------------------- markdown
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["ms"]:
        return f"{fmt(r['rate'])} ({r['pct_of_ceiling']:.0f}%){' host-bound' if r.get('host_bound') else ''}"
    if r["error"]:
        return "error"
    return "n/a" if str(r["skipped"]).startswith("unsupported") else "skip"


def headline_markdown(run: dict) -> str:
    """Per op and shape, in the primary dtype, fwd+bwd: best llmkernels fused backend against
    the best baseline; then the end-to-end steps."""
    records = run["records"]
    rows = []
    for op in _ops(records):
        dtype = _primary_dtype(records, op)
        groups = defaultdict(list)
        for r in records:
            if r["op"] == op and r["dtype"] == dtype and r["pass"] == "fwd+bwd":
                groups[r["shape_label"]].append(r)
        for shape, group in groups.items():
            ours, base = _best_ours(group), _best(group, ("baseline",))
            ours_text = f"{ours['provider']} {fmt(ours['rate'])} {ours['unit']} ({ours['pct_of_ceiling']:.0f}%)" if ours else "none timed"
            base_text = f"{base['provider']} {fmt(base['rate'])} ({base['pct_of_ceiling']:.0f}%)" if base else "none timed"
            rows.append([op, shape, dtype, ours_text, base_text, _comparison(ours, base)])
    parts = []
    if rows:
        parts.append(markdown_table(["op", "shape", "dtype", "best ours (fwd+bwd, % of ceiling)", "best baseline", "speedup"], rows))
    e2e_rows = _e2e_rows(run)
    if e2e_rows:
        parts.append(markdown_table(["end to end", "tokens/s", "ms/step", "MFU", "of matmul ceiling", "peak GiB",
                             "vs use_fused=False / stock"], e2e_rows))
    return "\n\n".join(parts) if parts else "(nothing timed)"


def suite_markdown(records: list[dict], op: str, ceilings: dict) -> str:
    """One row per (shape, dtype, pass), one column per provider: rate (% of ceiling)."""
    mine = [r for r in records if r["op"] == op]
    if not mine:
        return ""
    providers = sorted({r["provider"] for r in mine}, key=_provider_rank)
    groups = defaultdict(dict)
    for r in _ordered(mine):
        groups[_case_key(r)][r["provider"]] = r
    rows = []
    for (_, shape, dtype, pass_), by_provider in groups.items():
        group = list(by_provider.values())
        ours, base = _best_ours(group), _best(group, ("baseline",))
        ratio = _comparison(ours, base)
        best = f"{ratio} {ours['provider'][5:]} vs {base['provider']}" if ratio.endswith("x") else ratio
        rows.append([shape, dtype, pass_] + [_cell(by_provider.get(p)) for p in providers] + [best])
    unit = mine[0]["unit"]
    ceiling = ceilings["matmul"] if unit == "TFLOP/s" else ceilings["copy"]
    title = (f"### {op}: {unit} (% of the measured ceiling, {ceiling['what']}: "
             f"{fmt(ceiling['value'])} {ceiling['unit']})")
    return title + "\n\n" + markdown_table(["shape", "dtype", "pass"] + providers + ["best ours vs best baseline"], rows)


def _e2e_model(r: dict) -> str:
    """Whose model an e2e row trains: "llm" or "transformers" (runs saved before the
    transformers rows have only llm's)."""
    return r.get("model", "llm")


def _e2e_rows(run: dict) -> list[list[str]]:
    """One row per training step configuration; a use_fused row against the same model's
    unfused row (llm's use_fused=False, transformers' stock GPT-2) in the same mode."""
    results = run.get("e2e", [])
    unfused = {(_e2e_model(r), r["mode"]): r for r in results if not r["use_fused"] and r.get("tokens_per_s")}
    rows = []
    for r in results:
        if r.get("tokens_per_s"):
            mfu = f"{100 * r['mfu']:.1f}% of {r['mfu_peak_tflops']:.0f} TF" if r.get("mfu") else "-"
            of_ceiling = f"{100 * r['mfu_of_matmul_ceiling']:.1f}%" if r.get("mfu_of_matmul_ceiling") else "-"
            base = unfused.get((_e2e_model(r), r["mode"]))
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r["use_fused"] else "-"
            rows.append([r["label"], f"{r['tokens_per_s']:.0f}", f"{r['ms_per_step']:.1f}", mfu, of_ceiling,
                         fmt(r.get("peak_memory_gib")), ratio])
        else:
            note = (r.get("error") or r.get("skipped") or "").replace("|", "/")
            rows.append([r["label"], "error" if r.get("error") else "skip", "", "", "", "", note])
    return rows


def details_markdown(records: list[dict]) -> str:
    rows = []
    for r in _ordered(records):
        ratios = ", ".join(f"{name} {x:.2f}x" for name, x in sorted(r.get("speedup_vs", {}).items()))
        note = r["error"] or r["skipped"] or ""
        spread = f"{r['p10_ms']:.4g}-{r['p90_ms']:.4g}" if r.get("p10_ms") else "-"
        host = f"{r['host_ms']:.3g}{' host-bound' if r.get('host_bound') else ''}" if r.get("host_ms") else "-"
        rows.append([r["op"], r["shape_label"], r["dtype"], r["pass"], r["provider"],
                     f"{r['ms']:.4g}" if r["ms"] else "-", spread, host, fmt(r["rate"]), r["unit"],
                     f"{r['pct_of_ceiling']:.1f}" if r.get("pct_of_ceiling") else "-", ratios, note.replace("|", "/")])
    return markdown_table(["op", "shape", "dtype", "pass", "provider", "ms", "p10-p90 ms", "host ms", "rate", "unit",
                   "% ceiling", "speed vs baselines", "error / skipped"], rows)


def anchors_markdown(comparison: dict) -> str:
    if not comparison.get("rows"):
        return comparison.get("note", "")
    rows = [[c["anchor"], fmt(c["anchor_value"]), fmt(c["ours_value"]), c["unit"], f"{c['ratio']:.2f}",
             f"{c['ceiling_ratio']:.2f}" if c.get("ceiling_ratio") else "-", c["ours"], c["method_differs"] or ""]
            for c in comparison["rows"]]
    return (comparison["note"] + "\n\n" + markdown_table(
        ["anchor", "anchor value", "this run", "unit", "this run / anchor", "same, as % of each device's ceiling",
         "compared with", "method differs"], rows))


def full_markdown(run: dict) -> str:
    env, ceilings = run["env"], run["ceilings"]
    lines = [f"# llmkernels benchmarks: {env['device']}", "",
             f"{run['started']} | {'CPU run (wall-clock, not GPU figures)' if run['mode'] == 'cpu' else 'GPU run'}"
             f"{' | quick' if run['quick'] else ''}{' | headline' if run.get('headline') else ''}"
             f" | suites: {', '.join(run['suites'])} | {run['elapsed_s']:.0f} s"
             f"{' | ' + run['interrupted'] + ': partial results' if run.get('interrupted') else ''}",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, driver {env['driver']}, "
             f"git {env['git_commit'] or 'no commit'}{' (dirty)' if env['git_dirty'] else ''}",
             f"timing: {run['timer']['timer']}", "",
             "## Ceilings (measured in this run)", "",
             markdown_table(["ceiling", "value", "first, last measured"], [_ceiling_row(c) for c in ceilings.values()]),
             "", "## Headline", "", headline_markdown(run), ""]
    for op in _ops(run["records"]):
        table = suite_markdown(run["records"], op, ceilings)
        if table:
            lines += [table, ""]
    for section in run.get("extra_markdown", []):  # suites with their own tables (linear_cross_entropy)
        lines += [section, ""]
    lines += ["## Anchors (method check)", "", anchors_markdown(run.get("anchors", {})), ""]
    if run.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in run["notes"]] + [""]
    if run["records"]:
        lines += ["## Every measurement", "", details_markdown(run["records"]), ""]
    return "\n".join(lines)


def _ceiling_row(c: dict) -> list[str]:
    both = f"{fmt(c['first_value'])}, {fmt(c['last_value'])}" if "first_value" in c else "-"
    return [c["what"], f"{fmt(c['value'])} {c['unit']}", both]


def stdout_markdown(run: dict) -> str:
    parts = ["## Ceilings", markdown_table(["ceiling", "value", "first, last measured"],
                                   [_ceiling_row(c) for c in run["ceilings"].values()])]
    parts += [t for t in (suite_markdown(run["records"], op, run["ceilings"]) for op in _ops(run["records"])) if t]
    parts += ["## Anchors (method check)", anchors_markdown(run.get("anchors", {}))]
    parts += ["## Headline", headline_markdown(run)]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- anchors
_ATTENTION = re.compile(r"^(sdpa\[(\w+)\]|naive eager) (fwd|fwd\+bwd) causal B(\d+) H(\d+) S(\d+) D(\d+)$")
_MEMORY = re.compile(r"^(layernorm|gelu\(tanh\)) (eager|compiled) (fwd|fwd\+bwd) (\d+)x(\d+) (\w+)$")
_E2E = re.compile(r"^gpt2-124M train B16xT1024 (eager|compiled) sdpa$")
_ELEMENT_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def load_anchors(paths: list[Path]) -> list[tuple[str, str, float, str]]:
    """(source file, key, value, unit) for every figure in the anchor JSON files, which map
    a description to [value, unit]; a trailing ' [tag]' names the script that measured it."""
    anchors = []
    for path in paths:
        for key, value in json.loads(Path(path).read_text()).items():
            if isinstance(value, list) and len(value) == 2:
                anchors.append((Path(path).name, key, float(value[0]), value[1]))
    return anchors


_GRAD_ACCUMULATION = ("the anchor's .backward() also accumulates .grad (one more read-read-write pass); "
                      "ours takes torch.autograd.grad")
_DYNAMIC_COMPILE = ("the anchor reused one compiled lambda across shapes (dynamic shapes after the first); "
                    "ours compiles each shape statically")
_OTHER_MODEL = "the anchor trained its own GPT script (vocab padded to 50304); ours trains llm's model"


def match_anchor(key: str, run: dict):
    """(our value in the anchor's unit, what it was compared with, why the methods differ
    or None) for an anchor figure, or None when this run has no such case.

    Rates in TFLOP/s and tok/s compare directly. The anchors count memory-bound bytes as
    2*M*N (fwd) or 5*M*N (fwd+bwd) elements, so our times are converted with their count."""
    key = re.sub(r" \[[^\]]*\]$", "", key)
    records = {(r["op"], r["shape_label"], r["dtype"], r["pass"], r["provider"]): r for r in run["records"]}
    if key.startswith("ceiling: d2d copy"):
        return run["ceilings"]["copy"]["value"], "copy ceiling", None
    if key.startswith("ceiling: bf16 matmul"):
        return run["ceilings"]["matmul"]["value"], "matmul ceiling", None
    if m := _ATTENTION.match(key):
        provider = f"sdpa:{m[2]}" if m[2] else "torch:eager"
        shape = f"B{m[4]} H{m[5]} S{m[6]} D{m[7]}"
        r = records.get(("attention", shape, "bfloat16", m[3], provider))
        return (r["rate"], f"attention {shape} bfloat16 {m[3]} {provider}", None) if r and r["rate"] else None
    if m := _MEMORY.match(key):
        op = "layer_norm" if m[1] == "layernorm" else "gelu"
        provider = "torch:eager" if m[2] == "eager" else "torch:compile"
        rows, hidden, dtype = int(m[4]), int(m[5]), m[6]
        r = records.get((op, f"{rows}x{hidden}", dtype, m[3], provider))
        if not (r and r["ms"]):
            return None
        anchor_bytes = (2 if m[3] == "fwd" else 5) * rows * hidden * _ELEMENT_SIZE[dtype]
        differs = _DYNAMIC_COMPILE if m[2] == "compiled" else _GRAD_ACCUMULATION if m[3] == "fwd+bwd" else None
        return anchor_bytes / r["ms"] / 1e6, f"{op} {rows}x{hidden} {dtype} {m[3]} {provider}", differs
    if m := _E2E.match(key):
        mode = "eager" if m[1] == "eager" else "compile"
        for r in run.get("e2e", []):
            if _e2e_model(r) == "llm" and r["mode"] == mode and not r["use_fused"] and r.get("tokens_per_s"):
                return r["tokens_per_s"], r["label"], _OTHER_MODEL
    return None


def anchor_ceilings(anchors: list[tuple[str, str, float, str]]) -> dict:
    """The anchors' device ceilings by unit: GB/s (copy) and TFLOP/s (matmul)."""
    found = {}
    for _, key, value, unit in anchors:
        if key.startswith("ceiling: "):
            found.setdefault(unit, value)
    return found


def compare_with_anchors(run: dict, paths: list[Path]) -> dict:
    """Our baselines against the saved anchor figures: a check of the method, since both
    time the same PyTorch ops. The anchors come from another GPU, so each figure is compared
    as a fraction of its own device's measured ceiling (copy for GB/s, matmul for TFLOP/s and
    tok/s); near 1 is the goal. Rows where the anchor's method differs are shown but left out
    of the summary, and so are the ceilings themselves (they compare the devices)."""
    if run["mode"] != "cuda":
        return {"note": "Skipped: anchors are H100 figures and this is a CPU run.", "rows": []}
    try:
        anchors = load_anchors(paths)
    except (OSError, ValueError) as error:
        return {"note": f"Skipped: cannot read anchors ({error}).", "rows": []}
    theirs = anchor_ceilings(anchors)
    ours_ceiling = {"GB/s": run["ceilings"]["copy"]["value"], "TFLOP/s": run["ceilings"]["matmul"]["value"],
                    "tok/s": run["ceilings"]["matmul"]["value"]}
    rows = []
    for source, key, value, unit in anchors:
        matched = match_anchor(key, run)
        if matched:
            ours, what, differs = matched
            ceiling_unit = "TFLOP/s" if unit == "tok/s" else unit
            is_ceiling = key.startswith("ceiling: ")
            ceiling_ratio = (None if is_ceiling or ceiling_unit not in theirs else
                             (ours / ours_ceiling[unit]) / (value / theirs[ceiling_unit]))
            rows.append({"anchor": key, "source": source, "anchor_value": value, "ours_value": ours, "unit": unit,
                         "ratio": ours / value, "ceiling_ratio": ceiling_ratio, "ours": what,
                         "method_differs": "the devices' ceilings" if is_ceiling else differs})
    note = f"Anchors: {', '.join(Path(p).name for p in paths)} (measured on an {ANCHOR_DEVICE})."
    if run["env"].get("device") != ANCHOR_DEVICE:
        note += f" This run is on {run['env'].get('device')}: compare the % of ceiling column, not absolute ratios."
    same_method = [r["ceiling_ratio"] for r in rows if not r["method_differs"] and r["ceiling_ratio"]]
    median = statistics.median(same_method) if same_method else None
    if same_method:
        outside = sum(1 for x in same_method if not 0.9 <= x <= 1.1)
        note += (f" Same method, as % of each device's ceiling: {len(same_method)} figures, median ratio "
                 f"{median:.2f}, {outside} outside 0.9-1.1; {len(rows) - len(same_method)} more rows where the "
                 "method differs (marked).")
    return {"note": note, "rows": rows, "median_ratio_same_method": median}


# ----------------------------------------------------------------------------- plots
def plot(run: dict, path: Path) -> None:
    """One PNG: per op, % of the measured ceiling of each provider on each (shape, pass) in
    the primary dtype, our best kernel's speedup over the best baseline above its bar and
    the untimed providers marked; then end-to-end tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run["records"]
    ops = _ops(records)
    e2e = [r for r in run.get("e2e", []) if r.get("tokens_per_s")]
    panels = len(ops) + (1 if e2e else 0)
    if panels == 0:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "nothing timed", ha="center", va="center")
        ax.axis("off")
        save_png(fig, path)
        return
    widest = max([len({(r["shape_label"], r["pass"]) for r in records if r["op"] == op}) for op in ops] + [4])
    fig, axes = plt.subplots(panels, 1, figsize=(max(10, 1.3 * widest), 3.6 * panels), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        dtype = _primary_dtype(records, op)
        mine = _ordered([r for r in records if r["op"] == op and r["dtype"] == dtype])
        groups = list(dict.fromkeys((r["shape_label"], r["pass"]) for r in mine))
        providers = sorted({r["provider"] for r in mine}, key=_provider_rank)
        width = 0.8 / max(1, len(providers))
        slot = {p: (i - (len(providers) - 1) / 2) * width for i, p in enumerate(providers)}
        by_key = {(r["shape_label"], r["pass"], r["provider"]): r for r in mine}
        for provider in providers:
            timed = [(g, by_key[key + (provider,)]) for g, key in enumerate(groups)
                     if key + (provider,) in by_key and by_key[key + (provider,)]["ms"]]
            if timed:
                ax.bar([g + slot[provider] for g, _ in timed], [r["pct_of_ceiling"] for _, r in timed], width,
                       label=provider, color=PROVIDER_COLOURS.get(provider))
        for g, key in enumerate(groups):
            group = [by_key[key + (p,)] for p in providers if key + (p,) in by_key]
            for r in group:  # what was not timed says so where its bar would be
                if not r["ms"]:
                    ax.text(g + slot[r["provider"]], 0, _cell(r), rotation=90, fontsize=6, ha="center",
                            va="bottom", color="gray")
            ours, base = _best_ours(group), _best(group, ("baseline",))
            ratio = _comparison(ours, base)
            if ratio.endswith("x"):  # speed of our best kernel against the best baseline, over its bar
                ax.annotate(ratio, (g + slot[ours["provider"]], ours["pct_of_ceiling"]), fontsize=7,
                            ha="center", va="bottom")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s}\n{p}" for s, p in groups], fontsize=7)
        unit = mine[0]["unit"] if mine else ""
        ceiling = "matmul" if unit == "TFLOP/s" else "copy"
        ax.set_ylabel(f"% of {ceiling} ceiling")
        ax.set_title(f"{op} ({dtype}, {unit} / measured {ceiling} ceiling)", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
        ax.grid(axis="y", alpha=0.3)
    if e2e:
        ax = axes[-1, 0]
        colours = {"llm": "tab:gray", "transformers": "tab:purple"}
        ax.bar(range(len(e2e)), [r["tokens_per_s"] for r in e2e], color=[colours[_e2e_model(r)] for r in e2e])
        ax.set_xticks(range(len(e2e)))
        ax.set_xticklabels([r["label"].split(" ", 2)[-1] for r in e2e], fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"training steps: {e2e[0]['preset']} B{e2e[0]['batch']}xT{e2e[0]['seq']}", fontsize=10)
    fig.suptitle(f"llmkernels benchmarks: {run['env']['device']}{' (CPU wall-clock)' if run['mode'] == 'cpu' else ''}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    save_png(fig, path)


def write_outputs(run: dict, out_dir: Path) -> dict:
    """results.json (everything, every sample), results.md (the tables), summary.png."""
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "summary.png"}
    write_text(paths["json"], json.dumps(run, indent=1))
    write_text(paths["markdown"], full_markdown(run))
    plot(run, paths["plot"])
    return paths
