"""llm-serve's parts: the served model (loading), the batching engine and its per-row KV
cache, incremental text with stop sequences, the request schemas and the FastAPI app.
The command line is llm.serve."""

from llm.serving.app import create_app
from llm.serving.loading import ServedModel, load_served_model

__all__ = ["ServedModel", "create_app", "load_served_model"]
