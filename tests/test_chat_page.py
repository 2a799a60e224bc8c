"""The chat page and the completions playground in a real browser: Debian's chromium,
headless, driven by Playwright for Python, against the real server on a loopback port.

Set LLM_CHAT_SCREENSHOT=path.png to keep a screenshot of the chat (README's docs/chat-page.png).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_helpers import chat_ckpt, lm_ckpt, running, slowed, tokenizer  # noqa: F401

from llm.serving.loading import load_served_model

CHROMIUM = os.environ.get("LLM_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-page-5e6f7a8b"
WAIT_MS = 60_000

if not shutil.which(CHROMIUM):
    if os.environ.get("LLMKERNELS_REQUIRE_TEST_DEPS") == "1":  # CI installs it (.ci/run)
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium")
    pytest.skip(f"no chromium at {CHROMIUM}", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def chat_requests(page) -> list[dict]:
    """The JSON bodies the page posts to /v1/chat/completions, as it sends them."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
            else None)
    return bodies


def send(page, text: str) -> None:
    page.fill("#message", text)
    page.keyboard.press("Enter")


def test_chat_page_streams_a_reply_keeps_the_conversation_and_words_errors(chat_ckpt, browser):
    served = slowed(load_served_model(chat_ckpt, device="cpu"), 0.03)  # tokens arrive one by one
    with running(served, api_keys=[KEY], requests_per_minute=4) as client:
        expected = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"messages": [{"role": "user", "content": "Name a fox."}], "max_tokens": 12,
                                     "temperature": 0}).json()["choices"][0]["message"]["content"]
        page = browser.new_page(viewport={"width": 900, "height": 700})
        sent = chat_requests(page)
        page.goto(f"{client.base_url}/")
        page.wait_for_function("document.getElementById('model').textContent === 'chat.pt'")

        # No key yet: the 401 is put into words and the message stays in the box.
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        send(page, "Name a fox.")
        page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=WAIT_MS)
        assert "needs an API key" in page.inner_text("#error") and page.input_value("#message") == "Name a fox."

        page.fill("#api-key", KEY)
        page.click("#send")
        # Streamed: the reply is on the page, growing, before the response has ended.
        page.wait_for_function("(() => { const r = document.querySelector('.assistant');"
                               " return r && r.dataset.state === 'streaming' && r.textContent.length > 0; })()",
                               timeout=WAIT_MS)
        page.wait_for_selector(".assistant[data-state=done]", timeout=WAIT_MS)
        assert page.text_content(".assistant") == expected
        assert page.inner_text(".stats").startswith("12 tokens · ") and "tokens/s" in page.inner_text(".stats")
        assert page.inner_text("#error") == ""
        assert sent[-1]["messages"] == [{"role": "user", "content": "Name a fox."}]
        assert sent[-1]["temperature"] == 0 and sent[-1]["max_tokens"] == 12 and sent[-1]["stream"] is True
        assert sent[-1]["stream_options"] == {"include_usage": True}

        # The second turn carries the first.
        send(page, "And another?")
        page.wait_for_selector(".assistant[data-state=done] >> nth=1", timeout=WAIT_MS)
        assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
        assert sent[-1]["messages"][1]["content"] == expected
        if os.environ.get("LLM_CHAT_SCREENSHOT"):
            page.screenshot(path=os.environ["LLM_CHAT_SCREENSHOT"], full_page=True)

        # Too long for the context, then over this key's 4 requests a minute: both in words.
        send(page, "fox " * 300)
        page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=WAIT_MS)
        assert "Too long for the model's context" in page.inner_text("#error")
        send(page, "One more?")
        page.wait_for_function("document.getElementById('error').textContent.includes('429')", timeout=WAIT_MS)
        assert "Too many requests" in page.inner_text("#error") and "try again in" in page.inner_text("#error")
        assert page.locator(".assistant").count() == 2  # failed turns leave no trace in the conversation
        page.close()


def test_playground_streams_a_completion(lm_ckpt, browser):
    with running(load_served_model(lm_ckpt, device="cpu")) as client:
        expected = client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 8,
                                                        "temperature": 0}).json()["choices"][0]["text"]
        page = browser.new_page()
        page.goto(f"{client.base_url}/playground")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        page.fill("#prompt", "the quick")
        page.click("#complete")
        page.wait_for_selector("#generated[data-state=done]", timeout=WAIT_MS)
        assert page.text_content("#generated") == expected
        assert page.text_content("#prompt-echo") == "the quick" and "tokens/s" in page.inner_text("#stats")
        # The chat page tells a plain language model's user where to go instead.
        page.goto(f"{client.base_url}/")
        page.wait_for_function("document.getElementById('notice').textContent !== ''")
        assert "not instruction-tuned" in page.inner_text("#notice")
        page.close()
