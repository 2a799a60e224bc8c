"""GET /metrics: the server's counters in Prometheus' text format (prometheus_client).

    llm_serve_requests_total{route, status}              every request, refused ones included
    llm_serve_request_duration_seconds{route}            latency, to the end of the response
    llm_serve_time_to_first_token_seconds                request arrival to the first generated token
    llm_serve_prompt_tokens_total / _completion_tokens_total
    llm_serve_refusals_total{cause}                      unauthorized, requests_per_minute,
                                                         tokens_per_minute, server_busy, too_large,
                                                         unavailable (e.g. draining)
    llm_serve_queue_depth, llm_serve_active_rows         now (read from the engine at scrape time)
    llm_serve_decode_batch_size                          rows in each batched decode step

Each app has its own registry (several apps may live in one process, e.g. in tests). Routes
are labelled by the app's route paths, anything else "unmatched", so random URLs cannot
grow the label set; no label ever holds a key or a client.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llm.serving.request_log import RequestRecord

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# A refusal of a /v1/* request whose cause the refusing code did not name is known by its status.
CAUSE_OF_STATUS = {401: "unauthorized", 413: "too_large", 429: "server_busy", 503: "unavailable"}


class ServerMetrics:
    def __init__(self, load):
        """`load()` -> {"active": rows decoding, "queued": requests waiting} (the engine's)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llm_serve_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("llm_serve_request_duration_seconds", "Request latency to the end of the response",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram("llm_serve_time_to_first_token_seconds",
                                             "Arrival to the first generated token", buckets=LATENCY_BUCKETS_S,
                                             registry=r)
        self.prompt_tokens = Counter("llm_serve_prompt_tokens", "Prompt tokens of generating requests", registry=r)
        self.completion_tokens = Counter("llm_serve_completion_tokens", "Tokens generated", registry=r)
        self.refusals = Counter("llm_serve_refusals", "Requests refused, by cause", ["cause"], registry=r)
        Gauge("llm_serve_queue_depth", "Requests waiting for a decoding row", registry=r).set_function(
            lambda: load()["queued"])
        Gauge("llm_serve_active_rows", "Requests decoding now", registry=r).set_function(lambda: load()["active"])
        self.batch_size = Histogram("llm_serve_decode_batch_size", "Rows in each batched decode step",
                                    buckets=BATCH_BUCKETS, registry=r)

    def observe(self, record: RequestRecord) -> None:
        """Count a finished request."""
        route = record.route or "unmatched"
        self.requests.labels(route=route, status=str(record.status)).inc()
        self.latency.labels(route=route).observe(record.latency_s)
        if record.first_token_s is not None:
            self.time_to_first_token.observe(record.first_token_s)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        cause = record.refusal or (CAUSE_OF_STATUS.get(record.status) if record.path.startswith("/v1/") else None)
        if cause is not None:
            self.refusals.labels(cause=cause).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
