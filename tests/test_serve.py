"""llm-serve: the real server (uvicorn on a free loopback port, in a thread) with a tiny
random-weight model, talked to over HTTP with httpx; plus the per-row KV cache and the
incremental text against the library's own paths.

A test that needs requests to overlap slows the model down (a sleep in its forward), so
that batching, queueing, disconnects and timeouts are observed, not raced.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time

import pytest
import torch

# Not on the GPU machine (see conftest.OPTIONAL_TEST_PACKAGES); CI requires them.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from finetune_helpers import one_thread  # noqa: F401  (autouse: tiny models on a shared CPU)
from serve_helpers import (CONTEXT, HTTP_TIMEOUT, chat_ckpt, health, instruct_ckpt, instruct_server,  # noqa: F401
                           library_completion, lm_ckpt, running, slowed, sse_events, tokenizer, write_checkpoint)

from llm.chat_template import Message, get_template
from llm.config import GPTConfig
from llm.generate import complete
from llm.model import GPT
from llm.serve import main as serve_main
from llm.serving.loading import load_served_model
from llm.serving.launch import serve_in_subprocess
from llm.serving.row_cache import RowKVCache
from llm.text_stream import TextStream
from llm.tokenizer import gpt2_tokenizer
from llm.weights import save_hf

# --------------------------------------------------------------------------- the batched decoding path
def test_row_cache_batched_decode_matches_one_sequence_at_a_time(generator):
    """Three sequences of different lengths decoded in one forward per step give each the
    logits that the model's own KVCache gives it alone."""
    config = GPTConfig(vocab_size=97, context_length=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(1)
    model = GPT(config).eval()
    prompts = [torch.randint(0, 97, (1, n), generator=generator) for n in (5, 1, 11)]
    steps = [torch.randint(0, 97, (3, 1), generator=generator) for _ in range(4)]
    with torch.no_grad():
        alone = []
        for b, prompt in enumerate(prompts):
            cache = model.new_kv_cache(1)
            model(prompt, kv_cache=cache)
            alone.append(torch.cat([model(step[b : b + 1], kv_cache=cache)[0] for step in steps], dim=1))  # (1, 4, V)
        rows = RowKVCache(config, capacity=4, device="cpu", dtype=torch.float32)
        for b, prompt in enumerate(prompts):
            rows.select(b, b + 1)
            model(prompt, kv_cache=rows)
        rows.select(0, 3)
        batched = torch.cat([model(step, kv_cache=rows)[0] for step in steps], dim=1)  # (3, 4, V)
    assert rows.lengths[:3] == [9, 5, 15]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=0, atol=1e-5)

    # Freeing row 0 moves row 2 into it; it decodes on as before.
    rows.move_row(2, 0)
    rows.select(0, 1)
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.cat([prompts[2], *[s[2:3] for s in steps]], dim=1), kv_cache=cache)
        nxt = torch.randint(0, 97, (1, 1), generator=generator)
        torch.testing.assert_close(model(nxt, kv_cache=rows)[0], model(nxt, kv_cache=cache)[0], rtol=0, atol=1e-5)


def test_text_stream_holds_back_partial_characters_and_cuts_at_stop_sequences():
    enc = gpt2_tokenizer()
    text = "Hé said: STOP now. More text"
    ids = enc.encode(text)
    stream = TextStream(enc, ["STOP", "xyz"])
    released = [stream.push(t) for t in ids]
    assert "".join(released) == "Hé said: " and stream.stopped
    assert not any("S" in piece for piece in released)  # "S", "ST", ... held back until ruled out or matched
    assert stream.finish() == ""

    stream = TextStream(enc, [])
    pieces = [stream.push(t) for t in enc.encode("naïve 😀 end")] + [stream.finish()]
    assert "".join(pieces) == "naïve 😀 end" and "\ufffd" not in "".join(pieces)  # never half a character
    stream = TextStream(enc, ["😀"])  # a stop sequence across byte-level tokens
    assert "".join(stream.push(t) for t in enc.encode("a 😀 b")) == "a " and stream.stopped


# --------------------------------------------------------------------------- endpoints
def test_completion_matches_the_library_and_reports_usage(instruct_server, instruct_ckpt, tokenizer):
    prompt = "the quick brown"
    response = instruct_server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "instruct.pt"
    choice = body["choices"][0]
    assert choice["text"] == library_completion(instruct_ckpt, prompt, 12, temperature=0)
    n_prompt = len(tokenizer.encode(prompt))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["total_tokens"] == n_prompt + body["usage"]["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 12
    else:  # <|endoftext|> came first
        assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] <= 12

    models = instruct_server.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["instruct.pt"]
    info = health(instruct_server)
    assert info["status"] == "ok" and info["model_loaded"] and info["device"] == "cpu" and info["task"] == "instruct"
    assert info["requests"]["completed"] == 1 and info["tokens_generated"] == body["usage"]["completion_tokens"]


