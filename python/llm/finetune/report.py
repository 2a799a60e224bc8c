"""Before/after evaluation reports, written by llm-finetune and llm-eval:

  report.json     {"task", "models": {"before": name, "after": name}, "before": {split: metrics},
                   "after": {split: metrics}} (answers moved to answers.json)
  report.md       the same numbers as a table, one row per split and metric
  confusion.png   classify: the test confusion matrix before and after
  answers.json    instruct: each held-out prompt with the expected and the generated answers
"""

from __future__ import annotations

import json
from pathlib import Path

from llm.files import write_text
from llm.finetune.classify import save_confusion_plot

SCALARS = ("loss", "perplexity", "accuracy", "exact_match")


def write_report(out_dir: str | Path, task: str, results: dict[str, dict], models: dict[str, str]) -> str:
    """results: {"before": {split: metrics}, "after": {...}} (either may be missing); returns the table."""
    out_dir = Path(out_dir)
    stages = [stage for stage in ("before", "after") if stage in results]
    answers = _collect_answers(results, stages)
    plain = {stage: {split: {k: v for k, v in m.items() if k != "answers"} for split, m in results[stage].items()}
             for stage in stages}  # fmt: skip
    write_text(out_dir / "report.json", json.dumps({"task": task, "models": models, **plain}, indent=1))
    table = format_table(task, plain, models)
    write_text(out_dir / "report.md", table + "\n")
    if answers:
        write_text(out_dir / "answers.json", json.dumps(answers, indent=1, ensure_ascii=False))
    if task == "classify":
        split = "test" if "test" in plain[stages[0]] else "val"
        save_confusion_plot({f"{split}, {stage}": plain[stage][split] for stage in stages}, out_dir / "confusion.png")
    return table


def format_table(task: str, results: dict[str, dict], models: dict[str, str]) -> str:
    stages = list(results)
    header = ["split", "metric", *stages] + (["change"] if len(stages) == 2 else [])
    rows = []
    for split in results[stages[0]]:
        for metric in SCALARS:
            values = [results[stage].get(split, {}).get(metric) for stage in stages]
            if any(v is None for v in values):
                continue
            row = [split, metric, *(_format(metric, v) for v in values)]
            if len(values) == 2:
                row.append(f"{values[1] - values[0]:+.1%}" if metric in ("accuracy", "exact_match")
                           else f"{values[1] - values[0]:+.3f}")  # fmt: skip
            rows.append(row)
    lines = [f"{task} fine-tune: " + ", ".join(f"{stage} = {models[stage]}" for stage in stages), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for stage in stages:
        for split, metrics in results[stage].items():
            if "confusion" in metrics:
                lines += ["", f"confusion matrix, {split}, {stage} (rows: true, columns: predicted)", ""]
                lines += _confusion_table(metrics["labels"], metrics["confusion"])
    return "\n".join(lines)


def _confusion_table(labels: list[str], confusion: list[list[int]]) -> list[str]:
    lines = ["| true \\ predicted | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    return lines + [f"| {label} | " + " | ".join(str(c) for c in row) + " |" for label, row in zip(labels, confusion)]


def _collect_answers(results: dict, stages: list[str]) -> list[dict]:
    rows: list[dict] = []
    for stage in stages:
        for i, entry in enumerate(results[stage].get("test", {}).get("answers", [])):
            if i == len(rows):
                rows.append({k: entry[k] for k in ("instruction", "input", "expected")})
            rows[i][stage] = entry["answer"]
    return rows


def _format(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric in ("accuracy", "exact_match") else f"{value:.3f}"
