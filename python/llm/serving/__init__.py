"""llm-serve's parts: the served model (loading), the batching engine (engine) and its
per-row KV cache (row_cache), the request schemas (schemas), the FastAPI app (app), the
uvicorn server that drains on SIGTERM (server) and a child-process launcher (launch).
Incremental text with stop sequences is llm.text_stream; chat prompts, llm.chat_template.
The command line is llm.serve. Nothing is imported here, so the command's --help and
option errors answer without FastAPI installed."""
