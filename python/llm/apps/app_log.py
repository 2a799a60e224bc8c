"""What to log for an application: one JSON line per answer, to debug it later.

Each record holds the command, the prompt template, the retrieved sources and their scores,
the tool calls and their results, every guardrail decision with its rule, the finish reason
and the latency. Content (the question, the prompt, the answer, source texts, tool arguments
and results) is personal or large, so it is left out unless asked for (include_content).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path

CONTENT_FIELDS = frozenset({"question", "prompt", "answer", "text", "arguments", "result", "system", "messages"})


def without_content(value):
    """The record with every CONTENT_FIELDS entry removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_content(v) for k, v in value.items() if k not in CONTENT_FIELDS}
    if isinstance(value, list):
        return [without_content(v) for v in value]
    return value


class AppLog:
    """Appends records to a JSON-lines file; with no path, records nothing."""

    def __init__(self, path: str | os.PathLike | None = None, include_content: bool = False):
        self.path = Path(path) if path else None
        self.include_content = include_content
        self._lock = threading.Lock()
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.path:
            return
        record = record if self.include_content else without_content(record)
        line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                           **record}, ensure_ascii=False)  # fmt: skip
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")  # one write per line: concurrent writers never interleave within a record
