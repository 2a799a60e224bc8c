"""The HTTP app: OpenAI-shaped endpoints in front of one BatchingEngine.

    POST /v1/completions        {"prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream"}
    POST /v1/chat/completions   {"messages", ...}: instruction-tuned models ("task": "instruct") only
    GET  /v1/models             the one served model
    GET  /health                model, device, kernel backends, load and request counters
    GET  /metrics               Prometheus text format (llm.serving.metrics)
    GET  /, /playground         the chat page and the completions playground (llm.serving.pages)

With API keys every /v1/* request needs `Authorization: Bearer KEY` (llm.serving.auth),
and each client may have its own requests- and tokens-per-minute limits
(llm.serving.rate_limits); llm.serving.access applies both, gives every response an
x-request-id and writes one JSON log line per request (llm.serving.request_log).

Chat prompts use llm.prompt_template.format_prompt with the last message (which must be
the user's) as the instruction: the template is single-turn, as the model was fine-tuned,
so earlier turns and the system message are not part of the prompt.

Limits: at most --max-concurrency requests decode at once (batched, one forward per step)
and --queue more wait; beyond that a request gets 429 with Retry-After. A request that
runs past --timeout seconds (queue time included) ends: a non-streaming one with 504, a
streaming one (whose 200 is already sent) with a last chunk whose finish_reason is
"timeout". Streaming is server-sent events, one per generated token (its text may be ""
while a UTF-8 character or a possible stop sequence is incomplete), then `data: [DONE]`.
A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llm.generate import check_sampling
from llm.prompt_template import format_prompt
from llm.serving.access import AccessMiddleware, request_record
from llm.serving.auth import ApiKeys
from llm.serving.engine import (DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S, BatchingEngine,
                                GenerationRequest)
from llm.serving.loading import ServedModel
from llm.serving.metrics import ServerMetrics
from llm.serving.pages import add_pages
from llm.serving.rate_limits import ClientLimits
from llm.serving.schemas import (MAX_STOP_SEQUENCES, ApiError, ChatCompletionRequest, CompletionRequest,
                                 SamplingFields, validation_error)

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def create_app(served: ServedModel, max_concurrency: int = DEFAULT_MAX_CONCURRENCY, queue_size: int = DEFAULT_QUEUE,
               timeout_s: float = DEFAULT_TIMEOUT_S, api_keys: list[str] | tuple[str, ...] = (),
               requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
               log_content: bool = False) -> FastAPI:
    """The app serving `served`; its engine thread starts and stops with the app's lifespan.
    api_keys: accepted keys (none: open); *_per_minute: per-client limits (None: off);
    log_content: put prompts and completions in the request log."""
    engine = BatchingEngine(served.model, served.tokenizer, max_batch=max_concurrency, max_queue=queue_size)
    metrics = ServerMetrics(engine.load)
    engine.on_decode_step = metrics.batch_size.observe
    limits = ClientLimits(requests_per_minute, tokens_per_minute)
    context = served.model.config.context_length
    kernels = kernel_backends(served)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="llm-serve", description=__doc__, lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        return validation_error(list(error.errors())).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return ApiError(error.status_code, str(error.detail), headers=error.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        body = {
            "status": "ok" if engine.alive else "error: the generation thread has stopped",
            "model": served.name, "model_loaded": True, "task": served.task,
            "device": str(served.device), "use_fused": served.use_fused, "kernel_backends": kernels,
            "context_length": context, "parameters": served.model.num_parameters(),
            "limits": {"max_concurrency": max_concurrency, "queue": queue_size, "timeout_s": timeout_s,
                       "requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute},
            "api_keys_required": bool(api_keys),
            "batching": "continuous: concurrent requests share one forward per decode step",
            "requests": {**engine.load(), **{k: engine.stats[k] for k in
                                             ("completed", "cancelled", "timed_out", "rejected", "failed")}},
            **{k: engine.stats[k] for k in ("tokens_generated", "prefills", "decode_steps", "largest_batch")},
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        text, content_type = metrics.exposition()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "llm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt_ids = await encode(body.prompt) or [served.tokenizer.eot_token]  # "": start from <|endoftext|>
        return await respond(body, prompt_ids, "prompt", request, _Reply("text_completion", served.name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if served.task != "instruct":
            raise ApiError(400, f"model {served.name!r} is not instruction-tuned (task {served.task!r}); "
                                "use /v1/completions", param="model", code="not_a_chat_model")
        if body.messages[-1].role != "user":
            raise ApiError(400, f"the last message must be the user's, got role {body.messages[-1].role!r}",
                           param="messages")
        prompt_ids = await encode(format_prompt(body.messages[-1].content))
        return await respond(body, prompt_ids, "messages", request, _Reply("chat.completion", served.name))

    # ------------------------------------------------------------------ shared
    async def encode(text: str) -> list[int]:
        # Off the event loop: a long prompt must not hold up the other requests.
        return await asyncio.to_thread(served.tokenizer.encode, text, allowed_special="all")

    async def respond(body: SamplingFields, prompt_ids: list[int], prompt_field: str, request: Request, reply: "_Reply"):
        if body.model is not None and body.model != served.name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {served.name!r}",
                           param="model", code="model_not_found")
        loop, events, record = asyncio.get_running_loop(), asyncio.Queue(), request_record(request)
        generation = GenerationRequest(
            prompt_ids=prompt_ids,
            max_tokens=checked_max_tokens(body.max_tokens, len(prompt_ids), prompt_field),
            **checked_sampling(body),
            seed=body.seed if body.seed is not None else secrets.randbits(63),
            stop=checked_stop(body.stop),
            timeout_s=timeout_s,
            deliver=record.watching(lambda event: loop.call_soon_threadsafe(events.put_nowait, event)),
        )
        limits.reserve_tokens(record, len(prompt_ids), generation.max_tokens)  # 429 when the client's tokens/min are short
        record.prompt_tokens, record.prompt = len(prompt_ids), body.model_dump(include={"prompt", "messages"})
        if not engine.submit(generation):
            load = engine.load()
            raise ApiError(429, f"server busy: {load['active']} requests generating and {load['queued']} queued "
                                f"(limits: --max-concurrency {max_concurrency}, --queue {queue_size}); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if body.stream:
            return StreamingResponse(stream(reply, generation, events), media_type="text/event-stream")
        return await collect(reply, generation, events, request)

    def checked_max_tokens(max_tokens: int | None, prompt_tokens: int, prompt_field: str) -> int:
        room = context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens, "
                                "which leaves no room for a completion", param=prompt_field,
                           code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be an integer >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"the model's context is {context} tokens and the prompt takes {prompt_tokens}: "
                                f"max_tokens must be at most {room}, got {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    async def collect(reply: _Reply, generation: GenerationRequest, events: asyncio.Queue, request: Request):
        loop = asyncio.get_running_loop()
        text, next_event, last_check = [], None, loop.time()
        try:
            while True:
                next_event = next_event or asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({next_event}, timeout=DISCONNECT_POLL_S)
                if loop.time() - last_check >= DISCONNECT_POLL_S:
                    last_check = loop.time()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; the finally cancels
                if not done:
                    continue
                event, next_event = next_event.result(), None
                if event["type"] == "text":
                    text.append(event["text"])
                elif event["type"] == "error":
                    raise ApiError(500, event["message"], type="server_error")
                elif event["finish_reason"] == "timeout":
                    raise ApiError(504, f"the request did not finish within the server's timeout of {timeout_s:g} s "
                                        "(--timeout)", type="timeout_error", code="timeout")
                else:
                    return reply.full("".join(text) + event["text"], event)
        finally:
            if next_event is not None:
                next_event.cancel()
            generation.cancel()

    async def stream(reply: _Reply, generation: GenerationRequest, events: asyncio.Queue):
        try:
            if reply.kind == "chat.completion":  # OpenAI's first chat chunk carries the role
                yield _sse(reply.chunk("", first=True))
            while True:
                event = await events.get()  # a client that goes away cancels this (and so the generation)
                if event["type"] == "text":
                    yield _sse(reply.chunk(event["text"]))
                    continue
                if event["type"] == "error":
                    yield _sse({"error": {"message": event["message"], "type": "server_error", "param": None,
                                          "code": None}})
                else:
                    if event["text"]:
                        yield _sse(reply.chunk(event["text"]))
                    yield _sse(reply.chunk("", finish_reason=event["finish_reason"]))
                yield "data: [DONE]\n\n"
                return
        finally:
            generation.cancel()

    add_pages(app)
    app.add_middleware(AccessMiddleware, keys=ApiKeys(api_keys), limits=limits, metrics=metrics,
                       routes=frozenset(route.path for route in app.routes), log_content=log_content)
    return app


def kernel_backends(served: ServedModel) -> dict | str:
    """Which kernels the model runs on: llmkernels' backends (usable or why not) with --use-fused."""
    if not served.use_fused:
        return "none: plain PyTorch ops (--use-fused routes them to llmkernels)"
    from llmkernels import available_backends  # imported only when the fused ops are in use

    return {name: {"usable": usable, "reason": reason or None} for name, (usable, reason) in available_backends().items()}


def checked_sampling(body: SamplingFields) -> dict:
    """temperature / top_k / top_p by llm.generate's rules; top_p 1 means no nucleus cut."""
    try:
        check_sampling(body.temperature, body.top_k, body.top_p)
    except ValueError as error:
        raise ApiError(400, str(error), param=str(error).split()[0]) from None
    return dict(temperature=body.temperature, top_k=body.top_k, top_p=None if body.top_p == 1 else body.top_p)


def checked_stop(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} non-empty "
                            f"strings, got {stop!r}", param="stop")
    return stops


class _Reply:
    """The OpenAI JSON of one response: a text completion or a chat completion."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, object_type: str) -> dict:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed event."""
        if self.kind == "text_completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("text_completion"), "choices": [choice]}
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if finish_reason is None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def full(self, text: str, done: dict) -> dict:
        """The whole (non-streamed) response."""
        usage = {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                 "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}
        if self.kind == "text_completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done["finish_reason"]}
        return {**self._head(self.kind), "choices": [choice], "usage": usage}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
