"""The model a server serves: loaded once from an llm checkpoint or a Hugging Face GPT-2 folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch

from llm.chat_template import ChatTemplate, checkpoint_template
from llm.checkpoint import load_checkpoint, model_from_checkpoint
from llm.model import GPT
from llm.runtime import resolve_device
from llm.weights import load_gpt2_with_tokenizer

GENERATIVE_TASKS = ("lm", "instruct")


@dataclass
class ServedModel:
    name: str  # the id clients pass as "model" (GET /v1/models lists it)
    model: GPT
    tokenizer: tiktoken.Encoding
    task: str  # "lm" (plain completion) or "instruct" (also serves chat completions)
    device: torch.device
    use_fused: bool
    template: ChatTemplate | None = None  # instruct: the chat template it was trained with

def load_served_model(path: str | os.PathLike, device: str = "auto", use_fused: bool = False,
                      name: str | None = None) -> ServedModel:
    """A GPT in eval mode on `device` with its tokenizer and task, from
    - a checkpoint file written by llm-train or llm-finetune (its "task" key: absent or
      "lm", or "instruct" for an instruction fine-tune with its LoRA weights merged, served
      with its own chat template), or
    - a Hugging Face GPT-2 save_pretrained folder (config.json + weights, and the tokenizer
      llm-export stored beside them if any; task "lm").
    A classification fine-tune ("classify") generates no text and is refused."""
    path = Path(path)
    target = resolve_device(device)
    template = None
    if path.is_dir():
        model, tokenizer = load_gpt2_with_tokenizer(path, use_fused=use_fused, dropout=0.0)
        task = "lm"
    else:
        checkpoint = load_checkpoint(path)
        task = checkpoint.get("task", "lm")
        if task not in GENERATIVE_TASKS:
            raise ValueError(
                f"--checkpoint {path}: a {task!r} checkpoint (e.g. a classification fine-tune) does not generate "
                f"text; llm-serve serves models with task {' or '.join(map(repr, GENERATIVE_TASKS))}"
            )
        model, tokenizer = model_from_checkpoint(checkpoint, use_fused=use_fused, dropout=0.0)
        template = checkpoint_template(checkpoint) if task == "instruct" else None
    return ServedModel(name=name or path.resolve().name, model=model.to(target).eval(), tokenizer=tokenizer,
                       task=task, device=target, use_fused=use_fused, template=template)
