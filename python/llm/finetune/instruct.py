"""Instruction fine-tuning: Alpaca-style records through the one prompt template
(llm.prompt_template), the response followed by <|endoftext|>, and the loss on response
tokens only.

Each record becomes prompt ids + response ids + [eot], cut to context + 1 tokens. The
input x is all but the last token and the target y all but the first (next-token
prediction); targets that are prompt tokens are -1, which the model's loss ignores, so
the prompt conditions the response without being trained on (unless train_on_prompt).
A batch is padded to its longest row, not to the context: inputs with <|endoftext|>,
targets with -1.
"""

from __future__ import annotations

import tiktoken
import torch

from llm.finetune.datasets import Instruction
from llm.generate import generate
from llm.prompt_template import format_prompt

IGNORE = -1  # GPT.forward's ignore_index


def encode_record(record: Instruction, tokenizer: tiktoken.Encoding) -> tuple[list[int], int]:
    """(prompt + response + [eot] ids, number of prompt tokens)."""
    prompt = tokenizer.encode_ordinary(format_prompt(record.instruction, record.input))
    response = tokenizer.encode_ordinary(record.output) + [tokenizer.eot_token]
    return prompt + response, len(prompt)


def collate_instructions(
    rows: list[tuple[list[int], int]], context: int, pad_token: int, train_on_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, prompt length) rows -> x, y (B, T) with T = the longest row's length - 1, at most context."""
    cut = [ids[: context + 1] for ids, _ in rows]
    T = max(len(ids) for ids in cut) - 1
    x = torch.full((len(rows), T), pad_token)
    y = torch.full((len(rows), T), IGNORE)
    for i, (ids, (_, prompt_length)) in enumerate(zip(cut, rows)):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        if not train_on_prompt:
            y[i, : prompt_length - 1] = IGNORE  # y[j] = ids[j + 1]: prompt tokens up to index prompt_length - 1
    return x, y


class InstructionSet:
    """Encoded records; records whose prompt alone fills the context have no response
    token left to learn from and are dropped (counted in `dropped`). `num_windows` and
    `batch(indices, device)` are what llm.data.BatchLoader reads."""

    def __init__(self, records: list[Instruction], tokenizer: tiktoken.Encoding, context: int, train_on_prompt: bool):
        encoded = [(record, *encode_record(record, tokenizer)) for record in records]
        kept = [(record, ids, n) for record, ids, n in encoded if n < context]
        self.records = [record for record, _, _ in kept]
        self.rows = [(ids, n) for _, ids, n in kept]
        self.dropped = len(records) - len(kept)
        self.context = context
        self.pad_token = tokenizer.eot_token
        self.train_on_prompt = train_on_prompt
        self.num_windows = len(self.rows)
        if not self.rows:
            raise ValueError(f"every one of the {len(records)} instruction prompts is longer than the context "
                             f"({context} tokens); use a longer --context-length or shorter records")

    def batch(self, indices, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        x, y = collate_instructions([self.rows[i] for i in indices], self.context, self.pad_token, self.train_on_prompt)
        return x.to(device), y.to(device)


@torch.no_grad()
def response_loss(model, data: InstructionSet, batch_size: int, device, autocast) -> dict:
    """Mean loss per trained token over all of `data`, and its perplexity."""
    was_training = model.training
    model.eval()
    losses, counts = [], []  # per batch: its mean loss and its trained tokens, read all at once at the end
    for start in range(0, data.num_windows, batch_size):
        x, y = data.batch(range(start, min(start + batch_size, data.num_windows)), device)
        counts.append((y != IGNORE).sum())
        with autocast:
            losses.append(model(x, y)[1].float())
    model.train(was_training)
    counts = torch.stack(counts).tolist()
    loss = sum(mean * n for mean, n in zip(torch.stack(losses).tolist(), counts)) / sum(counts)
    return {"examples": data.num_windows, "loss": loss, "perplexity": float(torch.tensor(loss).exp())}


@torch.no_grad()
def answer(model, tokenizer: tiktoken.Encoding, record: Instruction, max_new_tokens: int) -> str:
    """The model's greedy response to the record's prompt, up to <|endoftext|>."""
    device = next(model.parameters()).device
    prompt = tokenizer.encode_ordinary(format_prompt(record.instruction, record.input))
    budget = min(max_new_tokens, model.config.context_length - len(prompt))
    if budget < 1:
        return ""
    out = generate(model, torch.tensor([prompt], device=device), budget, temperature=0, eos_token=tokenizer.eot_token)
    return tokenizer.decode([t for t in out[0, len(prompt) :].tolist() if t != tokenizer.eot_token])


def answers(model, tokenizer: tiktoken.Encoding, records: list[Instruction], max_new_tokens: int) -> list[str]:
    return [answer(model, tokenizer, record, max_new_tokens) for record in records]


def exact_match(predicted: list[str], expected: list[str]) -> float:
    """Share of answers equal to the expected ones, ignoring case and surrounding space."""
    return sum(p.strip().casefold() == e.strip().casefold() for p, e in zip(predicted, expected)) / max(1, len(expected))
