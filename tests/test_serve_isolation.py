"""llm-serve's engine under failure: a request's own failure ends it alone, a fault at any
engine step ends every request in flight and queued and gives back every place, a dead
thread refuses new work, the HTTP side has its own deadline, shutdown drains, and bounds
are checked before work. Regression tests for the serving review's defects 1, 2, 4, 5, 7, 8.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import statistics
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import llm.serving.app as app_module
from llm.config import GPTConfig
from llm.generate import generate
from llm.model import GPT
from llm.serving.engine import BatchingEngine, EngineUnavailable, GenerationRequest, Sampling
from llm.serving.loading import load_served_model
from llm.serving.request_log import REQUEST_LOG
from llm.serving.server import DrainingServer
from llm.text_stream import TextStream
from finetune_helpers import one_thread  # noqa: F401  (autouse: tiny models on a shared CPU)
from serve_helpers import instruct_ckpt, running, slowed, sse_events, tokenizer  # noqa: F401

MAX_BATCH, MAX_QUEUE = 2, 4


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.n_vocab, context_length=64, n_embd=32, n_layer=2, n_head=2)).eval()


class Listener:
    """Collects a request's events; `ended` once its last one is in."""

    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event["type"] in ("done", "error"):
            self.ended.set()


def make_request(listener, max_tokens=6, **sampling) -> GenerationRequest:
    return GenerationRequest(prompt_ids=[1, 2, 3], max_tokens=max_tokens, sampling=Sampling(**sampling), stop=[],
                             timeout_s=30, deliver=listener)


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Fault(Exception):
    pass


