"""A system message, few-shot examples and a user message -> the prompt text for a model,
in the template the model was trained with.

  instruct   the instruction template (llm.prompt_template): the system message and the
             examples lead the instruction, the user's text follows
  lm         plain text: the system message, then "Input: ... / Output: ..." pairs, then the
             user's input and "Output:" for the model to complete

Few-shot examples are instruction records (llm.finetune.datasets: JSONL or a JSON list of
{"instruction", "input"?, "output"}), the same format fine-tuning reads.
"""

from __future__ import annotations

from llm.finetune.datasets import Instruction
from llm.prompt_template import format_prompt

TEMPLATES = {"instruct": "alpaca", "lm": "plain"}


def example_text(example: Instruction) -> str:
    return example.instruction + (f"\n{example.input}" if example.input else "")


def render_prompt(task: str, user: str, system: str | None = None, examples: list[Instruction] = (),
                  user_input: str | None = None) -> str:  # fmt: skip
    """The prompt for a model of `task` ("lm" or "instruct"); `user_input`: the instruction's input."""
    shots = [(example_text(e), e.output) for e in examples]
    if task == "instruct":
        lead = "".join(f"{s}\n\n" for s in [system] if s)
        lead += "".join(f"Example:\n{question}\nAnswer: {answer}\n\n" for question, answer in shots)
        return format_prompt(lead + user, user_input)
    text = "".join(f"{s}\n\n" for s in [system] if s)
    text += "".join(f"Input: {question}\nOutput: {answer}\n\n" for question, answer in shots)
    return text + f"Input: {user}" + (f"\n{user_input}" if user_input else "") + "\nOutput:"


class PromptedModel:
    """A model, its tokenizer and its task, with what the applications need from it: the
    prompt in its template, token counts, and greedy (or sampled) completions that stop at
    <|endoftext|>, at a stop string, or when the context is full."""

    def __init__(self, model, tokenizer, task: str = "lm", max_new_tokens: int = 64, seed: int = 1337, **sampling):
        if task not in TEMPLATES:
            raise ValueError(f"a {task} model does not generate text; use an lm or instruct checkpoint")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.sampling = {"temperature": 0.0, **sampling}
        self.context = model.config.context_length
        self.template = TEMPLATES[task]
        if self.budget < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"{self.context}-token context")

    @property
    def budget(self) -> int:
        """Prompt tokens that still leave room for max_new_tokens."""
        return self.context - self.max_new_tokens

    def render(self, system: str | None, user: str, examples: list[Instruction] = ()) -> str:
        return render_prompt(self.task, user, system, examples)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, allowed_special="all"))

    def complete(self, prompt: str, stop: list[str] = ()) -> tuple[str, str, int]:
        """(text, finish_reason, tokens generated): "stop" at <|endoftext|>, "stop_string" at one
        of `stop` (cut from the text), "length" when max_new_tokens or the context ran out."""
        import torch

        from llm.generate import stream_tokens
        from llm.text_stream import TextStream

        ids = self.tokenizer.encode(prompt, allowed_special="all") or [self.tokenizer.eot_token]
        if len(ids) >= self.context:
            raise ValueError(f"the prompt takes {len(ids)} tokens, the model's context is {self.context}; "
                             "shorten it")
        device = self.model.transformer.wte.weight.device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        text = TextStream(self.tokenizer, stop=list(stop))
        count, finish_reason = 0, "length"
        budget = min(self.max_new_tokens, self.context - len(ids))
        for token in stream_tokens(self.model, torch.tensor([ids], device=device), budget,
                                   eos_token=self.tokenizer.eot_token, generator=generator, **self.sampling):  # fmt: skip
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
    from llm.checkpoint import checkpoint_task
    from llm.runtime import resolve_device
    from llm.weights import load_model_source

    model, tokenizer, saved = load_model_source(source, use_fused=use_fused)
    return PromptedModel(model.to(resolve_device(device)), tokenizer, checkpoint_task(saved), **settings)
