"""Tools a model may call, and the checks every call passes before it runs.

A Tool is a name, a description, a JSON schema for its arguments (the subset OpenAI's
`tools` use: an object of string / integer / number / boolean properties) and a function.
A ToolRegistry holds the tools an application offers and the whitelist of those it allows;
a call runs only if its tool is allowed and its arguments match the schema, and it runs under
a time limit. A refused or failed call is not an exception: it comes back as an error result
that the model reads, and the log records it.

Built in: calculator (llm.apps.calculator, what llm-eval --tool-use offers) and date (today's date).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

from llm.apps.calculator import calculate

DEFAULT_TIMEOUT_S = 2.0
JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema: {"type": "object", "properties": {...}, "required": [...]}
    function: Callable[..., object]


@dataclass(frozen=True)
class ToolResult:
    name: str
    arguments: dict
    ok: bool
    output: str  # the result, or what went wrong; the model reads either
    ms: float

    def summary(self) -> dict:
        return {"name": self.name, "ok": self.ok, "ms": round(self.ms, 2), "arguments": self.arguments,
                "result": self.output}  # fmt: skip


def check_arguments(tool: Tool, arguments: dict) -> None:
    """ValueError unless `arguments` match the tool's schema (required present, no others, types)."""
    properties = tool.parameters.get("properties", {})
    missing = [name for name in tool.parameters.get("required", []) if name not in arguments]
    if missing:
        raise ValueError(f"tool {tool.name!r}: missing argument(s) {', '.join(missing)}")
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise ValueError(f"tool {tool.name!r}: unknown argument(s) {', '.join(unknown)}; "
                         f"expected {', '.join(properties) or 'none'}")
    for name, value in arguments.items():
        expected = properties[name].get("type", "string")
        is_bool_for_number = isinstance(value, bool) and expected != "boolean"
        if is_bool_for_number or not isinstance(value, JSON_TYPES[expected]):
            raise ValueError(f"tool {tool.name!r}: argument {name!r} must be a {expected}, got {value!r}")


class ToolRegistry:
    def __init__(self, tools: list[Tool], allowed: list[str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.tools = {tool.name: tool for tool in tools}
        allowed = list(self.tools) if allowed is None else allowed
        unknown = [name for name in allowed if name not in self.tools]
        if unknown:
            raise ValueError(f"unknown tool(s) {', '.join(unknown)}; available: {', '.join(self.tools)}")
        self.allowed = tuple(allowed)
        self.timeout_s = timeout_s

    def run(self, name: str, arguments: dict) -> ToolResult:
        """Run one call if the whitelist and the schema allow it, within the time limit."""
        started = time.perf_counter()

        def result(ok: bool, output: str) -> ToolResult:
            return ToolResult(name, arguments, ok, output, 1000 * (time.perf_counter() - started))

        if name not in self.allowed:
            return result(False, f"error: tool {name!r} is not allowed; allowed: {', '.join(self.allowed) or 'none'}")
        try:
            check_arguments(self.tools[name], arguments)
        except ValueError as error:
            return result(False, f"error: {error}")
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            output = pool.submit(self.tools[name].function, **arguments).result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            return result(False, f"error: tool {name!r} took longer than {self.timeout_s:g} s")
        except (ValueError, ArithmeticError, TypeError) as error:
            return result(False, f"error: {error}")
        finally:
            pool.shutdown(wait=False)  # a call past its limit is abandoned, not waited for
        return result(True, str(output))


CALCULATOR = Tool(
    "calculator", "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    calculate,
)
DATE = Tool("date", "Today's date (YYYY-MM-DD).", {"type": "object", "properties": {}},
            lambda: datetime.date.today().isoformat())  # fmt: skip