def test_seed_reproduces_a_sample_and_matches_the_library(instruct_server, instruct_ckpt):
    request = {"prompt": "over the", "max_tokens": 20, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    first = instruct_server.post("/v1/completions", json={**request, "seed": 7}).json()["choices"][0]["text"]
    again = instruct_server.post("/v1/completions", json={**request, "seed": 7}).json()["choices"][0]["text"]
    other = instruct_server.post("/v1/completions", json={**request, "seed": 8}).json()["choices"][0]["text"]
    assert first == again != other
    assert first == library_completion(instruct_ckpt, "over the", 20, seed=7, temperature=1.0, top_k=50, top_p=0.95)


def test_stop_sequences_end_the_text_before_them(instruct_server):
    request = {"prompt": "lazy dog", "max_tokens": 40, "temperature": 0}
    full = instruct_server.post("/v1/completions", json=request).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2, f"the greedy text {full!r} is too short to pick a stop sequence from"
    expected = full[: full.find(stop)]
    body = instruct_server.post("/v1/completions", json={**request, "stop": ["never appears", stop]}).json()
    assert body["choices"][0] == {"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}
    with instruct_server.stream("POST", "/v1/completions", json={**request, "stop": stop, "stream": True}) as response:
        events = list(sse_events(response))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_checked_chat_takes_four_stop_sequences_of_its_own(instruct_server):
    """With tools (or guardrails, grounding) the server also stops at a tool call's end; that
    stop is the server's, not one of the client's four (OpenAI's most)."""
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers."}}]
    for stream in (False, True):
        response = instruct_server.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "tools": tools, "stop": ["w", "x", "y", "z"],
            "max_tokens": 3, "stream": stream})
        assert response.status_code == 200, response.text


