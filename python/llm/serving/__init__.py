"""llm-serve's parts: the served model (loading), the batching engine (engine) and its
per-row KV cache (row_cache), incremental text with stop sequences (text), the request
schemas (schemas), the FastAPI app (app) and a child-process launcher (launch). The
command line is llm.serve. Nothing is imported here, so the command's --help and option
errors answer without FastAPI installed."""
