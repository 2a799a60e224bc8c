"""llm-eval: measure a model on its task, before and after fine-tuning, in one report.

    llm-eval --checkpoint out-finetune/ckpt.pt            # vs the model it was fine-tuned from
    llm-eval --checkpoint out/ckpt.pt --data notes.txt    # perplexity of a language model
    llm-eval --checkpoint base.pt --adapters out-lora/adapters --task classify

  lm        loss and perplexity on the validation text
  classify  loss, accuracy and confusion matrix on the val and test splits (+ confusion.png)
  instruct  response loss and perplexity; the held-out test prompts answered greedily,
            written to answers.json beside the expected answers (+ exact-match rate)

Applications (llm.apps), instead of the task's report:

    llm-eval --checkpoint out-instruct/ckpt.pt --prompts variants.json --data labelled.jsonl
    llm-eval --checkpoint out-tools/ckpt.pt --tool-use

  --prompts   each prompt variant (zero-shot, few-shot, step-by-step, ...) over a labelled
              set of instruction records: exact match, contains-answer, mean length, tokens/s
              (llm.apps.prompt_variants); --data: files or a built-in dataset name
  --tool-use  arithmetic accuracy on the held-out arithmetic-tools questions, with the
              calculator (calls run, results fed back) and without it (the model's own
              continuation): what tool use buys a model fine-tuned on --data arithmetic-tools

The data are the fine-tune's own (from the checkpoint's finetune_config, same splits) unless
--data names others. "Before" is the model the fine-tune started from (--before auto), a
model you name, or nothing (--before none). Writes report.json, report.md (printed too)
and the task's extras to --out-dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llm.chat_template import checkpoint_template
from llm.checkpoint import TASKS, checkpoint_task
from llm.cli import command, device_name, int_in, new_parser
from llm.finetune.classify import classifier_from_checkpoint
from llm.files import write_text
from llm.finetune.config import FinetuneConfig
from llm.finetune.datasets import split_examples
from llm.finetune.lora import apply_adapters, merge_lora
from llm.finetune.report import write_report
from llm.finetune.tasks import make_task
from llm.model import GPT
from llm.runtime import DEVICE_CHOICES, autocast_for, resolve_device
from llm.weights import load_model_source

PROG = "llm-eval"


def task_model(gpt: GPT, checkpoint: dict, task: str, head_key: str = "head"):
    """The module evaluated for `task`: the GPT, or the classifier built on it."""
    if task != "classify":
        return gpt
    if checkpoint_task(checkpoint) != "classify":
        raise ValueError("--task classify needs a classifier (a checkpoint or adapters written by "
                         "llm-finetune --task classify)")
    return classifier_from_checkpoint(gpt, checkpoint, head_key)


def default_out_dir(checkpoint: str, adapters: str | None) -> Path:
    """eval/ inside the adapters' folder when they are applied (the base model's folder is
    not this run's), else beside the checkpoint."""
    return Path(adapters) / "eval" if adapters else Path(checkpoint).parent / "eval"


