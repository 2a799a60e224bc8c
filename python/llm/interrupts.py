"""Ctrl-C and SIGTERM during a long loop (training): let the current step finish, so the
loop can save its state at a step boundary and stop cleanly instead of dying mid-step."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from llm.runtime import Distributed


class StopRequests:
    """While active (a with block), SIGINT and SIGTERM only note that training should stop,
    so the loop finishes its step and saves a checkpoint there. A second signal is not
    deferred: it acts as it would have without this (KeyboardInterrupt, termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def _note(self, signum, _frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *_exc) -> None:
        self._restore()

    def requested(self, ddp: Distributed, device: torch.device) -> bool:
        """Whether any process was asked to stop (all ranks stop at the same step)."""
        if not ddp.enabled:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0
