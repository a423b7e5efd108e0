"""A project's data in a PostgreSQL table (a real server, tests/postgres.py): the filter and
aggregates are computed by the database, as the row-by-row reference computes them; names
and values an attacker chooses stay data (psycopg's %s placeholders included)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from postgres import BIN, postgres_server, postgres_url  # noqa: F401  (fixtures)
from test_engine import LABELS, alike, expected, requests
from test_query import FILTERS, ROWS

from flotta_mqtt.analytics import DatasetSpec, OperationError, UnknownColumn, open_dataset
from flotta_mqtt.analytics.plan import Agg, Request
from flotta_mqtt.model.query import Compare, Filter

# A real server beside the unit tests of the other sources (it shares their cases).
pytestmark = pytest.mark.skipif(
    not (BIN / "postgres").exists(), reason="no PostgreSQL server binaries"
)
COLUMNS = {"x": "double precision", "n": "bigint", "s": "text", "d": "date", "b": "boolean"}


def table(url: str, name: str, columns: dict[str, str], rows: list[dict[str, Any]]) -> Any:
    """A fresh table; the dataset reading it."""
    quoted = {'"' + c.replace('"', '""') + '"': t for c, t in columns.items()}
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f'DROP TABLE IF EXISTS "{name}"')
        con.execute(f'CREATE TABLE "{name}" ({", ".join(f"{c} {t}" for c, t in quoted.items())})')
        with con.cursor().copy(f'COPY "{name}" ({", ".join(quoted)}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
    spec = DatasetSpec.model_validate({"sql": {"url": url, "table": name}})
    return open_dataset("p", "w0", spec)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(FILTERS, ROWS)
def test_a_postgresql_table_answers_as_the_row_by_row_reference(
    postgres_url: str,  # noqa: F811
    where: Filter,
    rows: list[dict[str, Any]],
) -> None:
    data = table(postgres_url, "t", COLUMNS, rows)
    assert data.schema().field("d").type == pa.date32()
    found = data.aggregate(requests(where))
    assert alike(
        [
            {k: [float(v) if v is not None else None for v in vs] for k, vs in f.items()}
            for f in found
        ],
        [
            {k: [float(v) if v is not None else None for v in vs] for k, vs in f.items()}
            for f in expected(where, rows)
        ],
    )


def test_hostile_names_and_values_stay_data_in_postgresql(postgres_url: str) -> None:  # noqa: F811
    weird = 'we"ird%s'
    rows = [{weird: float(i), "label": LABELS[i % 4]} for i in range(8)]
    data = table(postgres_url, "t", {weird: "double precision", "label": "text"}, rows)
    for column in ['x" FROM t; DROP TABLE t; --', "%s", "label%s"]:
        with pytest.raises(UnknownColumn, match="has no column"):
            data.aggregate([Request(Compare(column=column, op="==", value=1), (), (Agg("rows"),))])
    for value in ["a' OR '1'='1", "%s", 'b" OR 1=1', "%(x)s"]:
        where = Compare(column="label", op="==", value=value)
        (found,) = data.aggregate([Request(where, ("label",), (Agg("rows"), Agg("sum", weird)))])
        assert sum(v[0] for v in found.values()) == (2 if value in LABELS else 0), value
    (everything,) = data.aggregate([Request(None, (), (Agg("rows"),))])
    assert everything == {(): [8]}
    with pytest.raises(OperationError, match="has no table"):
        open_dataset(
            "p", "w0", DatasetSpec.model_validate({"sql": {"url": postgres_url, "table": 't"; --'}})
        )


def test_a_postgresql_column_of_another_type_than_declared_is_a_clear_error(
    postgres_url: str,  # noqa: F811
) -> None:
    table(postgres_url, "t", {"x": "text"}, [{"x": "1.5"}])
    spec = DatasetSpec.model_validate(
        {"sql": {"url": postgres_url, "table": "t"}, "types": {"x": "double"}}
    )
    with pytest.raises(
        OperationError, match="column x is string in table t but the site declares double"
    ):
        open_dataset("p", "w0", spec)


def test_a_postgresql_table_is_never_split_so_no_cores_are_counted(
    postgres_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL runs its own parallel workers: the split (and its core count) is SQLite's."""

    def counted(pid: int) -> set[int]:
        raise AssertionError("cores counted for a PostgreSQL table")

    monkeypatch.setattr(os, "sched_getaffinity", counted)
    data = table(postgres_url, "t", {"x": "double precision"}, [{"x": 1.5}])
    assert data.threads == 1
    assert data.aggregate([Request(None, (), (Agg("rows"),))]) == [{(): [1]}]
