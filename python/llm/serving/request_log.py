"""What a request left behind: one JSON line per request on the "llm.serve.requests" logger.

    {"event": "request", "request_id": "4f1c...", "method": "POST", "route": "/v1/completions",
     "status": 200, "latency_s": 0.412, "time_to_first_token_s": 0.031, "prompt_tokens": 5,
     "completion_tokens": 16, "finish_reason": "length", "stream": false, "choices": 1,
     "user_hash": "2bd806c97f0e00af", "key_id": "9b2e61c0aa4d", "client_address": "127.0.0.1",
     "refusal": null}

The request id is also the response's x-request-id header, so a client can quote it. The
client's key appears only as its key id (llm.serving.auth.key_id), the request's "user"
field only as its hash (user_hash). The prompt and the completion are logged only when the
server runs with --log-content ("prompt" and "completion" fields): they are the users'
data. A request for several choices (n > 1) logs their finish reasons (and completions)
as lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

REQUEST_LOG = logging.getLogger("llm.serve.requests")


@dataclass
class RequestRecord:
    """One request's facts, filled in as it goes: by the access middleware (id, client,
    status), the endpoint (stream, choices, user, tokens, prompt) and the engine thread's
    events (watching). When the response ends, the middleware hands it to the rate limits
    (unused tokens back), the metrics and the request log: the one record of a request."""

    method: str
    path: str
    client_address: str | None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    route: str | None = None  # the matched route's path ("/v1/completions"); None: no route matched
    key_id: str | None = None
    status: int | None = None
    refusal: str | None = None  # why the request was refused (metrics' cause), when it was
    stream: bool | None = None  # a generation request's: was it streamed
    choices: int = 0  # a generation request's rows: prompts x n
    user_hash: str | None = None  # of the request's "user" field (user_hash); the field itself is never kept
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reserved_tokens: int = 0  # charged to the client's tokens-per-minute bucket (llm.serving.rate_limits)
    finish_reasons: dict[int, str] = field(default_factory=dict)  # choice index -> finish reason
    first_token_s: float | None = None
    latency_s: float | None = None
    prompt: object = None  # the prompt or the messages, kept for --log-content
    completions: dict[int, list[str]] = field(default_factory=dict)  # choice index -> text pieces

    @property
    def client(self) -> str:
        """Whom the rate limits count: the key's id, else the address."""
        return f"key:{self.key_id}" if self.key_id else f"address:{self.client_address}"

    def watching(self, choice: int, deliver: Callable[[dict], None]) -> Callable[[dict], None]:
        """`deliver` for the GenerationRequest of choice `choice` that also notes, on the engine
        thread, the time to the first token, the tokens generated, the finish reason and the text."""
        generated = 0
        pieces = self.completions.setdefault(choice, [])

        def deliver_and_note(event: dict) -> None:
            nonlocal generated
            if event["type"] == "text":
                if self.first_token_s is None:
                    self.first_token_s = time.perf_counter() - self.started
                generated += 1
                self.completion_tokens += 1
                pieces.append(event["text"])
            elif event["type"] == "done":
                self.completion_tokens += event["completion_tokens"] - generated  # a final <|endoftext|> too
                self.finish_reasons[choice] = event["finish_reason"]
                pieces.append(event["text"])
            deliver(event)

        return deliver_and_note

    def finish(self) -> None:
        self.latency_s = time.perf_counter() - self.started

    def as_log(self, log_content: bool) -> dict:
        line = {"event": "request", "request_id": self.request_id, "method": self.method,
                "route": self.route or self.path, "status": self.status,
                "latency_s": None if self.latency_s is None else round(self.latency_s, 4),
                "time_to_first_token_s": None if self.first_token_s is None else round(self.first_token_s, 4),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": one_or_list([self.finish_reasons[i] for i in sorted(self.finish_reasons)]),
                "stream": self.stream, "choices": self.choices, "user_hash": self.user_hash,
                "key_id": self.key_id, "client_address": self.client_address, "refusal": self.refusal}
        if log_content:
            line["prompt"] = self.prompt
            line["completion"] = one_or_list(["".join(self.completions[i]) for i in sorted(self.completions)])
        return line


def user_hash(user: str | None) -> str | None:
    """An OpenAI "user" field as the first 16 hex digits of its sha256 (None for none)."""
    return hashlib.sha256(user.encode()).hexdigest()[:16] if user else None


def one_or_list(values: list):
    """One choice's value alone; several choices' as a list; none: None."""
    return values[0] if len(values) == 1 else (values or None)


def log_request(record: RequestRecord, log_content: bool) -> None:
    REQUEST_LOG.info(json.dumps(record.as_log(log_content)))


def log_startup(**facts) -> None:
    """The server's start-up facts (model, size, device, backends, limits) as one JSON line."""
    REQUEST_LOG.info(json.dumps({"event": "startup", **facts}, default=str))


def log_to_stderr(level: str = "info") -> None:
    """Print the JSON lines bare on stderr (the llm-serve command; a library user configures logging).
    They are INFO records: level "warning" or above silences them."""
    REQUEST_LOG.setLevel(level.upper())
    REQUEST_LOG.propagate = False
    if not any(getattr(handler, "llm_serve_stderr", False) for handler in REQUEST_LOG.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.llm_serve_stderr = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        REQUEST_LOG.addHandler(handler)
