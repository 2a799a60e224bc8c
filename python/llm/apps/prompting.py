"""A system message, few-shot examples and a user message -> the prompt ids for a model, in
the template it was trained with, and greedy completions of them.

  instruct   the model's chat template (llm.chat_template, recorded in its checkpoint): the
             system message first; the examples as earlier user / assistant turns ("chat"),
             or, for the single-turn "alpaca" template, written into the user's message
  lm         plain text: the system message, then "Input: ... / Output: ..." pairs, then the
             user's input and "Output:" for the model to complete

Few-shot examples are instruction records (llm.finetune.datasets: {"instruction", "input"?,
"output"}), the format fine-tuning reads.
"""

from __future__ import annotations

from llm.chat_template import ChatTemplate, Message
from llm.finetune.datasets import Instruction, read_instructions


def example_text(example: Instruction) -> str:
    return example.instruction + (f"\n{example.input}" if example.input else "")


def read_examples(path: str) -> list[Instruction]:
    """Few-shot examples: instruction records ({"instruction", "input"?, "output"}, JSONL or a JSON list)."""
    examples = read_instructions(path)
    if not all(isinstance(e, Instruction) for e in examples):
        raise ValueError(f"--examples {path}: expected instruction records (instruction, input, output), "
                         "not conversations")
    return examples


def render_messages(template: ChatTemplate, user: str, system: str | None = None,
                    examples: list[Instruction] = ()) -> list[Message]:  # fmt: skip
    """The conversation for a chat template: system, examples as turns (or inline), user."""
    messages = [Message("system", system)] if system else []
    if template.name == "alpaca":  # single-turn: the examples lead the user's message
        shots = "".join(f"Example:\n{example_text(e)}\nAnswer: {e.output}\n\n" for e in examples)
        return messages + [Message("user", shots + user)]
    for example in examples:
        messages += [Message("user", example_text(example)), Message("assistant", example.output)]
    return messages + [Message("user", user)]


def plain_prompt(user: str, system: str | None = None, examples: list[Instruction] = ()) -> str:
    """The same for a plain language model, which has no template: a text to continue."""
    text = "".join(f"{s}\n\n" for s in [system] if s)
    text += "".join(f"Input: {example_text(e)}\nOutput: {e.output}\n\n" for e in examples)
    return text + f"Input: {user}\nOutput:"


def encode_prompt(tokenizer, template: ChatTemplate | None, user: str, system: str | None = None,
                  examples: list[Instruction] = ()) -> list[int]:
    """The ids of the prompt: in the chat template (render_messages), or for a plain language
    model (template None) the text plain_prompt writes."""
    if template is None:
        return tokenizer.encode_ordinary(plain_prompt(user, system, examples))
    return template.prompt_ids(render_messages(template, user, system, examples), tokenizer)


class PromptedModel:
    """A model, its tokenizer and its template, with what the applications need from it:
    prompts in its template, and completions that stop at <|endoftext|>, at a stop string, or
    when the context is full."""

    def __init__(self, model, tokenizer, template: ChatTemplate | None = None, max_new_tokens: int = 64,
                 checkpoint: dict | None = None):  # fmt: skip
        self.model, self.tokenizer, self.chat = model, tokenizer, template
        self.checkpoint = checkpoint or {}  # the checkpoint dict it came from ({} for GPT-2 weights)
        self.max_new_tokens = max_new_tokens
        self.context = model.config.context_length
        self.template = template.name if template else "plain"  # what the application log records
        if self.budget < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"{self.context}-token context")

    @property
    def budget(self) -> int:
        """Prompt tokens that still leave room for max_new_tokens."""
        return self.context - self.max_new_tokens

    def render(self, system: str | None, user: str, examples: list[Instruction] = ()) -> list[int]:
        return encode_prompt(self.tokenizer, self.chat, user, system, examples)

    def count_tokens(self, prompt: list[int]) -> int:
        return len(prompt)

    def text(self, prompt: list[int]) -> str:
        return self.tokenizer.decode(prompt)

    def complete(self, prompt: list[int], stop: list[str] = (), continuation: str = "") -> tuple[str, str, int]:
        """(text, finish_reason, tokens generated) after the prompt ids and `continuation` (text
        the reply already holds, e.g. tool calls and results): "stop" at <|endoftext|>,
        "stop_string" at one of `stop` (cut from the text), "length" when max_new_tokens or
        the context ran out."""
        import torch

        from llm.generate import stream_tokens
        from llm.text_stream import TextStream

        ids = list(prompt) + self.tokenizer.encode_ordinary(continuation)
        if len(ids) >= self.context:
            raise ValueError(f"the prompt takes {len(ids)} tokens, the model's context is {self.context}; "
                             "shorten it")
        device = self.model.transformer.wte.weight.device
        text = TextStream(self.tokenizer, stop=list(stop))
        count, finish_reason = 0, "length"
        budget = min(self.max_new_tokens, self.context - len(ids))
        for token in stream_tokens(self.model, torch.tensor([ids], device=device), budget,
                                   temperature=0.0, eos_token=self.tokenizer.eot_token):  # fmt: skip
            token_id = token.item()
            if token_id == self.tokenizer.eot_token:
                finish_reason = "stop"
                break
            count += 1
            text.push(token_id)
            if text.stopped:
                finish_reason = "stop_string"
                break
        text.finish()
        return text.text, finish_reason, count


def load_prompted_model(source: str, device: str = "auto", use_fused: bool = False, **settings) -> PromptedModel:
    """An llm checkpoint or GPT-2 folder, ready to prompt; settings as for PromptedModel."""
    from llm.chat_template import checkpoint_template
    from llm.checkpoint import checkpoint_task
    from llm.runtime import resolve_device
    from llm.weights import load_model_source

    model, tokenizer, saved = load_model_source(source, use_fused=use_fused)
    task = checkpoint_task(saved)
    if task == "classify":
        raise ValueError(f"{source} is a classifier (task classify): it predicts labels, not text")
    template = checkpoint_template(saved) if task == "instruct" else None
    return PromptedModel(model.to(resolve_device(device)), tokenizer, template, checkpoint=saved, **settings)
