"""Per-client rate limits: requests per minute and tokens per minute, as token buckets.

A client is its API key (by key id) or, when the server has no keys, its address. Each
client has two buckets that hold at most one minute's allowance and refill continuously
(the allowance / 60 every second), so a client may burst up to its whole minute and then
goes at the steady rate.

    request arrives     take 1 from the requests bucket                  (empty: 429)
    prompt tokenized    take prompt + max_tokens x choices from tokens   (short: 429)
    response ends       give back what it did not generate (all of it when it was
                        refused before generating anything)

As OpenAI does, a request is charged its max_tokens up front (what it may generate) and
the unused part is returned when it ends. A 429 carries Retry-After (whole seconds until
the bucket holds enough), and every response carries OpenAI's headers:
x-ratelimit-limit-requests / -remaining-requests / -reset-requests (time until the bucket
is full again, as "1.5s" or "1m0s") and the same three for tokens.

These limits sit in front of the global ones (--max-concurrency, --queue), which stay: a
client within its own limits can still get a 429 when the whole server is busy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from llm.serving.request_log import RequestRecord
from llm.serving.schemas import ApiError

MAX_TRACKED_CLIENTS = 10_000  # past this, clients whose buckets are full again are forgotten


@dataclass
class TokenBucket:
    capacity: float
    level: float  # what can be taken now
    updated: float  # clock time of `level`

    @property
    def refill_per_s(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.refill_per_s)
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Take `amount` and return 0, or take nothing and return the seconds until it would fit
        (inf when it never will: more than the capacity)."""
        self.refill(now)
        if amount <= self.level:
            self.level -= amount
            return 0.0
        if amount > self.capacity:
            return math.inf
        return (amount - self.level) / self.refill_per_s

    def give_back(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)

    def seconds_to_full(self, now: float) -> float:
        self.refill(now)
        return (self.capacity - self.level) / self.refill_per_s


class ClientLimits:
    """Requests and tokens per minute for each client; None = that limit is off."""

    def __init__(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 clock=time.monotonic):
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def __bool__(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def _bucket(self, client: str, kind: str) -> TokenBucket | None:
        capacity = self.requests_per_minute if kind == "requests" else self.tokens_per_minute
        if capacity is None:
            return None
        bucket = self._buckets.get((client, kind))
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._forget_idle_clients()
            bucket = self._buckets[(client, kind)] = TokenBucket(capacity, capacity, self.clock())
        return bucket

    def _forget_idle_clients(self) -> None:
        now = self.clock()
        for key in [key for key, bucket in self._buckets.items() if bucket.seconds_to_full(now) == 0]:
            del self._buckets[key]

    def admit_request(self, record: RequestRecord) -> None:
        """Count one request for record.client; ApiError 429 when its requests per minute are spent."""
        bucket = self._bucket(record.client, "requests")
        wait = bucket.take(1, self.clock()) if bucket else 0.0
        if wait:
            record.refusal = "requests_per_minute"
            raise ApiError(429, f"rate limit: this client may make {self.requests_per_minute} requests per minute; "
                                f"retry in {wait:.1f} s", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(math.ceil(wait))})

    def reserve_tokens(self, record: RequestRecord, prompt_tokens: int, max_generated: int) -> None:
        """Charge the prompt and the most it may generate (max_tokens x choices) to record.client;
        ApiError 429 when its tokens per minute are short."""
        bucket = self._bucket(record.client, "tokens")
        if bucket is None:
            return
        wanted = prompt_tokens + max_generated
        wait = bucket.take(wanted, self.clock())
        if wait == math.inf:
            record.refusal = "tokens_per_minute"
            raise ApiError(429, f"rate limit: the prompt ({prompt_tokens} tokens) plus max_tokens x choices "
                                f"({max_generated}) is more than this client's {self.tokens_per_minute} tokens per "
                                "minute; lower max_tokens", type="rate_limit_error", code="rate_limit_exceeded",
                           param="max_tokens")
        if wait:
            record.refusal = "tokens_per_minute"
            raise ApiError(429, f"rate limit: this client may use {self.tokens_per_minute} tokens per minute "
                                f"(prompt + max_tokens); this request needs {wanted}; retry in {wait:.1f} s",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(math.ceil(wait))})
        record.reserved_tokens = wanted

    def settle(self, record: RequestRecord) -> None:
        """The response has ended: give back the reserved tokens it did not use."""
        if record.reserved_tokens:
            generated = record.completion_tokens > 0 or (record.status or 500) < 400
            used = record.prompt_tokens + record.completion_tokens if generated else 0  # refused later: free
            unused = record.reserved_tokens - used
            self._bucket(record.client, "tokens").give_back(max(unused, 0), self.clock())
            record.reserved_tokens = 0

    def headers(self, client: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for this client, as of now."""
        now, headers = self.clock(), {}
        for kind in ("requests", "tokens"):
            bucket = self._bucket(client, kind)
            if bucket is not None:
                reset = bucket.seconds_to_full(now)
                headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
                headers[f"x-ratelimit-remaining-{kind}"] = str(int(bucket.level))
                headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
        return headers


def duration(seconds: float) -> str:
    """OpenAI's reset format: "0s", "1.5s", "6m0s"."""
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds >= 0.001 else "0s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"
