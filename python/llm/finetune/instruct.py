"""Instruction fine-tuning: Alpaca-style records and multi-turn conversations through the
model's chat template (llm.chat_template), each assistant reply followed by <|endoftext|>,
and the loss on assistant replies only.

Each record becomes the template's ids with a per-token "trained" flag, cut to context + 1
tokens. The input x is all but the last token and the target y all but the first
(next-token prediction); targets that are not reply tokens (system, user, the markers) are
-1, which the model's loss ignores, so they condition the replies without being trained
on (unless train_on_prompt). A batch is padded to its longest row, not to the context:
inputs with <|endoftext|>, targets with -1.
"""

from __future__ import annotations

import tiktoken
import torch

from llm.chat_template import ChatTemplate, Message
from llm.finetune.datasets import Conversation, Instruction
from llm.generate import generate

IGNORE = -1  # GPT.forward's ignore_index


def record_messages(record: Instruction | Conversation, template: ChatTemplate) -> list[Message]:
    """The whole record as a conversation (an Alpaca record: one user turn, one reply)."""
    if isinstance(record, Conversation):
        return list(record.messages)
    return template.instruction_messages(record.instruction, record.input) + [Message("assistant", record.output)]


def encode_record(record: Instruction | Conversation, tokenizer: tiktoken.Encoding,
                  template: ChatTemplate) -> tuple[list[int], list[bool]]:
    """(ids, trained): the template's ids and which of them are reply tokens the loss sees."""
    return template.training_ids(record_messages(record, template), tokenizer)


def collate_instructions(
    rows: list[tuple[list[int], list[bool]]], context: int, pad_token: int, train_on_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, trained) rows -> x, y (B, T) with T = the longest row's length - 1, at most context."""
    cut = [(ids[: context + 1], trained[: context + 1]) for ids, trained in rows]
    T = max(len(ids) for ids, _ in cut) - 1
    x = torch.full((len(rows), T), pad_token)
    y = torch.full((len(rows), T), IGNORE)
    for i, (ids, trained) in enumerate(cut):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        targets = torch.tensor(ids[1:])  # y[j] = ids[j + 1]: trained when token j + 1 is
        if not train_on_prompt:
            targets = targets.masked_fill(~torch.tensor(trained[1:]), IGNORE)
        y[i, :n] = targets
    return x, y


class InstructionSet:
    """Encoded records; records whose first reply token lies past the context have nothing
    left to learn from and are dropped (counted in `dropped`). `num_windows` and
    `batch(indices, device)` are what llm.data.BatchLoader reads."""

    def __init__(self, records: list[Instruction | Conversation], tokenizer: tiktoken.Encoding, context: int,
                 train_on_prompt: bool, template: ChatTemplate):
        encoded = [(record, encode_record(record, tokenizer, template)) for record in records]
        kept = [(record, row) for record, row in encoded if row[1].index(True) < context]
        self.records = [record for record, _ in kept]
        self.rows = [row for _, row in kept]
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


def held_out_turn(record: Instruction | Conversation, template: ChatTemplate) -> tuple[list[Message], str]:
    """(the conversation before the record's last reply, that reply): what an answer is judged on."""
    messages = record_messages(record, template)
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    return messages[:last], messages[last].content


@torch.no_grad()
def answer(model, tokenizer: tiktoken.Encoding, record: Instruction | Conversation, max_new_tokens: int,
           template: ChatTemplate) -> str:
    """The model's greedy reply to the record's conversation before its last reply, up to <|endoftext|>."""
    device = next(model.parameters()).device
    prompt = template.prompt_ids(held_out_turn(record, template)[0], tokenizer)
    budget = min(max_new_tokens, model.config.context_length - len(prompt))
    if budget < 1:
        return ""
    out = generate(model, torch.tensor([prompt], device=device), budget, temperature=0, eos_token=tokenizer.eot_token)
    return tokenizer.decode([t for t in out[0, len(prompt) :].tolist() if t != tokenizer.eot_token])


def answers(model, tokenizer: tiktoken.Encoding, records: list, max_new_tokens: int, template: ChatTemplate) -> list[str]:
    return [answer(model, tokenizer, record, max_new_tokens, template) for record in records]


def exact_match(predicted: list[str], expected: list[str]) -> float:
    """Share of answers equal to the expected ones, ignoring case and surrounding space."""
    return sum(p.strip().casefold() == e.strip().casefold() for p, e in zip(predicted, expected)) / max(1, len(expected))
