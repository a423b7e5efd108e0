"""The engine behind the statistics: every source (CSV plain and compressed, Parquet, SQLite,
batches) answers a job's aggregates as a direct computation does, in one scan; Parquet row
groups that the filter excludes are not read; a database gets one parameterised statement
and returns groups, not rows; names and values an attacker chooses stay data.

The oracle is test_query's row-by-row evaluator of SQL's three-valued logic.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_copies import copied
from test_estimators import federated
from test_query import FILTERS, ROWS, SCHEMA, TableDataset, reference

from flotta_mqtt.analytics import (
    DatasetSpec,
    OperationError,
    PrivacyPolicy,
    UnknownColumn,
    engine,
    open_dataset,
)
from flotta_mqtt.analytics.plan import Agg, Request
from flotta_mqtt.model.query import Compare, Filter, IsIn

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TYPES = {"x": "double", "n": "int64", "s": "string", "d": "date32", "b": "bool"}
SQL_TYPES = {"x": "REAL", "n": "INTEGER", "s": "TEXT", "d": "DATE", "b": "BOOLEAN"}
EXACT = {"exact": True, "release_extremes": True}


def write_csv(table: pa.Table, path: Path) -> Path:
    compression = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}.get(path.suffix)
    if compression is None:
        pacsv.write_csv(table, path)
    else:
        with pa.CompressedOutputStream(str(path), compression) as out:
            pacsv.write_csv(table, out)
    return path


def write_sqlite(rows: list[dict[str, Any]], path: Path, types: dict[str, str] = SQL_TYPES) -> str:
    with sqlite3.connect(path) as con:
        quoted = {'"' + name.replace('"', '""') + '"': type_ for name, type_ in types.items()}
        columns = ", ".join(f"{name} {type_}" for name, type_ in quoted.items())
        con.execute(f"CREATE TABLE t ({columns})")
        marks = ", ".join("?" for _ in types)
        values = [[_sqlite_value(row[c]) for c in types] for row in rows]
        con.executemany(f"INSERT INTO t VALUES ({marks})", values)
    con.close()
    return f"sqlite:///{path}"


def _sqlite_value(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


@contextlib.contextmanager
def sources(rows: list[dict[str, Any]], folder: Path) -> Iterator[dict[str, Any]]:
    """The same rows as every kind of source a worker reads, a CSV's and a Parquet file's
    columnar copies (copies.py) included."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "t.parquet", row_group_size=8)
    found: dict[str, Any] = {"batches": TableDataset(table)}
    specs = {"parquet": {"paths": [folder / "t.parquet"]}}
    for name in ("t.csv", "t.csv.gz", "t.csv.zst", "t.csv.bz2"):
        specs[name] = {"paths": [write_csv(table, folder / name)], "types": TYPES}
    for name, spec in specs.items():
        found[name] = open_dataset("p", "w0", DatasetSpec.model_validate(spec))
    url = write_sqlite(rows, folder / "t.db")
    found["sqlite"] = open_dataset(
        "p", "w0", DatasetSpec.model_validate({"sql": {"url": url, "table": "t"}})
    )
    with contextlib.ExitStack() as stack:
        for name in ("t.csv", "parquet"):
            copy = stack.enter_context(copied(specs[name], folder / f"{name}.copy"))
            found[f"{name} copied"] = copy
        yield found


def expected(where: Filter, rows: list[dict[str, Any]]) -> list[dict[Any, list[Any]]]:
    """The requests of `REQUESTS`, answered row by row."""
    kept = [r for r in rows if reference(where, r) is True]
    xs = [r["x"] for r in kept if r["x"] is not None]
    ns = [r["n"] for r in kept if r["n"] is not None]
    groups: dict[Any, list[Any]] = defaultdict(lambda: [0, 0.0])
    flags: dict[Any, list[Any]] = defaultdict(lambda: [0])
    for r in kept:
        groups[(r["s"],)][0] += 1
        groups[(r["s"],)][1] += float(r["n"] or 0)
        flags[(r["b"],)][0] += 1
    return [
        {
            (): [
                len(kept),
                len(xs),
                sum(min(max(x, -1.0), 1.0) for x in xs),
                min(ns, default=None),
                max(ns, default=None),
                sum(1 for x in xs if -1 <= x < 1),
                sum(1 for x in xs if x > 1),
            ]
        },
        dict(groups),
        dict(flags),
    ]


