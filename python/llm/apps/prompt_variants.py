"""Choosing between prompts by measuring them: each variant over one labelled set.

A variants file is a JSON list; each variant has a "name" and optionally a "system" message,
few-shot "examples" (instruction records) and a "template" for the user's message, in which
{input} stands for the record's instruction (and its input):

    [{"name": "zero-shot"},
     {"name": "few-shot", "examples": [{"instruction": "What is 2 + 2?", "output": "4"}]},
     {"name": "step-by-step", "template": "{input}\\nThink step by step, then answer."},
     {"name": "terse", "system": "Answer with one word."}]

The labelled set is single-turn instruction records (JSONL or a JSON list: instruction,
input?, output; conversations in it are left out).
Per variant: exact match, contains-answer (the expected output appears in the answer as
words), mean answer length in tokens, and generation speed in tokens per second.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from llm.apps.prompting import PromptedModel, example_text
from llm.apps.questions import contains_answer
from llm.finetune.datasets import Instruction, instruction_record
from llm.finetune.instruct import exact_match

VARIANT_FIELDS = {"name", "system", "examples", "template"}


@dataclass(frozen=True)
class Variant:
    name: str
    system: str | None = None
    examples: list[Instruction] = field(default_factory=list)
    template: str = "{input}"


def read_variants(path: str | Path) -> list[Variant]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: file not found: {path}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts {path}: not valid JSON ({error})") from None
    if not isinstance(values, list) or not values:
        raise ValueError(f"--prompts {path}: expected a non-empty JSON list of variants")
    variants = []
    for i, value in enumerate(values):
        where = f"--prompts {path}, variant {i + 1}"
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or set(value) - VARIANT_FIELDS:
            raise ValueError(f"{where}: expected an object with a name and optionally {', '.join(sorted(VARIANT_FIELDS - {'name'}))}")
        examples = value.get("examples", [])
        if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
            raise ValueError(f"{where}: examples must be a list of instruction records (instruction, input?, output)")
        template = value.get("template", "{input}")
        if not isinstance(template, str) or "{input}" not in template:
            raise ValueError(f"{where}: template must be a string containing {{input}}")
        system = value.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: system must be a string")
        variants.append(Variant(value["name"], system, [instruction_record(f"{where}, examples[{i}]", e)
                                                        for i, e in enumerate(examples)], template))  # fmt: skip
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"--prompts {path}: variant names must differ")
    return variants


def evaluate_variant(model: PromptedModel, variant: Variant, records: list[Instruction]) -> dict:
    answers, tokens, seconds = [], 0, 0.0
    for record in records:
        user = variant.template.replace("{input}", example_text(record))
        prompt = model.render(variant.system, user, variant.examples)
        started = time.perf_counter()
        text, _, count = model.complete(prompt)
        seconds += time.perf_counter() - started
        answers.append(text.strip())
        tokens += count
    expected = [r.output for r in records]
    return {
        "exact_match": exact_match(answers, expected),
        "contains_answer": sum(contains_answer(a, e) for a, e in zip(answers, expected)) / len(records),
        "mean_length": tokens / len(records),
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "answers": [{"input": example_text(r), "expected": r.output, "answer": a} for r, a in zip(records, answers)],
    }


def variants_table(results: dict[str, dict]) -> str:
    lines = ["| variant | exact match | contains answer | mean length (tokens) | tokens/s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['exact_match']:.3f} | {r['contains_answer']:.3f} | {r['mean_length']:.1f} | "
              f"{r['tokens_per_s']:.1f} |" for name, r in results.items()]  # fmt: skip
    return "\n".join(lines)
