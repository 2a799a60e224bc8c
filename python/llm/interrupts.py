"""Ctrl-C and SIGTERM during a long loop (training, fine-tuning): let the current step
finish, so the loop can save its state at a step boundary and stop cleanly instead of dying
mid-step; then the command says how to continue and exits 128 + signum, without a traceback."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

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


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint at `step` was saved to `path`."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved to {path}; "
            f"resume=True continues it"
        )


def exit_interrupted(prog: str, stop: TrainingInterrupted, resume_command: str) -> NoReturn:
    """A command's answer to TrainingInterrupted: one line on stderr (rank 0 only under
    torchrun) naming the checkpoint and the command that continues it, then exit status
    128 + signum, the shell's convention for "killed by signal N"."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{prog}: interrupted by {signal.Signals(stop.signum).name} at step {stop.step}; checkpoint saved "
            f"to {stop.path}; continue with: {resume_command}",
            file=sys.stderr,
        )
    raise SystemExit(128 + stop.signum) from None
