"""Train a GPT: AdamW, warmup + cosine LR, gradient clipping and accumulation, bf16
autocast on GPU, validation loss / perplexity, samples, loss curve, atomic checkpoints
with exact resume, and DistributedDataParallel under torchrun.

    python -m llm.train                       # tiny preset on Shakespeare, a few CPU minutes
    python -m llm.train --preset gpt2 --data 'corpus/*.txt' --device cuda --compile --use-fused
    torchrun --nproc_per_node 8 -m llm.train --preset gpt2 ...
    python -m llm.train --resume              # continue out/ckpt.pt exactly where it stopped
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from llm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from llm.config import PRESETS, GPTConfig
from llm.data import DEFAULT_DATA_DIR, BatchLoader, TokenWindows, corpus_tokenizer, prepare_data
from llm.files import atomic_output
from llm.generate import complete
from llm.model import GPT
from llm.tokenizer import get_tokenizer, gpt2_tokenizer, tokenizer_to_dict

# Tiny models spend most of their time in the (vocabulary x width) LM head, so the tiny
# preset learns a small vocabulary on its corpus instead of GPT-2's 50,257 tokens.
PRESET_TOKENIZERS = {"tiny": "bpe:2048"}
# Dense bf16 tensor-core peaks from the vendors' data sheets, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    init_from: str | None = None  # fine-tune: a checkpoint (.pt) or a Hugging Face GPT-2 folder
    context_length: int | None = None  # None = the preset's (or the initial model's); shorter crops
    dropout: float | None = None  # None = the preset's
    use_fused: bool = False  # attention, LayerNorm, GELU and the loss through llmkernels
    compile: bool = False  # torch.compile the model
    # data
    data: list[str] = field(default_factory=list)  # files / globs / folders; empty = built-in Shakespeare
    data_dir: str = str(DEFAULT_DATA_DIR)  # token cache
    # "gpt2", "bpe:N" (learn an N-token BPE on the training documents), or a file written
    # by llm.tokenizer.save_tokenizer; None = the preset's (PRESET_TOKENIZERS, else "gpt2").
    tokenizer: str | None = None
    val_fraction: float = 0.1
    stride: int | None = None  # between training windows; None = context_length (no overlap)
    # optimisation
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum_steps: int = 1
    max_steps: int = 1300
    lr_decay_steps: int | None = None  # cosine reaches min_lr here; None = max_steps
    warmup_steps: int = 30
    lr: float = 2e-3
    min_lr: float = 2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # bookkeeping
    out_dir: str = "out"
    resume: bool = False  # continue from out_dir/ckpt.pt
    eval_interval: int = 200  # steps between validation, sample, checkpoint and plot
    eval_batches: int = 8
    sample_tokens: int = 80
    sample_prompt: str = "\n"
    device: str = "auto"  # "auto" = cuda if available, else cpu
    seed: int = 1337
    peak_flops: float | None = None  # for MFU; None = look the GPU up in PEAK_BF16_FLOPS
    progress: bool = True  # tqdm bar and log lines


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only; biases and
    LayerNorm gains are not decayed. The fused CUDA implementation on GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at lr_decay_steps."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """FLOP/s the MFU is measured against: --peak-flops, else the GPU's dense bf16 peak
    from PEAK_BF16_FLOPS; None (MFU shown as n/a) on CPU or an unknown GPU."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def main_process_first(ddp: Distributed, fn):
    """fn() on rank 0, then on the other ranks: rank 0 fills the caches (the learned
    tokenizer, the token files) and the others read them instead of redoing the work."""
    if ddp.is_main:
        result = fn()
    if ddp.enabled:
        dist.barrier()
    if not ddp.is_main:
        result = fn()
    return result


def load_or_learn_tokenizer(cfg: TrainConfig) -> tiktoken.Encoding:
    spec = cfg.tokenizer or PRESET_TOKENIZERS.get(cfg.preset, "gpt2")
    if spec.startswith("bpe:"):
        return corpus_tokenizer(cfg.data, int(spec.removeprefix("bpe:")), cfg.data_dir, cfg.val_fraction)
    return get_tokenizer(spec)


