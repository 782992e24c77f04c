"""The `calculator` tool: exact arithmetic on a parsed expression, never `eval`."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from konstruct.platform.errors import ToolError

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 100
MAX_RESULT_DIGITS = 1000
# An int whose bit length passes this has more than MAX_RESULT_DIGITS decimal digits.
_MAX_RESULT_BITS = int(MAX_RESULT_DIGITS / math.log10(2)) + 1

_BINARY: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", operator.pow),
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_ALLOWED = "only numbers, parentheses, unary + and -, and + - * / // % ** are allowed"


def _refuse(what: str) -> ToolError:
    return ToolError(f"calculator refused {what}: {_ALLOWED}", retryable=False)


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name '{node.id}'"
    if isinstance(node, ast.Call):
        return "a function call"
    if isinstance(node, ast.Attribute):
        return f"an attribute access ('.{node.attr}')"
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return "a string"
        if isinstance(node.value, bool):
            return f"the boolean {node.value}"
        if isinstance(node.value, complex):
            return "a complex number"
        return f"the constant {node.value!r}"
    if isinstance(node, ast.BinOp):
        return f"the operator {type(node.op).__name__}"
    if isinstance(node, ast.UnaryOp):
        return f"the unary operator {type(node.op).__name__}"
    return f"a {type(node).__name__} expression"


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(
            f"calculator refused '**' with exponent {exponent}: at most {MAX_EXPONENT}",
            retryable=False,
        )
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        digits = exponent * math.log10(abs(base))
        if digits > MAX_RESULT_DIGITS:
            raise ToolError(
                f"calculator refused '**': the result would have about {int(digits)} digits "
                f"(at most {MAX_RESULT_DIGITS})",
                retryable=False,
            )


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ToolError("calculator: the result is not a real number", retryable=False)
    if isinstance(value, int):
        if value.bit_length() > _MAX_RESULT_BITS:
            raise ToolError(
                f"calculator: a result has more than {MAX_RESULT_DIGITS} digits", retryable=False
            )
        return value
    if not math.isfinite(value):
        raise ToolError(
            "calculator: the result is too large (not a finite number)", retryable=False
        )
    return float(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return _checked(node.value)
        raise _refuse(_describe(node))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        symbol, apply = _BINARY[type(node.op)]
        left = _evaluate(node.left)
        right = _evaluate(node.right)
        if symbol == "**":
            _check_power(left, right)
        try:
            return _checked(apply(left, right))
        except ZeroDivisionError:
            raise ToolError("calculator: division by zero", retryable=False) from None
        except OverflowError:
            raise ToolError(
                "calculator: the result is too large (not a finite number)", retryable=False
            ) from None
    raise _refuse(_describe(node))


def _format_number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".10g")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as text: "14", "0.3333333333".

    Parsed with `ast.parse(mode="eval")` and walked node by node; nothing is
    evaluated by Python itself. Refusals are `ToolError(retryable=False)`.
    """
    if not isinstance(expression, str):
        raise ToolError("calculator: 'expression' must be a string", retryable=False)
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"calculator: the expression has {len(expression)} characters "
            f"(at most {MAX_EXPRESSION_CHARS})",
            retryable=False,
        )
    text = expression.strip()
    if not text:
        raise ToolError("calculator: the expression is empty", retryable=False)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as error:
        reason = error.msg if isinstance(error, SyntaxError) else str(error)
        raise ToolError(
            f"calculator: not a valid arithmetic expression ({reason})", retryable=False
        ) from None
    except (RecursionError, MemoryError):
        raise ToolError(
            "calculator: the expression is nested too deeply", retryable=False
        ) from None
    try:
        value = _evaluate(tree.body)
    except RecursionError:
        raise ToolError(
            "calculator: the expression is nested too deeply", retryable=False
        ) from None
    return _format_number(value)
