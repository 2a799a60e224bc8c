"""Run llm-serve as a child process on a free loopback port (the load benchmark and the
command's own test): started, waited for until it answers, stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    base_url: str
    process: subprocess.Popen
    output: str = ""  # stdout + stderr, once it has stopped


@contextlib.contextmanager
def serve_in_subprocess(args: list[str], startup_timeout_s: float = 120.0):
    """`python -m llm.serve *args --port <free>`; yields a ServerProcess once /health answers."""
    port = free_loopback_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the same llm as ours
    process = subprocess.Popen([sys.executable, "-m", "llm.serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = ServerProcess(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llm-serve exited with status {process.returncode}: {process.stdout.read()}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llm-serve did not answer on {server.base_url} within {startup_timeout_s:g} s")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn's graceful shutdown
        try:
            server.output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            server.output, _ = process.communicate()