def build_model(cfg: TrainConfig, resume_from: dict | None):
    """(model, tokenizer): resumed, initialised from GPT-2 / a checkpoint, or from scratch."""
    overrides = {"use_fused": cfg.use_fused}
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    if resume_from is not None:
        model, tokenizer = model_from_checkpoint(resume_from, **overrides)
    elif cfg.init_from is None:
        tokenizer = load_or_learn_tokenizer(cfg)
        if cfg.context_length is not None:
            overrides["context_length"] = cfg.context_length
        model = GPT(GPTConfig.from_preset(cfg.preset, vocab_size=tokenizer.n_vocab, **overrides))
    elif Path(cfg.init_from).is_dir() or cfg.init_from.endswith((".safetensors", ".bin")):
        from llm.weights import load_gpt2

        model, tokenizer = load_gpt2(cfg.init_from, **overrides), gpt2_tokenizer()
    else:
        model, tokenizer = model_from_checkpoint(load_checkpoint(cfg.init_from), **overrides)
    if cfg.context_length is not None and cfg.context_length < model.config.context_length:
        model.crop_context(cfg.context_length)
    return model, tokenizer


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the history {"train_loss": [per step], "val_loss": [[step, loss], ...]}."""
    ddp = setup_distributed()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ddp.enabled:
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    log = tqdm.write if (ddp.is_main and cfg.progress) else (lambda *_: None)
    out_dir = Path(cfg.out_dir)
    checkpoint_path = out_dir / "ckpt.pt"

    resume_from = None
    if cfg.resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        resume_from = load_checkpoint(checkpoint_path)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, tokenizer = main_process_first(ddp, lambda: build_model(cfg, resume_from))
    model.to(device)
    context = model.config.context_length

    meta = main_process_first(ddp, lambda: prepare_data(cfg.data, tokenizer, cfg.data_dir, cfg.val_fraction))
    stride = cfg.stride or context
    train_windows = TokenWindows(Path(meta["dir"]) / "train.bin", meta["dtype"], context, stride)
    val_windows = TokenWindows(Path(meta["dir"]) / "val.bin", meta["dtype"], context, context)
    loader = BatchLoader(train_windows, cfg.batch_size, cfg.seed, ddp.rank, ddp.world_size)
    log(
        f"data: {meta['train_tokens']:,} train tokens ({len(meta['train_documents'])} documents), "
        f"{meta['val_tokens']:,} val tokens ({', '.join(meta['val_documents']) or 'tail of the text'}); "
        f"cache {meta['dir']}"
    )

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    step, history = 0, {"train_loss": [], "val_loss": []}
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        loader.load_state_dict(resume_from["data"])
        step, history = resume_from["step"], resume_from["history"]
        _restore_rng(resume_from["rng"], ddp)
        log(f"resumed from {checkpoint_path} at step {step}")
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # different dropout masks per rank

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * ddp.world_size * context
    peak = peak_flops(cfg, device)
    flops_per_token = raw_model.flops_per_token()
    log(
        f"model: {raw_model.num_parameters():,} parameters, context {context}, "
        f"{tokens_per_step:,} tokens per step on {ddp.world_size} x {device}; MFU "
        + (f"vs a peak of {peak / 1e12:.0f} TFLOP/s" if peak else "n/a (no peak FLOP/s known for this device)")
    )

    def evaluate_and_save() -> None:
        """Validation loss, a sample, the loss curve and a checkpoint (rank 0 writes)."""
        val_loss = estimate_loss(raw_model, val_windows, cfg.eval_batches, cfg.batch_size, device, autocast)
        history["val_loss"].append([step, val_loss])
        log(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.1f}")
        sample = complete(
            raw_model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed, temperature=0.8, top_k=200
        )
        log(f"--- sample ---\n{sample}\n--------------")
        save_loss_curve(history, out_dir / "loss.png")
        rng_states = _gather_rng(ddp)
        save_checkpoint(
            checkpoint_path,
            {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "model_config": raw_model.config.to_dict(),
                "train_config": dataclasses.asdict(cfg),
                "tokenizer": tokenizer_to_dict(tokenizer),
                "rng": rng_states,
                "data": loader.state_dict(),
                "history": history,
            },
        )

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (ddp.is_main and cfg.progress), dynamic_ncols=True)
    if step == 0 and ddp.is_main:
        history["val_loss"].append(
            [0, estimate_loss(raw_model, val_windows, cfg.eval_batches, cfg.batch_size, device, autocast)]
        )
        log(f"step 0: val loss {history['val_loss'][-1][1]:.4f}")
    while step < cfg.max_steps:
        started = time.perf_counter()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro_step in range(cfg.grad_accum_steps):
            x, y = loader.next_batch(device)  # (B, T), (B, T)
            # Under DDP, only the last micro-step all-reduces the accumulated gradients.
            last = micro_step == cfg.grad_accum_steps - 1
            sync = model.no_sync() if (ddp.enabled and not last) else contextlib.nullcontext()
            with sync, autocast:
                _, loss = model(x, y)
                loss = loss / cfg.grad_accum_steps
            loss.backward()
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ddp.enabled:
            dist.all_reduce(step_loss)  # sum over ranks -> mean below
            step_loss /= ddp.world_size
        step += 1
        history["train_loss"].append(step_loss.item())  # .item() waits for the GPU: honest timing
        elapsed = time.perf_counter() - started
        tokens_per_s = tokens_per_step / elapsed
        mfu = f"{flops_per_token * tokens_per_s / peak:.1%}" if peak else "n/a"
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=mfu, lr=f"{lr:.1e}")
        bar.update(1)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            if ddp.is_main:
                evaluate_and_save()
            else:
                _gather_rng(ddp)  # rank 0 collects every rank's RNG state for the checkpoint
    bar.close()
    if ddp.enabled:
        dist.barrier()
    return history


@torch.no_grad()
def estimate_loss(model: GPT, windows: TokenWindows, num_batches: int, batch_size: int, device, autocast) -> float:
    """Mean loss over num_batches * batch_size windows spread evenly over the split."""
    was_training = model.training
    model.eval()
    indices = windows.evaluation_indices(num_batches * batch_size)
    losses = []
    for i in range(0, len(indices), batch_size):
        x, y = windows.batch(indices[i : i + batch_size], device)
        with autocast:
            losses.append(model(x, y)[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


def _gather_rng(ddp: Distributed) -> list[dict]:
    """Every rank's generator states (CPU and, if present, CUDA), collected on all ranks."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if not ddp.enabled:
        return [state]
    states = [None] * ddp.world_size
    dist.all_gather_object(states, state)
    return states


