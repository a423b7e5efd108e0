"""The condition language of a task's `when`: a tiny grammar, parsed and evaluated as data.

    expr  := or ;  or := and ("or" and)* ;  and := not ("and" not)* ;  not := "not" not | cmp
    cmp   := atom [("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") atom]
    atom  := literal | reference | "(" expr ")" | "[" [expr ("," expr)*] "]"
    literal := 'text' | "text" | number | true | false | null
    reference := name ("." name)*    e.g. params.env, tasks.build.outputs.result, item

No eval(): a hand-written recursive descent parser builds a small tree that `evaluate`
walks. Values compared are JSON values; `and`, `or` and `not` take booleans only, and
`<`-like comparisons two numbers or two strings, so a typo is an error, never a guess.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_LENGTH = 2_000  # characters of one expression
MAX_DEPTH = 32  # nesting of parentheses, lists and `not`

COMPARISONS = ("==", "!=", "<=", ">=", "<", ">", "in", "not in")
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
    | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
    | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,|\.)
    )""",
    re.VERBOSE,
)


class ExpressionError(ValueError):
    """An expression that does not parse, or whose values cannot be compared."""


@dataclass(frozen=True)
class Literal:
    value: Any  # a JSON scalar


@dataclass(frozen=True)
class Reference:
    path: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class ListOf:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Compare:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Logic:
    op: str  # "and", "or"
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    operand: Node


Node = Literal | Reference | ListOf | Compare | Logic | Not


def parse(text: str) -> Node:
    """The tree of an expression; ExpressionError says where it stops making sense."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"the expression is {len(text):,} characters, more than {MAX_LENGTH}")
    parser = _Parser(text)
    node = parser.expression(0)
    if parser.peek() is not None:
        raise parser.error("an operator or the end")
    return node


def unparse(node: Node) -> str:
    """The text of a tree, which `parse` reads back to the same tree."""
    if isinstance(node, Literal) and isinstance(node.value, str):
        return '"' + node.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(node, Literal):
        return json.dumps(node.value)
    if isinstance(node, Reference):
        return str(node)
    if isinstance(node, ListOf):
        return "[" + ", ".join(unparse(item) for item in node.items) + "]"
    if isinstance(node, Not):
        return f"not ({unparse(node.operand)})"
    return f"({unparse(node.left)}) {node.op} ({unparse(node.right)})"


def references(node: Node) -> Iterator[Reference]:
    """Every reference in the tree, in order."""
    if isinstance(node, Reference):
        yield node
    elif isinstance(node, ListOf):
        for item in node.items:
            yield from references(item)
    elif isinstance(node, Not):
        yield from references(node.operand)
    elif isinstance(node, Compare | Logic):
        yield from references(node.left)
        yield from references(node.right)


def evaluate(node: Node, lookup: Callable[[Reference], Any]) -> Any:
    """The value of the tree; `lookup` gives a reference's value (or raises ExpressionError)."""
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Reference):
        return lookup(node)
    if isinstance(node, ListOf):
        return [evaluate(item, lookup) for item in node.items]
    if isinstance(node, Not):
        return not _boolean(evaluate(node.operand, lookup), "not")
    if isinstance(node, Logic):
        left = _boolean(evaluate(node.left, lookup), node.op)
        if left is (node.op == "or"):  # short-circuit, as a reader expects
            return left
        return _boolean(evaluate(node.right, lookup), node.op)
    return _compare(node.op, evaluate(node.left, lookup), evaluate(node.right, lookup))


def _boolean(value: Any, op: str) -> bool:
    if not isinstance(value, bool):
        raise ExpressionError(f"`{op}` takes true or false, not {_shown(value)}")
    return value


