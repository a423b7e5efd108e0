"""The condition language of `when`: a parser that reads back what it prints, refuses any
other text with ExpressionError (never another exception, never a hang or a stack
overflow), and an evaluator that compares JSON values strictly, running nothing."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt.model.expressions import (
    MAX_DEPTH,
    Compare,
    ExpressionError,
    ListOf,
    Literal,
    Logic,
    Node,
    Not,
    Reference,
    evaluate,
    parse,
    references,
    unparse,
)

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,8}", fullmatch=True).filter(
    lambda name: name not in {"and", "or", "not", "in", "true", "false", "null"}
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
leaves: st.SearchStrategy[Node] = st.one_of(
    scalars.map(Literal), st.lists(names, min_size=1, max_size=4).map(lambda p: Reference(tuple(p)))
)
trees: st.SearchStrategy[Node] = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: ListOf(tuple(items))),
        st.builds(Not, inner),
        st.builds(
            Compare,
            st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not in"]),
            inner,
            inner,
        ),
        st.builds(Logic, st.sampled_from(["and", "or"]), inner, inner),
    ),
    max_leaves=12,
)


@settings(max_examples=400)
@given(trees)
def test_what_is_printed_parses_back_to_the_same_tree(tree: Node) -> None:
    text = unparse(tree)
    assert parse(text) == tree
    assert unparse(parse(text)) == text  # 1 and true are equal in Python, not here


@settings(max_examples=400)
@given(st.text(alphabet=st.sampled_from(list("ab.()[],'\"=!<> \\-1e0notandorin")), max_size=40))
def test_any_text_parses_or_is_refused_with_an_expression_error(text: str) -> None:
    try:
        tree = parse(text)
    except ExpressionError:
        return
    assert parse(unparse(tree)) == tree


values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=400)
@given(trees, values)
def test_evaluation_gives_a_value_or_an_expression_error(tree: Node, value: Any) -> None:
    seen: list[Reference] = []

    def lookup(ref: Reference) -> Any:
        seen.append(ref)
        return value

    with contextlib.suppress(ExpressionError):
        evaluate(tree, lookup)
    assert set(seen) <= set(references(tree)), "only the tree's references are looked up"


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("params.env == 'prod'", True),
        ("params.env != 'prod'", False),
        ("params.env in ['dev', 'prod'] and not (params.n < 3)", True),
        ("params.n >= 3.0 or nothing.is_read", True),  # `or` stops at true
        ("params.env == 3", False),  # text is never a number
        ("params.n == 3.0", True),
        ("'ro' in params.env", True),
        ("params.env not in ['dev']", True),
        ("true and (false or params.flag)", True),
        ('params.quote == "it\'s \\"x\\""', True),
    ],
)
def test_conditions_evaluate_as_a_reader_expects(text: str, result: bool) -> None:
    values = {"env": "prod", "n": 3, "flag": True, "quote": 'it\'s "x"'}

    def lookup(ref: Reference) -> Any:
        assert ref.path[0] == "params", ref
        return values[ref.path[1]]

    assert evaluate(parse(text), lookup) is result


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("params.env ==", "expected a value, found the end"),
        ("params.env = 'x'", "unexpected character '='"),
        ("__import__('os').system('id')", "expected an operator or the end"),
        ("params.env; rm -rf /", "unexpected character ';'"),
        ("(" * (MAX_DEPTH + 2) + "1" + ")" * (MAX_DEPTH + 2), "nests deeper than 32"),
        ("not " * (MAX_DEPTH + 2) + "true", "nests deeper than 32"),
        ("1e999 == 1", "too large"),
        ("x" * 3000, "more than 2000"),
        ("a not b", "`in` after `not`"),
    ],
)
def test_bad_conditions_are_refused_naming_why(text: str, why: str) -> None:
    with pytest.raises(ExpressionError, match=re.escape(why)):
        parse(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("1 and true", "`and` takes true or false, not 1"),
        ("not 'x'", '`not` takes true or false, not "x"'),
        ("1 < 'a'", "compares two numbers or two texts"),
        ("1 in 2", "looks in a list or a text"),
    ],
)
def test_mismatched_values_are_an_error_not_a_guess(text: str, why: str) -> None:
    with pytest.raises(ExpressionError, match=re.escape(why)):
        evaluate(parse(text), lambda ref: None)
