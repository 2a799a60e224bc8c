// What the chat page and the playground share: the settings form, the API key (kept in this
// browser's localStorage), one streamed request through fetch (server-sent events read from
// the response body), and the server's errors put into words.
"use strict";

const KEY_STORAGE = "llm-serve-api-key";

// The settings inputs (#api-key, #temperature, #top-p, #max-tokens) -> request fields.
function settings() {
  const key = document.getElementById("api-key").value.trim();
  localStorage.setItem(KEY_STORAGE, key);
  return {
    key,
    fields: {
      temperature: Number(document.getElementById("temperature").value),
      top_p: Number(document.getElementById("top-p").value),
      max_tokens: Math.trunc(Number(document.getElementById("max-tokens").value)),
    },
  };
}

// Fill <fieldset id="settings" data-max-tokens="N"> with the inputs settings() reads.
function renderSettings() {
  const fieldset = document.getElementById("settings");
  fieldset.innerHTML = `<legend>Settings</legend>
    <label>API key <input id="api-key" type="password" autocomplete="off" placeholder="if the server needs one"></label>
    <label>Temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
    <label>Top-p <input id="top-p" type="number" min="0.01" max="1" step="0.05" value="1"></label>
    <label>Max tokens <input id="max-tokens" type="number" min="1" step="1" value="${fieldset.dataset.maxTokens}"></label>`;
  document.getElementById("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
}

// The served model's name, task and context, from the open /health route.
async function serverInfo() {
  const response = await fetch("/health");
  return response.json();
}

// An error the page shows: a sentence for a person, from the HTTP status and OpenAI's error JSON.
function errorInWords(status, error, retryAfter, keyGiven) {
  const message = (error && error.message) || "";
  const code = error && error.code;
  if (status === 401) {
    return keyGiven
      ? "The server did not accept this API key (401). Check the key in the API key field."
      : "This server needs an API key (401). Enter it in the API key field.";
  }
  if (status === 429) {
    const wait = retryAfter ? `try again in ${retryAfter} s` : "try again later";
    return `Too many requests (429): ${wait}. The server said: ${message}`;
  }
  if (code === "context_length_exceeded") {
    return `Too long for the model's context: ${message}. Start a new chat, shorten the message or lower max tokens.`;
  }
  if (status === 413) return `The request is too large for the server (413): ${message}`;
  if (status === 503) return `The server is not taking requests now (503): ${message}. Try again shortly.`;
  if (status === 504) return `The server ran out of time for this request (504): ${message}`;
  return `Error ${status}: ${message || "no details"}`;
}

// POST `body` (with stream: true) to `path`; onText(text) for every token's text as it arrives.
// Resolves to {ok: true, tokens, seconds, finishReason} or {ok: false, error: "words"}.
async function streamRequest(path, body, key, onText) {
  const headers = { "Content-Type": "application/json" };
  if (key) headers["Authorization"] = `Bearer ${key}`;
  const started = performance.now();
  let response;
  try {
    const streamed = { ...body, stream: true, stream_options: { include_usage: true } };
    response = await fetch(path, { method: "POST", headers, body: JSON.stringify(streamed) });
  } catch (failure) {
    return { ok: false, error: `Cannot reach the server: ${failure.message}` };
  }
  if (!response.ok) {
    let error = null;
    try {
      error = (await response.json()).error;
    } catch (_) {
      // not OpenAI's error JSON: the status alone says what happened
    }
    return { ok: false, error: errorInWords(response.status, error, response.headers.get("Retry-After"), !!key) };
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", tokens = 0, firstTokenAt = null, finishReason = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice("data: ".length);
      if (data === "[DONE]") {
        const seconds = (performance.now() - (firstTokenAt ?? started)) / 1000;
        return { ok: true, tokens, seconds, finishReason };
      }
      const event = JSON.parse(data);
      if (event.error) return { ok: false, error: errorInWords(500, event.error, null, !!key) };
      if (event.usage) tokens = event.usage.completion_tokens; // the last event: the server's own count
      if (!event.choices.length) continue;
      const choice = event.choices[0];
      const text = choice.text ?? (choice.delta && choice.delta.content);
      if (choice.finish_reason) {
        finishReason = choice.finish_reason;
      } else if (text !== undefined && !(choice.delta && choice.delta.role)) {
        tokens += 1; // one event per token (text may be "" mid-character); the usage event corrects it
        firstTokenAt = firstTokenAt ?? performance.now();
      }
      if (text) onText(text);
    }
  }
  return { ok: false, error: "The server closed the stream before it finished." };
}

function rate(result) {
  const perSecond = result.seconds > 0 ? (result.tokens / result.seconds).toFixed(1) : "-";
  return `${result.tokens} tokens · ${perSecond} tokens/s · finish: ${result.finishReason}`;
}