def test_streaming_sends_one_event_per_token_as_they_are_generated(instruct_ckpt):
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.02)
    request = {"prompt": "the", "max_tokens": 30, "temperature": 0}
    with running(served) as client:
        expected = client.post("/v1/completions", json=request).json()
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
            first = next(events)
            # The first token's event is here while the rest is still being generated.
            assert health(client)["requests"]["active"] == 1
            rest = list(events)
    assert rest[-1] == "[DONE]"
    chunks = [first, *rest[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == first["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert len(chunks) - 1 == expected["usage"]["completion_tokens"] - (chunks[-1]["choices"][0]["finish_reason"] == "stop")
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["choices"][0]["text"]


def test_chat_prompts_the_whole_conversation_in_the_models_template(chat_ckpt, instruct_ckpt, tokenizer):
    """Review defect 6: the system message and every earlier turn are part of the prompt, in
    the checkpoint's own template; an Alpaca (single-turn) model keeps working."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."},
                {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "And a dog?"}]
    template = get_template("chat")
    prompt_ids = template.prompt_ids([Message(**m) for m in messages], tokenizer)
    with running(load_served_model(chat_ckpt, device="cpu")) as client:
        assert health(client)["chat_template"] == "chat"
        chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10, "temperature": 0})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        templated = client.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": 10,
                                                          "temperature": 0}).json()
        assert body["choices"][0]["message"]["content"] == templated["choices"][0]["text"]
        assert body["usage"] == templated["usage"] and body["usage"]["prompt_tokens"] == len(prompt_ids)
        stream_request = {"messages": messages, "max_tokens": 10, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=stream_request) as response:
            events = list(sse_events(response))
        assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("length", "stop")
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert streamed == body["choices"][0]["message"]["content"]

    alpaca = get_template("alpaca")
    with running(load_served_model(instruct_ckpt, device="cpu")) as client:  # no "chat_template" key: alpaca
        single = client.post("/v1/chat/completions", json={"messages": messages[1:2], "max_tokens": 5, "temperature": 0})
        ids = alpaca.prompt_ids([Message("user", "Name a fox.")], tokenizer)
        assert single.status_code == 200 and single.json()["usage"]["prompt_tokens"] == len(ids)
        multi = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5})
        assert multi.status_code == 400 and "single-turn" in multi.json()["error"]["message"]


def test_serves_a_hugging_face_gpt2_folder_with_the_fused_ops(tmp_path):
    torch.manual_seed(0)
    save_hf(GPT(GPTConfig(n_embd=32, n_layer=2, n_head=2, context_length=64)), tmp_path / "gpt2-small-random")
    served = load_served_model(tmp_path / "gpt2-small-random", device="cpu", use_fused=True)
    assert served.task == "lm" and served.model.config.use_fused
    request = {"prompt": "Hello, world", "max_tokens": 6, "temperature": 0}
    with running(served) as client:
        text = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
        info = health(client)
    assert text == complete(served.model, gpt2_tokenizer(), "Hello, world", 6, temperature=0)[len("Hello, world"):]
    assert info["model"] == "gpt2-small-random" and info["use_fused"]
    assert info["kernel_backends"]["reference"]["usable"]  # what llmkernels can run here


def test_chat_is_refused_for_a_model_that_is_not_instruction_tuned(lm_ckpt):
    with running(load_served_model(lm_ckpt, device="cpu")) as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
        assert "not instruction-tuned" in response.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 40
CHAT = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (endpoint, JSON body or raw bytes, status, param, words the message must contain)
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, 400, "top_k", "top_k"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens", "at most"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt", "context"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 101}}, 400, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal to 2"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "not served"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("/v1/completions", b'{"prompt": "x",', 400, None, "malformed JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "role"),
    ("/v1/chat/completions", {"messages": CHAT + [{"role": "assistant", "content": "x"}]}, 400, "messages", "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages", "context"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 9}, 400, "n", "less than or equal to 8"),
    ("/v1/chat/completions", {"messages": CHAT, "parallel_tool_calls": True}, 400, "parallel_tool_calls", "not supported"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools.0.function.name", "pattern"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs: true"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, 400, "stream", "boolean"),
]


def test_bad_requests_get_a_4xx_with_one_line_and_the_server_carries_on(instruct_server):
    for endpoint, body, status, param, words in BAD_REQUESTS:
        if isinstance(body, bytes):
            response = instruct_server.post(endpoint, content=body, headers={"Content-Type": "application/json"})
        elif any(isinstance(v, float) and v != v for v in body.values()):
            response = instruct_server.post(endpoint, content=json.dumps(body),  # NaN: JSON extension Python reads
                                            headers={"Content-Type": "application/json"})
        else:
            response = instruct_server.post(endpoint, json=body)
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (status, param), (body, response.text)
        assert set(error) == {"message", "type", "param", "code"} and error["type"]
        assert words in error["message"] and "\n" not in error["message"], (body, error["message"])
    not_found = instruct_server.get("/v1/nothing")
    assert not_found.status_code == 404 and "error" in not_found.json()
    assert instruct_server.get("/v1/completions").status_code == 405
    assert health(instruct_server)["requests"]["completed"] == 0  # none of them generated anything
    assert instruct_server.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_failing_generation_is_a_500_and_the_server_carries_on(instruct_ckpt):
    served = load_served_model(instruct_ckpt, device="cpu")
    forward, failures = served.model.forward, [RuntimeError("boom in prefill"), RuntimeError("boom in decode")]

    def forward_that_fails_twice(idx, *args, **kwargs):
        if failures and (idx.shape[1] > 1) == (len(failures) == 2):  # first a prefill, then a decode step
            raise failures.pop(0)
        return forward(idx, *args, **kwargs)

    served.model.forward = forward_that_fails_twice
    with running(served) as client:
        response = client.post("/v1/completions", json={"prompt": "the quick brown fox", "max_tokens": 4})
        assert response.status_code == 500 and "boom in prefill" in response.json()["error"]["message"]
        with client.stream("POST", "/v1/completions", json={"prompt": "the quick brown fox", "max_tokens": 4, "stream": True}) as stream:
            events = list(sse_events(stream))
        assert "boom in decode" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        assert client.post("/v1/completions", json={"prompt": "the quick brown fox", "max_tokens": 4}).status_code == 200
        info = health(client)
    assert info["status"] == "ok" and info["requests"]["failed"] == 2 and info["requests"]["completed"] == 1


# --------------------------------------------------------------------------- load
def test_burst_is_batched_and_answered_200_or_429(instruct_ckpt):
    """50 concurrent requests against 2 decoding rows and a queue of 3: every one answered,
    none lost or hung; the first ones batched; the rest refused with Retry-After."""
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.005)

    async def burst(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
            requests = [client.post("/v1/completions", json={"prompt": f"fox {i}", "max_tokens": 8, "seed": i})
                        for i in range(50)]
            return await asyncio.wait_for(asyncio.gather(*requests), timeout=120)

    with running(served, max_concurrency=2, queue_size=3) as client:
        responses = asyncio.run(burst(str(client.base_url)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        refused = [r for r in responses if r.status_code == 429]
        assert refused and statuses.count(200) >= 5  # the first five found room
        assert all(r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
                   for r in refused)
        info = health(client)
    assert info["status"] == "ok"
    assert info["requests"] == {"active": 0, "queued": 0, "completed": statuses.count(200), "cancelled": 0,
                                "timed_out": 0, "rejected": len(refused), "failed": 0}
    assert info["largest_batch"] == 2  # decoded together, never more than --max-concurrency


def test_client_that_disconnects_stops_its_generation(instruct_ckpt):
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.02)
    with running(served) as client:
        request = {"prompt": "the", "max_tokens": 150, "temperature": 0}
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
            events = sse_events(response)
            next(events), next(events)
        # A non-streaming client that gives up is noticed too (the server polls for it).
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=request, timeout=0.3)
        deadline = time.monotonic() + 20
        while (info := health(client))["requests"]["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert info["requests"]["cancelled"] == 2 and info["requests"]["active"] == 0
    assert info["requests"]["completed"] == 0
    assert info["tokens_generated"] < 100  # of the 300 asked for: both stopped early


def test_requests_past_the_timeout_end_with_504_or_a_timeout_finish_reason(instruct_ckpt):
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.02)
    with running(served, timeout_s=0.3) as client:
        request = {"prompt": "the", "max_tokens": 150, "temperature": 0}  # greedy: no <|endoftext|> in 150
        response = client.post("/v1/completions", json=request)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as stream:
            events = list(sse_events(stream))
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "timeout"
        assert health(client)["requests"]["timed_out"] == 2


# --------------------------------------------------------------------------- command line
def test_command_line_refuses_bad_input_in_one_line(tmp_path, tokenizer, capsys):
    classify = write_checkpoint(tmp_path / "classify.pt", tokenizer, "classify")
    for argv, words in [(["--ckpt", str(classify)], "'classify' checkpoint"),
                        (["--ckpt", str(tmp_path / "missing.pt")], "not found"),
                        (["--ckpt", str(tmp_path)], "config.json"),
                        (["--ckpt", str(classify), "--port", "70000"], "--port"),
                        (["--ckpt", str(classify), "--timeout", "0"], "--timeout"),
                        (["--ckpt", str(classify), "--device", "tpu"], "--device"),
                        (["--checkpoint", str(classify), "--drain-timeout", "-1"], "--drain-timeout"),
                        (["--ckpt", str(classify), "--api-key-file", str(tmp_path / "keys.txt")], "--api-key-file"),
                        (["--ckpt", str(classify), "--rag-index", str(tmp_path / "index")], "--rag-index")]:
        with pytest.raises(SystemExit) as exit_info:
            serve_main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and words in err and "Traceback" not in err, (argv, err)
        assert err.splitlines()[-1].startswith("llm-serve: error:")


def test_llm_serve_command_serves_and_stops_on_sigterm(lm_ckpt):
    with serve_in_subprocess(["--checkpoint", str(lm_ckpt), "--device", "cpu", "--log-level", "info",
                              "--model-name", "tiny"], startup_timeout_s=60) as server:
        response = httpx.post(f"{server.base_url}/v1/completions",
                              json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "user": "alice"}, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200 and response.json()["model"] == "tiny"
        server.process.send_signal(signal.SIGTERM)  # drains (nothing in flight), then exits
        server.process.wait(30)
    assert server.process.returncode == 0 and "Traceback" not in server.output, server.output
    assert "serving 'tiny' (lm" in server.output and "llm-serve: stopped" in server.output
    assert hashlib.sha256(b"alice").hexdigest()[:16] in server.output and "alice" not in server.output  # the user's hash


def test_load_benchmark_writes_its_figures(tmp_path):
    from benchmarks.serve import main as benchmark_main

    argv = ["--device", "cpu", "--requests", "4", "--clients", "1", "--clients", "3", "--prompt-tokens", "8",
            "--max-tokens", "4", "--out", str(tmp_path)]
    assert benchmark_main(argv) == 0
    run = json.loads((tmp_path / "results.json").read_text())
    assert run["settings"]["max_concurrency"] == 3 and [r["clients"] for r in run["results"]] == [1, 3]
    assert [r["requests"] for r in run["results"]] == [4, 6]  # at least two per client
    for result in run["results"]:
        assert result["ok"] == result["requests"] and result["completion_tokens"] > 0 and result["tokens_per_s"] > 0
        assert result["requests_per_s"] > 0 and 0 < result["latency_p50_s"] <= result["latency_p99_s"]
    assert run["results"][0]["rows_per_step"] == 1 and run["results"][1]["rows_per_step"] > 1  # batched
    assert "| 3 | 6 / 6 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"
