"""llm-serve through the official `openai` client (sync and async, streamed and not) against a
live server on loopback: the parsed types, usage, every supported field, and concurrent
greedy output equal to llm.generate's. Regression tests for the serving review's defects 3
and 6 (fields every client sends; the whole conversation)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from finetune_helpers import one_thread  # noqa: F401  (autouse: tiny models on a shared CPU)
from serve_helpers import chat_ckpt, library_completion, running, tokenizer  # noqa: F401

from llm.chat_template import Message, get_template
from llm.serving.loading import load_served_model
MODEL = "chat.pt"  # the checkpoint's file name is its model id


@pytest.fixture(scope="module")
def server(chat_ckpt):
    """(base URL, the served model) of one live server for the whole module."""
    served = load_served_model(chat_ckpt, device="cpu")
    with running(served, max_concurrency=8, queue_size=8) as client:
        yield f"{client.base_url}/v1", served


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0) as client:
        yield client


def test_sync_client_completions_and_chat_streamed_and_not(client, chat_ckpt, caplog):
    completion = client.completions.create(model=MODEL, prompt="the quick", max_tokens=6, temperature=0)
    assert isinstance(completion, openai.types.Completion) and completion.object == "text_completion"
    assert completion.choices[0].text == library_completion(chat_ckpt, "the quick", 6, temperature=0)
    usage = completion.usage
    assert isinstance(usage, openai.types.CompletionUsage)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 6

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the fox"}]
    user_hash = hashlib.sha256(b"someone@example.com").hexdigest()[:16]
    with caplog.at_level(logging.INFO, logger="llm.serve"):
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0,
                                              user="someone@example.com", seed=3)
        deadline = time.monotonic() + 5  # the request's log line is written once its response has ended
        while user_hash not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert user_hash in caplog.text  # logged as a hash, never as sent
    assert "someone@example.com" not in caplog.text
    assert isinstance(chat, openai.types.chat.ChatCompletion) and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 5

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == chat.usage.model_dump()  # usage comes last
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == chat.choices[0].message.content

    streamed = list(client.completions.create(model=MODEL, prompt="the quick", max_tokens=6, temperature=0,
                                              stream=True))
    assert all(isinstance(c, openai.types.Completion) and c.usage is None for c in streamed)  # no usage: not asked
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_async_client_concurrent_greedy_output_equals_the_librarys(server, chat_ckpt):
    prompts = ["the", "the quick brown", "lazy dog", "over the lazy", "fox", "jumps over", "quick", "dog; the"]
    lengths = [12, 3, 9, 5, 14, 4, 7, 10]  # rows finish at different steps: freed rows are refilled

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=server[0], api_key="unused", max_retries=0) as client:
            async def streamed(prompt, length):
                stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=length, temperature=0,
                                                         stream=True)
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

            plain = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                     for p, n in zip(prompts, lengths)]
            return await asyncio.gather(*plain, *map(streamed, prompts, lengths))

    answers = asyncio.run(ask_all())
    expected = [library_completion(chat_ckpt, p, n, temperature=0) for p, n in zip(prompts, lengths)]
    assert all(isinstance(a, openai.types.Completion) for a in answers[: len(prompts)])
    assert [a.choices[0].text for a in answers[: len(prompts)]] == expected
    assert answers[len(prompts):] == expected


def test_n_choices_are_rows_seeds_repeat_and_stop_cuts(client):
    request = dict(model=MODEL, prompt="the quick", max_tokens=8, temperature=1.0, seed=11)
    first = client.completions.create(n=3, **request)
    again = client.completions.create(n=3, **request)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in first.choices}) > 1  # each choice samples on its own
    assert 3 <= first.usage.completion_tokens <= 3 * 8  # every row's tokens
    assert first.usage.prompt_tokens == client.completions.create(max_tokens=1, **{
        k: v for k, v in request.items() if k != "max_tokens"}).usage.prompt_tokens  # the prompt counted once
    greedy = client.completions.create(model=MODEL, prompt="the quick", max_tokens=30, temperature=0).choices[0].text
    stops = [greedy[4:6], greedy[9:11], "never", "nor this"]
    cut = client.completions.create(model=MODEL, prompt="the quick", max_tokens=30, temperature=0, stop=stops)
    assert cut.choices[0].text == greedy[: min(greedy.find(s) for s in stops if s in greedy)]
    assert cut.choices[0].finish_reason == "stop"
    chats = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                           max_completion_tokens=4, seed=5)
    assert [c.index for c in chats.choices] == [0, 1]
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                                 max_completion_tokens=4, seed=5, stream=True))
    for index in (0, 1):  # a stream interleaves the choices, each told apart by its index
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == chats.choices[index].message.content
        assert mine[-1].finish_reason == chats.choices[index].finish_reason
    # Several prompts: choice index = prompt * n + j, each as the prompt alone would give.
    several = client.completions.create(model=MODEL, prompt=["the", "lazy dog"], n=2, max_tokens=5, temperature=0)
    alone = client.completions.create(model=MODEL, prompt="lazy dog", max_tokens=5, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[2].text == several.choices[3].text == alone.choices[0].text


def reference_decode(served, prompt_ids, steps, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding with OpenAI's penalties, written out here on the model's full forward:
    logit[j] - count[j] * frequency - (count[j] > 0) * presence + bias[j]."""
    ids, counts = list(prompt_ids), {}
    with torch.no_grad():
        for _ in range(steps):
            logits = served.model(torch.tensor([ids]))[0][0, -1].double()
            for token, count in counts.items():
                logits[token] -= count * frequency + presence
            for token, value in (bias or {}).items():
                logits[token] += value
            token = int(logits.argmax())
            if token == served.tokenizer.eot_token:
                break
            ids.append(token)
            counts[token] = counts.get(token, 0) + 1
    return ids[len(prompt_ids):]


