"""The three fine-tuning tasks behind one interface, used by the training loop and llm-eval:

  train_set             what llm.data.BatchLoader draws batches from
  model(gpt)            the module that trains: the GPT itself, or a GPTClassifier around it
  loss(model, batch)    the scalar to minimise
  metrics(model, split) loss (and accuracy, perplexity) on "val" or "test"
  report(model)         the before/after numbers: every held-out split, with the confusion
                        matrix (classify) or the answers to held-out prompts (instruct)
"""

from __future__ import annotations

import math
from pathlib import Path

import tiktoken

from llm.data import TokenWindows, prepare_data
from llm.finetune.classify import ClassificationSet, GPTClassifier, classification_loss, classification_metrics
from llm.finetune.config import FinetuneConfig
from llm.finetune.datasets import read_instructions, read_labelled_text, split_examples
from llm.chat_template import get_template
from llm.finetune.instruct import InstructionSet, answers, exact_match, held_out_turn, response_loss
from llm.finetune.shakespeare import BUILTIN_DATASETS, builtin_dataset
from llm.model import GPT
from llm.train import estimate_loss, next_token_loss

# Built-in data and user files are split with this seed, not the training seed, so runs with
# different seeds (and llm-eval) see the same test set.
SPLIT_SEED = 0
DEFAULT_DATASETS = {"classify": "shakespeare-genre", "instruct": "shakespeare-instruct"}


def load_examples(cfg: FinetuneConfig, read_file) -> list:
    """The task's examples: a built-in dataset by name (default: the task's own), or files."""
    if not cfg.data or (len(cfg.data) == 1 and cfg.data[0] in BUILTIN_DATASETS):
        name = cfg.data[0] if cfg.data else DEFAULT_DATASETS[cfg.task]
        examples = builtin_dataset(name, seed=SPLIT_SEED)
        kind = "labelled" if cfg.task == "classify" else "instruction"
        if (name == "shakespeare-instruct") != (kind == "instruction"):
            raise ValueError(f"--data {name} is not a dataset for --task {cfg.task}")
        return examples
    return [example for path in cfg.data for example in read_file(Path(path).expanduser())]


class LanguageModelTask:
    """Continue next-token training on plain text (llm.data's token windows)."""

    name = "lm"

    def __init__(self, cfg: FinetuneConfig, tokenizer: tiktoken.Encoding, context: int, labels=None):
        meta = prepare_data(cfg.data, tokenizer, cfg.data_dir, cfg.val_fraction)
        self.train_set = TokenWindows(Path(meta["dir"]) / "train.bin", meta["dtype"], context, context)
        self.val_windows = TokenWindows(Path(meta["dir"]) / "val.bin", meta["dtype"], context, context)
        self.cfg = cfg
        self.description = f"{meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val tokens"

    def model(self, gpt: GPT) -> GPT:
        return gpt

    loss = staticmethod(next_token_loss)

    def metrics(self, model, split: str, device, autocast) -> dict:
        loss = estimate_loss(model, self.val_windows, self.cfg.eval_batches, self.cfg.batch_size, device, autocast)
        return {"loss": loss, "perplexity": math.exp(loss)}

    def report(self, model, tokenizer, device, autocast) -> dict:
        return {"val": self.metrics(model, "val", device, autocast)}


class ClassifyTask:
    """Labelled text -> class, read at the last real token (llm.finetune.classify)."""

    name = "classify"

    def __init__(self, cfg: FinetuneConfig, tokenizer: tiktoken.Encoding, context: int, labels=None):
        splits = split_examples(load_examples(cfg, read_labelled_text), cfg.val_fraction, cfg.test_fraction, SPLIT_SEED)
        # A resumed or evaluated model keeps its own label order.
        self.labels = labels or sorted({e.label for split in splits.values() for e in split})
        self.sets = {name: ClassificationSet(examples, self.labels, tokenizer, context) for name, examples in splits.items()}
        self.train_set = self.sets["train"]
        self.cfg = cfg
        sizes = ", ".join(f"{len(splits[s])} {s}" for s in splits)
        self.description = f"{sizes} examples of {len(self.labels)} classes ({', '.join(self.labels[:8])}" + (
            ", ...)" if len(self.labels) > 8 else ")"
        )

    def model(self, gpt: GPT) -> GPTClassifier:
        return GPTClassifier(gpt, self.labels)

    loss = staticmethod(classification_loss)

    def metrics(self, model, split: str, device, autocast) -> dict:
        return classification_metrics(model, self.sets[split], self.cfg.batch_size, device, autocast)

    def report(self, model, tokenizer, device, autocast) -> dict:
        return {split: self.metrics(model, split, device, autocast) for split in ("val", "test")}


class InstructTask:
    """Instruction records and conversations -> replies in the chat template cfg.chat_template,
    loss on reply tokens (llm.finetune.instruct)."""

    name = "instruct"

    def __init__(self, cfg: FinetuneConfig, tokenizer: tiktoken.Encoding, context: int, labels=None):
        splits = split_examples(load_examples(cfg, read_instructions), cfg.val_fraction, cfg.test_fraction, SPLIT_SEED)
        self.template = get_template(cfg.chat_template)
        self.sets = {name: InstructionSet(records, tokenizer, context, cfg.train_on_prompt, self.template)
                     for name, records in splits.items()}  # fmt: skip
        self.train_set = self.sets["train"]
        self.cfg = cfg
        dropped = sum(s.dropped for s in self.sets.values())
        self.description = ", ".join(f"{s.num_windows} {name}" for name, s in self.sets.items()) + " records" + (
            f" ({dropped} dropped: prompt longer than the context)" if dropped else ""
        )

    def model(self, gpt: GPT) -> GPT:
        return gpt

    loss = staticmethod(next_token_loss)

    def metrics(self, model, split: str, device, autocast) -> dict:
        return response_loss(model, self.sets[split], self.cfg.batch_size, device, autocast)

    def report(self, model, tokenizer, device, autocast) -> dict:
        report = {split: self.metrics(model, split, device, autocast) for split in ("val", "test")}
        held_out = self.sets["test"].records[: self.cfg.answer_count]
        replies = answers(model, tokenizer, held_out, self.cfg.answer_tokens, self.template)
        turns = [held_out_turn(record, self.template) for record in held_out]  # (conversation, expected reply)
        report["test"]["exact_match"] = exact_match(replies, [expected for _, expected in turns])
        report["test"]["answers"] = [
            {"instruction": getattr(record, "instruction", messages[-1].content), "input": getattr(record, "input", ""),
             "expected": expected, "answer": reply}
            for record, (messages, expected), reply in zip(held_out, turns, replies)
        ]
        return report


TASK_CLASSES = {"lm": LanguageModelTask, "classify": ClassifyTask, "instruct": InstructTask}


def make_task(cfg: FinetuneConfig, tokenizer: tiktoken.Encoding, context: int, labels=None):
    return TASK_CLASSES[cfg.task](cfg, tokenizer, context, labels)
