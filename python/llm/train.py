"""Train a GPT: AdamW, warmup + cosine LR, gradient clipping and accumulation, bf16
autocast on GPU, validation loss / perplexity, samples, loss curve, atomic checkpoints
with exact resume, and DistributedDataParallel under torchrun.

    llm-train                                 # tiny preset on Shakespeare, a few CPU minutes
    llm-train --preset gpt2 --data 'corpus/*.txt' --device cuda --compile --use-fused
    torchrun --nproc_per_node 8 -m llm.train --preset gpt2 ...
    llm-train --resume --max-steps 2000       # continue out/ckpt.pt exactly where it stopped
    llm-train --overwrite                     # start over, replacing out/ckpt.pt
    llm-train --checkpoint ./gpt2 --data 'notes/*.txt' --out-dir out-notes   # start from a model

The checkpoint (OUT_DIR/ckpt.pt) is written at every evaluation and every --save-interval
seconds, atomically; an existing one is never replaced unless --overwrite says so. Ctrl-C
(SIGINT) or SIGTERM saves a checkpoint at the end of the current step and prints the command
that resumes it; the resumed run matches an uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from llm.checkpoint import (
    check_existing_checkpoint, checkpoint_task, load_checkpoint, model_from_checkpoint, save_checkpoint,
)  # fmt: skip
from llm.cli import (
    PROGRESS_SETTINGS, SEED, add_progress_options, checked_by, command, device_name, existing_path, float_in,
    int_in, new_parser, shows_bar,
)  # fmt: skip
from llm.config import PRESETS, GPTConfig
from llm.data import DEFAULT_DATA_DIR, BatchLoader, TokenWindows, corpus_tokenizer, prepare_data, resolve_sources
from llm.generate import complete
from llm.interrupts import StopRequests, TrainingInterrupted, exit_interrupted
from llm.model import GPT
from llm.plots import new_figure, save_png
from llm.runtime import (
    autocast_for, gather_rng_states, main_process_first, resolve_device, restore_rng_states, setup_distributed,
)  # fmt: skip
from llm.tokenizer import LEARNED_PREFIX, check_tokenizer_spec, get_tokenizer, tokenizer_to_dict

DEFAULT_PRESET = "tiny"
# Tiny models spend most of their time in the (vocabulary x width) LM head, so the tiny
# preset learns a small vocabulary on its corpus instead of GPT-2's 50,257 tokens.
PRESET_TOKENIZERS = {"tiny": "bpe:2048"}
# Dense bf16 tensor-core peaks from the vendors' data sheets, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class TrainConfig:
    # model
    preset: str | None = None  # None = DEFAULT_PRESET, or the checkpoint's when resuming
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
    overwrite: bool = False  # replace an existing out_dir/ckpt.pt with a new run
    eval_interval: int = 200  # steps between validation, sample, checkpoint and plot
    save_interval: float = 300.0  # seconds between checkpoints (besides those at evaluations)
    eval_batches: int = 8
    sample_tokens: int = 80
    sample_prompt: str = "\n"
    device: str = "auto"  # "auto" = cuda if available, else cpu
    seed: int = 1337
    peak_flops: float | None = None  # for MFU; None = look the GPU up in PEAK_BF16_FLOPS
    progress: bool | None = None  # the tqdm bar; None = only when stderr is a terminal


# The numeric settings and their valid ranges, shared by the command line (argparse types)
# and check_config (a TrainConfig built in Python). None, where a field allows it, means
# the default described in TrainConfig.
NUMERIC_SETTINGS = {
    "context_length": int_in(1),  # and at most the model's, see check_context_length
    "dropout": float_in(0, 1, max_open=True),
    "val_fraction": float_in(0, 1, min_open=True, max_open=True),
    "stride": int_in(1),
    "batch_size": int_in(1),
    "grad_accum_steps": int_in(1),
    "max_steps": int_in(1),
    "lr_decay_steps": int_in(1),
    "warmup_steps": int_in(0),
    "lr": float_in(0, min_open=True),
    "min_lr": float_in(0),
    "weight_decay": float_in(0),
    "beta1": float_in(0, 1, max_open=True),
    "beta2": float_in(0, 1, max_open=True),
    "grad_clip": float_in(0),
    "eval_interval": int_in(1),
    "save_interval": float_in(0, min_open=True),
    "eval_batches": int_in(1),
    "sample_tokens": int_in(0),
    "seed": SEED,
    "peak_flops": float_in(0, min_open=True),
}
# What None means for the settings that may be None (--help shows it as the default).
UNSET_MEANS = {"context_length": "the model's", "dropout": "the preset's", "stride": "the context length",
               "lr_decay_steps": "--max-steps", "peak_flops": "the GPU's, if known"}
SETTING_HELP = {"save_interval": "seconds between checkpoints, besides those at evaluations: "}
# What fixes the model and its tokens: a resumed run takes these from its checkpoint.
RESUMED_SETTINGS = ("preset", "context_length", "tokenizer", "init_from")
# Fields whose option is not their name with dashes; --init-from stays an alias of --checkpoint.
OPTION_NAMES = {"init_from": "--checkpoint"}


def option(name: str) -> str:
    """The command-line spelling of a TrainConfig field: max_steps -> --max-steps."""
    return OPTION_NAMES.get(name, "--" + name.replace("_", "-"))


def check_config(cfg: TrainConfig) -> None:
    """Every setting in range and the settings consistent, before any work starts; a
    ValueError / FileNotFoundError names the option."""
    for name, kind in NUMERIC_SETTINGS.items():
        value = getattr(cfg, name)
        if not (value is None and getattr(TrainConfig, name) is None):  # None where None is the default
            kind.check(option(name), value)
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr {cfg.min_lr} must not exceed --lr {cfg.lr}")
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {cfg.preset!r}; valid presets: {', '.join(PRESETS)}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("pass --resume (continue the checkpoint) or --overwrite (replace it), not both")
    if cfg.resume and cfg.init_from is not None:
        raise ValueError("--resume continues OUT_DIR/ckpt.pt and --checkpoint starts a new run from a model; "
                         "pass one of them")
    if cfg.tokenizer is not None:
        try:
            check_tokenizer_spec(cfg.tokenizer)
        except ValueError as error:
            raise ValueError(f"--tokenizer {error}") from None
    for name in ("out_dir", "data_dir"):
        folder = Path(getattr(cfg, name)).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{option(name)} {folder} is a file; expected a folder")
    if cfg.init_from is not None and not Path(cfg.init_from).exists():
        raise FileNotFoundError(f"--checkpoint: no such file or folder: {cfg.init_from}")
    resolve_sources(cfg.data)  # every --data source exists


def check_context_length(cfg: TrainConfig, supported: int, source: str) -> None:
    """--context-length may crop the model's context, never extend it."""
    if cfg.context_length is not None and cfg.context_length > supported:
        raise ValueError(
            f"--context-length {cfg.context_length} is more than {source} supports ({supported}); "
            f"pass at most {supported}"
        )


