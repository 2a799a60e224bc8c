"""The tool-use loop: the model writes, a tool call is run, its result is appended, the model
goes on; at most max_calls calls per answer.

    prompt -> model writes '<call>calculator {"expression": "2 + 2"}</call>'  (generation stops there)
           -> runtime: parse, whitelist, schema, run with a time limit (llm.apps.tools)
           -> "<result>4</result>" appended -> model writes on -> the answer

Nothing the model writes can run a tool that the registry does not allow, nor more calls than
the policy's max_tool_calls: the extra call is not run and the answer stops there
(finish_reason "content_filter", the intervention logged).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llm.apps.guardrails import Intervention
from llm.apps.prompting import PromptedModel, example_text
from llm.apps.tools import ToolRegistry, ToolResult
from llm.tool_calls import CALL_END, CALL_START, RESULT_END, format_tool_result, parse_tool_call


@dataclass
class ToolUseAnswer:
    answer: str  # what the model wrote after its last tool result
    transcript: str  # everything it wrote, calls and results included
    calls: list[ToolResult] = field(default_factory=list)
    finish_reason: str = "stop"
    interventions: list[Intervention] = field(default_factory=list)
    tokens: int = 0


def answer_with_tools(model: PromptedModel, prompt: list[int], tools: ToolRegistry, max_calls: int) -> ToolUseAnswer:
    """The model's reply to `prompt` (ids in its template), tool calls run as it makes them."""
    result = ToolUseAnswer("", "")
    while True:
        text, finish_reason, count = model.complete(prompt, stop=[CALL_END], continuation=result.transcript)
        result.tokens += count
        start = text.find(CALL_START)
        if start < 0 or finish_reason != "stop_string":
            result.transcript += text  # no complete call: this is the answer
            result.finish_reason = finish_reason
            break
        if len(result.calls) >= max_calls:
            result.transcript += text[:start]
            result.finish_reason = "content_filter"
            result.interventions.append(Intervention("max_tool_calls", "stopped", f"more than {max_calls} calls"))
            break
        call = text[start:] + CALL_END
        try:
            name, arguments = parse_tool_call(call)
            outcome = tools.run(name, arguments)
        except ValueError as error:  # not even a well-formed call: the model reads why
            outcome = ToolResult("?", {}, False, f"error: {error}", 0.0)
        result.calls.append(outcome)
        result.transcript += text[:start] + call + format_tool_result(outcome.output)
    result.answer = result.transcript.rsplit(RESULT_END, 1)[-1].strip()
    return result


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The first number in the text after the last tool result, as the model wrote it."""
    match = NUMBER.search(text.rsplit(RESULT_END, 1)[-1])
    return match.group() if match else None


def arithmetic_accuracy(model: PromptedModel, records: list, tools: ToolRegistry | None, max_calls: int = 3) -> dict:
    """Share of records whose answer is the expected number. With tools, calls run; without,
    the model's own continuation stands (it writes its own result, as it would unaided)."""
    correct, answers = 0, []
    for record in records:
        expected = record.output.rsplit(RESULT_END, 1)[-1].strip()
        prompt = model.render(None, example_text(record))
        if tools is not None:
            reply = answer_with_tools(model, prompt, tools, max_calls).transcript
        else:
            reply = model.complete(prompt)[0]
        got = final_number(reply)
        correct += got == expected
        answers.append({"question": record.instruction, "expected": expected, "answer": got})
    return {"accuracy": correct / max(1, len(records)), "questions": len(records), "answers": answers}
