"""Training checkpoints: written atomically, read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values only (configs as dicts, the
tokenizer as its description), so loading it never runs pickled code:
  model, optimizer     state dicts
  step                 optimizer steps taken (the LR schedule's position)
  model_config         GPTConfig.to_dict()
  train_config         dataclasses.asdict(TrainConfig)
  tokenizer            llm.tokenizer.tokenizer_to_dict()
  rng                  per-rank CPU (and CUDA) generator states
  data                 the BatchLoader position
  history              losses so far, for the loss curve
  task                 optional: "lm" (absent = "lm"), "classify" or "instruct" -- what the
                       model was fine-tuned for, so every command treats it accordingly
  chat_template        instruct: the llm.chat_template name the model was trained with
                       (absent: "alpaca", the single-turn template of older fine-tunes)

Written by llm-finetune (llm.finetune.loop) instead of train_config:
  finetune_config      dataclasses.asdict(FinetuneConfig): llm-finetune --resume continues it
  classifier           classify: {"labels", "head", "initial_head"} (llm.finetune.classify)
  lora                 LoRA runs: {"adapters": unmerged adapter weights}; "model" is merged
  evaluation           {"before": the task's metrics before fine-tuning}

On disk that dict is the "payload" of {"payload", "sha256", "llmkernels_version"}: the
SHA-256 of a canonical walk over the payload (every tensor's dtype, shape and bytes, every
plain value), so a damaged file is refused instead of loading changed weights. Files
written before the checksum existed (the bare dict) still load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import tiktoken
import torch

from llm.config import GPTConfig
from llm.files import atomic_output
from llm.model import GPT
from llm.tokenizer import tokenizer_from_dict

REQUIRED_KEYS = ("model", "model_config", "tokenizer", "step")
TASKS = ("lm", "classify", "instruct")
ENVELOPE_KEYS = {"payload", "sha256", "llmkernels_version"}


def package_version() -> str:
    try:
        return importlib.metadata.version("llmkernels")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def payload_digest(payload) -> str:
    """SHA-256 over a canonical walk of tensors and plain values (dict keys sorted)."""
    digest = hashlib.sha256()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}\n".encode())
            for key in sorted(value, key=repr):
                visit(key)
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}\n".encode())
            for item in value:
                visit(item)
        else:  # str, int, float, bool, None
            digest.update(f"{type(value).__name__} {value!r}\n".encode())

    visit(payload)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write the checkpoint with its checksum and the package version, atomically."""
    envelope = {"payload": checkpoint, "sha256": payload_digest(checkpoint), "llmkernels_version": package_version()}
    with atomic_output(path) as tmp:
        torch.save(envelope, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict, or an error saying in one line why the file is not a usable checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; expected a file such as {path / 'ckpt.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch's own message (kept as __cause__) is long and suggests weights_only=False; don't.
        raise ValueError(
            f"cannot load checkpoint {path}: the file is corrupt or not a checkpoint written by llm.train "
            f"({type(error).__name__})"
        ) from error
    if isinstance(checkpoint, dict) and set(checkpoint) == ENVELOPE_KEYS:
        if payload_digest(checkpoint["payload"]) != checkpoint["sha256"]:
            raise ValueError(
                f"checkpoint {path} is damaged: its contents do not match the checksum saved with it "
                f"(written by llmkernels {checkpoint['llmkernels_version']})"
            )
        checkpoint = checkpoint["payload"]
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not an llm checkpoint: expected keys {list(REQUIRED_KEYS)}, found {found}")
    return checkpoint


def check_existing_checkpoint(cfg, path: Path) -> None:
    """A new run never silently replaces a checkpoint: --resume continues it, --overwrite replaces it.
    cfg: anything with .resume and .overwrite (TrainConfig, llm-finetune's config or its parsed options)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; the checkpoint goes there as a file")
    if cfg.resume and not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if not (cfg.resume or cfg.overwrite) and path.exists():
        raise FileExistsError(
            f"{path} already exists; pass --resume to continue it, --overwrite to replace it, "
            f"or another --out-dir"
        )


def load_model_state(model: GPT, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """model.load_state_dict with an error that names every mismatched key and shape."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: {source} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not match the model: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {mismatched}"
        )
    model.load_state_dict(state)


def model_from_checkpoint(checkpoint: dict, **config_overrides) -> tuple[GPT, tiktoken.Encoding]:
    """The trained model (on CPU) and its tokenizer; overrides e.g. use_fused=True, dropout=0.0."""
    config = GPTConfig.from_dict({**checkpoint["model_config"], **config_overrides})
    model = GPT(config)
    load_model_state(model, checkpoint["model"])
    return model, tokenizer_from_dict(checkpoint["tokenizer"])


def checkpoint_task(checkpoint: dict) -> str:
    """What the model was fine-tuned for: "lm" (also when the key is absent), "classify" or "instruct"."""
    task = checkpoint.get("task", "lm")
    if task not in TASKS:
        raise ValueError(f"the checkpoint's task {task!r} is none of {', '.join(TASKS)}")
    return task