def _restore_rng(states: list[dict], ddp: Distributed) -> None:
    if len(states) != ddp.world_size:
        raise ValueError(
            f"the checkpoint was written by {len(states)} process(es); resume it with the same number, "
            f"not {ddp.world_size}"
        )
    torch.set_rng_state(states[ddp.rank]["cpu"])
    if "cuda" in states[ddp.rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[ddp.rank]["cuda"])


def save_loss_curve(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(range(1, len(history["train_loss"]) + 1), history["train_loss"], label="train", alpha=0.7)
    if history["val_loss"]:
        steps, losses = zip(*history["val_loss"])
        axes.plot(steps, losses, "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy loss (nats/token)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=defaults.preset, help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--data", nargs="*", default=[], help="text files, globs or folders (default: Shakespeare)")
    parser.add_argument("--data-dir", default=defaults.data_dir, help="token cache folder")
    parser.add_argument("--tokenizer", default=None, help='"gpt2", "bpe:N" or a saved tokenizer file')
    parser.add_argument("--out-dir", default=defaults.out_dir)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--use-fused", action="store_true", help="attention/LayerNorm/GELU and the LM-head loss via llmkernels")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    parser.add_argument("--init-from", default=None, help="start from a checkpoint or a GPT-2 folder")
    for name in (
        "context_length",
        "dropout",
        "stride",
        "batch_size",
        "grad_accum_steps",
        "lr_decay_steps",
        "warmup_steps",
        "lr",
        "min_lr",
        "weight_decay",
        "grad_clip",
        "eval_interval",
        "eval_batches",
        "sample_tokens",
        "seed",
        "peak_flops",
    ):
        default = getattr(defaults, name)
        kind = float if name in ("dropout", "lr", "min_lr", "weight_decay", "grad_clip", "peak_flops") else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f"default {default}")
    parser.add_argument("--sample-prompt", default=defaults.sample_prompt)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    history = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and history["val_loss"]:
        first, last = history["val_loss"][0][1], history["val_loss"][-1][1]
        print(f"validation loss {first:.3f} -> {last:.3f}; checkpoint and loss.png in {cfg.out_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad input: the message, no traceback
        raise SystemExit(f"error: {error}") from None
