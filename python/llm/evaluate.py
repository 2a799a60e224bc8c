"""llm-eval: measure a model on its task, before and after fine-tuning, in one report.

    llm-eval --checkpoint out-finetune/ckpt.pt            # vs the model it was fine-tuned from
    llm-eval --checkpoint out/ckpt.pt --data notes.txt    # perplexity of a language model
    llm-eval --checkpoint base.pt --adapters out-lora/adapters --task classify

  lm        loss and perplexity on the validation text
  classify  loss, accuracy and confusion matrix on the val and test splits (+ confusion.png)
  instruct  response loss and perplexity; the held-out test prompts answered greedily,
            written to answers.json beside the expected answers (+ exact-match rate)

The data are the fine-tune's own (from the checkpoint's finetune_config, same splits) unless
--data names others. "Before" is the model the fine-tune started from (--before auto), a
model you name, or nothing (--before none). Writes report.json, report.md (printed too)
and the task's extras to --out-dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llm.chat_template import LEGACY_TEMPLATE
from llm.checkpoint import TASKS, checkpoint_task
from llm.cli import command, int_in, new_parser
from llm.finetune.classify import classifier_from_checkpoint
from llm.finetune.config import FinetuneConfig
from llm.finetune.lora import apply_adapters, merge_lora
from llm.finetune.report import write_report
from llm.finetune.tasks import make_task
from llm.model import GPT
from llm.runtime import autocast_for, resolve_device
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
    settings.setdefault("chat_template", saved.get("chat_template", LEGACY_TEMPLATE))  # the model's own template
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
    out_dir = out_dir or str(Path(checkpoint).parent / "eval")
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
    parser.add_argument("--out-dir", default=None, help="default: eval/ beside the checkpoint")
    parser.add_argument("--batch-size", type=int_in(1), default=None)
    parser.add_argument("--answer-count", type=int_in(0), default=None, help="instruct: held-out prompts to answer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--use-fused", action="store_true")
    return parser


@command(PROG)
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with torch.no_grad():
        _, table = evaluate(**vars(args))
    print(table)


if __name__ == "__main__":
    main()
