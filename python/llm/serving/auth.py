"""API keys: who may call the /v1/* routes.

Keys come from `--api-key KEY` (repeatable), the LLM_SERVE_API_KEYS environment variable
(comma-separated) and `--api-key-file` (one key a line; blank lines and # comments are
skipped). A client sends `Authorization: Bearer KEY`, as OpenAI's clients do.

The server keeps only each key's SHA-256 digest and compares the digest of what a client
sent with every one of them, with hmac.compare_digest: the time taken does not depend on
how much of a key a guess got right, nor on which key matched. Logs and metrics name a
client by key_id(key) (12 hex digits of a differently salted SHA-256), never by the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEYS_ENV = "LLM_SERVE_API_KEYS"
BEARER = "bearer "


def key_id(key: str) -> str:
    """A stable, non-secret name for a key in logs (a hash: the key cannot be read back)."""
    return hashlib.sha256(b"llm-serve key id:" + key.encode()).hexdigest()[:12]


def load_api_keys(keys: list[str] | tuple[str, ...] = (), key_file: str | os.PathLike | None = None,
                  environ: dict | None = None) -> list[str]:
    """Every key given on the command line, in LLM_SERVE_API_KEYS and in `key_file`,
    each once. A malformed key is refused with a message that does not show it."""
    environ = os.environ if environ is None else environ
    found = [(key, "--api-key") for key in keys]
    found += [(key.strip(), KEYS_ENV) for key in environ.get(KEYS_ENV, "").split(",") if key.strip()]
    if key_file is not None:
        lines = Path(key_file).read_text().splitlines()  # llm-serve checks that it exists when parsing
        found += [(line.strip(), f"--api-key-file {key_file}") for line in lines
                  if line.strip() and not line.strip().startswith("#")]
    for key, source in found:
        if not key or any(c.isspace() or not c.isprintable() for c in key) or not key.isascii():
            raise ValueError(f"{source}: an API key must be printable ASCII without spaces "
                             f"(key {key_id(key)} is not)")
    return list(dict.fromkeys(key for key, _ in found))


class ApiKeys:
    """The accepted keys (as digests). Empty: every client is let in."""

    def __init__(self, keys: list[str] | tuple[str, ...] = ()):
        self._keys = [(hashlib.sha256(key.encode()).digest(), key_id(key)) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def client_of(self, authorization: str | None) -> str | None:
        """The key id for an `Authorization: Bearer KEY` header carrying an accepted key, else None."""
        if not authorization or authorization[:len(BEARER)].lower() != BEARER:
            return None
        presented = hashlib.sha256(authorization[len(BEARER):].strip().encode()).digest()
        client = None
        for digest, ident in self._keys:  # every key is compared: no early exit tells which matched
            if hmac.compare_digest(presented, digest):
                client = ident
        return client
