"""llm-finetune: fine-tune a trained GPT (an llm checkpoint or a GPT-2 folder) for a task.

    llm-finetune --task classify --checkpoint out/ckpt.pt                 # genre of a passage
    llm-finetune --task classify --checkpoint ./gpt2 --data examples/sms_spam_sample.tsv
    llm-finetune --task instruct --checkpoint out/ckpt.pt --lora-rank 8   # built-in instructions
    llm-finetune --task instruct --checkpoint ./gpt2 --data alpaca.json
    llm-finetune --task lm --checkpoint ./gpt2 --data 'notes/*.txt'
    llm-finetune --resume --out-dir out-finetune --max-steps 400          # continue that fine-tune
    llm-finetune --overwrite --task lm --checkpoint out/ckpt.pt           # start over in out-finetune

(--checkpoint was called --init-from, which still works.)

Data: classify reads CSV/TSV (label, text) files, instruct reads JSON/JSONL records
(instruction, input, output), lm reads text files; without --data each task uses its
built-in Shakespeare dataset (shakespeare-genre, shakespeare-play, shakespeare-instruct);
--data arithmetic-tools teaches an instruct model to call the calculator (llm.finetune.arithmetic).
Writes OUT_DIR/ckpt.pt (LoRA merged in; every command loads it) at every evaluation and
every --save-interval seconds, adapters/ (LoRA runs), loss.png and the before/after report
(report.md, report.json, confusion.png, answers.json).

An existing OUT_DIR/ckpt.pt is never replaced unless --overwrite says so. Ctrl-C (SIGINT) or
SIGTERM saves a checkpoint at the end of the current step and prints the command that
resumes it; the resumed fine-tune matches an uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from llm.chat_template import checkpoint_template
from llm.checkpoint import TASKS, check_existing_checkpoint, load_checkpoint
from llm.cli import PROGRESS_SETTINGS, SEED, add_progress_options, command, device_name, float_in, int_in, new_parser
from llm.finetune.config import ALL_BLOCKS, DTYPES, FULL_LR, HELD_OUT_FRACTION, LORA_LR, FinetuneConfig
from llm.finetune.loop import finetune
from llm.interrupts import TrainingInterrupted, exit_interrupted
from llm.runtime import DEVICE_CHOICES

PROG = "llm-finetune"
# What may change when resuming; everything else continues as the fine-tune started.
RESUME_OPTIONS = ("out_dir", "max_steps", "eval_interval", "save_interval", "device", "use_fused", "compile",
                  "progress")


def trainable_blocks(text: str) -> int:
    """An argparse type: "all" or an integer >= 0."""
    if text == "all":
        return ALL_BLOCKS
    try:
        return int_in(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'all' or an integer >= 0, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig(init_from="")  # the defaults
    parser = new_parser(PROG, __doc__)
    parser.add_argument("--task", choices=TASKS, default=d.task)
    parser.add_argument("--checkpoint", "--init-from", dest="init_from", metavar="MODEL", default=None,
                        help="the model to fine-tune: an llm checkpoint (.pt) or a Hugging Face GPT-2 folder")
    parser.add_argument("--data", nargs="+", default=[], help="data files, or a built-in dataset name")
    parser.add_argument("--data-dir", default=d.data_dir, help="token cache (lm task)")
    parser.add_argument("--out-dir", default=d.out_dir)
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the fine-tune in OUT_DIR")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
    parser.add_argument("--val-fraction", type=HELD_OUT_FRACTION, default=d.val_fraction)
    parser.add_argument("--test-fraction", type=HELD_OUT_FRACTION, default=d.test_fraction,
                        help="classify and instruct")
    parser.add_argument("--context-length", type=int_in(1), default=None, help="default: the model's")
    parser.add_argument("--dropout", type=float_in(0, 1, max_open=True), default=d.dropout)
    parser.add_argument("--use-fused", action="store_true", help="attention/LayerNorm/GELU via llmkernels")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="autocast: auto = bf16 on GPU only")
    parser.add_argument("--trainable-blocks", type=trainable_blocks, default=None,
                        help="train the last N blocks + final LayerNorm (+ head), or 'all' "
                             "(default: 1 for classify, all otherwise; LoRA trains adapters instead)")  # fmt: skip
    parser.add_argument("--lora-rank", type=int_in(0), default=d.lora_rank, help="0 = no LoRA")
    parser.add_argument("--lora-alpha", type=float_in(0, min_open=True), default=d.lora_alpha)
    parser.add_argument("--lora-dropout", type=float_in(0, 1, max_open=True), default=d.lora_dropout)
    parser.add_argument("--train-on-prompt", action="store_true", help="instruct: the prompt tokens count in the loss too")
    parser.add_argument("--batch-size", type=int_in(1), default=d.batch_size)
    parser.add_argument("--grad-accum-steps", type=int_in(1), default=d.grad_accum_steps)
    parser.add_argument("--max-steps", type=int_in(1), default=d.max_steps)
    parser.add_argument("--lr-decay-steps", type=int_in(1), default=None, help="default: max steps")
    parser.add_argument("--warmup-steps", type=int_in(0), default=d.warmup_steps)
    parser.add_argument("--lr", type=float_in(0, min_open=True), default=None,
                        help=f"default {FULL_LR:g}, or {LORA_LR:g} with --lora-rank (adapters start at zero)")
    parser.add_argument("--min-lr", type=float_in(0), default=None, help="default: lr / 10")
    parser.add_argument("--weight-decay", type=float_in(0), default=d.weight_decay)
    parser.add_argument("--grad-clip", type=float_in(0), default=d.grad_clip, help="0 = off")
    parser.add_argument("--eval-interval", type=int_in(1), default=d.eval_interval)
    parser.add_argument("--save-interval", type=float_in(0, min_open=True), default=d.save_interval,
                        help="seconds between checkpoints, besides those at evaluations")
    parser.add_argument("--eval-batches", type=int_in(1), default=d.eval_batches)
    parser.add_argument("--answer-count", type=int_in(0), default=d.answer_count,
                        help="instruct: held-out prompts answered in the report")  # fmt: skip
    parser.add_argument("--answer-tokens", type=int_in(1), default=d.answer_tokens)
    parser.add_argument("--device", type=device_name, default=d.device, help=DEVICE_CHOICES)
    parser.add_argument("--seed", type=SEED, default=d.seed)
    add_progress_options(parser)
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[FinetuneConfig, dict | None]:
    """The run's settings and, with --resume, the checkpoint it continues (read once: finetune takes it)."""
    options = {**vars(args), "progress": PROGRESS_SETTINGS[args.progress]}
    if not args.resume:
        return FinetuneConfig(**options), None
    path = Path(args.out_dir) / "ckpt.pt"
    check_existing_checkpoint(args, path)
    checkpoint = load_checkpoint(path)
    if "finetune_config" not in checkpoint:
        raise ValueError(f"{args.out_dir}/ckpt.pt was not written by llm-finetune; continue it with llm-train --resume")
    fixed = sorted(name for name, value in vars(args).items()
                   if name not in RESUME_OPTIONS + ("resume",) and value != parser.get_default(name))  # fmt: skip
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        raise ValueError(f"{flags}: cannot change when resuming; the fine-tune continues with its saved settings "
                         f"(only {', '.join('--' + n.replace('_', '-') for n in RESUME_OPTIONS)} may change)")
    # A fine-tune saved before chat templates existed trained on Alpaca's.
    saved = {"chat_template": checkpoint_template(checkpoint).name, **checkpoint["finetune_config"]}
    given = {name: options[name] for name in RESUME_OPTIONS if getattr(args, name) != parser.get_default(name)}
    # The bar is this invocation's choice, not the saved run's; a resumed run replaces nothing.
    cfg = FinetuneConfig(**{**saved, **given, "out_dir": args.out_dir, "resume": True, "overwrite": False,
                            "progress": options["progress"]})  # fmt: skip
    return cfg, checkpoint


def resume_command(out_dir: str) -> str:
    """The command that continues an interrupted fine-tune: its checkpoint holds every setting."""
    return shlex.join([PROG, "--resume", "--out-dir", out_dir])


@command(PROG)
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    cfg, resume_from = config_from_args(parser, parser.parse_args(argv))
    try:
        result = finetune(cfg, resume_from)
    except TrainingInterrupted as stop:
        exit_interrupted(PROG, stop, resume_command(cfg.out_dir))
    history = result["history"]["val_loss"]
    print(result["table"])
    print(f"validation loss {history[0][1]:.3f} -> {history[-1][1]:.3f}; checkpoint and report in {cfg.out_dir}")
