"""The expressions of ``(?)`` conditionals, as BuildStream evaluates them.

BuildStream hands each condition to jinja2 as ``{% if EXPR %}`` with the
project's options as names (a bool option is a boolean, a flags option a
list of strings, the others strings; an unknown name is an error). remex
evaluates the part of that language conditions use, without jinja2:

- literals: ``'x'``, ``"x"`` (with backslash escapes), integers, ``true`` /
  ``false`` / ``none`` (any capitalisation jinja accepts: ``True``, ``None``),
  lists ``[a, b]`` and tuples ``(a, b)``;
- names (the options);
- comparisons ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``,
  chained as in Python (``a == b == c``);
- ``not``, ``and``, ``or`` (short-circuit, returning operands as Python
  does) and parentheses.

The result is taken as jinja2 takes it: by its Python truth value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ExpressionError", "evaluate", "parse"]


class ExpressionError(Exception):
    """The expression is malformed, or cannot be evaluated (an unknown name, a
    comparison of a string with a number); the message says what, not where."""


_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<number>\d+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
    """,
    re.VERBOSE | re.DOTALL,
)
_CONSTANTS: dict[str, Any] = {
    "true": True, "True": True, "false": False, "False": False, "none": None, "None": None,
}  # fmt: skip
_KEYWORDS = {"and", "or", "not", "in", "is", "if", "else"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0"}
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


@dataclass(frozen=True)
class _Token:
    kind: str  # "string", "number", "name", "op", "end"
    text: str
    value: Any = None


# An expression tree: a tuple whose first item says what it is.
Expr = tuple[Any, ...]


def parse(text: str) -> Expr:
    """Parse ``text`` into an expression tree.

    Raises:
        ExpressionError: the text is not an expression remex understands.
    """
    parser = _Parser(_tokenize(text))
    expr = parser.parse_or()
    parser.expect_end()
    return expr


def evaluate(text: str, names: Mapping[str, Any]) -> bool:
    """Whether the expression ``text`` is true with ``names`` bound (the options).

    Raises:
        ExpressionError: malformed, an unknown name, an impossible comparison.
    """
    return bool(_eval(parse(text), names))


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise ExpressionError(f"unexpected {text[pos]!r} at column {pos + 1}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None
        word = match.group()
        if kind == "space":
            continue
        if kind == "string":
            tokens.append(_Token("string", word, _unquote(word)))
        elif kind == "number":
            tokens.append(_Token("number", word, int(word)))
        else:
            tokens.append(_Token(kind, word))
    tokens.append(_Token("end", ""))
    return tokens


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            # Python keeps unknown escapes as written; so does jinja2.
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


class _Parser:
    """Recursive descent, lowest precedence first: or, and, not, comparison, primary."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def at(self, kind: str, text: str | None = None) -> bool:
        token = self.peek()
        return token.kind == kind and (text is None or token.text == text)

    def expect(self, kind: str, text: str) -> None:
        if not self.at(kind, text):
            raise ExpressionError(f"expected {text!r}, got {self._describe(self.peek())}")
        self.take()

    def expect_end(self) -> None:
        if not self.at("end"):
            raise ExpressionError(f"unexpected {self._describe(self.peek())}")

    def parse_or(self) -> Expr:
        left = self.parse_and()
        while self.at("name", "or"):
            self.take()
            left = ("or", left, self.parse_and())
        return left

    def parse_and(self) -> Expr:
        left = self.parse_not()
        while self.at("name", "and"):
            self.take()
            left = ("and", left, self.parse_not())
        return left

    def parse_not(self) -> Expr:
        if self.at("name", "not"):
            self.take()
            return ("not", self.parse_not())
        return self.parse_compare()

    def parse_compare(self) -> Expr:
        first = self.parse_primary()
        ops: list[tuple[str, Expr]] = []
        while True:
            token = self.peek()
            if (token.kind, token.text in _COMPARE) == ("op", True) or (
                token.kind == "name" and token.text == "in"
            ):
                op = self.take().text
            elif (
                token.kind == "name"
                and token.text == "not"
                and self.tokens[self.pos + 1].kind == "name"
                and self.tokens[self.pos + 1].text == "in"
            ):
                self.pos += 2
                op = "not in"
            elif token.kind == "name" and token.text == "is":
                raise ExpressionError("jinja2 tests ('is ...') are not supported by remex")
            else:
                break
            ops.append((op, self.parse_primary()))
        return ("compare", first, ops) if ops else first

    def parse_primary(self) -> Expr:
        token = self.take()
        if token.kind in ("string", "number"):
            return ("const", token.value)
        if token.kind == "name":
            if token.text in _CONSTANTS:
                return ("const", _CONSTANTS[token.text])
            if token.text in _KEYWORDS:
                raise ExpressionError(f"unexpected {token.text!r}")
            return ("name", token.text)
        if token.kind == "op" and token.text == "(":
            if self.at("op", ")"):
                self.take()
                return ("tuple", [])
            first = self.parse_or()
            if self.at("op", ","):
                self.take()
                return ("tuple", [first, *self._items(")")])
            self.expect("op", ")")
            return first
        if token.kind == "op" and token.text == "[":
            return ("list", self._items("]"))
        raise ExpressionError(f"unexpected {self._describe(token)}")

    def _items(self, close: str) -> list[Expr]:
        """Comma-separated expressions up to ``close`` (a trailing comma allowed)."""
        items: list[Expr] = []
        while not self.at("op", close):
            items.append(self.parse_or())
            if not self.at("op", ","):
                break
            self.take()
        self.expect("op", close)
        return items

    @staticmethod
    def _describe(token: _Token) -> str:
        return "the end of the expression" if token.kind == "end" else repr(token.text)


def _eval(expr: Expr, names: Mapping[str, Any]) -> Any:
    kind = expr[0]
    if kind == "const":
        return expr[1]
    if kind == "name":
        try:
            return names[expr[1]]
        except KeyError:
            raise ExpressionError(f"{expr[1]!r} is undefined (not an option)") from None
    if kind == "list":
        return [_eval(item, names) for item in expr[1]]
    if kind == "tuple":
        return tuple(_eval(item, names) for item in expr[1])
    if kind == "not":
        return not _eval(expr[1], names)
    if kind == "and":
        left = _eval(expr[1], names)
        return _eval(expr[2], names) if left else left
    if kind == "or":
        left = _eval(expr[1], names)
        return left if left else _eval(expr[2], names)
    assert kind == "compare"
    left = _eval(expr[1], names)
    for op, right_expr in expr[2]:
        right = _eval(right_expr, names)
        try:
            result = _COMPARE[op](left, right)
        except TypeError:
            raise ExpressionError(
                f"cannot compare {_type_name(left)} with {_type_name(right)} using {op!r}"
            ) from None
        if not result:
            return False
        left = right
    return True


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "none" if value is None else type(value).__name__
