"""How a model writes a tool call and reads its result: one place for the markup, shared by
the tool-use training data (llm.finetune.arithmetic) and the runtime that runs the calls
(llm.apps.tool_use, llm-serve's tool_calls).

    <call>calculator {"expression": "12 * 7"}</call>
    <result>84</result>

A call is the tool's name, a space and its arguments as a JSON object. The model writes the
call and stops at </call>; the runtime runs the tool, appends the result, and the model goes
on to answer with it. The markup is short on purpose: a small model's context is a few
hundred tokens, and a learned BPE splits tags and JSON keys into many pieces.
"""

from __future__ import annotations

import json

CALL_START, CALL_END = "<call>", "</call>"
RESULT_START, RESULT_END = "<result>", "</result>"


def format_tool_call(name: str, arguments: dict) -> str:
    return f"{CALL_START}{name} {json.dumps(arguments)}{CALL_END}"


def format_tool_result(result: str) -> str:
    return f"\n{RESULT_START}{result}{RESULT_END}\n"


def parse_tool_call(markup: str) -> tuple[str, dict]:
    """(name, arguments) of one <call>name {...}</call>; ValueError saying what is wrong."""
    body = markup.strip().removeprefix(CALL_START).removesuffix(CALL_END).strip()
    name, _, arguments_text = body.partition(" ")
    if not name.isidentifier():
        raise ValueError(f"a tool call is <call>NAME {{JSON arguments}}</call>, got {body[:80]!r}")
    try:
        arguments = json.loads(arguments_text) if arguments_text.strip() else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"the arguments of tool {name!r} are not valid JSON ({error.msg}): {arguments_text[:80]!r}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of tool {name!r} must be a JSON object, got {arguments_text[:80]!r}")
    return name, arguments