def test_penalties_follow_openais_formula_and_logit_bias_applies(client, server):
    served = server[1]
    prompt = served.tokenizer.encode("the quick")
    plain = reference_decode(served, prompt, 20)
    for presence, frequency in [(1.5, 0.0), (0.0, 1.0), (0.7, -0.4)]:
        expected = reference_decode(served, prompt, 20, presence, frequency)
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                           presence_penalty=presence, frequency_penalty=frequency)
        assert answer.choices[0].text == served.tokenizer.decode(expected), (presence, frequency)
        assert expected != plain or presence == frequency == 0  # the penalty changed the greedy text
    favourite = plain[0] + 1
    biased = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                       logit_bias={str(favourite): 100})
    assert biased.choices[0].text == served.tokenizer.decode([favourite] * 5)


def test_completion_logprobs_with_echo_give_the_prompts_log_likelihood(client, server):
    """What lm-evaluation-harness's local-completions sends for log-likelihood tasks."""
    served = server[1]
    prompt = served.tokenizer.encode("the quick brown fox")
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True)
    logprobs = answer.choices[0].logprobs
    with torch.no_grad():
        expected = served.model(torch.tensor([prompt]))[0][0].log_softmax(-1)  # (T, V)
    assert len(logprobs.tokens) == len(prompt) + 1 and logprobs.token_logprobs[0] is None
    for t in range(1, len(prompt)):
        assert math.isclose(logprobs.token_logprobs[t], expected[t - 1, prompt[t]].item(), abs_tol=1e-4)
        assert len(logprobs.top_logprobs[t]) == 2
        assert math.isclose(max(logprobs.top_logprobs[t].values()), expected[t - 1].max().item(), abs_tol=1e-4)
    generated = expected[-1].argmax().item()  # greedy: the most likely token, and its logprob
    assert math.isclose(logprobs.token_logprobs[-1], expected[-1, generated].item(), abs_tol=1e-4)
    assert answer.choices[0].text.startswith(served.tokenizer.decode(prompt))
    assert logprobs.text_offset[:3] == [0, len(logprobs.tokens[0]), len(logprobs.tokens[0]) + len(logprobs.tokens[1])]


def test_chat_logprobs_and_top_logprobs(client, server):
    served = server[1]
    messages = [Message("system", "Be brief."), Message("user", "the fox")]
    answer = client.chat.completions.create(model=MODEL, messages=[vars(m) for m in messages], max_completion_tokens=4,
                                            temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    prompt = get_template("chat").prompt_ids(messages, served.tokenizer)
    with torch.no_grad():
        first = served.model(torch.tensor([prompt]))[0][0, -1].log_softmax(-1)
    assert 1 <= len(content) <= 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert math.isclose(content[0].logprob, first.max().item(), abs_tol=1e-4)  # greedy: the top token
    assert content[0].top_logprobs[0].token == content[0].token and bytes(content[0].bytes).decode() == content[0].token
    streamed = client.chat.completions.create(model=MODEL, messages=[vars(m) for m in messages], max_tokens=4,
                                              temperature=0, logprobs=True, top_logprobs=3, stream=True)
    tokens = [c.choices[0].logprobs.content[0].token for c in streamed if c.choices and c.choices[0].logprobs]
    assert tokens == [entry.token for entry in content]


def test_unsupported_fields_are_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert refused.value.status_code == 400 and refused.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    assert refused.value.body["param"] == "response_format" and "not supported" in refused.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