def requests(where: Filter) -> list[Request]:
    return [
        Request(
            where,
            (),
            (
                Agg("rows"),
                Agg("present", "x"),
                Agg("sum", "x", clip=(-1.0, 1.0)),
                Agg("min", "n"),
                Agg("max", "n"),
                Agg("within", "x", low=-1, high=1),
                Agg("within", "x", low=1, low_open=True),
            ),
        ),
        Request(where, ("s",), (Agg("rows"), Agg("sum", "n"))),
        Request(where, ("b",), (Agg("rows"),)),  # a boolean key reads True, not 1
    ]


def same(found: list[dict[Any, list[Any]]], wanted: list[dict[Any, list[Any]]]) -> bool:
    def typed(answers: list[dict[Any, list[Any]]]) -> list[set[Any]]:
        return [{tuple((type(v), v) for v in key) for key in groups} for groups in answers]

    if typed(found) != typed(wanted):  # the keys, and their types (True is not 1)
        return False
    return all(
        math.isclose(float(a), float(b), abs_tol=1e-9) if b is not None else a is None
        for f, w in zip(found, wanted, strict=True)
        for key in w
        for a, b in zip(f[key], w[key], strict=True)
    )


@SETTINGS
@given(FILTERS, ROWS)
def test_every_source_answers_as_the_row_by_row_reference(
    tmp_path_factory: pytest.TempPathFactory, where: Filter, rows: list[dict[str, Any]]
) -> None:
    """The filter compiled to SQL (DuckDB on files and batches, SQLite on its table) keeps
    the rows SQL's three-valued logic keeps, and every aggregate matches."""
    wanted = expected(where, rows)
    with sources(rows, tmp_path_factory.mktemp("s")) as found_in:
        for name, data in found_in.items():
            found = data.aggregate(requests(where))
            assert same(found, wanted), (name, found, wanted)


