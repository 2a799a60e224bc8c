"""Hugging Face GPT-2 checkpoints in and out, offline, every shape checked.

Hugging Face stores GPT-2's linear layers as `Conv1D` modules whose weight is
(in_features, out_features), the transpose of nn.Linear's (out, in); those four
matrices per block (c_attn, c_proj, c_fc, mlp.c_proj) are transposed on the way in and
out. Everything else maps one to one, because our module names follow GPT2LMHeadModel.

A checkpoint trained here usually has its own learned tokenizer, which Hugging Face's
GPT-2 tokenizer cannot stand in for; save_hf writes it next to the weights
(llm_tokenizer.json) and load_gpt2_with_tokenizer picks it up.

    llm-export --checkpoint out/ckpt.pt --out hf-model   # then GPT2LMHeadModel.from_pretrained("hf-model")
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import tiktoken
import torch
from safetensors.torch import load_file, save_file

from llm.checkpoint import checkpoint_task, load_checkpoint, model_from_checkpoint
from llm.cli import command, existing_file, new_parser
from llm.config import GPTConfig
from llm.files import atomic_output
from llm.model import GPT
from llm.tokenizer import gpt2_tokenizer, load_tokenizer, save_tokenizer

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOKENIZER_FILE = "llm_tokenizer.json"  # our tokenizer, when it is not GPT-2's
# Buffers some checkpoints carry (the causal mask); they hold no learned values.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .bin file, or of the model.safetensors or
    pytorch_model.bin inside a save_pretrained folder. .bin files load with
    weights_only=True (no code runs)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"GPT-2 weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read GPT-2 weights from {path}: {error}") from error


def config_from_hf(path: str | os.PathLike, **overrides) -> GPTConfig:
    """GPTConfig from a save_pretrained folder's config.json (GPT-2 architecture only)."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found; pass a save_pretrained folder")
    hf = json.loads(config_path.read_text())
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
    }
    for field, allowed in unsupported.items():
        if field in hf and hf[field] not in allowed:
            raise ValueError(f"{config_path}: {field}={hf[field]!r} is not supported (expected one of {allowed})")
    fields = dict(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    return GPTConfig(**{**fields, **overrides})


def load_hf_state_dict(model: GPT, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a GPT2LMHeadModel / GPT2Model state dict into `model`, checking every key and shape."""
    hf_state = {
        key.removeprefix("transformer."): tensor
        for key, tensor in hf_state.items()
        if not key.endswith(IGNORED_SUFFIXES) and key != "lm_head.weight"  # the head is tied to wte
    }
    ours = {key.removeprefix("transformer."): p for key, p in model.state_dict().items() if key != "lm_head.weight"}
    missing, unexpected = sorted(set(ours) - set(hf_state)), sorted(set(hf_state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"GPT-2 state dict does not match the model: missing {missing}, unexpected {unexpected}")
    vocab = model.config.vocab_size
    with torch.no_grad():
        for key, target in ours.items():
            source = hf_state[key]
            if key == "wte.weight":
                target = target[:vocab]  # padding rows (if any) stay as initialised
            if key.endswith(CONV1D_SUFFIXES):
                target = target.t()  # Linear (out, in) viewed as Conv1D (in, out)
            if source.shape != target.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: checkpoint has {tuple(source.shape)}, "
                    f"model expects {tuple(target.shape)}"
                )
            target.copy_(source)


def load_gpt2(path: str | os.PathLike, **config_overrides) -> GPT:
    """A GPT with the weights of a Hugging Face GPT-2 save_pretrained folder (no download)."""
    model = GPT(config_from_hf(path, **config_overrides))
    load_hf_state_dict(model, read_hf_state_dict(path))
    return model


def load_gpt2_with_tokenizer(path: str | os.PathLike, **config_overrides) -> tuple[GPT, tiktoken.Encoding]:
    """load_gpt2 and the folder's tokenizer: the one save_hf stored (llm_tokenizer.json), else
    GPT-2's, which is refused if it has more tokens than the model has embeddings."""
    model = load_gpt2(path, **config_overrides)
    tokenizer_path = Path(path) / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path.is_file() else gpt2_tokenizer()
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(
            f"{path}: the model has {model.config.vocab_size} token embeddings but its tokenizer "
            f"({tokenizer.name}) has {tokenizer.n_vocab} tokens; a model exported from an llm checkpoint "
            f"needs its {TOKENIZER_FILE} (llm-export writes it)"
        )
    return model, tokenizer


def load_model_source(source: str | os.PathLike, **config_overrides) -> tuple[GPT, tiktoken.Encoding, dict]:
    """(model, tokenizer, checkpoint dict) from an llm checkpoint file, or from a Hugging Face
    GPT-2 folder or weights file (.safetensors / .bin), whose checkpoint dict is {}."""
    if Path(source).is_dir() or str(source).endswith((".safetensors", ".bin")):
        return *load_gpt2_with_tokenizer(source, **config_overrides), {}
    checkpoint = load_checkpoint(source)
    return *model_from_checkpoint(checkpoint, **config_overrides), checkpoint


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names and layouts (Conv1D transposed)."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties on load
        if key == "transformer.wte.weight":
            tensor = tensor[: model.config.vocab_size]  # drop padding rows
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()  # Linear (out, in) -> Conv1D (in, out)
        state[key] = tensor.detach().cpu().contiguous()
    return state


def save_hf(model: GPT, out_dir: str | os.PathLike, tokenizer: tiktoken.Encoding | None = None) -> None:
    """Write model.safetensors + config.json that GPT2LMHeadModel.from_pretrained reads, and
    the tokenizer (llm_tokenizer.json) unless it is GPT-2's own."""
    cfg = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "bos_token_id": cfg.vocab_size - 1,  # <|endoftext|> is the last id in our tokenizers
        "eos_token_id": cfg.vocab_size - 1,
        "tie_word_embeddings": True,
    }
    out_dir = Path(out_dir)
    with atomic_output(out_dir / "model.safetensors") as tmp:
        save_file(to_hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    with atomic_output(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None and tokenizer is not gpt2_tokenizer():
        save_tokenizer(tokenizer, out_dir / TOKENIZER_FILE)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("llm-export", "Export a checkpoint written by llm-train as a Hugging Face GPT-2 folder\n"
                        "(model.safetensors + config.json, and llm_tokenizer.json for a learned tokenizer).")
    parser.add_argument("--checkpoint", type=existing_file, required=True, help="a checkpoint (e.g. out/ckpt.pt)")
    parser.add_argument("--out", required=True, help="the folder to write (GPT2LMHeadModel.from_pretrained reads it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    return parser


@command("llm-export")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; expected a folder")
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds an export; pass --overwrite to replace it")
    checkpoint = load_checkpoint(args.checkpoint)
    task = checkpoint_task(checkpoint)
    if task not in ("lm", "instruct"):
        raise ValueError(f"--checkpoint {args.checkpoint} is a {task!r} model; only language models export as GPT-2")
    model, tokenizer = model_from_checkpoint(checkpoint)
    save_hf(model, out, tokenizer)
    print(f"exported {args.checkpoint} (step {checkpoint['step']}) to {out}/")


if __name__ == "__main__":
    main()
