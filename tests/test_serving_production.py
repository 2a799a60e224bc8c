"""llm-serve in production: API keys, per-client rate limits, /metrics, the JSON request log,
each refusal, and a bounded soak test. The real server on a loopback port (test_serve's
`running`), talked to with httpx, the official openai client and prometheus_client's parser."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import statistics
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

from serve_helpers import (HTTP_TIMEOUT, chat_ckpt, health, instruct_ckpt, lm_ckpt, running, slowed, sse_events,  # noqa: F401
                        tokenizer)

from llm.serve import main as serve_main
from llm.serving.auth import KEYS_ENV, ApiKeys, key_id, load_api_keys
from llm.serving.loading import load_served_model
from llm.serving.rate_limits import TokenBucket, duration
from llm.serving.request_log import REQUEST_LOG

KEY, OTHER_KEY = "sk-test-4f9a1c0e7b2d", "sk-test-other-77aa01"
COMPLETION = {"prompt": "the quick brown fox", "max_tokens": 4, "temperature": 0}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def request_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "llm.serve.requests"]


def scrape(client) -> dict:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(response.text) for s in family.samples}


# --------------------------------------------------------------------------- keys
def test_v1_routes_need_a_key_and_health_metrics_and_pages_stay_open(instruct_ckpt):
    with running(load_served_model(instruct_ckpt, device="cpu"), api_keys=[KEY, OTHER_KEY]) as client:
        for headers in ({}, bearer("wrong"), bearer(KEY[:-1]), bearer(KEY + "x"), {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/nothing")):
                response = client.request(method, path, json=COMPLETION, headers=headers)
                assert response.status_code == 401, (headers, path)
                assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                                     "type": "invalid_request_error", "param": None,
                                                     "code": "invalid_api_key"}}
                assert KEY not in response.text and response.headers["www-authenticate"] == "Bearer"
        for key in (KEY, OTHER_KEY):
            assert client.post("/v1/completions", json=COMPLETION, headers=bearer(key)).status_code == 200
        assert client.post("/v1/completions", json=COMPLETION,
                           headers={"Authorization": f"bearer  {KEY}"}).status_code == 200  # scheme is case-blind
        assert health(client)["api_keys_required"] is True
        for path in ("/metrics", "/", "/playground", "/static/client.js"):
            assert client.get(path).status_code == 200, path
        # The official client sends the key as a bearer token.
        good = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=None, **COMPLETION).usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="nope", max_retries=0).models.list()
        assert refused.value.code == "invalid_api_key"


def test_keys_come_from_the_option_the_environment_and_a_file(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# production keys\nsk-file-one\n\n  sk-file-two  \nsk-cli\n")
    keys = load_api_keys(["sk-cli"], key_file, environ={KEYS_ENV: "sk-env-a, sk-env-b,"})
    assert keys == ["sk-cli", "sk-env-a", "sk-env-b", "sk-file-one", "sk-file-two"]
    accepted = ApiKeys(keys)
    assert all(accepted.client_of(f"Bearer {key}") == key_id(key) for key in keys)
    assert accepted.client_of("Bearer sk-file") is None and accepted.client_of(None) is None
    with pytest.raises(ValueError, match="printable ASCII") as bad:
        load_api_keys(["sk with space"], environ={})
    assert "sk with space" not in str(bad.value)  # the message names the key by its id only


def test_keys_never_reach_logs_errors_or_metrics(instruct_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="llm.serve.requests")
    with running(load_served_model(instruct_ckpt, device="cpu"), api_keys=[KEY], requests_per_minute=3,
                 log_content=True) as client:
        seen = [client.post("/v1/completions", json=COMPLETION, headers=bearer(KEY)) for _ in range(4)]
        seen += [client.post("/v1/completions", json={**COMPLETION, "max_tokens": 0}, headers=bearer(KEY)),
                 client.post("/v1/completions", json=COMPLETION, headers=bearer(KEY + "-guess"))]
        metrics_text = client.get("/metrics").text
    assert [r.status_code for r in seen] == [200, 200, 200, 429, 429, 401]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in [logged, metrics_text] + [r.text + str(r.headers) for r in seen]:
        assert KEY not in text
    lines = request_lines(caplog)
    assert [line["key_id"] for line in lines] == [key_id(KEY)] * 5 + [None, None]  # the last: /metrics


# --------------------------------------------------------------------------- per-client limits
def test_a_client_over_its_limit_is_refused_while_another_is_served(instruct_ckpt):
    with running(load_served_model(instruct_ckpt, device="cpu"), api_keys=[KEY, OTHER_KEY],
                 requests_per_minute=3) as client:
        first = [client.post("/v1/completions", json=COMPLETION, headers=bearer(KEY)) for _ in range(3)]
        assert [r.status_code for r in first] == [200] * 3
        assert [r.headers["x-ratelimit-remaining-requests"] for r in first] == ["2", "1", "0"]
        assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in first)
        refused = client.post("/v1/completions", json=COMPLETION, headers=bearer(KEY))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "3 requests per minute" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 20  # a third of a minute refills one request
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        other = client.post("/v1/completions", json=COMPLETION, headers=bearer(OTHER_KEY))
        assert other.status_code == 200 and other.headers["x-ratelimit-remaining-requests"] == "2"
        assert health(client)["requests"]["completed"] == 4  # the refused one never reached the engine


def test_tokens_per_minute_charge_max_tokens_and_give_back_what_was_not_generated(instruct_ckpt):
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.01)
    with running(served, tokens_per_minute=150) as client:
        first = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 1})
        prompt = first.json()["usage"]["prompt_tokens"]
        assert first.headers["x-ratelimit-limit-tokens"] == "150"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) in (149 - prompt, 150 - prompt)  # + refill
        # A stream for 100 tokens abandoned after two: what it did not generate comes back.
        with client.stream("POST", "/v1/completions", json={**COMPLETION, "max_tokens": 100, "stream": True}) as stream:
            events = sse_events(stream)
            next(events), next(events)
        deadline = time.monotonic() + 20
        while health(client)["requests"]["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        too_many = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 150})
        assert too_many.status_code == 429 and too_many.json()["error"]["param"] == "max_tokens"
        assert "lower max_tokens" in too_many.json()["error"]["message"] and "Retry-After" not in too_many.headers
        after = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 1})
        assert after.status_code == 200
        # Charged in full, the stream would leave at most 150 - 3 * (prompt + 1) - 99 (+ a few refilled).
        assert int(after.headers["x-ratelimit-remaining-tokens"]) > 150 - 3 * (prompt + 1) - 50


def test_refusals_413_and_503_while_draining_in_openai_shape_counted_and_logged(chat_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="llm.serve.requests")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running(load_served_model(chat_ckpt, device="cpu"), api_keys=[KEY], max_body_bytes=4096) as client:
        too_large = {**chat, "messages": [{"role": "user", "content": "fox " * 2000}]}
        refused = client.post("/v1/chat/completions", json=too_large, headers=bearer(KEY))
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
        assert client.post("/v1/chat/completions", json=too_large).status_code == 401  # the key is checked first
        assert client.post("/v1/chat/completions", json=chat, headers=bearer(KEY)).status_code == 200
        client.server_app.state.engine.begin_drain(5.0)  # what SIGTERM starts (llm.serving.server)
        draining = client.post("/v1/chat/completions", json=chat, headers=bearer(KEY))
        assert draining.status_code == 503 and draining.json()["error"]["code"] == "unavailable"
        assert "shutting down" in draining.json()["error"]["message"]
        assert client.get("/health").status_code == 503  # a load balancer stops sending requests here
        metrics = scrape(client)
    causes = {labels: value for (name, labels), value in metrics.items() if name == "llm_serve_refusals_total"}
    assert causes == {(("cause", "too_large"),): 1, (("cause", "unauthorized"),): 1, (("cause", "unavailable"),): 1}
    logged = [(line["status"], line["refusal"]) for line in request_lines(caplog) if line["route"] != "/metrics"]
    assert logged == [(413, None), (401, "unauthorized"), (200, None), (503, None), (503, None)]
    assert refused.headers["x-request-id"] == request_lines(caplog)[0]["request_id"]


def test_token_bucket_refills_at_its_rate_up_to_its_capacity():
    bucket = TokenBucket(capacity=60, level=60, updated=0.0)
    assert bucket.take(60, now=0.0) == 0 and bucket.level == 0
    assert bucket.take(3, now=1.0) == pytest.approx(2.0)  # 1 token a second: 1 there, 2 more to wait
    assert bucket.take(3, now=3.0) == 0 and bucket.level == pytest.approx(0)
    assert bucket.seconds_to_full(now=33.0) == pytest.approx(30.0)
    bucket.refill(now=1000.0)
    assert bucket.level == 60  # never above the capacity
    assert bucket.take(61, now=1000.0) == math.inf
    assert [duration(s) for s in (0, 0.25, 1.5, 59.9, 60, 361)] == ["0s", "0.25s", "1.5s", "59.9s", "1m0s", "6m1s"]


# --------------------------------------------------------------------------- metrics and logs
def test_metrics_count_requests_tokens_refusals_and_batches(instruct_ckpt):
    served = slowed(load_served_model(instruct_ckpt, device="cpu"), 0.002)
    with running(served, api_keys=[KEY], requests_per_minute=4) as client:
        answers = [client.post("/v1/completions", json=COMPLETION, headers=bearer(KEY)) for _ in range(2)]
        with client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True},
                           headers=bearer(KEY)) as response:
            response.read()
        client.post("/v1/completions", json=COMPLETION)  # no key
        client.post("/v1/completions", json={**COMPLETION, "max_tokens": 0}, headers=bearer(KEY))  # 400
        client.post("/v1/completions", json=COMPLETION, headers=bearer(KEY))  # the 5th in a minute
        info = health(client)
        metrics = scrape(client)

    def value(name, **labels):
        return metrics.get((name, tuple(sorted(labels.items()))), 0)

    route = "/v1/completions"
    assert value("llm_serve_requests_total", route=route, status="200") == 3
    assert value("llm_serve_requests_total", route=route, status="401") == 1
    assert value("llm_serve_requests_total", route=route, status="400") == 1
    assert value("llm_serve_requests_total", route=route, status="429") == 1
    assert value("llm_serve_requests_total", route="/health", status="200") == 1
    assert value("llm_serve_refusals_total", cause="unauthorized") == 1
    assert value("llm_serve_refusals_total", cause="requests_per_minute") == 1
    usage = answers[0].json()["usage"]
    assert value("llm_serve_prompt_tokens_total") == 3 * usage["prompt_tokens"]
    assert value("llm_serve_completion_tokens_total") == 3 * usage["completion_tokens"]
    assert value("llm_serve_request_duration_seconds_count", route=route) == 6
    assert value("llm_serve_time_to_first_token_seconds_count") == 3
    assert value("llm_serve_decode_batch_size_count") == info["decode_steps"] > 0
    assert value("llm_serve_decode_batch_size_sum") == info["decode_steps"]  # one row at a time here
    assert value("llm_serve_queue_depth") == 0 and value("llm_serve_active_rows") == 0


def test_one_json_line_per_request_with_its_id_and_content_only_when_asked(instruct_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="llm.serve.requests")
    served = load_served_model(instruct_ckpt, device="cpu")
    for log_content in (False, True):
        caplog.clear()
        with running(served, log_content=log_content) as client:
            answer = client.post("/v1/completions", json=COMPLETION)
            client.get("/v1/models")
        lines = request_lines(caplog)
        assert [(line["route"], line["status"]) for line in lines] == [("/v1/completions", 200), ("/v1/models", 200)]
        line = lines[0]
        assert line["request_id"] == answer.headers["x-request-id"] != lines[1]["request_id"]
        assert line["prompt_tokens"] == answer.json()["usage"]["prompt_tokens"]
        assert line["completion_tokens"] == 4 and line["finish_reason"] == answer.json()["choices"][0]["finish_reason"]
        assert line["latency_s"] >= line["time_to_first_token_s"] > 0 and line["client_address"] == "127.0.0.1"
        assert line["stream"] is False and line["choices"] == 1 and line["user_hash"] is None
        if log_content:
            assert line["prompt"] == {"prompt": COMPLETION["prompt"]}
            assert line["completion"] == answer.json()["choices"][0]["text"]
        else:
            assert "prompt" not in line and "completion" not in line
            assert COMPLETION["prompt"] not in "\n".join(r.getMessage() for r in caplog.records)
    caplog.clear()
    with running(served, log_content=True) as client:  # two choices: two rows, counted together
        answer = client.post("/v1/completions", json={**COMPLETION, "n": 2, "temperature": 1, "seed": 3}).json()
        with client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True, "user": "alice"}) as stream:
            assert list(sse_events(stream))[-1] == "[DONE]"
    line, streamed = request_lines(caplog)
    assert line["completion_tokens"] == answer["usage"]["completion_tokens"] == 8
    assert line["finish_reason"] == ["length", "length"] and line["choices"] == 2
    assert line["completion"] == [choice["text"] for choice in answer["choices"]]
    assert streamed["stream"] is True and streamed["completion_tokens"] == 4 and streamed["finish_reason"] == "length"
    assert streamed["user_hash"] == hashlib.sha256(b"alice").hexdigest()[:16]  # the user only as its hash
    assert "alice" not in "\n".join(r.getMessage() for r in caplog.records)


def test_command_binds_loopback_without_keys_and_logs_its_start(lm_ckpt, monkeypatch, capsys):
    from llm.serving import server

    calls = []
    monkeypatch.setattr(server, "serve", lambda app, **options: calls.append(options))
    for attribute in ("handlers", "level", "propagate"):  # the command sets up its logger: undone after
        monkeypatch.setattr(REQUEST_LOG, attribute, getattr(REQUEST_LOG, attribute))
    monkeypatch.setattr(REQUEST_LOG, "handlers", [])
    monkeypatch.delenv(KEYS_ENV, raising=False)
    serve_main(["--ckpt", str(lm_ckpt), "--device", "cpu"])
    out = capsys.readouterr()
    assert calls[-1]["host"] == "127.0.0.1" and "listening on 127.0.0.1 only" in out.out
    startup = json.loads(out.err.strip().splitlines()[-1])
    assert startup["event"] == "startup" and startup["parameters"] > 0 and startup["device"] == "cpu"
    assert startup["kernel_backends"].startswith("none") and startup["max_concurrency"] == 8
    assert startup["api_keys"] == 0 and startup["requests_per_minute"] is None

    monkeypatch.setenv(KEYS_ENV, KEY)
    serve_main(["--ckpt", str(lm_ckpt), "--device", "cpu", "--tokens-per-minute", "500"])
    out = capsys.readouterr()
    assert calls[-1]["host"] == "0.0.0.0" and "no API keys" not in out.out and KEY not in out.out + out.err
    startup = json.loads(out.err.strip().splitlines()[-1])
    assert startup["api_keys"] == 1 and startup["tokens_per_minute"] == 500

    monkeypatch.delenv(KEYS_ENV)
    serve_main(["--ckpt", str(lm_ckpt), "--device", "cpu", "--host", "0.0.0.0"])
    assert calls[-1]["host"] == "0.0.0.0" and "anyone who can reach 0.0.0.0" in capsys.readouterr().out


# --------------------------------------------------------------------------- soak
def resident_mb() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


SOAK_REQUESTS, SOAK_CLIENTS = 2000, 16


def test_soak_many_keyed_clients_with_limits_stay_healthy(instruct_ckpt, capsys):
    """2,000 short requests from 16 clients (each its own key, 60 requests a minute) on
    loopback: every one answered 200 or 429, the refusals only the limits', nothing left in
    flight, memory and latency bounded."""
    keys = [f"sk-soak-{i:02d}-a1b2c3d4" for i in range(SOAK_CLIENTS)]
    served = load_served_model(instruct_ckpt, device="cpu")

    async def soak(base_url):
        async def one_client(key):
            latencies, statuses = [], []
            async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT, headers=bearer(key)) as client:
                for i in range(SOAK_REQUESTS // SOAK_CLIENTS):
                    start = time.perf_counter()
                    response = await client.post("/v1/completions", json={"prompt": f"fox {i}", "max_tokens": 1})
                    latencies.append(time.perf_counter() - start)
                    statuses.append(response.status_code)
            return latencies, statuses

        return await asyncio.wait_for(asyncio.gather(*(one_client(key) for key in keys)), timeout=120)

    with running(served, api_keys=keys, requests_per_minute=60, max_concurrency=8, queue_size=16) as client:
        rss_before_mb = resident_mb()
        started = time.perf_counter()
        results = asyncio.run(soak(str(client.base_url)))
        elapsed = time.perf_counter() - started
        rss_after_mb = resident_mb()
        info, metrics = health(client), scrape(client)
    latencies = sorted(t for client_latencies, _ in results for t in client_latencies)
    statuses = [s for _, client_statuses in results for s in client_statuses]
    refusals = {cause: int(value) for (name, labels), value in metrics.items()
                if name == "llm_serve_refusals_total" for _, cause in labels}
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies))]
    with capsys.disabled():
        print(f"\nsoak: {len(statuses)} requests from {SOAK_CLIENTS} clients in {elapsed:.1f} s: "
              f"{statuses.count(200)} x 200, {statuses.count(429)} x 429; p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
              f"refusals {refusals}; RSS {rss_before_mb:.0f} MB before, {rss_after_mb:.0f} MB after")
    assert len(statuses) == SOAK_REQUESTS and set(statuses) <= {200, 429}
    # Each client gets its bucket of 60 plus the refill while it runs; the rest are refused by its limit.
    assert statuses.count(200) >= SOAK_CLIENTS * 60 and statuses.count(429) == refusals["requests_per_minute"] > 0
    assert set(refusals) == {"requests_per_minute"}
    assert info["requests"]["active"] == info["requests"]["queued"] == 0 and info["requests"]["failed"] == 0
    assert info["requests"]["completed"] == statuses.count(200)
    assert rss_after_mb - rss_before_mb < 200 and p99 < 10