def evaluate(
    checkpoint: str,
    before: str | None = "auto",
    adapters: str | None = None,
    task: str | None = None,
    data: list[str] | None = None,
    data_dir: str | None = None,
    out_dir: str | None = None,
    device: str = "auto",
    use_fused: bool = False,
    batch_size: int | None = None,
    answer_count: int | None = None,
) -> tuple[dict, str]:
    """(results {"before"?, "after"}, table); writes the report files into out_dir."""
    device = resolve_device(device)
    gpt, tokenizer, saved = load_model_source(checkpoint, use_fused=use_fused)
    context = gpt.config.context_length
    finetune_config = saved.get("finetune_config") or {}
    if adapters:  # "before" is then the base model itself (not a classifier: its head is new)
        after_model, adapter_config = apply_adapters(gpt, adapters)
        after_model = merge_lora(after_model)
        finetune_config = adapter_config.get("finetune_config") or {}
        task = task or adapter_config["task"]
        if before == "auto":
            before = "none" if task == "classify" else checkpoint
    else:
        task = task or checkpoint_task(saved)
        after_model = task_model(gpt, saved, task)
    # The fine-tune's own data and splits, unless others are named.
    settings = dict(finetune_config, task=task, init_from=checkpoint, resume=False)
    settings.setdefault("chat_template", checkpoint_template(saved).name)  # the model's own template
    if data:
        settings["data"] = data
    for name, value in (("data_dir", data_dir), ("batch_size", batch_size), ("answer_count", answer_count)):
        if value is not None:
            settings[name] = value
    cfg = FinetuneConfig(**settings)
    labels = getattr(after_model, "labels", None)
    evaluated_task = make_task(cfg, tokenizer, context, labels)
    autocast = autocast_for(device, cfg.dtype)

    models = {"after": checkpoint + (f" + {adapters}" if adapters else "")}
    results = {}
    if before == "auto":
        before = finetune_config.get("init_from")
    if before and before != "none":
        before_gpt, _, before_saved = load_model_source(before, use_fused=use_fused)
        if before_gpt.config.context_length > context:
            before_gpt.crop_context(context)  # as the fine-tune did
        if task == "classify":  # a classifier's own head, or the head the fine-tune started with
            own_head = checkpoint_task(before_saved) == "classify"
            before_model = task_model(before_gpt, before_saved if own_head else saved, task,
                                      "head" if own_head else "initial_head")  # fmt: skip
        else:
            before_model = before_gpt
        results["before"] = evaluated_task.report(before_model.to(device), tokenizer, device, autocast)
        models["before"] = before
    results["after"] = evaluated_task.report(after_model.to(device), tokenizer, device, autocast)
    out_dir = out_dir or str(default_out_dir(checkpoint, adapters))
    table = write_report(out_dir, task, results, models)
    return results, table


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, __doc__)
    parser.add_argument("--checkpoint", required=True, help="llm checkpoint (.pt) or GPT-2 folder to evaluate")
    parser.add_argument("--before", default="auto",
                        help="the model to compare with: auto (the one it was fine-tuned from), none, or a path")  # fmt: skip
    parser.add_argument("--adapters", default=None, help="LoRA adapters folder to apply to --checkpoint")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: the checkpoint's")
    parser.add_argument("--data", nargs="+", default=None, help="data files or a built-in dataset name")
    parser.add_argument("--data-dir", default=None, help="token cache for text (lm task)")
    parser.add_argument("--out-dir", default=None, help="default: eval/ beside the checkpoint, or inside --adapters")
    parser.add_argument("--batch-size", type=int_in(1), default=None)
    parser.add_argument("--answer-count", type=int_in(0), default=None, help="instruct: held-out prompts to answer")
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_CHOICES)
    parser.add_argument("--use-fused", action="store_true")
    application = parser.add_mutually_exclusive_group()
    application.add_argument("--prompts", default=None, help="a JSON list of prompt variants to compare on --data")
    application.add_argument("--tool-use", action="store_true",
                             help="arithmetic accuracy with and without the calculator tool")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int_in(1), default=64, help="--prompts / --tool-use: answer length")
    return parser


def records_to_answer(answer_count: int | None, default: int, run: str) -> int:
    """--answer-count for a run that answers records: `default` when not given, never 0
    (the task's report may take 0: it still measures the loss)."""
    if answer_count is None:
        return default
    if answer_count < 1:
        raise ValueError(f"--answer-count: {run} needs at least 1 record to answer, got {answer_count}")
    return answer_count


def evaluate_prompts(checkpoint: str, prompts: str, data: list[str] | None, out_dir: str | None, device: str = "auto",
                     answer_count: int | None = None, max_new_tokens: int = 64,
                     use_fused: bool = False) -> tuple[dict, str]:  # fmt: skip
    """Each prompt variant over the labelled records; writes prompts.json to out_dir."""
    answer_count = records_to_answer(answer_count, 30, "--prompts")
    from llm.apps.prompt_variants import evaluate_variant, read_variants, variants_table
    from llm.apps.prompting import load_prompted_model
    from llm.finetune.datasets import Instruction, read_instructions
    from llm.finetune.tasks import load_examples

    if not data:
        raise ValueError("--prompts needs --data: a labelled set of instruction records (or a built-in dataset name)")
    variants = read_variants(prompts)
    records = load_examples(FinetuneConfig(task="instruct", init_from=checkpoint, data=data), read_instructions)
    single_turn = [r for r in records if isinstance(r, Instruction)]
    records = single_turn[:answer_count]
    if not records:
        raise ValueError(f"--data {' '.join(data)}: no single-turn instruction records to compare prompts on")
    model = load_prompted_model(checkpoint, device, use_fused, max_new_tokens=max_new_tokens)
    results = {variant.name: evaluate_variant(model, variant, records) for variant in variants}
    table = variants_table(results)
    write_text(Path(out_dir or default_out_dir(checkpoint, None)) / "prompts.json",
               json.dumps({"checkpoint": checkpoint, "records": len(records), "variants": results}, indent=1) + "\n")
    return results, table


