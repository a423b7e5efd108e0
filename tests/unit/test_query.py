"""Queries: the builder's syntax, JSON round trips, and vectorised evaluation on batches.

The oracle is a pure-Python evaluator written here from SQL's three-valued logic, applied
row by row; the library evaluates with pyarrow.compute on whole batches.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from flotta_mqtt import Compare, DateCompare, IsIn, Query
from flotta_mqtt.analytics import ColumnTypeError, Dataset, UnknownColumn
from flotta_mqtt.analytics.filters import check, mask, select
from flotta_mqtt.model.query import AllOf, AnyOf, Filter, Not

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILTER = TypeAdapter(Filter)

SCHEMA = pa.schema(
    [
        ("x", pa.float64()),
        ("n", pa.int64()),
        ("s", pa.string()),
        ("d", pa.date32()),
        ("b", pa.bool_()),
    ]
)
WORDS = ["a", "b", "c", "ab"]
DAYS = [date(2019, 12, 31), date(2020, 1, 1), date(2020, 6, 15), date(2021, 2, 28)]

# --- the reference: SQL's three-valued logic, one row at a time ----------------------------

COMPARE = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def reference(where: Any, row: dict[str, Any]) -> bool | None:
    """True, False or None (unknown) for one row."""
    if isinstance(where, AllOf | AnyOf):
        results = [reference(f, row) for f in where.filters]
        decisive = isinstance(where, AnyOf)  # True decides an OR, False an AND
        if decisive in results:
            return decisive
        return None if None in results else not decisive
    if isinstance(where, Not):
        inner = reference(where.filter, row)
        return None if inner is None else not inner
    value = row[where.column]
    if value is None:
        return None
    if isinstance(where, IsIn):
        return value in where.values
    return COMPARE[where.op](value, where.value)


# --- strategies -------------------------------------------------------------------------------

OPS = st.sampled_from(list(COMPARE))
EQ = st.sampled_from(["==", "!="])
SMALL = st.floats(-3, 3, allow_nan=False).map(lambda v: round(v, 1))
LEAVES = st.one_of(
    st.builds(lambda op, v: Compare(column="x", op=op, value=v), OPS, SMALL),
    st.builds(lambda op, v: Compare(column="n", op=op, value=v), OPS, st.integers(-3, 3)),
    st.builds(lambda op, v: Compare(column="x", op=op, value=v), OPS, st.integers(-3, 3)),
    st.builds(lambda op, v: Compare(column="s", op=op, value=v), EQ, st.sampled_from(WORDS)),
    st.builds(lambda op, v: Compare(column="b", op=op, value=v), EQ, st.booleans()),
    st.builds(lambda op, v: DateCompare(column="d", op=op, value=v), OPS, st.sampled_from(DAYS)),
    st.builds(lambda v: IsIn(column="s", values=v), st.lists(st.sampled_from(WORDS), max_size=3)),
    st.builds(lambda v: IsIn(column="n", values=v), st.lists(st.integers(-3, 3), max_size=3)),
    st.builds(lambda v: IsIn(column="x", values=v), st.lists(SMALL, max_size=3)),
    st.builds(
        lambda v: IsIn(column="n", values=v), st.lists(st.sampled_from([0.5, 1.0]), max_size=2)
    ),
)
FILTERS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda fs: AllOf(filters=fs), st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda fs: AnyOf(filters=fs), st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda f: Not(filter=f), inner),
    ),
    max_leaves=8,
)


def maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), values)


ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "x": maybe(SMALL),
            "n": maybe(st.integers(-3, 3)),
            "s": maybe(st.sampled_from(WORDS)),
            "d": maybe(st.sampled_from(DAYS)),
            "b": maybe(st.booleans()),
        }
    ),
    max_size=40,
)


class TableDataset(Dataset):
    """An in-memory dataset, served in small batches so that rows cross batch edges."""

    def __init__(self, table: pa.Table, node: str = "w0", batch_rows: int = 7) -> None:
        super().__init__("p", node)
        self.table = table
        self.batch_rows = batch_rows

    def schema(self) -> pa.Schema:
        return self.table.schema

    def batches(self, columns: Any) -> Any:
        return iter(self.table.select(list(columns)).to_batches(self.batch_rows))

    def count_rows(self) -> int:
        return int(self.table.num_rows)


# --- properties ---------------------------------------------------------------------------------


@SETTINGS
@given(FILTERS)
def test_filters_round_trip_through_json(where: Any) -> None:
    text = json.dumps(FILTER.dump_python(where, mode="json"))
    assert FILTER.validate_json(text) == where
    query = Query()[where][["x", "s"]]
    assert Query.model_validate_json(json.dumps(query.params())) == query


@SETTINGS
@given(FILTERS, ROWS)
def test_evaluation_on_batches_equals_the_row_by_row_reference(
    where: Any, rows: list[dict[str, Any]]
) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    expected = [i for i, row in enumerate(rows) if reference(where, row) is True]
    table = table.append_column("i", pa.array(range(len(rows)), pa.int64()))
    data = TableDataset(table)
    kept = [i for batch in select(data, ["i"], where) for i in batch.column("i").to_pylist()]
    assert kept == expected
    # Unknown is not false: only rows with a known answer pass either the filter or its not.
    if rows:
        whole = table.to_batches()[0]
        both = mask(where, whole).to_pylist(), mask(Not(filter=where), whole).to_pylist()
        assert [a is None for a in both[0]] == [b is None for b in both[1]]


# --- the builder --------------------------------------------------------------------------------


def test_builder_syntax_makes_the_same_filters_as_the_models() -> None:
    q = Query()
    assert (q["x"] > 0.5) == Compare(column="x", op=">", value=0.5)
    assert (q["s"] == "a") == Compare(column="s", op="==", value="a")
    assert (q["d"] < date(2020, 1, 1)) == DateCompare(column="d", op="<", value=date(2020, 1, 1))
    assert q["s"].isin(["a", "b"]) == IsIn(column="s", values=["a", "b"])
    both = (q["s"] == "a") & ~(q["d"] < date(2020, 1, 1)) & (q["n"] >= 2)
    assert isinstance(both, AllOf) and len(both.filters) == 3  # a & b & c is one AllOf
    assert isinstance(both.filters[1], Not)
    either = (q["n"] < 0) | (q["n"] > 2) | q["s"].isin([])
    assert isinstance(either, AnyOf) and len(either.filters) == 3

    selected = q[q["x"] > 0.5][q["n"] != 1][["x", "n"]]
    assert selected.columns == ["x", "n"]
    assert isinstance(selected.where, AllOf) and len(selected.where.filters) == 2
    assert selected.params() == {
        "where": {
            "kind": "all",
            "filters": [
                {"kind": "compare", "column": "x", "op": ">", "value": 0.5},
                {"kind": "compare", "column": "n", "op": "!=", "value": 1},
            ],
        },
        "columns": ["x", "n"],
    }
    assert q[q["d"] >= date(2021, 3, 4)].params()["where"]["value"] == "2021-03-04"


def test_filters_refuse_what_has_no_meaning() -> None:
    with pytest.raises(ValidationError, match="compare only with == and !="):
        Compare(column="s", op="<", value="a")
    with pytest.raises(ValidationError, match="finite"):
        Compare(column="x", op="<", value=float("nan"))
    with pytest.raises(TypeError):
        Query()[3]  # type: ignore[call-overload]


def test_unknown_columns_and_type_mismatches_name_the_worker_and_the_column() -> None:
    data = TableDataset(pa.Table.from_pylist([], schema=SCHEMA), node="node-7")
    q = Query()
    with pytest.raises(UnknownColumn, match=r"worker node-7: .* no column nope"):
        check(data, set(), q["nope"] > 1)
    cases = [
        (q["s"] > 1, "column s .* is string; the filter compares it with the number 1"),
        (q["x"] == "a", "column x .* is double; the filter compares it with the string 'a'"),
        (q["n"] == True, "column n .* is int64; .* the boolean True"),  # noqa: E712
        (q["x"] < date(2020, 1, 1), "column x .* is double; .* with dates"),
        (q["d"].isin(["a"]), "column d .* is date32.* with strings"),
        (~(q["s"].isin([1, 2]) | (q["x"] > 0)), "column s .* is string; .* with numbers"),
    ]
    for where, message in cases:
        with pytest.raises(ColumnTypeError, match=f"worker node-7: {message}"):
            check(data, set(), where)
