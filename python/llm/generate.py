"""Text generation: temperature, top-k, top-p, stop at <|endoftext|>, KV cache.

With the KV cache (default) the prompt runs once (prefill) and each new token then
costs one position: its query attends to the cached keys/values (query length 1,
key length S). With use_fused, that decode step goes through
llmkernels.flash_attention, whose bottom-right-aligned causal mask handles Sq != Sk: on a
GPU the Triton kernel takes it (the CUDA kernel needs Sq == Sk).

The llm-generate command over these is llm.generate_cli.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import tiktoken
import torch

from llm.model import GPT
from llm.text_stream import TextStream


# Below this temperature sampling is greedy: logits / T would overflow to inf (3e-38 does),
# and the distribution is an argmax in all but name long before that.
GREEDY_BELOW = 1e-5


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the setting unless temperature >= 0, top_k >= 1, 0 < top_p <= 1."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")


@torch.no_grad()
def stream_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """prompt (B, T) -> yields each step's new tokens (B, 1), at most max_new_tokens times.

    temperature 0 means greedy. Stops once every row has produced eos_token (rows that
    finished earlier keep emitting eos_token). Sampling draws only from `generator`, never
    from the global RNG. Without the cache, a sequence longer than the context is cropped
    to its last context_length tokens; with the cache, a full cache is refilled from the
    last half-context of tokens. Closing the generator early (a client that went away)
    simply stops the loop.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = model.config.context_length
    B, T = prompt.shape
    if T == 0:
        raise ValueError("the prompt must hold at least one token")
    if T > context:
        raise ValueError(f"prompt of {T} tokens is longer than the model's context_length {context}")
    was_training = model.training
    model.eval()
    try:
        tokens = prompt
        cache = model.new_kv_cache(B) if use_cache else None
        next_input = tokens  # what the model has not seen yet
        finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = model(tokens[:, -context:])  # (B, T', V)
            else:
                if cache.length + next_input.shape[1] > context:  # full: restart from recent tokens
                    cache.reset()
                    next_input = tokens[:, -(context // 2) :]
                logits, _ = model(next_input, kv_cache=cache)  # (B, T', V)
            next_token = sample_next_token(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token is not None:
                next_token = torch.where(finished[:, None], eos_token, next_token)
                finished |= next_token[:, 0] == eos_token
            tokens = torch.cat([tokens, next_token], dim=1)  # (B, T) -> (B, T+1)
            next_input = next_token
            yield next_token
            if finished.all():
                break
    finally:
        model.train(was_training)


def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """prompt (B, T) -> (B, T + n) with n <= max_new_tokens new tokens; `sampling` as for
    stream_tokens (temperature, top_k, top_p, eos_token, use_cache, generator)."""
    new_tokens = list(stream_tokens(model, prompt, max_new_tokens, **sampling))  # n x (B, 1)
    return torch.cat([prompt, *new_tokens], dim=1)  # (B, T) -> (B, T + n)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1). Temperatures below GREEDY_BELOW are greedy."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)  # greedy
    logits = logits / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        # Keep the smallest set of most likely tokens whose probabilities sum to >= top_p.
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(dim=-1)  # (B, V)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the tokens before suffice
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def adjust_logits(
    logits: torch.Tensor,
    counts: torch.Tensor | None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> torch.Tensor:
    """OpenAI's penalties and logit bias: logits (B, V) and counts (B, V), how often each token
    appears in the text generated so far, -> logits[j] - counts[j] * frequency_penalty
    - (counts[j] > 0) * presence_penalty + logit_bias[j]."""
    if counts is not None and (presence_penalty or frequency_penalty):
        logits = logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty
    if logit_bias:
        ids = torch.tensor(list(logit_bias), device=logits.device)
        logits = logits.index_add(-1, ids, torch.tensor(list(logit_bias.values()), device=logits.device,
                                                        dtype=logits.dtype).expand(logits.shape[0], -1))
    return logits


def complete(
    model: GPT,
    tokenizer: tiktoken.Encoding,
    prompt: str,
    max_new_tokens: int,
    seed: int = 1337,
    **sampling,
) -> str:
    """Prompt text -> prompt + generated text (stops at <|endoftext|>)."""
    device = model.transformer.wte.weight.device
    ids = tokenizer.encode(prompt, allowed_special="all") or [tokenizer.eot_token]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens,
        eos_token=tokenizer.eot_token,
        generator=generator,
        **sampling,
    )
    new_ids = [t for t in out[0, len(ids) :].tolist() if t != tokenizer.eot_token]
    return prompt + tokenizer.decode(new_ids)


def stream_text(
    model: GPT,
    tokenizer: tiktoken.Encoding,
    prompt_ids: list[int],
    max_new_tokens: int,
    seed: int = 1337,
    **sampling,
) -> Iterator[str]:
    """The generated text piece by piece as tokens arrive, up to <|endoftext|>. A BPE token
    can end inside a multi-byte character; TextStream holds such bytes back until the
    character is complete, so every piece is valid text."""
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.tensor([prompt_ids], device=device)  # (1, T)
    text = TextStream(tokenizer, stop=[])
    for token in stream_tokens(model, prompt, max_new_tokens, eos_token=tokenizer.eot_token, generator=generator,
                               **sampling):  # fmt: skip
        token_id = token.item()  # waits for the device: once per token
        if token_id == tokenizer.eot_token:
            break
        piece = text.push(token_id)
        if piece:
            yield piece
    tail = text.finish()
    if tail:
        yield tail
