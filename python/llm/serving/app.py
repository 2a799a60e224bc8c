"""The HTTP app: OpenAI-shaped endpoints in front of one BatchingEngine.

    POST /v1/completions        {"prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                                 "stream", "stream_options", "presence_penalty", "frequency_penalty",
                                 "logit_bias", "logprobs", "echo", "user", ...}
    POST /v1/chat/completions   {"messages", "max_completion_tokens", "logprobs", "top_logprobs", ...}:
                                instruction-tuned models ("task": "instruct") only
    GET  /v1/models             the one served model
    GET  /health                model, device, kernel backends, load and request counters
    GET  /metrics               Prometheus text format (llm.serving.metrics)
    GET  /, /playground         the chat page and the completions playground (llm.serving.pages)

With API keys every /v1/* request needs `Authorization: Bearer KEY` (llm.serving.auth),
and each client may have its own requests- and tokens-per-minute limits
(llm.serving.rate_limits); llm.serving.access applies both, gives every response an
x-request-id and writes one JSON log line per request (llm.serving.request_log).

Chat prompts are the whole conversation (system message and every earlier turn) in the
model's own chat template (llm.chat_template, recorded in its checkpoint). Each of the n
choices is its own batch row.

Limits, checked before any work: a body over max_body_bytes is a 413 (read no further); a
prompt longer in bytes than the context could ever hold (context x the longest token's
bytes), or more choices (prompts x n) than the server has places (--max-concurrency +
--queue), is a 400 before anything is tokenized; tokenizing runs off the event loop. At most
--max-concurrency rows decode at once (batched, one forward per step) and --queue more
wait; a request that does not fit gets 429 with Retry-After, and a server that cannot
serve (shutting down, generation thread stopped) answers 503. A request that runs past
--timeout seconds (queue time included) ends: a non-streaming one with 504, a streaming
one (whose 200 is already sent) with a last chunk whose finish_reason is "timeout". Should
the engine never answer, the HTTP side gives up on its own a few seconds later (504 /
an error event). Streaming is server-sent events, one per generated token (its text may
be "" while a UTF-8 character or a possible stop sequence is incomplete), then
`data: [DONE]`. A client that disconnects cancels its generation.

Every request's facts (route, status, tokens, timings, finish reasons, stream, choices,
the user's hash) gather in the access middleware's RequestRecord (llm.serving.request_log),
which the endpoints fill in; when the response ends it goes to the rate limits, the metrics
and the request log.

Extending the app: create_app returns a plain FastAPI app. Add middleware with
app.add_middleware (it wraps the body-size limit), routes with app.include_router.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llm.generate import check_sampling
from llm.tool_calls import CALL_END
from llm.serving.access import AccessMiddleware, request_record
from llm.serving.auth import ApiKeys
from llm.serving.engine import (DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S, BatchingEngine, EngineBusy,
                                EngineUnavailable, GenerationRequest, Sampling)
from llm.serving.applications import ChatApplications, as_stream
from llm.serving.loading import ServedModel
from llm.serving.metrics import ServerMetrics
from llm.serving.pages import add_pages
from llm.serving.rate_limits import ClientLimits
from llm.serving.request_log import user_hash
from llm.serving.schemas import (MAX_STOP_SEQUENCES, ApiError, ChatCompletionRequest, CompletionRequest,
                                 SamplingFields, validation_error)

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there
BACKSTOP_GRACE_S = 10.0  # past --timeout, the HTTP side stops waiting for the engine on its own
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def create_app(served: ServedModel, max_concurrency: int = DEFAULT_MAX_CONCURRENCY, queue_size: int = DEFAULT_QUEUE,
               timeout_s: float = DEFAULT_TIMEOUT_S, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
               max_body_bytes: int | None = None, api_keys: list[str] | tuple[str, ...] = (),
               requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
               log_content: bool = False, applications: ChatApplications | None = None) -> FastAPI:
    """The app serving `served`; its engine thread starts and stops with the app's lifespan.
    max_body_bytes None: 8 x the longest prompt the context can hold, at least 1 MiB.
    api_keys: accepted keys (none: open); *_per_minute: per-client limits (None: off);
    log_content: put prompts and completions in the request log;
    applications: guardrails, grounding and the application log for chat (llm.serving.applications)."""
    applications = applications or ChatApplications()
    engine = BatchingEngine(served.model, served.tokenizer, max_batch=max_concurrency, max_queue=queue_size)
    metrics = ServerMetrics(engine.load)
    engine.on_decode_step = metrics.batch_size.observe
    limits = ClientLimits(requests_per_minute, tokens_per_minute)
    tokenizer = served.tokenizer
    context = served.model.config.context_length
    prompt_byte_bound = context * max_token_bytes(tokenizer)  # more bytes than this cannot fit the context
    max_body_bytes = max_body_bytes or max(2**20, 8 * prompt_byte_bound)
    kernels = kernel_backends(served)
    token_bytes = functools.lru_cache(maxsize=None)(tokenizer.decode_single_token_bytes)  # for logprobs

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="llm-serve", description=__doc__, lifespan=lifespan)
    app.state.engine, app.state.served = engine, served
    app.state.drain_timeout_s = drain_timeout_s  # llm.serving.server reads it on SIGTERM
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        endpoint = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        return validation_error(list(error.errors()), endpoint).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        code = "request_too_large" if error.status_code == 413 else None  # BodySizeLimit's
        return ApiError(error.status_code, str(error.detail), code=code, headers=error.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        unavailable = engine.unavailable_reason()
        body = {
            "status": "ok" if unavailable is None else f"unavailable: {unavailable}",
            "model": served.name, "model_loaded": True, "task": served.task,
            "chat_template": served.template.name if served.template else None,
            "device": str(served.device), "use_fused": served.use_fused, "kernel_backends": kernels,
            "context_length": context, "parameters": served.model.num_parameters(),
            "limits": {"max_concurrency": max_concurrency, "queue": queue_size, "timeout_s": timeout_s,
                       "drain_timeout_s": drain_timeout_s, "max_body_bytes": max_body_bytes,
                       "max_prompt_bytes": prompt_byte_bound, "requests_per_minute": requests_per_minute,
                       "tokens_per_minute": tokens_per_minute},
            "api_keys_required": bool(api_keys),
            "batching": "continuous: concurrent requests share one forward per decode step",
            "requests": {**engine.load(), **{k: engine.stats[k] for k in
                                             ("completed", "cancelled", "timed_out", "rejected", "failed")}},
            **{k: engine.stats[k] for k in ("tokens_generated", "prefills", "decode_steps", "largest_batch")},
        }
        return JSONResponse(body, status_code=200 if unavailable is None else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        text, content_type = metrics.exposition()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "llm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        note_request(request, body)
        check_model(body.model)
        if applications.guardrails:  # raw prompts and texts would pass the policy unchecked
            raise ApiError(403, "this server's --policy guards chat only, so /v1/completions is turned off: "
                                "use /v1/chat/completions", type="permission_error", code="content_policy")
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
            else [body.prompt]
        check_choices(len(prompts) * (body.n or 1))
        prompt_ids = [await prompt_tokens(prompt) for prompt in prompts]
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        for ids in prompt_ids:
            checked_max_tokens(max_tokens, len(ids), "prompt", "max_tokens")
        sampling = checked_sampling(body, body.logprobs, prompt_logprobs=bool(body.echo) and body.logprobs is not None)
        return await generate("completions", body, prompt_ids, max_tokens, sampling, request, echo=bool(body.echo))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        note_request(request, body)
        check_model(body.model)
        if served.template is None:
            raise ApiError(400, f"model {served.name!r} is not instruction-tuned (task {served.task!r}); "
                                "use /v1/completions", param="model", code="not_a_chat_model")
        check_prompt_bytes(sum(len(m.text().encode()) for m in body.messages), "messages")
        check_choices(body.n or 1)
        field_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        plan = await asyncio.to_thread(applications.plan, body, served.template, tokenizer, context,
                                       getattr(body, field_name))  # fmt: skip
        if plan.answer is not None:  # grounded, and nothing relevant: no model needed
            return _whole(applications.direct_response(plan, served.name, served.template), body.stream)
        max_tokens = checked_max_tokens(getattr(body, field_name), len(plan.prompt_ids), "messages", field_name)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        sampling = checked_sampling(body, (body.top_logprobs or 0) if body.logprobs else None, prompt_logprobs=False)
        if not applications.active(body):
            return await generate("chat", body, [plan.prompt_ids], max_tokens, sampling, request)
        # Checked before it is sent: generated whole, then filtered (and streamed as chunks if asked).
        whole = body.model_copy(update={"stream": False})
        response = await generate("chat", whole, [plan.prompt_ids], max_tokens, sampling, request,
                                  server_stops=(CALL_END,))
        if not isinstance(response, dict):  # the client went away
            return response
        return _whole(applications.finish(response, plan, served.template), body.stream)

    def note_request(request: Request, body: SamplingFields) -> None:
        """The request's own facts for its record (llm.serving.request_log): streamed? whose?"""
        record = request_record(request)
        record.stream, record.user_hash = bool(body.stream), user_hash(body.user)

    # ------------------------------------------------------------------ checks (before any work)
    def check_model(model: str | None) -> None:
        if model is not None and model != served.name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {served.name!r}",
                           param="model", code="model_not_found")

    def check_choices(rows: int) -> None:
        """Every choice (prompts x n) is a row of its own: more than the server's places never fit."""
        if rows > max_concurrency + queue_size:
            raise ApiError(400, f"{rows} choices (prompts x n) can never fit this server's "
                                f"{max_concurrency + queue_size} places (--max-concurrency + --queue)", param="n")

    def check_prompt_bytes(size: int, param: str) -> None:
        if size > prompt_byte_bound:
            raise ApiError(400, f"the prompt is {size:,} bytes; the model's context of {context} tokens holds at most "
                                f"{prompt_byte_bound:,} bytes of text", param=param, code="context_length_exceeded")

    async def prompt_tokens(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):  # token ids
            bad = [t for t in prompt if not 0 <= t < tokenizer.n_vocab]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {tokenizer.n_vocab})",
                               param="prompt")
            return prompt or [tokenizer.eot_token]
        check_prompt_bytes(len(prompt.encode()), "prompt")
        # Off the event loop: a long prompt must not hold up the other requests.
        ids = await asyncio.to_thread(tokenizer.encode, prompt, allowed_special="all")
        return ids or [tokenizer.eot_token]  # "": start from <|endoftext|>

    def checked_max_tokens(max_tokens: int | None, prompt_tokens: int, prompt_field: str, field_name: str) -> int:
        room = context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens, "
                                "which leaves no room for a completion", param=prompt_field,
                           code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise ApiError(400, f"{field_name} must be an integer >= 1, got {max_tokens}", param=field_name)
        if max_tokens > room:
            raise ApiError(400, f"the model's context is {context} tokens and the prompt takes {prompt_tokens}: "
                                f"{field_name} must be at most {room}, got {max_tokens}", param=field_name,
                           code="context_length_exceeded")
        return max_tokens

    def checked_sampling(body: SamplingFields, logprobs: int | None, prompt_logprobs: bool) -> Sampling:
        """The request's sampling settings by llm.generate's rules; nulls are the defaults."""
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = None if body.top_p in (None, 1) else body.top_p
        try:
            check_sampling(temperature, body.top_k, top_p)
        except ValueError as error:
            raise ApiError(400, str(error), param=str(error).split()[0]) from None
        return Sampling(temperature=temperature, top_k=body.top_k, top_p=top_p,
                        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                        logit_bias=checked_logit_bias(body.logit_bias), logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs)

    def checked_logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float]:
        checked = {}
        for key, bias in (logit_bias or {}).items():
            if not (key.isdigit() and int(key) < tokenizer.n_vocab):
                raise ApiError(400, f"logit_bias: keys must be token ids in [0, {tokenizer.n_vocab}), got {key!r}",
                               param="logit_bias")
            if not -100 <= bias <= 100:
                raise ApiError(400, f"logit_bias: biases must be in [-100, 100], got {bias} for token {key}",
                               param="logit_bias")
            checked[int(key)] = float(bias)
        return checked

    # ------------------------------------------------------------------ generation
    async def generate(endpoint: str, body: SamplingFields, prompt_ids: list[list[int]], max_tokens: int,
                       sampling: Sampling, request: Request, echo: bool = False,
                       server_stops: tuple[str, ...] = ()):
        """Submit every choice (n per prompt, choice index = prompt * n + j) as its own row,
        then answer with one JSON body or a stream. server_stops: stop sequences of the
        server's own, beside the client's (which alone count toward MAX_STOP_SEQUENCES)."""
        n = body.n or 1
        stops = checked_stop(body.stop) + list(server_stops)
        base_seed = body.seed if body.seed is not None else secrets.randbits(62)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        record = request_record(request)  # the access middleware's: tokens, first token, the log line
        rows = []
        for p, ids in enumerate(prompt_ids):
            for j in range(n):
                index = p * n + j
                rows.append(GenerationRequest(
                    prompt_ids=ids, max_tokens=max_tokens,
                    sampling=Sampling(**{**vars(sampling), "seed": (base_seed + index) % 2**63}),
                    stop=stops, timeout_s=timeout_s,
                    deliver=record.watching(index, functools.partial(
                        lambda i, event: loop.call_soon_threadsafe(events.put_nowait, (i, event)), index))))
        record.choices = len(rows)
        prompt_total = sum(map(len, prompt_ids))
        limits.reserve_tokens(record, prompt_total, len(rows) * max_tokens)  # 429: tokens/min spent
        record.prompt_tokens = prompt_total
        if log_content:  # the users' text is kept for the request log only when asked
            record.prompt = body.model_dump(include={"prompt", "messages"})
        try:
            engine.submit(*rows)
        except EngineBusy:
            load = engine.load()
            raise ApiError(429, f"server busy: {load['active']} requests generating and {load['queued']} queued "
                                f"(limits: --max-concurrency {max_concurrency}, --queue {queue_size}); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineUnavailable as error:
            raise ApiError(503, f"server unavailable: {error}", type="server_error", code="unavailable") from None
        reply = _Reply(endpoint, served.name, token_bytes)
        if echo:
            reply.echo_ids = [prompt_ids[index // n] for index in range(len(rows))]
            reply.echo = [tokenizer.decode(ids) for ids in reply.echo_ids]
        answer = _Answer(rows, events, prompt_total, loop.time() + timeout_s + BACKSTOP_GRACE_S)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(reply, answer, include_usage), media_type="text/event-stream")
        return await collect(reply, answer, request)

    async def next_event(answer: _Answer, timeout: float | None = None):
        """(index, event) of the next event, or None past the backstop deadline."""
        remaining = answer.backstop - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(answer.events.get(), max(0.0, min(remaining, timeout or remaining)))
        except asyncio.TimeoutError:
            return None

    async def collect(reply: _Reply, answer: _Answer, request: Request):
        loop = asyncio.get_running_loop()
        last_check = loop.time()
        try:
            while not answer.finished:
                item = await next_event(answer, DISCONNECT_POLL_S)
                if loop.time() - last_check >= DISCONNECT_POLL_S:
                    last_check = loop.time()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it
                if item is None:
                    if loop.time() >= answer.backstop:
                        raise ApiError(504, "the generation did not answer within the server's timeout "
                                            f"({timeout_s:g} s + {BACKSTOP_GRACE_S:g} s)", type="timeout_error",
                                       code="timeout")
                    continue
                index, event = item
                answer.take(index, event)
                if event["type"] == "error":
                    raise ApiError(event["status"], event["message"], type="server_error")
                if event["type"] == "done" and event["finish_reason"] == "timeout":
                    raise ApiError(504, f"the request did not finish within the server's timeout of {timeout_s:g} s "
                                        "(--timeout)", type="timeout_error", code="timeout")
            return reply.full(answer)
        finally:
            answer.cancel()

    async def stream(reply: _Reply, answer: _Answer, include_usage: bool):
        try:
            for index in range(len(answer.rows)):
                first = reply.first_chunk(index)
                if first is not None and not (reply.echo and answer.rows[index].sampling.prompt_logprobs):
                    yield _sse(first)
            while not answer.finished:
                item = await next_event(answer)  # a client that goes away cancels this (and so the generation)
                if item is None:
                    yield _sse(ApiError(504, "the generation did not answer within the server's timeout",
                                        type="timeout_error", code="timeout").body())
                    break
                index, event = item
                answer.take(index, event)
                if event["type"] == "prompt":
                    yield _sse(reply.chunk(index, reply.echo[index], prompt_logprobs=event))
                elif event["type"] == "text":
                    yield _sse(reply.chunk(index, event["text"], token=event))
                elif event["type"] == "error":
                    yield _sse(ApiError(event["status"], event["message"], type="server_error").body())
                    break
                else:
                    if event["text"]:
                        yield _sse(reply.chunk(index, event["text"]))
                    yield _sse(reply.chunk(index, "", finish_reason=event["finish_reason"]))
            else:
                if include_usage:
                    yield _sse({**reply.head(), "choices": [], "usage": answer.usage()})
            yield "data: [DONE]\n\n"
        finally:
            answer.cancel()

    add_pages(app)
    app.add_middleware(AccessMiddleware, keys=ApiKeys(api_keys), limits=limits, metrics=metrics,
                       routes=frozenset(route.path for route in app.routes), log_content=log_content)
    return app


class _Answer:
    """The choices of one request as their events arrive (on the event loop)."""

    def __init__(self, rows: list[GenerationRequest], events: asyncio.Queue, prompt_tokens: int, backstop: float):
        self.rows, self.events, self.prompt_tokens, self.backstop = rows, events, prompt_tokens, backstop
        self.texts = [[] for _ in rows]
        self.tokens = [[] for _ in rows]  # per choice: its token events (for logprobs)
        self.prompt_logprobs: list[dict | None] = [None] * len(rows)
        self.ends: list[dict | None] = [None] * len(rows)

    @property
    def finished(self) -> bool:
        return all(end is not None for end in self.ends)

    def take(self, index: int, event: dict) -> None:
        if event["type"] == "prompt":
            self.prompt_logprobs[index] = event
        elif event["type"] == "text":
            self.texts[index].append(event["text"])
            self.tokens[index].append(event)
        else:
            self.ends[index] = event
            if event["type"] == "done":
                self.texts[index].append(event["text"])

    def usage(self) -> dict:
        prompt = self.prompt_tokens
        completion = sum(end.get("completion_tokens", 0) for end in self.ends if end is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()


class _Reply:
    """The OpenAI JSON of one response: a text completion or a chat completion."""

    def __init__(self, endpoint: str, model: str, token_bytes: Callable[[int], bytes]):
        self.chat = endpoint == "chat"
        self.model, self.token_bytes = model, token_bytes
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.echo: list[str] | None = None  # completions with echo: each choice's prompt text
        self.echo_ids: list[list[int]] | None = None  # and its token ids

    def head(self) -> dict:
        kind = ("chat.completion.chunk" if self.chat else "text_completion")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def first_chunk(self, index: int) -> dict | None:
        """What a stream opens with per choice: chat's role; completions' echoed prompt."""
        if self.chat:
            return self.chunk(index, "", first=True)
        return self.chunk(index, self.echo[index]) if self.echo else None

    def chunk(self, index: int, text: str, finish_reason: str | None = None, first: bool = False,
              token: dict | None = None, prompt_logprobs: dict | None = None) -> dict:
        """One streamed event."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if finish_reason is None else {})
            logprobs = {"content": [self._chat_logprob(token)]} if token and "logprob" in token else None
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            entries = []
            if prompt_logprobs is not None:
                entries = self._prompt_entries(prompt_logprobs, index)
            elif token and "logprob" in token:
                entries = [(token["token"], token["logprob"], token["top_logprobs"])]
            logprobs = self._completion_logprobs(entries) if entries else None
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.head(), "choices": [choice], "usage": None}

    def full(self, answer) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for index, (texts, tokens, end) in enumerate(zip(answer.texts, answer.tokens, answer.ends)):
            text = "".join(texts)
            generated = [(t["token"], t["logprob"], t["top_logprobs"]) for t in tokens if "logprob" in t]
            if self.chat:
                logprobs = {"content": [self._chat_logprob(t) for t in tokens if "logprob" in t]} \
                    if answer.rows[index].sampling.logprobs is not None else None
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": end["finish_reason"]})
                continue
            prompt = self._prompt_entries(answer.prompt_logprobs[index], index) if self.echo else []
            if self.echo:
                text = self.echo[index] + text
            logprobs = self._completion_logprobs(prompt + generated) \
                if answer.rows[index].sampling.logprobs is not None else None
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": end["finish_reason"]})
        head = {**self.head(), "object": "chat.completion" if self.chat else "text_completion"}
        return {**head, "choices": choices, "usage": answer.usage()}

    def _text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def _prompt_entries(self, prompt_logprobs: dict | None, index: int) -> list[tuple]:
        if prompt_logprobs is None:
            return []
        return list(zip(self.echo_ids[index], prompt_logprobs["logprobs"], prompt_logprobs["top_logprobs"]))

    def _completion_logprobs(self, entries: list[tuple]) -> dict:
        """Completions' shape: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset
        (where each token starts in this choice's text; in a streamed chunk, in the chunk's)."""
        tokens, offsets, offset = [], [], 0
        for token, _, _ in entries:
            offsets.append(offset)
            tokens.append(self._text(token))
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {self._text(t): lp for t, lp in top} for _, _, top in entries],
                "text_offset": offsets}

    def _chat_logprob(self, token: dict) -> dict:
        """Chat's shape: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self._text(token_id), "logprob": logprob, "bytes": list(self.token_bytes(token_id))}

        return {**entry(token["token"], token["logprob"]),
                "top_logprobs": [entry(t, lp) for t, lp in token["top_logprobs"]]}


class BodySizeLimit:
    """ASGI middleware: a request body over max_bytes is a 413, refused from its
    Content-Length before a byte is read, or as soon as the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            error = ApiError(413, self._too_large(int(length)), code="request_too_large")
            return await error.response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # no Content-Length (chunked): stop reading here
                # An HTTPException passes FastAPI's body parsing untouched; the app's handler answers it.
                raise HTTPException(413, self._too_large(received))
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, size: int) -> str:
        return (f"the request body is over {self.max_bytes:,} bytes ({size:,} so far); this server's limit follows "
                "from the model's context")


def max_token_bytes(tokenizer) -> int:
    """The longest token's text in bytes (special tokens' names included: a prompt may spell
    them): no text of more than context x this many bytes fits the context."""
    longest = 1
    for token in range(tokenizer.n_vocab):
        try:
            longest = max(longest, len(tokenizer.decode_single_token_bytes(token)))
        except KeyError:  # an id the vocabulary skips
            pass
    return longest


def checked_stop(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} non-empty "
                            f"strings, got {stop!r}", param="stop")
    return stops


def kernel_backends(served: ServedModel) -> dict | str:
    """Which kernels the model runs on: llmkernels' backends (usable or why not) with --use-fused."""
    if not served.use_fused:
        return "none: plain PyTorch ops (--use-fused routes them to llmkernels)"
    from llmkernels import available_backends  # imported only when the fused ops are in use

    return {name: {"usable": usable, "reason": reason or None} for name, (usable, reason) in available_backends().items()}


def _whole(response: dict, stream: bool | None):
    """A chat response made whole before it is sent: as it is, or as a stream's chunks if asked."""
    return StreamingResponse(iter(as_stream(response)), media_type="text/event-stream") if stream else response


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
