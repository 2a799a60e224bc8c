"""A GPT-2 style language model from scratch: config, model, tokenizer, data, training,
generation, GPT-2 weights and fine-tuning. See llm.train for the main entry point."""

from llm.config import GPTConfig
from llm.model import GPT

__all__ = ["GPT", "GPTConfig"]