def alike(a: Any, b: Any) -> bool:
    """Equal, floats to rounding (a sum's order differs between statements)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(alike(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(alike(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_one_scan_answers_several_statistics_and_each_as_alone(tmp_path: Path) -> None:
    """A summary job sends its database one statement for all of its statistics."""
    rng = np.random.default_rng(3)
    rows = [
        {"x": float(x), "n": int(n), "s": s, "d": None, "b": None}
        for x, n, s in zip(
            rng.random(200), rng.integers(0, 9, 200), rng.choice(["a", "b"], 200), strict=True
        )
    ]
    url = write_sqlite(rows, tmp_path / "t.db")
    data = open_dataset(
        "p", "w0", DatasetSpec.model_validate({"sql": {"url": url, "table": "t"}, "privacy": EXACT})
    )
    over = {"where": Compare(column="x", op=">", value=0.5).model_dump(mode="json")}
    parts = {
        "n": {"name": "count", "params": over},
        "m": {"name": "mean", "params": {"column": "x", **over}},
        "h": {"name": "histogram", "params": {"column": "n", "edges": [0, 3, 9], **over}},
        "g": {"name": "group_mean", "params": {"by": "s", "column": "n", **over}},
        "top": {"name": "max", "params": {"column": "n"}},
    }
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        con = connect(*args, **kwargs)
        con.set_trace_callback(statements.append)
        return con

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", traced)
        summary = federated("summary", [data], operations=parts)
    # One scan; the other statement reads the table's first and last rowid (an index look-up).
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    selects = [s for s in selects if not s.startswith("SELECT (SELECT min(rowid)")]
    assert len(selects) == 1, selects
    for key, part in parts.items():
        assert alike(summary[key], federated(part["name"], [data], **part["params"])), key
    kept = [r for r in rows if r["x"] > 0.5]
    assert summary["n"] == len(kept)
    assert math.isclose(summary["m"], sum(r["x"] for r in kept) / len(kept))


def test_a_database_gets_parameters_and_returns_groups_not_rows(tmp_path: Path) -> None:
    rows = [{"x": i / 1000, "n": i % 7, "s": "a", "d": None, "b": None} for i in range(5000)]
    url = write_sqlite(rows, tmp_path / "t.db")
    data = open_dataset("p", "w0", DatasetSpec.model_validate({"sql": {"url": url, "table": "t"}}))
    statements: list[str] = []
    fetched: list[int] = []
    connect = sqlite3.connect

    class Counting(sqlite3.Cursor):
        def fetchall(self) -> list[Any]:
            found = super().fetchall()
            fetched.append(len(found))
            return found

    class Tracing(sqlite3.Connection):
        def execute(self, *args: Any) -> sqlite3.Cursor:
            statements.append(args[0])
            return Counting(self).execute(*args)

    where = Compare(column="x", op=">=", value=2.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=Tracing))
        (found,) = data.aggregate([Request(where, (), (Agg("rows"), Agg("sum", "n")))])
    assert found == {(): [2500, float(sum(i % 7 for i in range(2500, 5000)))]}
    assert fetched == [1]  # one row came back, for 5,000 in the table
    assert "count(*)" in statements[-1] and "2.5" not in statements[-1]


# --- Parquet: row groups the filter excludes are skipped ----------------------------------


def test_parquet_row_groups_the_filter_excludes_are_not_read(tmp_path: Path) -> None:
    """The first row group's data is overwritten with garbage: reading it fails, so a
    filter whose bounds exclude it (by its statistics) must not read it."""
    n = 1000
    x = np.concatenate([np.linspace(0, 0.4, n), np.linspace(0.6, 1, n)])
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": x, "y": np.arange(2 * n, dtype=float)}), path, row_group_size=n)
    first = pq.ParquetFile(path).metadata.row_group(0)
    with path.open("r+b") as f:
        for j in range(first.num_columns):
            chunk = first.column(j)
            start = (
                chunk.dictionary_page_offset
                if chunk.has_dictionary_page
                else chunk.data_page_offset
            )
            f.seek(start)
            f.write(b"\xff" * chunk.total_compressed_size)
    data = open_dataset("p", "w0", DatasetSpec(paths=[path]))
    over = Compare(column="x", op=">", value=0.5)
    (found,) = data.aggregate([Request(over, (), (Agg("rows"), Agg("sum", "y")))])
    assert found == {(): [n, float(sum(range(n, 2 * n)))]}
    with pytest.raises(OperationError, match="cannot read its files"):
        data.aggregate([Request(None, (), (Agg("rows"), Agg("sum", "y")))])


def test_nan_is_missing_in_every_source(tmp_path: Path) -> None:
    """Parquet and batches hold NaN: it is left out as missing, and a negated comparison
    does not keep it (NaN > 0.5 is unknown, not false)."""
    table = pa.table({"x": [0.7, float("nan"), 0.2, None]})
    pq.write_table(table, tmp_path / "t.parquet")
    parquet = open_dataset("p", "w0", DatasetSpec(paths=[tmp_path / "t.parquet"]))
    where = ~Compare(column="x", op=">", value=0.5)
    for data in (parquet, TableDataset(table)):
        (found,) = data.aggregate([Request(where, (), (Agg("rows"), Agg("present", "x")))])
        assert found == {(): [1, 1]}
        (everything,) = data.aggregate([Request(None, (), (Agg("present", "x"), Agg("max", "x")))])
        assert everything == {(): [2, 0.7]}


@SETTINGS
@given(FILTERS, ROWS, st.lists(st.booleans()))
def test_nan_answers_as_missing_whichever_rows_hold_it(
    tmp_path_factory: pytest.TempPathFactory,
    where: Filter,
    rows: list[dict[str, Any]],
    nan: list[bool],
) -> None:
    """Some x made NaN: every source answers as if it were missing."""
    flags = [*nan, *[False] * len(rows)][: len(rows)]
    wanted = expected(
        where, [{**r, "x": None} if f else r for r, f in zip(rows, flags, strict=True)]
    )
    with_nan = [{**r, "x": math.nan} if f else r for r, f in zip(rows, flags, strict=True)]
    with sources(with_nan, tmp_path_factory.mktemp("s")) as found_in:
        for name, data in found_in.items():
            found = data.aggregate(requests(where))
            assert same(found, wanted), (name, found, wanted)


def test_a_scan_is_one_statement_whatever_the_data_holds(tmp_path: Path) -> None:
    """NaN or not, in a row the filter passes or not: the same one statement, every float
    read with NaN as missing, so the work (and a job's duration) does not tell which."""
    statements: list[str] = []
    connect = engine._connect

    class Traced:
        def __init__(self) -> None:
            self.con = connect()

        def __enter__(self) -> Traced:
            return self

        def __exit__(self, *exc: object) -> None:
            self.con.close()

        def execute(self, statement: str, params: list[object]) -> Any:
            statements.append(statement)
            return self.con.execute(statement, params)

    nan = math.nan
    cases = (
        ([0.7, 0.2, 0.9], [1.0, 2.0, 3.0]),
        ([0.7, nan, 0.9], [1.0, 2.0, 3.0]),  # the filter's bound leaves the NaN out
        ([0.7, 0.2, 0.9], [1.0, 2.0, nan]),
        ([0.7, 0.2, 0.9], [1.0, nan, 3.0]),  # not in a passing row
    )
    seen = set()
    for x, y in cases:
        statements.clear()
        pq.write_table(pa.table({"x": x, "y": y}), tmp_path / "t.parquet")
        data = open_dataset("p", "w0", DatasetSpec(paths=[tmp_path / "t.parquet"]))
        where = Compare(column="x", op=">", value=0.5)
        aggs = (Agg("rows"), Agg("present", "y"), Agg("sum", "y"))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "_connect", Traced)
            (found,) = data.aggregate([Request(where, (), aggs)])
        kept = [b for a, b in zip(x, y, strict=True) if a > 0.5 and not math.isnan(b)]
        rows = sum(1 for a in x if a > 0.5)
        assert found == {(): [rows, len(kept), sum(kept)]}, (x, y)
        assert len(statements) == 1, (x, y)
        assert "isnan" in statements[0]
        seen.add(statements[0])
    assert len(seen) == 1


