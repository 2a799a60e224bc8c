"""LoRA (Hu et al., 2021) through Hugging Face's `peft`: each adapted nn.Linear W gains a
low-rank update, y = W x + (alpha / r) * B(A(dropout(x))), with A (r x in) random and
B (out x r) zero, so at initialisation the model is exactly the base model. Only A and B
train; merging adds (alpha / r) * B @ A into W and leaves a plain GPT that every command loads.

peft serves this model as it is: `inject_adapter_in_model` wraps the nn.Linear modules
named in `target_modules` (matched as name suffixes) in place, with no wrapper model and
no Hugging Face config. GPT-2's module names pick the attention projections (c_attn, and
c_proj of attn) and the MLP's (c_fc, and c_proj of mlp). Adapters are saved alone as
adapters.safetensors plus adapter_config.json in a folder (as peft's own
adapter_model.safetensors + adapter_config.json), with the classification head when there is one.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from llm.files import atomic_output

TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]  # attention and MLP projections in every block
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def check_lora_options(rank: int, alpha: float, dropout: float) -> None:
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"lora alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap the GPT's projections in LoRA adapters, in place; afterwards only the adapters
    require gradients (peft freezes everything else)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ValueError("LoRA needs the peft package: pip install 'llmkernels[finetune]' (or pip install peft)") from None

    check_lora_options(rank, alpha, dropout)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES)
    return inject_adapter_in_model(config, model)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone (lora_A / lora_B of every wrapped module)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved adapter weights into a model that has adapters of the same shapes."""
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source}: adapters do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatches {sorted(mismatched)[:3]} (was it saved for another base model or rank?)"
        )
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base nn.Linear and put the plain layer back, in place."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged copy (for the plain checkpoint) that leaves the training model's adapters alone."""
    return merge_lora(copy.deepcopy(model))


def save_adapters(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """adapters.safetensors (adapter and head tensors) + adapter_config.json, each atomically."""
    directory = Path(directory)
    with atomic_output(directory / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with atomic_output(directory / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=1))


def load_adapters(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) saved by save_adapters; safetensors, so loading runs no code."""
    directory = Path(directory)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"--adapters: {directory / name} not found (expected a folder from llm-finetune)")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return load_file(str(directory / ADAPTER_WEIGHTS)), config


def apply_adapters(gpt: nn.Module, directory: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The base GPT with the saved adapters added (and the classification head, for a
    classifier): (model, adapter config). Merge with merge_lora for a plain model."""
    from llm.finetune.classify import GPTClassifier

    tensors, config = load_adapters(directory)
    add_lora(gpt, config["rank"], config["alpha"], config["dropout"])
    head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    load_adapter_state(gpt, {k: v for k, v in tensors.items() if not k.startswith("head.")}, str(directory))
    if config["task"] != "classify":
        return gpt, config
    model = GPTClassifier(gpt, config["labels"])
    model.head.load_state_dict(head)
    return model, config