def _compare(op: str, left: Any, right: Any) -> bool:
    if op in ("==", "!="):
        same = type(left) is type(right) or (_number(left) and _number(right))
        return (same and left == right) == (op == "==")
    if op in ("in", "not in"):
        if isinstance(right, list):
            found = any(_compare("==", left, item) for item in right)
        elif isinstance(right, str) and isinstance(left, str):
            found = left in right
        else:
            raise ExpressionError(
                f"`{op}` looks in a list or a text, not {_shown(left)} in {_shown(right)}"
            )
        return found == (op == "in")
    if not (_number(left) and _number(right)) and not (
        isinstance(left, str) and isinstance(right, str)
    ):
        raise ExpressionError(
            f"`{op}` compares two numbers or two texts, not {_shown(left)} and {_shown(right)}"
        )
    result: bool = {
        "<": left < right,
        ">": left > right,
        "<=": left <= right,
        ">=": left >= right,
    }[op]
    return result


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Parser:
    """Recursive descent over the tokens; `depth` bounds nesting, so no input overflows."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        position = 0
        while text[position:].strip():
            match = _TOKEN.match(text, position)
            if match is None or match.lastgroup is None:
                start = len(text) - len(text[position:].lstrip())
                raise ExpressionError(f"unexpected character {text[start]!r} at {start + 1}")
            self.tokens.append((match.lastgroup, match.group(match.lastgroup), match.end()))
            position = match.end()
        self.at = 0

    def peek(self) -> tuple[str, str] | None:
        if self.at >= len(self.tokens):
            return None
        kind, value, _ = self.tokens[self.at]
        return kind, value

    def take(self, value: str) -> bool:
        token = self.peek()
        if token is not None and token[1] == value and token[0] in ("op", "name"):
            self.at += 1
            return True
        return False

    def error(self, expected: str) -> ExpressionError:
        token = self.peek()
        found = "the end" if token is None else repr(token[1])
        return ExpressionError(f"expected {expected}, found {found} in {self.text!r}")

    def expression(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"the expression nests deeper than {MAX_DEPTH}")
        node = self._and(depth)
        while self.take("or"):
            node = Logic("or", node, self._and(depth))
        return node

    def _and(self, depth: int) -> Node:
        node = self._not(depth)
        while self.take("and"):
            node = Logic("and", node, self._not(depth))
        return node

    def _not(self, depth: int) -> Node:
        if self.take("not"):
            if depth + 1 > MAX_DEPTH:
                raise ExpressionError(f"the expression nests deeper than {MAX_DEPTH}")
            return Not(self._not(depth + 1))
        return self._comparison(depth)

    def _comparison(self, depth: int) -> Node:
        left = self._atom(depth)
        for op in ("==", "!=", "<=", ">=", "<", ">", "in"):
            if self.take(op):
                return Compare(op, left, self._atom(depth))
        if self.peek() == ("name", "not"):
            self.at += 1
            if not self.take("in"):
                raise self.error("`in` after `not`")
            return Compare("not in", left, self._atom(depth))
        return left

    def _atom(self, depth: int) -> Node:
        token = self.peek()
        if token is None:
            raise self.error("a value")
        kind, value = token
        if kind == "number":
            self.at += 1
            number = float(value) if any(c in value for c in ".eE") else int(value)
            if isinstance(number, float) and not math.isfinite(number):
                raise ExpressionError(f"the number {value} is too large")
            return Literal(number)
        if kind == "string":
            self.at += 1
            return Literal(_unquote(value))
        if self.take("("):
            node = self.expression(depth + 1)
            if not self.take(")"):
                raise self.error("`)`")
            return node
        if self.take("["):
            items: list[Node] = []
            if not self.take("]"):
                items.append(self.expression(depth + 1))
                while self.take(","):
                    items.append(self.expression(depth + 1))
                if not self.take("]"):
                    raise self.error("`,` or `]`")
            return ListOf(tuple(items))
        if kind == "name" and value in ("true", "false", "null"):
            self.at += 1
            return Literal({"true": True, "false": False, "null": None}[value])
        if kind == "name" and value not in _KEYWORDS:
            self.at += 1
            path = [value]
            while self.take("."):
                part = self.peek()
                if part is None or part[0] != "name":
                    raise self.error("a name after `.`")
                path.append(part[1])
                self.at += 1
            return Reference(tuple(path))
        raise self.error("a value")


def _unquote(token: str) -> str:
    """A quoted text's value: `\\` escapes the next character (a quote, `\\`, n or t)."""
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            i += 1
            char = {"n": "\n", "t": "\t"}.get(body[i], body[i])
        out.append(char)
        i += 1
    return "".join(out)