def resumed_config(cfg: TrainConfig, checkpoint: dict, path: Path) -> TrainConfig:
    """cfg with the model settings of the run it resumes (RESUMED_SETTINGS); an option that
    contradicts them, a fine-tuned checkpoint or one already at --max-steps is refused."""
    if "finetune_config" in checkpoint or checkpoint_task(checkpoint) != "lm":
        raise ValueError(
            f"--resume: {path} is a fine-tune (task {checkpoint_task(checkpoint)}); continue it with "
            f"llm-finetune --resume --out-dir {path.parent}, which keeps its task, data and settings"
        )
    if checkpoint["step"] >= cfg.max_steps:
        raise ValueError(
            f"--max-steps {cfg.max_steps}: {path} is already at step {checkpoint['step']}; "
            f"pass a larger --max-steps to train further"
        )
    recorded = checkpoint.get("train_config", {})
    settings = {}
    for name in RESUMED_SETTINGS:
        given, saved = getattr(cfg, name), recorded.get(name)
        if given is not None and given != saved:
            raise ValueError(
                f"{option(name)} {given} differs from the checkpoint's {saved} ({path}); a resumed run keeps "
                f"its model and tokenizer, so leave {option(name)} out"
            )
        settings[name] = saved
    return dataclasses.replace(cfg, **settings)


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


