"""A tiny model and its checkpoint for the fine-tuning tests: GPT-2's tokenizer (so the
built-in datasets tokenise as they do for real models), a 2-layer, 32-wide body."""

import pytest
import torch

from llm.checkpoint import save_checkpoint
from llm.config import GPTConfig
from llm.model import GPT
from llm.tokenizer import gpt2_tokenizer, tokenizer_to_dict


def tiny_gpt(seed: int = 0, context_length: int = 96, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=gpt2_tokenizer().n_vocab, context_length=context_length, n_embd=32, n_layer=2, n_head=2)
    return GPT(GPTConfig(**{**config, **overrides}))


def save_tiny_checkpoint(path, seed: int = 0, **overrides):
    model = tiny_gpt(seed, **overrides)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                           "tokenizer": tokenizer_to_dict(gpt2_tokenizer()), "step": 0})  # fmt: skip
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread is many times faster than several contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
