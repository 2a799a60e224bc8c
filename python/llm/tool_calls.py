"""How a model writes a tool call and reads its result: one place for the markup, shared by
the tool-use training data (llm.finetune) and the runtime that runs the calls (llm.apps).

    <tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>
    <tool_result>84</tool_result>

The model writes the call and stops at </tool_call>; the runtime runs the tool and appends
the result, and the model goes on to answer with it (Hermes / Qwen style markup).
"""

from __future__ import annotations

import json

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
RESULT_START, RESULT_END = "<tool_result>", "</tool_result>"


def format_tool_call(name: str, arguments: dict) -> str:
    return CALL_START + json.dumps({"name": name, "arguments": arguments}) + CALL_END


def format_tool_result(result: str) -> str:
    return f"\n{RESULT_START}{result}{RESULT_END}\n"


def find_tool_call(text: str) -> tuple[int, int] | None:
    """(start, end) of the first complete call in text, or None."""
    start = text.find(CALL_START)
    end = text.find(CALL_END, start + len(CALL_START)) if start >= 0 else -1
    return None if end < 0 else (start, end + len(CALL_END))


def parse_tool_call(markup: str) -> tuple[str, dict]:
    """(name, arguments) of one <tool_call>...</tool_call>; ValueError saying what is wrong."""
    body = markup.removeprefix(CALL_START).removesuffix(CALL_END)
    try:
        call = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"the tool call is not valid JSON ({error.msg}): {body[:80]!r}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f'a tool call is {{"name": ..., "arguments": {{...}}}}, got {body[:80]!r}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ValueError(f"the arguments of tool {call['name']!r} are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of tool {call['name']!r} must be an object")
    return call["name"], arguments
