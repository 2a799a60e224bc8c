"""Fine-tune GPT-2 weights (or a checkpoint) on your own text, with llm.train's loop.

    python -m llm.finetune --gpt2-weights ./gpt2 --data my_notes.txt --max-steps 200
    python -m llm.finetune --checkpoint out/ckpt.pt --data 'poems/*.txt'

Fine-tuning is training that starts from trained weights: a smaller learning rate, a
short warmup, a shorter context to fit CPU memory, and the starting model's tokenizer.
"""

from __future__ import annotations

import argparse

from llm.train import TrainConfig, train

# What fine-tuning changes in TrainConfig's defaults; the command line's defaults too.
FINETUNE_DEFAULTS = dict(
    out_dir="out-finetune",
    context_length=256,
    batch_size=8,
    max_steps=200,
    warmup_steps=10,
    lr=1e-4,
    min_lr=1e-5,
    weight_decay=0.0,
    eval_interval=50,
    dropout=0.0,
)


def finetune_config(init_from: str, data: list[str], **overrides) -> TrainConfig:
    return TrainConfig(**{"init_from": init_from, "data": data, **FINETUNE_DEFAULTS, **overrides})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gpt2-weights", help="a Hugging Face GPT-2 save_pretrained folder")
    source.add_argument("--checkpoint", help="a checkpoint written by llm.train")
    parser.add_argument("--data", nargs="+", required=True, help="text files, globs or folders")
    parser.add_argument("--out-dir", default=FINETUNE_DEFAULTS["out_dir"])
    parser.add_argument("--data-dir", default=TrainConfig.data_dir)
    parser.add_argument("--max-steps", type=int, default=FINETUNE_DEFAULTS["max_steps"])
    parser.add_argument("--lr", type=float, default=FINETUNE_DEFAULTS["lr"])
    parser.add_argument("--context-length", type=int, default=FINETUNE_DEFAULTS["context_length"])
    parser.add_argument("--batch-size", type=int, default=FINETUNE_DEFAULTS["batch_size"])
    parser.add_argument("--device", default=TrainConfig.device)
    parser.add_argument("--use-fused", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("gpt2_weights", "checkpoint", "data")}
    cfg = finetune_config(args.gpt2_weights or args.checkpoint, args.data, min_lr=args.lr / 10, **overrides)
    history = train(cfg)
    first, last = history["val_loss"][0][1], history["val_loss"][-1][1]
    print(f"validation loss {first:.3f} -> {last:.3f}; checkpoint in {cfg.out_dir}/ckpt.pt")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad input: the message, no traceback
        raise SystemExit(f"error: {error}") from None