def evaluate_tool_use(checkpoint: str, out_dir: str | None, device: str = "auto", answer_count: int | None = None,
                      max_new_tokens: int = 64, use_fused: bool = False) -> tuple[dict, str]:  # fmt: skip
    """Arithmetic accuracy with and without the calculator on the held-out arithmetic-tools
    questions (the fine-tune's own test split); writes tool_use.json to out_dir."""
    answer_count = records_to_answer(answer_count, 100, "--tool-use")
    from llm.apps.guardrails import Policy
    from llm.apps.prompting import load_prompted_model
    from llm.apps.tool_use import arithmetic_accuracy
    from llm.apps.tools import CALCULATOR, ToolRegistry
    from llm.finetune.arithmetic import ARITHMETIC_DATASET
    from llm.finetune.datasets import read_instructions
    from llm.finetune.tasks import SPLIT_SEED, load_examples

    model = load_prompted_model(checkpoint, device, use_fused, max_new_tokens=max_new_tokens)
    if model.chat is None:
        raise ValueError(f"--tool-use needs an instruction model (llm-finetune --task instruct --data "
                         f"{ARITHMETIC_DATASET}); {checkpoint} is a plain language model")
    saved = model.checkpoint.get("finetune_config") or {}
    cfg = FinetuneConfig(task="instruct", init_from=checkpoint, data=[ARITHMETIC_DATASET],
                         val_fraction=saved.get("val_fraction", 0.1), test_fraction=saved.get("test_fraction", 0.1))
    records = split_examples(load_examples(cfg, read_instructions), cfg.val_fraction, cfg.test_fraction,
                             SPLIT_SEED)["test"][:answer_count]  # fmt: skip
    tools = ToolRegistry([CALCULATOR])
    results = {"with calculator": arithmetic_accuracy(model, records, tools, Policy().max_tool_calls),
               "without": arithmetic_accuracy(model, records, None)}  # fmt: skip
    table = "\n".join(["| arithmetic, held-out questions | accuracy |", "|---|---|"] +
                      [f"| {name} | {r['accuracy']:.3f} ({r['questions']} questions) |" for name, r in results.items()])
    write_text(Path(out_dir or default_out_dir(checkpoint, None)) / "tool_use.json",
               json.dumps({"checkpoint": checkpoint, **results}, indent=1) + "\n")
    return results, table


# The options each kind of run reads: one given to a run that would ignore it is refused.
SHARED_OPTIONS = {"checkpoint", "out_dir", "answer_count", "device", "use_fused"}
RUN_OPTIONS = {
    "--prompts": SHARED_OPTIONS | {"prompts", "data", "max_new_tokens"},
    "--tool-use": SHARED_OPTIONS | {"tool_use", "max_new_tokens"},
    "the task's report": SHARED_OPTIONS | {"before", "adapters", "task", "data", "data_dir", "batch_size"},
}


@command(PROG)
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = "--prompts" if args.prompts else "--tool-use" if args.tool_use else "the task's report"
    ignored = [name for name, value in vars(args).items()
               if name not in RUN_OPTIONS[run] and value != parser.get_default(name)]  # fmt: skip
    if ignored:
        parser.error(f"{', '.join('--' + name.replace('_', '-') for name in ignored)}: not used by {run}")
    with torch.no_grad():
        if args.prompts:
            _, table = evaluate_prompts(args.checkpoint, args.prompts, args.data, args.out_dir, args.device,
                                        args.answer_count, args.max_new_tokens, args.use_fused)  # fmt: skip
        elif args.tool_use:
            _, table = evaluate_tool_use(args.checkpoint, args.out_dir, args.device, args.answer_count,
                                         args.max_new_tokens, args.use_fused)  # fmt: skip
        else:
            _, table = evaluate(**{name: value for name, value in vars(args).items() if name in RUN_OPTIONS[run]})
    print(table)


if __name__ == "__main__":
    main()
