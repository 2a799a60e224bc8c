"""The batching engine: one thread owns the model and decodes every active request at once.

    submit() --> pending (bounded) --> prefill, alone, into a free cache row
                                   --> batched decode: one forward per step for all rows

Between decode steps the engine admits waiting requests (up to `max_batch` rows), drops
finished, cancelled and timed-out ones, and moves the last row into a freed row so the
active requests always fill rows [0, n) of the RowKVCache and one forward covers them.
Each request samples with its own temperature / top-k / top-p and its own seeded
torch.Generator, so batching never mixes sampling settings. The model runs only on this
thread, never on the server's event loop; results go back through each request's
`deliver` callback (called on this thread).

With use_fused, a prefill (one row) runs the model's fused attention; a decode step whose
rows differ in length uses PyTorch's SDPA with a per-row mask, since the fused kernels take
no mask (a one-token decode step went to llmkernels' reference path anyway).

A seed makes a request reproducible when it runs with the same batch companions (e.g.
alone); in a different batch the logits can differ in the last bits of rounding, which
can rarely flip a sampled token.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import tiktoken
import torch

from llm.generate import sample_next_token
from llm.model import GPT
from llm.serving.row_cache import RowKVCache
from llm.text_stream import TextStream

log = logging.getLogger("llm.serve")
DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S = 8, 32, 120.0  # rows, waiting requests, seconds


@dataclass
class GenerationRequest:
    """What to generate, and where the events go. `deliver` receives, on the engine
    thread, {"type": "text", "text"} once per generated token (text may be "" while a
    character or a possible stop sequence is incomplete), then exactly one of
    {"type": "done", "finish_reason": "stop" | "length" | "timeout", "text": the rest,
    "prompt_tokens", "completion_tokens"} or {"type": "error", "message"}."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stop: list[str]
    timeout_s: float
    deliver: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0  # time.monotonic() past which it ends with "timeout"; set by submit

    def cancel(self) -> None:
        """Stop generating (the client went away); harmless once finished."""
        self.cancelled.set()


@dataclass
class _Slot:
    """An admitted request's decoding state; slot i of the engine lives in cache row i."""

    request: GenerationRequest
    generator: torch.Generator
    text: TextStream
    last_token: int = 0
    completion_tokens: int = 0
    finished: bool = False