def fail_once(obj, name, after=0):
    """Make obj.name raise Fault on its (after + 1)-th call, then behave."""
    original, calls = getattr(obj, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after + 1:
            raise Fault(f"injected into {name}")
        return original(*args, **kwargs)

    setattr(obj, name, failing)


# Every step of the engine loop: prefill and decode forwards, a row's sampling and its text,
# moving a cache row, clearing one, checking the queue, admitting, dropping finished rows,
# ending a request past the drain, and the delivery of events.
FAULTS = [
    ("model", "forward", 0), ("model", "forward", 3), ("engine", "_sample", 0), ("engine", "_sample", 4),
    ("engine", "_take", 2), ("cache", "move_row", 0), ("cache", "clear_row", 1), ("engine", "_check_queued", 0),
    ("engine", "_admit", 1), ("engine", "_drop_finished", 2), ("engine", "_end_past_drain", 3), ("engine", "_step", 1),
    ("engine", "_send", 3),
]


@pytest.mark.parametrize("target, name, after", FAULTS, ids=[f"{n}-{a}" for _, n, a in FAULTS])
def test_a_fault_at_any_engine_step_ends_every_request_and_frees_every_place(model, tokenizer, target, name, after):
    engine = BatchingEngine(model, tokenizer, MAX_BATCH, MAX_QUEUE)
    fail_once({"model": model, "engine": engine, "cache": engine.cache}[target], name, after)
    try:
        engine.start()
        listeners = [Listener() for _ in range(MAX_BATCH + MAX_QUEUE)]
        # All at once: two decode, four wait in the queue. Different lengths, so rows finish
        # at different steps and the last row moves.
        engine.submit(*[make_request(listener, max_tokens=2 + 3 * i) for i, listener in enumerate(listeners)])
        wait_until(lambda: engine.admitted == 0, timeout=8)  # ~0.1 s when nothing is lost
        # Every request ended: answered, or failed with an error (a failed delivery cancels).
        assert all(listener.ended.is_set() or name == "_send" for listener in listeners)
        assert engine.stats["completed"] + engine.stats["failed"] + engine.stats["cancelled"] == len(listeners)
        assert engine.load() == {"active": 0, "queued": 0} and engine.alive

        # Capacity is whole again: a full load is taken and answered.
        again = [Listener() for _ in range(MAX_BATCH + MAX_QUEUE)]
        engine.submit(*[make_request(listener) for listener in again])
        assert all(listener.ended.wait(20) for listener in again)
        assert all(listener.events[-1]["type"] == "done" for listener in again)
    finally:
        if target == "model":
            del model.forward  # the instance attribute: back to GPT.forward
        engine.stop()


def test_rows_freed_at_different_steps_are_refilled_and_each_request_keeps_its_own_context(model, tokenizer):
    """Six greedy requests admitted together (one submit: one batch, whatever the machine's
    load), finishing at different steps, so the last row moves into each freed row: every
    request's tokens are what it decodes alone."""
    prompts = [[5, 9, 200], [7], [100, 101, 102, 103, 104], [11, 12], [40, 41, 42, 43], [250, 3]]
    lengths = [9, 2, 7, 3, 11, 5]
    engine = BatchingEngine(model, tokenizer, max_batch=len(prompts), max_queue=0)
    listeners = [Listener() for _ in prompts]
    try:
        engine.start()
        engine.submit(*[GenerationRequest(prompt_ids=p, max_tokens=n, sampling=Sampling(temperature=0), stop=[],
                                          timeout_s=30, deliver=listener)
                        for p, n, listener in zip(prompts, lengths, listeners)])
        assert all(listener.ended.wait(20) for listener in listeners)
    finally:
        engine.stop()
    assert engine.stats["largest_batch"] == len(prompts)  # they did decode together
    for prompt, length, listener in zip(prompts, lengths, listeners):
        alone = generate(model, torch.tensor([prompt]), length, temperature=0)[0, len(prompt):]  # (length,)
        assert [e["token"] for e in listener.events if e["type"] == "text"] == alone.tolist()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the point
def test_a_dead_engine_thread_ends_everything_it_held_and_refuses_new_work(model, tokenizer):
    """Review defect 8: submit refused (503) when the engine thread cannot serve."""

    class ThreadKiller(BaseException):  # not an Exception: nothing in the loop catches it
        pass

    engine = BatchingEngine(model, tokenizer, MAX_BATCH, MAX_QUEUE)

    def die(*args, **kwargs):
        raise ThreadKiller()

    engine._step = die
    engine.start()
    listeners = [Listener() for _ in range(MAX_BATCH + MAX_QUEUE)]
    engine.submit(*[make_request(listener) for listener in listeners])
    assert all(listener.ended.wait(20) for listener in listeners)
    assert all(listener.events[-1] == {"type": "error", "status": 503, "message": "the generation thread stopped"}
               for listener in listeners)
    assert engine.admitted == 0 and not engine.alive
    with pytest.raises(EngineUnavailable, match="generation thread has stopped"):
        engine.submit(make_request(Listener()))
    engine.stop()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        engine.submit(make_request(Listener()))


def test_a_requests_own_failure_fails_it_alone_and_tiny_temperatures_are_greedy(instruct_ckpt):
    """Review defect 1: temperature 3e-38 once made torch.multinomial raise in the batch-wide
    sampling line and failed every request batched with it (this model's logits are small:
    1e-45 overflows them as 3e-38 did a trained model's)."""
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.05)  # 12 steps: 0.6 s for all four to join
    original_push = TextStream.push

    pushes = {}

    def push(self, token):  # a request whose third token's text cannot be decoded (here: any with stop "boom")
        pushes[id(self)] = pushes.get(id(self), 0) + 1
        if "boom" in self.stop and pushes[id(self)] == 3:  # in a batched decode step, not its prefill
            raise ValueError("cannot decode this request's text")
        return original_push(self, token)

    TextStream.push = push
    try:
        with running(served, max_concurrency=4) as client:
            request = {"prompt": "the quick", "max_tokens": 12}

            async def together(base_url):
                async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
                    bodies = [{**request, "temperature": 0}, {**request, "temperature": 1e-45},
                              {**request, "temperature": 0, "stop": ["boom"]}, {**request, "temperature": 0.7, "seed": 1}]
                    return await asyncio.gather(*[http.post("/v1/completions", json=body) for body in bodies])

            greedy, tiny, failing, sampled = asyncio.run(together(str(client.base_url)))
            info = client.get("/health").json()
    finally:
        TextStream.push = original_push
    assert greedy.status_code == tiny.status_code == sampled.status_code == 200
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]  # below the floor: greedy
    assert failing.status_code == 500 and "cannot decode this request's text" in failing.json()["error"]["message"]
    assert info["largest_batch"] >= 3  # they did share decode steps
    assert info["requests"]["failed"] == 1 and info["requests"]["completed"] == 3


