"""python -m benchmarks hf: a Hugging Face GPT-2, stock vs patched with llmkernels vs torch.compile.

Times, in one process and on the same random weights, a training step (forward with
labels, backward, AdamW step) and greedy generation with the KV cache, for:

  stock       transformers.GPT2LMHeadModel as it comes (attn_implementation="sdpa")
  llmkernels  the same model after llmkernels.integrations.transformers.apply_llmkernels_to_gpt2
  compile     the stock model's forward under torch.compile (dynamic shapes for generation)

    python -m benchmarks hf                 # gpt2 (124M) in bf16 autocast on a GPU; a small config on CPU
    python -m benchmarks hf --quick         # fewer samples, shorter generation

On CPU the llmkernels ops run their plain-PyTorch references (no Triton without a GPU), so
CPU figures compare code paths, not kernels. Writes results.json, results.md and hf.png to
--out (default benchmarks/results/<date>-<time>-hf-<device>).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from llm.cli import int_in
from llm.files import write_text
from llm.plots import save_png

from .measure import REPO_ROOT, device_slug, environment, make_timer, resolve_device_and_model
from .report import fmt, markdown_table

VARIANTS = ("stock", "llmkernels", "compile")
# name -> (GPT2Config arguments, batch, sequence length): gpt2 is the 124M model; tiny fits a CPU.
MODELS = {
    "gpt2": (dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024), 8, 1024),
    "tiny": (dict(n_embd=128, n_layer=4, n_head=4, vocab_size=2048, n_positions=256), 4, 128),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", choices=("auto",) + tuple(MODELS), default="auto",
                        help="auto: gpt2 (124M) on a GPU, tiny on CPU")
    parser.add_argument("--batch", type=int_in(1, 4096), help="training batch (default: the model's)")
    parser.add_argument("--seq", type=int_in(2, 1024), help="training sequence length (default: the model's)")
    parser.add_argument("--prompt-tokens", type=int_in(1, 512), default=32, help="generation prompt length")
    parser.add_argument("--new-tokens", type=int_in(1, 512), help="tokens generated per call (default 64, --quick 16)")
    parser.add_argument("--variant", action="append", choices=VARIANTS, help=f"repeatable (default: all of {VARIANTS})")
    parser.add_argument("--quick", action="store_true", help="fewer timed samples and a shorter generation")
    parser.add_argument("--out", type=Path, help="output folder")
    args = parser.parse_args(argv)
    resolve_device_and_model(parser, args)
    config, batch, seq = MODELS[args.model]
    args.batch, args.seq = args.batch or batch, args.seq or seq
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    if args.seq > config["n_positions"] or args.prompt_tokens + args.new_tokens > config["n_positions"]:
        parser.error(f"--seq and --prompt-tokens + --new-tokens must fit the {args.model} context of "
                     f"{config['n_positions']} positions")
    args.variant = list(dict.fromkeys(args.variant or VARIANTS))
    return args


def stock_model(name: str, **overrides):
    """transformers.GPT2LMHeadModel of MODELS[name] (fields replaced by `overrides`), random
    weights, dropout off (no fused kernel has dropout), attn_implementation "sdpa"."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {**MODELS[name][0], **overrides}
    last_token = config["vocab_size"] - 1  # GPT-2's <|endoftext|> id, in this vocabulary
    return GPT2LMHeadModel(GPT2Config(**config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=last_token, eos_token_id=last_token, attn_implementation="sdpa"))


def build_model(variant: str, stock, device: str):
    """A copy of the stock model set up as `variant`, in training mode. Only this copy is
    patched: GPT-2 models built later in the process stay stock."""
    from llmkernels.integrations.transformers import apply_llmkernels_to_gpt2, revert_llmkernels_gpt2_class_patch

    model = copy.deepcopy(stock).to(device).train()
    if variant == "llmkernels":
        apply_llmkernels_to_gpt2(model)
        revert_llmkernels_gpt2_class_patch()  # GPT-2 models built after this one stay stock
    elif variant == "compile":
        model.forward = torch.compile(model.forward, dynamic=True)
    return model


