"""llm-serve's parts: the served model (loading), the batching engine (engine) and its
per-row KV cache (row_cache), the request schemas (schemas), the FastAPI app (app), the
uvicorn server that drains on SIGTERM (server) and a child-process launcher (launch).
In production, in front of the app (access): API keys (auth), per-client rate limits
(rate_limits), Prometheus metrics (metrics), the JSON request log (request_log); and the
chat page and playground a browser opens (pages, static/).
Incremental text with stop sequences is llm.text_stream; chat prompts, llm.chat_template.
The command line is llm.serve. Nothing is imported here, so the command's --help and
option errors answer without FastAPI installed."""
