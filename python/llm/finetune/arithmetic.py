"""A built-in tool-use dataset: arithmetic questions answered through calculator calls, so a
small model learns to call the calculator rather than guess (llm-finetune --task instruct
--data arithmetic-tools; llm-eval --tool-use measures it with and without the tool).

    instruction  What is 37 * 58?
    output       <call>calculator {"expression": "37 * 58"}</call>
                 <result>2146</result>
                 2146

The model learns three things: to write the call with the question's numbers, to stop at
</call> (the runtime then runs the tool and appends the result), and to answer with
the result. Deterministic: the same records on every machine.
"""

from __future__ import annotations

import random

from llm.finetune.datasets import Instruction
from llm.tool_calls import format_tool_call, format_tool_result

ARITHMETIC_DATASET = "arithmetic-tools"
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.")


def arithmetic_records(count: int, seed: int) -> list[Instruction]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        op = rng.choice(list(OPERATIONS))
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        expression, value = f"{a} {op} {b}", OPERATIONS[op](a, b)
        call = format_tool_call("calculator", {"expression": expression})
        question = rng.choice(PHRASINGS).format(a=a, op=op, b=b)
        records.append(Instruction(question, "", call + format_tool_result(str(value)) + str(value)))
    return records
