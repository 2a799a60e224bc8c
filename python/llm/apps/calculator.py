"""A calculator for tool calls: arithmetic on the expression's syntax tree, never eval.

Accepted: integers and decimals, + - * / // % ** and unary +/-, parentheses. Anything else
(names, calls, attributes, strings, comparisons) is refused, and so is work that could run
away: a long expression, deep nesting, huge powers, huge numbers.

    calculate("2 * (3 + 4)")   -> 14
    calculate("7 / 2")         -> 3.5
    calculate("__import__('os')") raises ValueError
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 200
MAX_DEPTH = 20
MAX_MAGNITUDE = 10**30  # larger numbers (operands or results) are refused
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression; ValueError for anything else."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("expected an arithmetic expression such as 2 * (3 + 4)")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body, depth=0)
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else value


def _evaluate(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise ValueError(f"the expression nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and abs(right) * math.log10(abs(left)) > 30:
            raise ValueError("the power is too large (results are limited to 30 digits)")
        try:
            return _bounded(BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, found {type(node).__name__}")


def _bounded(value):
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError("the result is not a finite real number")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError("the number is too large (at most 30 digits)")
    return value