def test_nan_in_a_parquet_column_without_nulls_is_missing(tmp_path: Path) -> None:
    """Arrow writes a column's min and max without its NaN, and no NaN count: the engine
    must not take those statistics to mean that the column holds no NaN (DuckDB did when
    the column had no null: the NaN was counted, kept by x > 0.5 and summed). Nor must a
    worker's copy of the file, made by a database of its own (it did, before it was set
    as the engine's)."""
    table = pa.table({"x": [0.7, float("nan"), 0.2, 0.9], "y": [1.0, 2.0, float("nan"), 4.0]})
    pq.write_table(table, tmp_path / "t.parquet")
    spec = DatasetSpec(paths=[tmp_path / "t.parquet"])
    over = Compare(column="x", op=">", value=0.5)
    with copied(spec, tmp_path / "copy") as copy:
        for data in (open_dataset("p", "w0", spec), copy):
            everything = [Request(None, (), (Agg("present", "x"), Agg("max", "x")))]
            assert data.aggregate(everything) == [{(): [3, 0.9]}]
            for where, wanted in ((over, [2, 2, 5.0]), (~over, [1, 0, 0])):
                aggs = (Agg("rows"), Agg("present", "y"), Agg("sum", "y"))
                (found,) = data.aggregate([Request(where, (), aggs)])
                assert found == {(): wanted}, where


# --- names and values an attacker chooses -------------------------------------------------

LABELS = ["a'); DROP TABLE t; --", 'b" OR 1=1', "%s", "a"]
HOSTILE = [
    'x" FROM t; DROP TABLE t; --',
    "x' OR '1'='1",
    "x%s",
    'x") OR 1=1 --',
]


