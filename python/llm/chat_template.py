"""Chat templates: how a conversation becomes the token ids a model is trained and prompted on.

One place for every template, shared by instruction fine-tuning, llm-generate, llm-eval
and llm-serve's /v1/chat/completions, so a model is always prompted the way it was trained.
A checkpoint records its template (key "chat_template"); an instruction checkpoint without
the key was trained before multi-turn chat existed and uses "alpaca".

"chat" (multi-turn; what llm-finetune --task instruct trains now):

    <|system|>\\n{system}\\n             <- optional, first
    <|user|>\\n{user}\\n
    <|assistant|>\\n{reply}<|endoftext|>  <- loss on {reply}<|endoftext|> only
    <|user|>\\n{user}\\n
    <|assistant|>\\n                     <- at inference the prompt ends here; the model writes the rest

"alpaca" (single-turn, for instruction models trained before "chat"):

    Below is an instruction that describes a task. Write a response ...   <- or the system message
    (blank line)
    ### Instruction:
    {instruction}
    (blank line)
    ### Input:            <- only when the record has a non-empty input
    {input}
    (blank line)
    ### Response:
    {output}<|endoftext|>

The markers are plain text, not special tokens: message content is always encoded as
ordinary text, so a client cannot forge a turn boundary or an <|endoftext|>.
"""

from __future__ import annotations

from dataclasses import dataclass

import tiktoken

ROLES = ("system", "user", "assistant")
EOT = object()  # a segment that is the tokenizer's <|endoftext|> token


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


class ChatTemplate:
    """A conversation -> token ids. Subclasses say how each turn reads (`_segments`)."""

    name = ""

    def prompt_ids(self, messages: list[Message], tokenizer: tiktoken.Encoding) -> list[int]:
        """The conversation so far (ending with a user message), up to where the assistant's
        reply starts: what the model continues. Raises ValueError naming what is wrong."""
        self._check(messages)
        if messages[-1].role != "user":
            raise ValueError(f"messages: the last message must be the user's, got role {messages[-1].role!r}")
        return [t for segment, _ in self._segments(messages, reply_next=True) for t in _encode(segment, tokenizer)]

    def training_ids(self, messages: list[Message], tokenizer: tiktoken.Encoding) -> tuple[list[int], list[bool]]:
        """(ids, trained): trained[i] is True for the tokens of assistant replies and the
        <|endoftext|> ending each, the only tokens the loss sees."""
        self._check(messages)
        if not any(m.role == "assistant" for m in messages):
            raise ValueError("messages: a training conversation needs at least one assistant message")
        ids, trained = [], []
        for segment, is_reply in self._segments(messages, reply_next=False):
            encoded = _encode(segment, tokenizer)
            ids += encoded
            trained += [is_reply] * len(encoded)
        return ids, trained

    def instruction_messages(self, instruction: str, input: str = "") -> list[Message]:
        """An Alpaca-style (instruction, input) record as a user message."""
        return [Message("user", f"{instruction}\n\n{input}" if input else instruction)]

    def _check(self, messages: list[Message]) -> None:
        if not messages:
            raise ValueError("messages: at least one message is needed")
        for i, message in enumerate(messages):
            if message.role not in ROLES:
                raise ValueError(f"messages.{i}.role: expected one of {', '.join(ROLES)}, got {message.role!r}")
            if message.role == "system" and i > 0:
                raise ValueError(f"messages.{i}: a system message may only come first")

    def _segments(self, messages: list[Message], reply_next: bool):
        """(text or EOT, is part of an assistant reply) in order."""
        raise NotImplementedError


class MultiTurnTemplate(ChatTemplate):
    name = "chat"

    def _segments(self, messages, reply_next):
        for message in messages:
            if message.role == "assistant":
                yield "<|assistant|>\n", False
                yield message.content, True
                yield EOT, True  # the model learns to end its turn
            else:
                yield f"<|{message.role}|>\n{message.content}\n", False
        if reply_next:
            yield "<|assistant|>\n", False


class AlpacaTemplate(ChatTemplate):
    name = "alpaca"
    PREAMBLE = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")

    def instruction_messages(self, instruction: str, input: str = "") -> list[Message]:
        # Rendered under "### Instruction:", this reads exactly as Alpaca's own Input section.
        return [Message("user", f"{instruction}\n\n### Input:\n{input}" if input else instruction)]

    def _check(self, messages):
        super()._check(messages)
        turns = [m.role for m in messages if m.role != "system"]
        if turns not in (["user"], ["user", "assistant"]):
            raise ValueError("messages: this model was fine-tuned on single-turn Alpaca prompts; send one user "
                             "message (after an optional system message, which replaces the preamble)")

    def _segments(self, messages, reply_next):
        system = messages[0].content if messages[0].role == "system" else self.PREAMBLE
        user = next(m for m in messages if m.role == "user")
        yield f"{system}\n\n### Instruction:\n{user.content}\n\n### Response:\n", False
        for message in messages:
            if message.role == "assistant":
                yield message.content, True
                yield EOT, True


TEMPLATES = {template.name: template for template in (MultiTurnTemplate(), AlpacaTemplate())}
DEFAULT_TEMPLATE = "chat"  # what new instruction fine-tunes record
LEGACY_TEMPLATE = "alpaca"  # an instruction checkpoint without a "chat_template" key


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def checkpoint_template(checkpoint: dict) -> ChatTemplate:
    """The template an instruction checkpoint was trained with (absent: alpaca)."""
    return get_template(checkpoint.get("chat_template", LEGACY_TEMPLATE))


def _encode(segment, tokenizer: tiktoken.Encoding) -> list[int]:
    return [tokenizer.eot_token] if segment is EOT else tokenizer.encode_ordinary(segment)