def load_or_learn_tokenizer(cfg: TrainConfig) -> tiktoken.Encoding:
    spec = cfg.tokenizer or PRESET_TOKENIZERS.get(cfg.preset, "gpt2")
    if spec.startswith(LEARNED_PREFIX):
        return corpus_tokenizer(cfg.data, int(spec.removeprefix(LEARNED_PREFIX)), cfg.data_dir, cfg.val_fraction)
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
    else:
        from llm.weights import load_model_source

        model, tokenizer, _ = load_model_source(cfg.init_from, **overrides)
    if resume_from is not None or cfg.init_from is not None:
        check_context_length(cfg, model.config.context_length, "the initial model")
    if cfg.context_length is not None and cfg.context_length < model.config.context_length:
        model.crop_context(cfg.context_length)
    return model, tokenizer


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the history {"train_loss": [per step], "val_loss": [[step, loss], ...]}.
    Raises TrainingInterrupted (after saving a checkpoint) on SIGINT / SIGTERM."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    checkpoint_path = out_dir / "ckpt.pt"
    check_existing_checkpoint(cfg, checkpoint_path)
    resume_from = None
    if cfg.resume:
        resume_from = load_checkpoint(checkpoint_path)
        cfg = resumed_config(cfg, resume_from, checkpoint_path)
    else:
        cfg = dataclasses.replace(cfg, preset=cfg.preset or DEFAULT_PRESET)
        if cfg.init_from is None:
            preset_context = GPTConfig.from_preset(cfg.preset).context_length
            check_context_length(cfg, preset_context, f"the {cfg.preset} preset")

    ddp = setup_distributed(device)
    if device.type == "cuda" and ddp.enabled:
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    # Evaluation lines and samples always print (rank 0); the bar only on a terminal or if asked.
    log = tqdm.write if ddp.is_main else (lambda *_: None)
    show_bar = ddp.is_main and shows_bar(cfg.progress)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, tokenizer = main_process_first(ddp, lambda: build_model(cfg, resume_from))
    model.to(device)
    context = model.config.context_length
    prompt_tokens = len(tokenizer.encode(cfg.sample_prompt, allowed_special="all"))
    if prompt_tokens >= context:
        raise ValueError(f"--sample-prompt is {prompt_tokens} tokens; the context holds {context}")

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
        restore_rng_states(resume_from["rng"], ddp)
        log(f"resumed from {checkpoint_path} at step {step}")
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # different dropout masks per rank

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_for(device)
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * ddp.world_size * context
    peak = peak_flops(cfg, device)
    flops_per_token = raw_model.flops_per_token()
    log(
        f"model: {raw_model.num_parameters():,} parameters, context {context}, "
        f"{tokens_per_step:,} tokens per step on {ddp.world_size} x {device}; MFU "
        + (f"vs a peak of {peak / 1e12:.0f} TFLOP/s" if peak else "n/a (no peak FLOP/s known for this device)")
    )

    def save() -> None:
        """The loss curve and a checkpoint at this step (rank 0 writes; every rank takes part)."""
        rng_states = gather_rng_states(ddp)  # rank 0 collects every rank's RNG state for the checkpoint
        if not ddp.is_main:
            return
        save_loss_curve(history, out_dir / "loss.png")
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

    def evaluate() -> None:
        """Validation loss and a sample (rank 0)."""
        val_loss = estimate_loss(raw_model, val_windows, cfg.eval_batches, cfg.batch_size, device, autocast)
        history["val_loss"].append([step, val_loss])
        log(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.1f}")
        sample = complete(
            raw_model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed, temperature=0.8, top_k=200
        )
        log(f"--- sample ---\n{sample}\n--------------")

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not show_bar, dynamic_ncols=True)
    if step == 0 and ddp.is_main:
        history["val_loss"].append(
            [0, estimate_loss(raw_model, val_windows, cfg.eval_batches, cfg.batch_size, device, autocast)]
        )
        log(f"step 0: val loss {history['val_loss'][-1][1]:.4f}")
    interrupted = False
    saver = IntervalSaves(cfg.save_interval, ddp)
    with StopRequests() as stop:
        while step < cfg.max_steps:
            started = time.perf_counter()
            no_sync = model.no_sync if ddp.enabled else None
            lr, step_loss = training_step(model, optimizer, loader, next_token_loss, cfg, step, device, autocast, no_sync)
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
            evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
            saved = evaluated or saver.due(device)
            if evaluated and ddp.is_main:
                evaluate()
            if saved:
                save()
                saver.saved()
            if step < cfg.max_steps and stop.requested(ddp, device):
                if not saved:
                    save()
                interrupted = True
                break
    bar.close()
    if ddp.enabled:
        dist.barrier()
    if interrupted:
        raise TrainingInterrupted(stop.received or signal.SIGTERM, step, checkpoint_path)
    return history


class IntervalSaves:
    """When a checkpoint is due by the clock (every `interval` seconds since the last one), so a
    run killed outright (out of memory, a lost machine) loses at most that much work. Under
    torchrun rank 0's clock decides for every rank, since all of them take part in a save."""

    def __init__(self, interval: float, ddp):
        self.interval, self.ddp = interval, ddp
        self.last = time.monotonic()

    def due(self, device: torch.device) -> bool:
        due = time.monotonic() - self.last >= self.interval
        if self.ddp.enabled:
            flag = torch.tensor(float(due), device=device)
            dist.broadcast(flag, src=0)
            due = flag.item() > 0
        return due

    def saved(self) -> None:
        self.last = time.monotonic()


def next_token_loss(model, batch) -> torch.Tensor:
    x, y = batch  # (B, T), (B, T); y == -1 ignored
    return model(x, y)[1]