def measure(variant: str, stock, args, timer) -> dict:
    """Training-step and generation times of one variant; its first calls (compilation,
    autotuning) are the timer's warm-up."""
    model = build_model(variant, stock, args.device)
    autocast = torch.autocast("cuda", torch.bfloat16) if args.device == "cuda" else nullcontext()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")

    def train_step():
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=generator).to(args.device)

    def generate():
        with autocast, torch.no_grad():
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)

    train = timer.time(train_step)
    model.eval()
    decode = timer.time(generate)
    return {"variant": variant,
            "train_ms": train.median, "train_tokens_per_s": args.batch * args.seq / train.median * 1e3,
            "train_samples_ms": train.ms,
            "generate_ms": decode.median, "generate_tokens_per_s": args.new_tokens / decode.median * 1e3,
            "generate_samples_ms": decode.ms}


def markdown(run: dict) -> str:
    s = run["settings"]
    stock = next((r for r in run["results"] if r["variant"] == "stock"), None)

    def vs_stock(r: dict, key: str) -> str:
        return f"{r[key] / stock[key]:.2f}x" if stock else "-"

    rows = [[r["variant"], fmt(r["train_ms"]), fmt(r["train_tokens_per_s"]), vs_stock(r, "train_tokens_per_s"),
             fmt(r["generate_ms"]), fmt(r["generate_tokens_per_s"]), vs_stock(r, "generate_tokens_per_s")]
            for r in run["results"]]
    precision = "bf16 autocast" if run["mode"] == "cuda" else "float32"
    return (f"# Hugging Face GPT-2: stock vs llmkernels vs torch.compile, {run['env']['device']}\n\n"
            f"{s['model']} ({run['parameters']:,} parameters, random weights, dropout off), {precision}, "
            f"{run['env']['torch_threads']} thread(s). Training step: batch {s['batch']} x {s['seq']} tokens, "
            f"forward + backward + AdamW. Generation: greedy, {s['prompt_tokens']}-token prompt, "
            f"{s['new_tokens']} new tokens, KV cache. Medians; "
            f"{'CPU figures (llmkernels runs its references here), not GPU ones' if run['mode'] == 'cpu' else 'GPU'}. "
            f"git {run['env']['git_commit']}.\n\n"
            + markdown_table(["variant", "train step (ms)", "train tokens/s", "vs stock",
                              "generate (ms)", "generated tokens/s", "vs stock"], rows) + "\n")


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["variant"] for r in run["results"]]
    for ax, key, title in ((axes[0], "train_tokens_per_s", "training tokens/s"),
                           (axes[1], "generate_tokens_per_s", "generated tokens/s")):
        ax.bar(names, [r[key] for r in run["results"]], color=["tab:gray", "tab:blue", "tab:orange"][:len(names)])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Hugging Face GPT-2 ({run['settings']['model']}) on {run['env']['device']}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(run: dict, out_dir: Path) -> None:
    """results.json (every sample), results.md (the table) and hf.png from what the run holds."""
    write_text(out_dir / "results.json", json.dumps(run, indent=1))
    write_text(out_dir / "results.md", markdown(run))
    plot(run, out_dir / "hf.png")


def main(argv=None) -> int:
    from tqdm import tqdm

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env = environment(args.device)
    if args.device == "cpu":
        torch.set_num_threads(1)  # steadier on a shared core pair, as the other CPU benchmarks
    env["torch_threads"] = torch.get_num_threads()
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or REPO_ROOT / "benchmarks" / "results" / f"{started:%Y-%m-%d-%H%M%S}-hf-{device_slug(env)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    stock = stock_model(args.model)
    run = {"schema": 1, "started": started.isoformat(timespec="seconds"), "mode": args.device, "env": env,
           "command": ["python", "-m", "benchmarks", "hf", *argv], "parameters": stock.num_parameters(),
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    timer = make_timer(args.device, args.quick)
    run["timer"] = timer.settings()
    for variant in tqdm(args.variant, desc="variants", file=sys.stderr):
        run["results"].append(measure(variant, stock, args, timer))
        run["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        write_outputs(run, out_dir)  # after each variant: a killed run keeps what it measured
    print(markdown(run))
    print(f"wrote {out_dir}/results.json, results.md, hf.png ({run['elapsed_s']:.0f} s)")
    return 0