def test_the_http_side_gives_up_on_its_own_when_the_engine_never_answers(instruct_ckpt, monkeypatch):
    """Review defect 2: collect/stream had no deadline of their own."""
    monkeypatch.setattr(app_module, "BACKSTOP_GRACE_S", 0.3)
    served = load_served_model(instruct_ckpt, device="cpu")
    with running(served, timeout_s=0.2) as client:
        engine = client.server_app.state.engine
        monkeypatch.setattr(engine, "submit", lambda *requests: None)  # accepted, then lost
        started = time.monotonic()
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert response.status_code == 504 and "did not answer" in response.json()["error"]["message"]
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as stream:
            events = list(sse_events(stream))
        assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
        assert time.monotonic() - started < 5


def test_null_max_tokens_on_completions_is_16(instruct_ckpt, caplog):
    """Review defect 5: max_tokens null meant the whole remaining context."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOG.name)
    served = load_served_model(instruct_ckpt, device="cpu")
    with running(served) as client:
        nulls = {"max_tokens": None, "temperature": None, "top_p": None, "n": None, "stop": None, "seed": None,
                 "stream": None, "stream_options": None, "presence_penalty": None, "frequency_penalty": None,
                 "logit_bias": None, "user": None, "echo": None, "logprobs": None, "model": None}
        no_end = {str(served.tokenizer.eot_token): -100}  # never ends early: exactly the default's tokens
        body = client.post("/v1/completions", json={"prompt": "the", "logit_bias": no_end, **{
            k: v for k, v in nulls.items() if k != "logit_bias"}}).json()
        assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
        body = client.post("/v1/completions", json={"prompt": "the", **nulls}).json()
        assert body["usage"]["completion_tokens"] <= 16 and len(body["choices"]) == 1
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == REQUEST_LOG.name]  # what metrics get
    assert [(record["route"], record["status"]) for record in records] == [("/v1/completions", 200)] * 2
    assert records[-1]["completion_tokens"] == body["usage"]["completion_tokens"] and records[-1]["user_hash"] is None


def test_null_max_tokens_on_chat_is_the_rest_of_the_context_and_max_completion_tokens_wins(instruct_ckpt):
    """OpenAI's chat rule: no limit given, the completion may fill the context; with both
    names given, max_completion_tokens (the newer) is the one obeyed."""
    served = load_served_model(instruct_ckpt, device="cpu")
    chat = {"messages": [{"role": "user", "content": "the"}], "temperature": 0,
            "logit_bias": {str(served.tokenizer.eot_token): -100}}  # never ends early
    with running(served) as client:
        whole = client.post("/v1/chat/completions", json={**chat, "max_tokens": None}).json()
        both = client.post("/v1/chat/completions", json={**chat, "max_tokens": 9, "max_completion_tokens": 3}).json()
    assert whole["usage"]["completion_tokens"] == served.model.config.context_length - whole["usage"]["prompt_tokens"]
    assert whole["choices"][0]["finish_reason"] == "length"
    assert both["usage"]["completion_tokens"] == 3


def test_more_choices_than_places_are_refused_before_any_prompt_is_tokenized(instruct_ckpt, monkeypatch):
    served = load_served_model(instruct_ckpt, device="cpu")
    encoded = []

    def counted(encode):
        def encode_and_count(*args, **kwargs):
            encoded.append(args)
            return encode(*args, **kwargs)
        return encode_and_count

    for name in ("encode", "encode_ordinary"):
        monkeypatch.setattr(served.tokenizer, name, counted(getattr(served.tokenizer, name)))
    with running(served, max_concurrency=1, queue_size=1) as client:  # two places
        refused = [client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2}),
                   client.post("/v1/completions", json={"prompt": "a", "n": 3, "max_tokens": 2}),
                   client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "n": 3,
                                                             "max_tokens": 2})]
        assert encoded == []
        assert client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).status_code == 200
    for response in refused:
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
        assert "3 choices (prompts x n) can never fit this server's 2 places" in response.json()["error"]["message"]
    assert encoded  # the one that fits was tokenized here


def test_big_prompts_are_refused_before_work_and_do_not_delay_small_requests(instruct_ckpt):
    """Review defect 4: eight 10 MB prompts delayed a 5-token request from 0.08 s to 3.6 s."""
    served = load_served_model(instruct_ckpt, device="cpu")
    small = {"prompt": "the", "max_tokens": 5, "temperature": 0}
    big = b'{"prompt": "' + b"fox " * (10 * 2**20 // 4) + b'", "max_tokens": 5}'  # 10 MB
    with running(served) as client:
        limits = client.get("/health").json()["limits"]

        def timed(post):
            start = time.perf_counter()
            status = post().status_code
            return status, time.perf_counter() - start

        alone = statistics.median(timed(lambda: client.post("/v1/completions", json=small))[1] for _ in range(5))

        def post_big():
            with httpx.Client(base_url=client.base_url, timeout=60) as http:
                try:
                    return http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
                except httpx.TransportError as error:  # refused while still sending: the 413 came first
                    return error

        results = []
        burst = [threading.Thread(target=lambda: results.append(post_big())) for _ in range(8)]
        start = time.perf_counter()
        for thread in burst:
            thread.start()
        during = [timed(lambda: client.post("/v1/completions", json=small)) for _ in range(5)]
        for thread in burst:
            thread.join()
        burst_s = time.perf_counter() - start
        assert all(status == 200 for status, _ in during)
        during_s = statistics.median(seconds for _, seconds in during)
        statuses = [r.status_code for r in results if isinstance(r, httpx.Response)]
        assert statuses and set(statuses) == {413}
        # A prompt under the body limit but over what the context can hold: refused without tokenizing.
        over = "fox " * (limits["max_prompt_bytes"] // 4 + 1)
        refused, refused_s = timed(lambda: client.post("/v1/completions", json={"prompt": over}))
        assert refused == 400
        chunked = client.post("/v1/completions", content=(b"x" * 2**16 for _ in range(limits["max_body_bytes"] // 2**16 + 1)),
                              headers={"Content-Type": "application/json"})  # no Content-Length: cut off while read
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    print(f"\n5-token request: {alone:.3f} s alone, {during_s:.3f} s during eight 10 MB prompts "
          f"(burst answered in {burst_s:.2f} s); {len(over):,}-byte prompt refused in {refused_s:.3f} s")
    assert during_s < alone + 1.0, (alone, during_s)  # it was 3.6 s before the bounds


def test_shutdown_refuses_new_work_drains_then_ends_requests_with_length(instruct_ckpt):
    """Review defect 7: on SIGTERM the drain was bounded only by --timeout (120 s)."""
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.03)
    app = app_module.create_app(served, max_concurrency=1, queue_size=2, drain_timeout_s=0.5)
    server = DrainingServer(app, host="127.0.0.1", port=0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        base_url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        request = {"prompt": "the", "max_tokens": 150, "temperature": 0, "stream": True}
        with httpx.Client(base_url=base_url, timeout=30) as client, httpx.Client(base_url=base_url, timeout=30) as other:
            with client.stream("POST", "/v1/completions", json=request) as response:
                events = sse_events(response)
                next(events), next(events)
                queued = threading.Thread(target=lambda: results.append(
                    other.post("/v1/completions", json={**request, "stream": False})))
                results = []
                queued.start()
                wait_until(lambda: app.state.engine.load()["queued"] == 1)
                started = time.monotonic()
                server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
                with pytest.raises(EngineUnavailable, match="shutting down"):  # new work: 503
                    app.state.engine.submit(GenerationRequest([1], 1, Sampling(), [], 1, print))
                rest = list(events)
                drained_s = time.monotonic() - started
            queued.join(10)
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert 0.4 < drained_s < 3, drained_s
        assert results[0].status_code == 503 and "before this request started" in results[0].json()["error"]["message"]
        thread.join(15)
        assert not thread.is_alive()
    finally:
        server.should_exit = True
        thread.join(15)
