"""uvicorn's server, draining on shutdown: SIGTERM (or Ctrl-C) makes the engine admit nothing
new (503) and gives the requests in flight at most the app's drain_timeout_s to finish;
past it they end with finish_reason "length" (or, never started, an error event). uvicorn
then waits for the open connections (a few seconds more at most) and the lifespan stops
the engine.

uvicorn re-raises the signal it handled once it has shut down; here the drain is the whole
answer to SIGTERM and SIGINT, so that re-raise finds a handler that does nothing and the
process exits 0."""

from __future__ import annotations

import signal

import uvicorn
from fastapi import FastAPI

SHUTDOWN_GRACE_S = 5.0  # after the drain, for the last responses to reach their clients


class DrainingServer(uvicorn.Server):
    def __init__(self, app: FastAPI, **config):
        self.app = app
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=app.state.drain_timeout_s + SHUTDOWN_GRACE_S,
                                        **config))

    def handle_exit(self, sig: int, frame) -> None:
        self.app.state.engine.begin_drain(self.app.state.drain_timeout_s)
        super().handle_exit(sig, frame)


def serve(app: FastAPI, **config) -> None:
    """Run until SIGTERM or Ctrl-C, then drain and return (uvicorn.Config options: host, port, ...)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # what uvicorn restores and re-raises into once it is done
    DrainingServer(app, **config).run()
