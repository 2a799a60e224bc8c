"""The batching engine: one thread owns the model and decodes every active request at once.

    submit() --> pending (bounded) --> prefill, alone, into a free cache row
                                   --> batched decode: one forward per step for all rows

Between decode steps the engine admits waiting requests (up to `max_batch` rows), drops
finished, cancelled and timed-out ones, and moves the last row into a freed row so the
active requests always fill rows [0, n) of the RowKVCache and one forward covers them.
Each request samples with its own settings (temperature, top-k / top-p, penalties, logit
bias) and its own seeded torch.Generator, so batching never mixes sampling settings. The
model runs only on this thread, never on the server's event loop; results go back through
each request's `deliver` callback (called on this thread).

Isolation: everything one request does on its own (its prefill, its sampling, its text
and stop sequences) runs under its own guard, so its failure ends that request alone. A
failure of the shared batched forward, or any bug in the engine's own bookkeeping, ends
the requests in flight with an error, never the thread; and should the thread stop, every
request it held or had queued is ended. Every submitted request ends exactly once
(`_end`), and only that frees its place, so capacity always returns to full.

With use_fused, a prefill (one row) runs the model's fused attention; a decode step whose
rows differ in length uses PyTorch's SDPA with a per-row mask, since the fused kernels take
no mask (a one-token decode step went to llmkernels' reference path anyway).

A seed makes a request reproducible when it runs with the same batch companions (e.g.
alone); in a different batch the logits can differ in the last bits of rounding, which
can rarely flip a sampled token.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import tiktoken
import torch

from llm.generate import adjust_logits, sample_next_token
from llm.model import GPT
from llm.serving.row_cache import RowKVCache
from llm.text_stream import TextStream

log = logging.getLogger("llm.serve")
DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S = 8, 32, 120.0  # rows, waiting requests, seconds
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # on shutdown, what the requests in flight may still take


class EngineBusy(Exception):
    """Every row and queue place is taken (HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine is stopping, draining for shutdown, or its thread has stopped (HTTP 503)."""


@dataclass
class Sampling:
    """One request's sampling settings (OpenAI's names; top_k is ours)."""

    temperature: float = 1.0  # below llm.generate.GREEDY_BELOW: greedy
    top_k: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int = 0
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the k most likely
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (completions' echo)


@dataclass(eq=False)  # each request is itself: the queue finds and removes it by identity
class GenerationRequest:
    """What to generate, and where the events go. `deliver` receives, on the engine
    thread:
      {"type": "prompt", "logprobs", "top_logprobs"}   with sampling.prompt_logprobs, first
      {"type": "text", "text", "token", "logprob"?, "top_logprobs"?} once per generated
          token (text may be "" while a character or a possible stop sequence is incomplete)
    then exactly one of
      {"type": "done", "finish_reason": "stop" | "length" | "timeout", "text": the rest,
       "prompt_tokens", "completion_tokens"}
      {"type": "error", "status": 500 | 503, "message"}.
    A cancelled request gets nothing more. Logprobs are the model's own (log-softmax of its
    logits, before temperature, penalties and logit bias): [(token id, logprob), ...]."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    timeout_s: float
    deliver: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0  # time.monotonic() past which it ends with "timeout"; set by submit
    ended: bool = False  # its last event is sent (engine thread only)

    def cancel(self) -> None:
        """Stop generating (the client went away); harmless once finished."""
        self.cancelled.set()


@dataclass
class _Slot:
    """An admitted request's decoding state; slot i of the engine lives in cache row i."""

    request: GenerationRequest
    generator: torch.Generator
    text: TextStream
    counts: torch.Tensor | None  # (1, V) tokens generated so far, when penalties need them
    last_token: int = 0
    completion_tokens: int = 0
    finished: bool = False
    token_logprobs: dict | None = None  # the sampled token's, until _take sends it


