"""Request bodies of the OpenAI-shaped endpoints, and the OpenAI error shape.

Bodies are validated strictly: an unknown field, a wrong type (a string for a number) or
malformed JSON is a 400 with one line naming the field, never a silent coercion.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4  # as OpenAI


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # if given, must be the served model's id
    max_tokens: int | None = None
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # not in OpenAI's API; None = no limit
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # None: a fresh random seed
    stream: bool = False


class CompletionRequest(SamplingFields):
    prompt: str
    max_tokens: int | None = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # max_tokens None: up to the end of the model's context


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's list of pydantic errors -> one 400 line about the first of them."""
    error = errors[0]
    # loc is ("body", field, ...) with union members named by type ("str", "list[str]"): drop those.
    parts = [str(p) for p in error["loc"][1:] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    param = ".".join(parts) or None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if error["type"] == "json_invalid":
        message = f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}"
        param = None
    elif error["type"] == "extra_forbidden":
        message = f"unknown field '{param}' (not supported by this server)"
    elif error["type"] == "missing":
        message = f"missing required field '{param}'"
    elif param is None:  # the body itself: not a JSON object (or not sent as application/json)
        message = f"the request body must be a JSON object sent as Content-Type: application/json ({error['msg']})"
    else:
        message = f"{param}: {error['msg']}"
    return ApiError(400, message + more, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}