def training_step(model, optimizer, loader: BatchLoader, loss_of, cfg, step: int, device, autocast, no_sync=None):
    """Optimizer step number `step` of llm-train and llm-finetune: the scheduled learning rate, the
    mean of loss_of(model, batch) over cfg.grad_accum_steps micro-batches (their gradients add up),
    the global gradient norm clipped to cfg.grad_clip (0 = off). no_sync: DDP's model.no_sync, so
    only the last micro-batch all-reduces the accumulated gradients.
    Returns (lr, the step's loss as a 0-d tensor on the device: reading it waits for the device)."""
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device)
    for micro_step in range(cfg.grad_accum_steps):
        batch = loader.next_batch(device)
        last = micro_step == cfg.grad_accum_steps - 1
        sync = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync, autocast:
            loss = loss_of(model, batch) / cfg.grad_accum_steps
        loss.backward()
        step_loss += loss.detach()
    if cfg.grad_clip > 0:  # frozen parameters (fine-tuning) have no gradient to clip
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, step_loss


@torch.no_grad()
def estimate_loss(model: GPT, windows: TokenWindows, num_batches: int, batch_size: int, device, autocast) -> float:
    """Mean loss over num_batches * batch_size windows spread evenly over the split."""
    was_training = model.training
    model.eval()
    indices = windows.evaluation_indices(num_batches * batch_size)
    losses = []  # 0-d tensors, read all at once: one wait for the device instead of one per batch
    for i in range(0, len(indices), batch_size):
        x, y = windows.batch(indices[i : i + batch_size], device)
        with autocast:
            losses.append(model(x, y)[1])
    model.train(was_training)
    losses = torch.stack(losses).tolist()
    return sum(losses) / len(losses)


def save_loss_curve(history: dict, path: Path, loss_unit: str = "nats/token") -> None:
    figure, axes = new_figure(figsize=(7, 4))
    axes.plot(range(1, len(history["train_loss"]) + 1), history["train_loss"], label="train", alpha=0.7)
    if history["val_loss"]:
        steps, losses = zip(*history["val_loss"])
        axes.plot(steps, losses, "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel(f"cross-entropy loss ({loss_unit})")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    save_png(figure, path)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = new_parser("llm-train", __doc__)
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help=f"model size (default {DEFAULT_PRESET}; when resuming, the checkpoint's)")
    parser.add_argument("--data", nargs="*", default=[], help="text files, globs or folders (default: Shakespeare)")
    parser.add_argument("--data-dir", default=defaults.data_dir, help="token cache folder")
    parser.add_argument("--tokenizer", type=checked_by(check_tokenizer_spec, "TOKENIZER"), default=None,
                        help='"gpt2", "bpe:N" (learn N tokens on the data) or a saved tokenizer file')
    parser.add_argument("--out-dir", default=defaults.out_dir, help="where ckpt.pt and loss.png go")
    parser.add_argument("--device", type=device_name, default=defaults.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--use-fused", action="store_true", help="attention/LayerNorm/GELU and the LM-head loss via llmkernels")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue OUT_DIR/ckpt.pt where it stopped")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
    parser.add_argument("--checkpoint", "--init-from", dest="init_from", metavar="MODEL", type=existing_path,
                        default=None, help="start a new run from this model: an llm checkpoint or a Hugging Face "
                                           "GPT-2 folder")  # fmt: skip
    for name, kind in NUMERIC_SETTINGS.items():
        default = getattr(defaults, name)
        parser.add_argument(option(name), type=kind, default=default, metavar="N" if kind.kind is int else "X",
                            help=f"{SETTING_HELP.get(name, '')}{kind.expected}; "
                                 f"default {UNSET_MEANS.get(name, default)}")  # fmt: skip
    parser.add_argument("--sample-prompt", default=defaults.sample_prompt, help="text the samples continue")
    add_progress_options(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args["progress"] = PROGRESS_SETTINGS[args["progress"]]
    return TrainConfig(**args)


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same options plus --resume,
    less those that start a run (--overwrite, --checkpoint / --init-from: OUT_DIR/ckpt.pt holds
    the model)."""
    starts = ("--checkpoint", "--init-from")
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in starts:
            skip_value = True
        elif arg not in ("--overwrite", "--resume") and not arg.startswith(tuple(f"{s}=" for s in starts)):
            kept.append(arg)
    return shlex.join(["llm-train", *kept, "--resume"])


@command("llm-train")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        history = train(cfg)
    except TrainingInterrupted as stop:
        exit_interrupted("llm-train", stop, resume_command(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = history["val_loss"][0][1], history["val_loss"][-1][1]
        print(f"validation loss {first:.3f} -> {last:.3f}; checkpoint and loss.png in {cfg.out_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
