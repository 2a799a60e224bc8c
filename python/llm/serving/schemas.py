"""Request bodies of the OpenAI-shaped endpoints, and the OpenAI error shape.

Bodies are validated strictly: a wrong type (a string for a number) or malformed JSON is a
400 with one line naming the field, never a silent coercion. null means the field's
default, as in OpenAI's API. OpenAI fields this server does not implement are refused
with a 400 naming the field (UNSUPPORTED_FIELDS, also listed in README); any other
unknown field likewise.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_CHOICES = 8  # n
MAX_LOGPROBS = 5  # completions' logprobs (as OpenAI)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (as OpenAI)

# OpenAI request fields that are recognised but not implemented: a 400 names them.
UNSUPPORTED_FIELDS = {
    "completions": ("suffix", "best_of"),
    "chat": ("parallel_tool_calls", "functions", "function_call", "response_format",
             "audio", "modalities", "prediction", "reasoning_effort", "web_search_options", "store", "metadata",
             "service_tier"),
}


class StrictModel(BaseModel):
    """Unknown fields and wrong types are 400s, as for every body here."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool | None = None  # a last chunk with the usage of the whole request


class SamplingFields(StrictModel):
    """The fields both endpoints share."""

    model: str | None = None  # if given, must be the served model's id
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1; 0 = greedy
    top_p: float | None = None  # None: 1 (no nucleus cut)
    top_k: int | None = None  # not in OpenAI's API; None = no limit
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)  # None: 1; choices are separate batch rows
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # None: a fresh random seed
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None  # accepted; logged as a hash only


class CompletionRequest(SamplingFields):
    # Text, token ids, or a list of either (one choice per prompt and n).
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None  # the prompt in front of the text (and its logprobs with logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's logprob and the k most likely
    # max_tokens None: OpenAI's default for completions, 16


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's convention)


class ToolCall(StrictModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class FunctionSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of an object (llm.apps.tools checks calls against it)
    strict: bool | None = None


class ToolSpec(StrictModel):
    type: Literal["function"]
    function: FunctionSpec


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's new name for system
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted, not part of the prompt
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolSpec] | None = None  # the model may answer with tool_calls (llm.serving.applications)
    tool_choice: Literal["auto", "none"] | None = None
    # max_tokens None: up to the end of the model's context


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(errors: list[dict], endpoint: str) -> ApiError:
    """FastAPI's list of pydantic errors -> one 400 line about the first of them."""
    error = errors[0]
    # loc is ("body", field, ...) with union members named by type ("str", "list[str]"): drop those.
    parts = [str(p) for p in error["loc"][1:] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    param = ".".join(parts) or None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if error["type"] == "json_invalid":
        message = f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}"
        param = None
    elif error["type"] == "extra_forbidden" and param in UNSUPPORTED_FIELDS[endpoint]:
        message = f"field '{param}' is not supported by this server (see README: llm-serve's unsupported fields)"
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
