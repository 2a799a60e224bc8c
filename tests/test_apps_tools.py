"""Tools: the calculator parses instead of evaluating, the registry enforces its whitelist,
argument schemas and time limit, and the tool-use loop feeds results back at most N times."""

import time

import pytest
from finetune_helpers import one_thread, save_tiny_checkpoint  # noqa: F401

from llm.apps.calculator import calculate
from llm.apps.prompting import PromptedModel
from llm.apps.tool_use import answer_with_tools, arithmetic_accuracy
from llm.apps.tools import CALCULATOR, DATE, Tool, ToolRegistry
from llm.finetune.arithmetic import arithmetic_records
from llm.tool_calls import RESULT_END, format_tool_call, parse_tool_call


@pytest.mark.parametrize("expression, value", [
    ("2 * (3 + 4)", 14), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10", 1024), ("-(2.5)", -2.5),
    ("1 - 2 - 3", -4), ("2 ** 3 ** 2", 512), ("((((1))))", 1),
])  # fmt: skip
def test_calculator_follows_python_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "only numbers"), ("abs(-1)", "only numbers"), ("x + 1", "only numbers"),
    ("(1).real", "only numbers"), ("'a' * 3", "only numbers"), ("1 < 2", "only numbers"), ("True + 1", "only numbers"),
    ("9 ** 9 ** 9", "too large"), ("10 ** 31", "too large"), ("1 / 0", "division by zero"), ("1 +", "not an arithmetic"),
    ("1" + " + 1" * 100, "longer than"), ("-" * 30 + "1", "deeper"), ("(-8) ** 0.5", "finite real"),
])  # fmt: skip
def test_calculator_refuses_everything_else(expression, message):
    with pytest.raises(ValueError, match=message):
        calculate(expression)


def test_registry_runs_only_whitelisted_tools_with_valid_arguments():
    slow = Tool("slow", "sleeps", {"type": "object", "properties": {}}, lambda: time.sleep(2) or "late")
    tools = ToolRegistry([CALCULATOR, DATE, slow], allowed=["calculator", "slow"], timeout_s=0.2)
    assert tools.run("calculator", {"expression": "6 * 7"}).output == "42"
    refused = tools.run("date", {})
    assert not refused.ok and "not allowed" in refused.output
    assert "missing argument(s) expression" in tools.run("calculator", {}).output
    assert "unknown argument(s) code" in tools.run("calculator", {"expression": "1", "code": "x"}).output
    assert "must be a string" in tools.run("calculator", {"expression": 7}).output
    assert "division by zero" in tools.run("calculator", {"expression": "1/0"}).output
    started = time.perf_counter()
    late = tools.run("slow", {})
    assert not late.ok and "longer than 0.2 s" in late.output and time.perf_counter() - started < 1.5
    with pytest.raises(ValueError, match="unknown tool"):
        ToolRegistry([CALCULATOR], allowed=["shell"])


def test_tool_call_markup_round_trips_and_rejects_malformed_calls():
    call = format_tool_call("calculator", {"expression": "1 + 1"})
    assert parse_tool_call(call) == ("calculator", {"expression": "1 + 1"})
    for bad in ("<call>calculator {oops}</call>", "<call>calculator [1]</call>", "<call>rm -rf {}</call>"):
        with pytest.raises(ValueError):
            parse_tool_call(bad)


class ScriptedModel(PromptedModel):
    """Stands in for a model's output (what a model might write is the input under test here):
    each completion is the next scripted text; a text containing a stop string is cut there."""

    def __init__(self, replies):
        self.replies, self.prompts, self.template = list(replies), [], "scripted"

    def render(self, system, user, examples=()):
        return user

    def complete(self, prompt, stop=(), continuation=""):
        self.prompts.append(prompt + continuation)
        text = self.replies.pop(0)
        for s in stop:
            if s in text:
                return text[: text.index(s)], "stop_string", 1
        return text, "stop", 1


def test_tool_loop_feeds_results_back_and_stops_after_max_calls():
    calculator = ToolRegistry([CALCULATOR])
    model = ScriptedModel([format_tool_call("calculator", {"expression": "12 * 7"}), "The answer is 84."])
    answer = answer_with_tools(model, "Q: 12 times 7?\n", calculator, max_calls=3)
    assert answer.answer == "The answer is 84." and [c.output for c in answer.calls] == ["84"]
    assert model.prompts[1].endswith("<result>84</result>\n")  # the result is what the model reads next

    # A call to a tool outside the whitelist is not run; the model reads why.
    model = ScriptedModel([format_tool_call("shell", {"command": "ls"}), "ok"])
    answer = answer_with_tools(model, "", calculator, max_calls=3)
    assert not answer.calls[0].ok and "not allowed" in answer.calls[0].output

    loop = [format_tool_call("calculator", {"expression": "1 + 1"})] * 5
    answer = answer_with_tools(ScriptedModel(loop), "", calculator, max_calls=2)
    assert len(answer.calls) == 2 and answer.finish_reason == "content_filter"
    assert answer.interventions[0].rule == "max_tool_calls"


def test_arithmetic_dataset_answers_through_the_calculator():
    records = arithmetic_records(50, seed=3)
    for record in records:
        call = record.output[: record.output.index("</call>") + len("</call>")]
        name, arguments = parse_tool_call(call)
        result = record.output.rsplit(RESULT_END, 1)[-1].strip()
        assert name == "calculator" and str(calculate(arguments["expression"])) == result
        assert arguments["expression"].split()[0] in record.instruction
    assert arithmetic_records(50, seed=3) == records  # deterministic

    # With the tool the runtime's result stands; without it, whatever the model wrote itself.
    wrong_guess = [r.output.split("<result>")[0] + "<result>0</result>\n0" for r in records[:4]]
    with_tool = ScriptedModel([reply for r in records[:4] for reply in (r.output.split("</call>")[0] + "</call>",
                                                                       r.output.rsplit(RESULT_END, 1)[-1])])  # fmt: skip
    assert arithmetic_accuracy(with_tool, records[:4], ToolRegistry([CALCULATOR]))["accuracy"] == 1.0
    assert arithmetic_accuracy(ScriptedModel(wrong_guess), records[:4], None)["accuracy"] == 0.0