class BatchingEngine:
    def __init__(self, model: GPT, tokenizer: tiktoken.Encoding, max_batch: int, max_queue: int):
        weight = model.transformer.wte.weight
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = weight.device
        self.vocab_size = model.config.vocab_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = RowKVCache(model.config, max_batch, weight.device, weight.dtype)
        self._slots: list[_Slot] = []  # engine thread only; slot i <-> cache row i
        self._in_hand: list[GenerationRequest] = []  # taken from pending, not yet a slot (engine thread)
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._admitted = 0  # submitted and not yet ended; changed under _wake
        self._wake = threading.Condition()
        self._stopping = False
        self._stopped = False  # the engine thread has ended (or never ran its loop)
        self._drain_deadline: float | None = None  # time.monotonic(); set once shutdown begins
        self._thread: threading.Thread | None = None
        self.stats = dict(completed=0, cancelled=0, timed_out=0, rejected=0, failed=0,
                          tokens_generated=0, prefills=0, decode_steps=0, largest_batch=0)
        self.on_decode_step: Callable[[int], None] | None = None  # called with the rows of each decode step

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End every request (error: shutting down) and the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def begin_drain(self, timeout_s: float) -> None:
        """Shutdown: admit nothing new (submit raises EngineUnavailable); requests in flight
        go on for at most timeout_s more, then end with finish_reason "length"."""
        with self._wake:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + timeout_s
                log.info("draining: %d request(s) in flight get at most %g s", self._admitted, timeout_s)
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def unavailable_reason(self) -> str | None:
        """Why submit would refuse with 503 now; None when it can serve."""
        if self._stopping or self._drain_deadline is not None:
            return "the server is shutting down"
        if not self.alive:
            return "the generation thread has stopped"
        return None

    def submit(self, *requests: GenerationRequest) -> None:
        """Queue the requests, all or none: EngineBusy when max_batch + max_queue cannot take
        them all, EngineUnavailable when the engine cannot serve."""
        with self._wake:
            reason = self.unavailable_reason()
            if reason is not None:
                raise EngineUnavailable(reason)
            if self._admitted + len(requests) > self.max_batch + self.max_queue:
                self.stats["rejected"] += len(requests)
                raise EngineBusy()
            for request in requests:
                request.deadline = time.monotonic() + request.timeout_s
                self._pending.append(request)
                self._admitted += 1
            self._wake.notify()

    def load(self) -> dict:
        """Requests generating and waiting now (read from another thread: a snapshot)."""
        active = sum(not slot.finished for slot in list(self._slots))  # finished ones leave after the step
        return {"active": active, "queued": len(self._pending)}

    @property
    def admitted(self) -> int:
        """Submitted requests not yet ended (0 when idle: nothing holds a place)."""
        return self._admitted

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not (self._stopping or self._pending or self._slots):
                            self._wake.wait()
                        if self._stopping:
                            break
                        self._in_hand = []
                        while self._pending and len(self._slots) + len(self._in_hand) < self.max_batch:
                            self._in_hand.append(self._pending.popleft())
                        waiting = list(self._pending)
                    try:
                        self._end_past_drain(waiting)
                        for request in waiting:  # ends queued requests that timed out or were cancelled
                            self._check_queued(request)
                        for request in list(self._in_hand):
                            self._admit(request)
                        self._in_hand = []
                        if self._slots:
                            self._step()
                    except Exception as error:  # a bug here fails the requests in flight, never the engine
                        log.exception("generation failed")
                        self._fail_in_flight(f"generation failed: {type(error).__name__}: {error}")
        finally:  # stopping, or the thread itself failing: nothing it held may be left without an answer
            with self._wake:
                self._stopped = True
                left = list(self._pending)
                self._pending.clear()
            message = "the server is shutting down" if self._stopping else "the generation thread stopped"
            self._fail_in_flight(message, status=503)
            for request in left:
                self._end(request, {"type": "error", "status": 503, "message": message})

    def _end_past_drain(self, waiting: list[GenerationRequest]) -> None:
        """Past the drain deadline: active requests end with what they have ("length");
        queued ones, never started, with an error."""
        if self._drain_deadline is None or time.monotonic() < self._drain_deadline:
            return
        for slot in self._slots:
            if not slot.finished:
                self._finish(slot, "length")
        self._drop_finished()
        for request in waiting + self._in_hand:
            with self._wake:
                if request in self._pending:
                    self._pending.remove(request)
            self._end(request, {"type": "error", "status": 503,
                                "message": "the server shut down before this request started"})
        self._in_hand = []

    def _check_queued(self, request: GenerationRequest) -> None:
        if request.cancelled.is_set() or time.monotonic() > request.deadline:
            with self._wake:
                try:
                    self._pending.remove(request)
                except ValueError:  # admitted meanwhile
                    return
            self._end_unstarted(request)

    def _end_unstarted(self, request: GenerationRequest) -> None:
        """A request that ends before its prefill: cancelled, or out of time in the queue."""
        if request.cancelled.is_set():
            self._end(request, None)
        else:
            self._end(request, {"type": "done", "finish_reason": "timeout", "text": "",
                                "prompt_tokens": len(request.prompt_ids), "completion_tokens": 0})

    def _admit(self, request: GenerationRequest) -> None:
        """Prefill the prompt alone in the next free row, then sample its first token."""
        if request.cancelled.is_set() or time.monotonic() > request.deadline:
            self._end_unstarted(request)
            return
        row = len(self._slots)
        sampling = request.sampling
        penalized = bool(sampling.presence_penalty or sampling.frequency_penalty)
        slot = _Slot(request, torch.Generator(device=self.device).manual_seed(sampling.seed),
                     TextStream(self.tokenizer, request.stop),
                     torch.zeros(1, self.vocab_size, device=self.device) if penalized else None)
        try:
            self.cache.clear_row(row)
            self.cache.select(row, row + 1)
            prompt = torch.tensor([request.prompt_ids], device=self.device)  # (1, T)
            logits, _ = self.model(prompt, kv_cache=self.cache)  # (1, T, V)
            self.stats["prefills"] += 1
            if sampling.prompt_logprobs:
                self._send(request, {"type": "prompt", **self._prompt_logprobs(request, logits[0].float())})
            token = self._sample(slot, logits[:, -1].float())  # (1, 1)
            self._slots.append(slot)
            self._take(slot, token.item())
        except Exception as error:  # this request fails; the engine and the others go on
            log.exception("prefill failed")
            slot.finished = True
            self._end(request, {"type": "error", "status": 500,
                                "message": f"generation failed: {type(error).__name__}: {error}"})
        self._drop_finished()

    def _step(self) -> None:
        """One decode step for every active row: one forward, then each row samples on its own."""
        for slot in self._slots:
            if slot.request.cancelled.is_set():
                self._finish(slot, None)
            elif time.monotonic() > slot.request.deadline:
                self._finish(slot, "timeout")
        self._drop_finished()
        if not self._slots:
            return
        n = len(self._slots)
        self.cache.select(0, n)
        tokens = torch.tensor([[slot.last_token] for slot in self._slots], device=self.device)  # (n, 1)
        logits, _ = self.model(tokens, kv_cache=self.cache)  # (n, 1, V); a failure here ends the batch
        logits = logits[:, -1].float()  # (n, V)
        self.stats["decode_steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        if self.on_decode_step is not None:
            self.on_decode_step(n)
        sampled = {}  # row -> (1, 1); read back from the device all at once below
        for i, slot in enumerate(self._slots):
            with self._guard(slot):
                sampled[i] = self._sample(slot, logits[i : i + 1])
        if sampled:
            rows = list(sampled)
            for i, token in zip(rows, torch.cat([sampled[i] for i in rows])[:, 0].tolist()):
                with self._guard(self._slots[i]):
                    self._take(self._slots[i], token)
        self._drop_finished()

    @contextlib.contextmanager
    def _guard(self, slot: _Slot):
        """A failure inside ends this slot's request alone."""
        try:
            yield
        except Exception as error:
            log.exception("request failed")
            slot.finished = True
            self._end(slot.request, {"type": "error", "status": 500,
                                     "message": f"generation failed: {type(error).__name__}: {error}"})

    def _sample(self, slot: _Slot, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) -> (1, 1) with this request's own settings and generator."""
        sampling = slot.request.sampling
        adjusted = adjust_logits(logits, slot.counts, sampling.presence_penalty, sampling.frequency_penalty,
                                 sampling.logit_bias)
        token = sample_next_token(adjusted, sampling.temperature, sampling.top_k, sampling.top_p, slot.generator)
        if slot.counts is not None:
            slot.counts.scatter_add_(1, token, torch.ones_like(token, dtype=slot.counts.dtype))
        if sampling.logprobs is not None:
            (logprob,), (top,) = logprobs_of(logits, token[:, 0], sampling.logprobs)
            slot.token_logprobs = {"logprob": logprob, "top_logprobs": top}
        return token

    def _prompt_logprobs(self, request: GenerationRequest, logits: torch.Tensor) -> dict:
        """logits (T, V) of the prompt -> each prompt token's logprob given the ones before it
        (None for the first, which has no context) and the k most likely there."""
        ids = torch.tensor(request.prompt_ids[1:], device=logits.device)  # (T-1,)
        chosen, tops = logprobs_of(logits[:-1], ids, request.sampling.logprobs or 0)  # position t predicts t + 1
        return {"logprobs": [None, *chosen], "top_logprobs": [None, *tops]}

    def _take(self, slot: _Slot, token: int) -> None:
        """Record one sampled token: send its text, or finish the request."""
        slot.last_token = token
        slot.completion_tokens += 1
        self.stats["tokens_generated"] += 1
        logprobs, slot.token_logprobs = slot.token_logprobs or {}, None
        if token == self.tokenizer.eot_token:
            self._finish(slot, "stop")
            return
        self._send(slot.request, {"type": "text", "text": slot.text.push(token), "token": token, **logprobs})
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif slot.completion_tokens >= slot.request.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, finish_reason: str | None) -> None:
        """End an active request; finish_reason None = cancelled (nobody is listening)."""
        slot.finished = True
        if finish_reason is None:
            self._end(slot.request, None)
            return
        self._end(slot.request, {"type": "done", "finish_reason": finish_reason, "text": slot.text.finish(),
                                 "prompt_tokens": len(slot.request.prompt_ids),
                                 "completion_tokens": slot.completion_tokens})

    def _drop_finished(self) -> None:
        """Free finished rows; the last row moves into each freed row, keeping rows [0, n) active."""
        for row in reversed(range(len(self._slots))):
            if self._slots[row].finished:
                last = len(self._slots) - 1
                if row != last:
                    self.cache.move_row(last, row)
                    self._slots[row] = self._slots[last]
                self._slots.pop()

    def _fail_in_flight(self, message: str, status: int = 500) -> None:
        """End every request the engine holds (active rows and those being admitted) with an
        error; their rows are free again."""
        for slot in self._slots:
            slot.finished = True
            self._end(slot.request, {"type": "error", "status": status, "message": message})
        self._slots.clear()
        for request in self._in_hand:
            self._end(request, {"type": "error", "status": status, "message": message})
        self._in_hand = []

    def _end(self, request: GenerationRequest, event: dict | None) -> None:
        """The one way a request ends: its last event (None: cancelled, nothing sent), counted
        once, and its place freed once, whatever path gets here first."""
        if request.ended:
            return
        request.ended = True
        if event is None:
            self.stats["cancelled"] += 1
        elif event["type"] == "error":
            self.stats["failed"] += 1
        else:
            self.stats["timed_out" if event["finish_reason"] == "timeout" else "completed"] += 1
        with self._wake:
            self._admitted -= 1
        if event is not None:
            self._send(request, event)

    def _send(self, request: GenerationRequest, event: dict) -> None:
        try:
            request.deliver(event)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop generating for it
            request.cancel()


def logprobs_of(logits: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """logits (N, V), ids (N,) -> each id's logprob in its row, and each row's k most likely
    [(id, logprob)] ([] for k = 0)."""
    logprobs = logits.log_softmax(-1)  # (N, V)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    if not k:
        return chosen, [[] for _ in chosen]
    top = logprobs.topk(k, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
