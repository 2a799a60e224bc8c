"""The llm-serve tests' shared parts: a tiny random-weight model's checkpoints (a small BPE,
a 2-layer, 32-wide body), the real server on a free loopback port in a thread, and
server-sent events read as they arrive."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from llm.checkpoint import save_checkpoint
from llm.config import GPTConfig
from llm.generate import complete
from llm.model import GPT
from llm.serving.app import create_app
from llm.serving.loading import load_served_model
from llm.tokenizer import tokenizer_to_dict, train_bpe

CONTEXT = 200  # the Alpaca template alone is ~100 tokens with this small BPE
HTTP_TIMEOUT = httpx.Timeout(60.0)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog; " * 4, "Below is an instruction."], 300)


def write_checkpoint(path, tokenizer, task: str | None, chat_template: str | None = None):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.n_vocab, context_length=CONTEXT, n_embd=32, n_layer=2, n_head=2)
    checkpoint = {"model": GPT(config).state_dict(), "model_config": config.to_dict(),
                  "tokenizer": tokenizer_to_dict(tokenizer), "step": 0}
    if task is not None:
        checkpoint["task"] = task
    if chat_template is not None:
        checkpoint["chat_template"] = chat_template
    save_checkpoint(path, checkpoint)
    return path


@pytest.fixture(scope="module")
def instruct_ckpt(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "instruct.pt", tokenizer, "instruct")


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "chat.pt", tokenizer, "instruct", chat_template="chat")


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "lm.pt", tokenizer, None)  # no key: "lm"


def slowed(served, seconds_per_forward: float):
    """Make every forward take at least this long, so that requests overlap."""
    forward = served.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds_per_forward)
        return forward(*args, **kwargs)

    served.model.forward = slow_forward
    return served


@contextlib.contextmanager
def running(served, **limits):
    """The app on a free 127.0.0.1 port (port 0: the OS picks), stopped on exit whatever happens."""
    app = create_app(served, **limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=HTTP_TIMEOUT) as client:
            client.server_app = app  # for tests that reach into the engine
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def instruct_server(instruct_ckpt):
    with running(load_served_model(instruct_ckpt, device="cpu")) as client:
        yield client


def health(client) -> dict:
    response = client.get("/health")
    assert response.status_code == 200
    return response.json()


def sse_events(response):
    """The data payloads of a server-sent event stream, one at a time as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def library_completion(ckpt, prompt: str, max_tokens: int, **sampling) -> str:
    """What llm.generate.complete makes of the same prompt (its text after the prompt)."""
    served = load_served_model(ckpt, device="cpu")
    return complete(served.model, served.tokenizer, prompt, max_tokens, **sampling)[len(prompt):]