def hostile_sources(tmp_path: Path) -> dict[str, Any]:
    """A table whose column and category names are an attacker's, as CSV and SQLite."""
    weird = 'we"ird%s'
    rows = [{weird: float(i), "label": LABELS[i % 4]} for i in range(8)]
    table = pa.Table.from_pylist(rows)
    csv = open_dataset("p", "w0", DatasetSpec(paths=[write_csv(table, tmp_path / "t.csv")]))
    url = write_sqlite(rows, tmp_path / "t.db", {weird: "REAL", "label": "TEXT"})
    sql = open_dataset("p", "w0", DatasetSpec.model_validate({"sql": {"url": url, "table": "t"}}))
    return {"csv": csv, "sqlite": sql, "batches": TableDataset(table)}


def test_hostile_column_names_are_refused_and_hostile_values_stay_values(tmp_path: Path) -> None:
    for name, data in hostile_sources(tmp_path).items():
        for column in HOSTILE:
            with pytest.raises(UnknownColumn, match="has no column"):
                data.aggregate([Request(None, (), (Agg("sum", column),))])
            with pytest.raises(UnknownColumn, match="has no column"):
                data.aggregate(
                    [Request(Compare(column=column, op="==", value=1), (), (Agg("rows"),))]
                )
        # A site's own odd names are quoted; a value is a parameter, never SQL.
        for value in ["a' OR '1'='1", "%s", 'b" OR 1=1']:
            where = Compare(column="label", op="==", value=value)
            (found,) = data.aggregate([Request(where, (), (Agg("rows"), Agg("sum", 'we"ird%s')))])
            assert found[()][0] == (2 if value in LABELS else 0), (name, value)
        where = IsIn(column="label", values=["a'); DROP TABLE t; --", "a"])
        (groups,) = data.aggregate([Request(where, ("label",), (Agg("rows"),))])
        assert groups == {("a'); DROP TABLE t; --",): [2], ("a",): [2]}, name
        (everything,) = data.aggregate([Request(None, (), (Agg("rows"),))])
        assert everything == {(): [8]}, name  # nothing dropped


def test_a_hostile_table_name_in_the_configuration_is_refused(tmp_path: Path) -> None:
    url = write_sqlite([], tmp_path / "t.db")
    for table in ['t"; DROP TABLE t; --', "t' --", "missing"]:
        with pytest.raises(OperationError, match="has no table"):
            open_dataset(
                "p", "w0", DatasetSpec.model_validate({"sql": {"url": url, "table": table}})
            )


# --- the site's schema ------------------------------------------------------------------


def test_a_column_of_another_type_than_the_site_declares_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": ["1.5", "2"]}), tmp_path / "t.parquet")
    spec = DatasetSpec(paths=[tmp_path / "t.parquet"], types={"x": "double"})
    with pytest.raises(
        OperationError, match=r"column x is string in t.parquet but the site declares double"
    ):
        open_dataset("p", "w0", spec)
    url = write_sqlite([{"x": "1.5"}], tmp_path / "t.db", {"x": "TEXT"})
    spec = DatasetSpec.model_validate({"sql": {"url": url, "table": "t"}, "types": {"x": "double"}})
    with pytest.raises(
        OperationError, match="column x is string in table t but the site declares double"
    ):
        open_dataset("p", "w0", spec)


def test_a_dataset_spec_names_files_or_a_table() -> None:
    with pytest.raises(ValueError, match=r"files \(paths\) or a database table \(sql\)"):
        DatasetSpec.model_validate({"privacy": PrivacyPolicy().model_dump()})
    with pytest.raises(ValueError, match=r"sqlite:/// or postgresql://"):
        DatasetSpec.model_validate({"sql": {"url": "mysql://h/db", "table": "t"}})


def test_a_dataset_opens_the_engine_before_its_first_job(tmp_path: Path) -> None:
    """Opening DuckDB's database costs tens of milliseconds: paid at the worker's start."""
    pq.write_table(pa.table({"x": [0.7, 0.2]}), tmp_path / "t.parquet")
    engine.database.cache_clear()
    data = open_dataset("p", "w0", DatasetSpec(paths=[tmp_path / "t.parquet"]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.duckdb, "connect", lambda *a, **k: pytest.fail("opened by a job"))
        (found,) = data.aggregate([Request(None, (), (Agg("rows"),))])
    assert found == {(): [2]}