class BatchingEngine:
    def __init__(self, model: GPT, tokenizer: tiktoken.Encoding, max_batch: int, max_queue: int):
        weight = model.transformer.wte.weight
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = RowKVCache(model.config, max_batch, weight.device, weight.dtype)
        self._slots: list[_Slot] = []  # engine thread only; slot i <-> cache row i
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._admitted = 0  # pending + active, changed under _wake
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = dict(completed=0, cancelled=0, timed_out=0, rejected=0, failed=0,
                          tokens_generated=0, prefills=0, decode_steps=0, largest_batch=0)
        self.on_decode_step: Callable[[int], None] | None = None  # called with the rows of each decode step

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> bool:
        """Queue a request; False (and nothing queued) when max_batch + max_queue are taken."""
        with self._wake:
            if self._admitted >= self.max_batch + self.max_queue:
                self.stats["rejected"] += 1
                return False
            request.deadline = time.monotonic() + request.timeout_s
            self._pending.append(request)
            self._admitted += 1
            self._wake.notify()
        return True

    def load(self) -> dict:
        """Requests generating and waiting now (read from another thread: a snapshot)."""
        active = sum(not slot.finished for slot in list(self._slots))  # finished ones leave after the step
        return {"active": active, "queued": len(self._pending)}

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._pending or self._slots):
                        self._wake.wait()
                    if self._stopping:
                        break
                    arrivals = []
                    while self._pending and len(self._slots) + len(arrivals) < self.max_batch:
                        arrivals.append(self._pending.popleft())
                    waiting = list(self._pending)
                try:
                    for request in waiting:  # ends queued requests that timed out or were cancelled
                        self._check_queued(request)
                    for request in arrivals:
                        self._admit(request)
                    if self._slots:
                        self._step()
                except Exception as error:  # a bug here fails the requests in flight, never the engine
                    log.exception("generation failed")
                    self._fail_all(f"generation failed: {type(error).__name__}: {error}")
        self._fail_all("the server is shutting down")
        for request in self._pending:
            self._fail(request, "the server is shutting down")

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
            self.stats["cancelled"] += 1
        else:
            self.stats["timed_out"] += 1
            self._send(request, {"type": "done", "finish_reason": "timeout", "text": "",
                                 "prompt_tokens": len(request.prompt_ids), "completion_tokens": 0})
        self._release()

    def _admit(self, request: GenerationRequest) -> None:
        """Prefill the prompt alone in the next free row, then sample its first token."""
        if request.cancelled.is_set() or time.monotonic() > request.deadline:
            self._end_unstarted(request)
            return
        row = len(self._slots)
        slot = _Slot(request, torch.Generator(device=self.device).manual_seed(request.seed),
                     TextStream(self.tokenizer, request.stop))
        try:
            self.cache.clear_row(row)
            self.cache.select(row, row + 1)
            prompt = torch.tensor([request.prompt_ids], device=self.device)  # (1, T)
            logits, _ = self.model(prompt, kv_cache=self.cache)  # (1, T, V)
            token = self._sample(slot, logits[:, -1].float())  # (1, 1)
        except Exception as error:  # this request fails; the engine and the others go on
            log.exception("prefill failed")
            self._fail(request, f"generation failed: {type(error).__name__}: {error}")
            return
        self.stats["prefills"] += 1
        self._slots.append(slot)
        self._take(slot, token.item())
        self._drop_finished()

    def _step(self) -> None:
        """One decode step for every active row: one forward, then per-row sampling."""
        for slot in self._slots:
            if slot.request.cancelled.is_set():
                self.stats["cancelled"] += 1
                self._finish(slot, None)
            elif time.monotonic() > slot.request.deadline:
                self._finish(slot, "timeout")
        self._drop_finished()
        if not self._slots:
            return
        n = len(self._slots)
        try:
            self.cache.select(0, n)
            tokens = torch.tensor([[slot.last_token] for slot in self._slots], device=self.device)  # (n, 1)
            logits, _ = self.model(tokens, kv_cache=self.cache)  # (n, 1, V)
            logits = logits[:, -1].float()  # (n, V)
            sampled = torch.cat([self._sample(slot, logits[i : i + 1]) for i, slot in enumerate(self._slots)])  # (n, 1)
        except Exception as error:  # a failed step fails the rows in it, never the server
            log.exception("decode step failed")
            self._fail_all(f"generation failed: {type(error).__name__}: {error}")
            return
        self.stats["decode_steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        if self.on_decode_step is not None:
            self.on_decode_step(n)
        for slot, token in zip(self._slots, sampled[:, 0].tolist()):
            self._take(slot, token)
        self._drop_finished()

    def _sample(self, slot: _Slot, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) -> (1, 1) with this request's own settings and generator."""
        request = slot.request
        return sample_next_token(logits, request.temperature, request.top_k, request.top_p, slot.generator)

    def _take(self, slot: _Slot, token: int) -> None:
        """Record one sampled token: send its text, or finish the request."""
        slot.last_token = token
        slot.completion_tokens += 1
        self.stats["tokens_generated"] += 1
        if token == self.tokenizer.eot_token:
            self._finish(slot, "stop")
            return
        self._send(slot.request, {"type": "text", "text": slot.text.push(token)})
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif slot.completion_tokens >= slot.request.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, finish_reason: str | None) -> None:
        """End an active request; finish_reason None = cancelled (nobody is listening)."""
        slot.finished = True
        if finish_reason is None:
            return
        self.stats["timed_out" if finish_reason == "timeout" else "completed"] += 1
        self._send(slot.request, {"type": "done", "finish_reason": finish_reason, "text": slot.text.finish(),
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
                self._release()

    def _fail(self, request: GenerationRequest, message: str) -> None:
        self.stats["failed"] += 1
        self._send(request, {"type": "error", "message": message})
        self._release()

    def _fail_all(self, message: str) -> None:
        """Fail every active request (e.g. a decode step raised) and free their rows."""
        for slot in self._slots:
            if not slot.finished:
                self._fail(slot.request, message)
            else:
                self._release()
        self._slots.clear()

    def _release(self) -> None:
        with self._wake:
            self._admitted -= 1

    def _send(self, request: GenerationRequest, event: dict) -> None:
        try:
            request.deliver(event)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop generating for it
            request.cancel()
