"""A SQLite table scanned on every core: rowid ranges on threads, answers as one scan's."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_engine import SETTINGS, requests, write_sqlite
from test_query import FILTERS, ROWS

from flotta_mqtt.analytics import DatasetSpec, OperationError, open_dataset
from flotta_mqtt.analytics.databases import MAX_THREADS, SqlDataset
from flotta_mqtt.analytics.plan import Agg, Request
from flotta_mqtt.model.query import Compare, Filter, IsIn

PARTS = 4


def opened(url: str, table: str = "t", parts: int = 1) -> SqlDataset:
    """The table as a worker opens it, its scan split in `parts` ranges (1: one scan)."""
    data = open_dataset(
        "p", "w0", DatasetSpec.model_validate({"sql": {"url": url, "table": table}})
    )
    assert isinstance(data, SqlDataset)
    data.threads, data.split_rows = parts, 1
    return data


class Traced:
    """The statements (and their parameters) SQLite connections execute, and on which
    thread."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, list[Any], str]] = []
        self.together: threading.Barrier | None = None  # that the ranges' scans meet

    def ranges(self) -> list[tuple[str, list[Any]]]:
        return [(s, p) for s, p, _ in self.statements if "BETWEEN" in s]

    def threads(self) -> set[str]:
        return {t for s, _, t in self.statements if "BETWEEN" in s}


@contextlib.contextmanager
def tracing() -> Iterator[Traced]:
    trace = Traced()
    connect = sqlite3.connect

    class Tracing(sqlite3.Connection):
        def execute(self, statement: str, params: Any = (), /) -> sqlite3.Cursor:
            trace.statements.append((statement, list(params), threading.current_thread().name))
            if trace.together is not None and "BETWEEN" in statement:
                trace.together.wait(timeout=10)  # broken unless every range runs at once
            return super().execute(statement, params)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=Tracing))
        yield trace


@pytest.fixture
def traced() -> Iterator[Traced]:
    with tracing() as trace:
        yield trace


EIGHTHS = ROWS.map(  # x in eighths: a sum is exact in any order, so parts add up to one scan
    lambda rows: [{**r, "x": None if r["x"] is None else round(r["x"] * 8) / 8} for r in rows]
)


@SETTINGS
@given(FILTERS, EIGHTHS, st.integers(1, 1000), st.integers(100, 2**40), st.sampled_from([-1, 1]))
def test_a_split_scan_answers_as_one_scan(
    tmp_path_factory: pytest.TempPathFactory,
    where: Filter,
    rows: list[dict[str, Any]],
    stride: int,
    base: int,
    sign: int,
) -> None:
    """Any table, filter and grouping: the ranges' rows rolled up are one scan's rows, keys
    and their types included; rowids spread apart (gaps, negatives) make uneven ranges."""
    folder = tmp_path_factory.mktemp("split")
    url = write_sqlite(rows, folder / "t.db")
    with sqlite3.connect(folder / "t.db") as con:
        con.execute("UPDATE t SET rowid = ? * (rowid * ? + ?)", (sign, stride, base))
    con.close()
    whole = opened(url).aggregate(requests(where))
    with tracing() as trace:
        split = opened(url, parts=PARTS).aggregate(requests(where))
    assert (len(trace.ranges()) >= 2) == (len(rows) >= 2)
    typed = [{k: (tuple(map(type, k)), v) for k, v in groups.items()} for groups in split]
    assert typed == [{k: (tuple(map(type, k)), v) for k, v in g.items()} for g in whole]


def test_the_ranges_cover_the_table_once_on_threads_with_parameters(
    tmp_path: Path, traced: Traced
) -> None:
    rows = [{"x": i / 8, "n": i % 7, "s": "ab"[i % 2], "d": None, "b": None} for i in range(1001)]
    data = opened(write_sqlite(rows, tmp_path / "t.db"), parts=PARTS)
    traced.together = threading.Barrier(PARTS)
    where = Compare(column="x", op=">=", value=2.5)
    found = data.aggregate([Request(where, ("s",), (Agg("rows"), Agg("sum", "n")))])
    kept = [r for r in rows if r["x"] >= 2.5]
    assert found == [
        {
            (s,): [sum(r["s"] == s for r in kept), float(sum(r["n"] for r in kept if r["s"] == s))]
            for s in "ab"
        }
    ]
    ranges = traced.ranges()
    bounds = sorted(tuple(p[:2]) for _, p in ranges)
    assert bounds == [(1, 251), (252, 502), (503, 753), (754, 1001)]
    for statement, params in ranges:  # a value is a parameter, never statement text
        assert "2.5" not in statement and "251" not in statement
        assert params[2:] == [2.5] and statement.startswith('WITH "t part" AS (')
    assert threading.current_thread().name not in traced.threads()


def test_a_small_table_view_or_table_without_rowid_is_scanned_once(
    tmp_path: Path, traced: Traced
) -> None:
    url = write_sqlite(
        [{"x": 1.0, "n": i, "s": "a", "d": None, "b": None} for i in range(50)], tmp_path / "t.db"
    )
    with sqlite3.connect(tmp_path / "t.db") as con:
        con.execute("CREATE VIEW v AS SELECT * FROM t")
        con.execute("CREATE TABLE w (n INTEGER PRIMARY KEY, x REAL) WITHOUT ROWID")
        con.execute("INSERT INTO w SELECT n, x FROM t")
    con.close()
    small = opened(url, parts=PARTS)
    small.split_rows = 100  # fewer rowids than two ranges of 100
    everything = [Request(None, (), (Agg("rows"), Agg("sum", "n")))]
    for data in (small, opened(url, "v", PARTS), opened(url, "w", PARTS)):
        assert data.aggregate(everything) == [{(): [50, float(sum(range(50)))]}]
    assert traced.ranges() == []


def test_columns_named_as_the_rowid_do_not_take_its_place(tmp_path: Path, traced: Traced) -> None:
    """A site's column named rowid (or _rowid_, oid) is a column: the ranges go by a name
    SQLite keeps for the rowid, and with every name taken the table is scanned once."""
    names = ["rowid", "_rowid_", "oid"]
    for taken in (names[:1], names[:2], names):
        path = tmp_path / f"t{len(taken)}.db"
        types = {**{name: "INTEGER" for name in taken}, 'we"ird%s': "REAL"}
        rows = [{**{name: -i for name in taken}, 'we"ird%s': 1.0} for i in range(40)]
        data = opened(write_sqlite(rows, path, types), parts=PARTS)
        where = Compare(column=taken[0], op=">", value=-20)
        found = data.aggregate([Request(where, (), (Agg("rows"), Agg("sum", taken[0])))])
        assert found == [{(): [20, float(-sum(range(20)))]}], taken
    used = {statement.split(" BETWEEN")[0].split()[-1] for statement, _ in traced.ranges()}
    assert used == {"_rowid_", "oid"}  # none for the table whose every name was taken
    assert len(traced.ranges()) == 2 * PARTS


def test_hostile_values_stay_values_in_a_split_scan(tmp_path: Path) -> None:
    labels = ["a'); DROP TABLE t; --", "a", "%s", 'b" OR 1=1']
    rows = [{"label": labels[i % 4], "v": float(i)} for i in range(100)]
    data = opened(write_sqlite(rows, tmp_path / "t.db", {"label": "TEXT", "v": "REAL"}), parts=3)
    (groups,) = data.aggregate(
        [Request(IsIn(column="label", values=labels[:2]), ("label",), (Agg("rows"),))]
    )
    assert groups == {(labels[0],): [25], (labels[1],): [25]}
    (everything,) = data.aggregate([Request(None, (), (Agg("rows"),))])
    assert everything == {(): [100]}  # nothing dropped


def hooked(data: SqlDataset, after_ranges: Callable[[], None]) -> None:
    """Run `after_ranges` once the split scan has read its ranges (its first read
    transaction open), before the other ranges' connections begin theirs."""
    read = data._ranges

    def ranges(con: sqlite3.Connection) -> list[tuple[int, int]]:
        found = read(con)
        data._ranges = read  # type: ignore[method-assign]
        after_ranges()
        return found

    data._ranges = ranges  # type: ignore[method-assign]


def test_a_writer_cannot_commit_between_the_ranges_snapshots(tmp_path: Path) -> None:
    """Every range reads one snapshot: a write committed after the ranges were read would
    be seen by the later ranges only (rows moved between ranges counted twice or not at
    all); the first range's read transaction keeps it from committing until all are begun."""
    rows = [{"x": 1.0, "n": 1, "s": "a", "d": None, "b": None} for _ in range(400)]
    url = write_sqlite(rows, tmp_path / "t.db")
    data = opened(url, parts=PARTS)
    refused: list[str] = []

    def move_rows() -> None:  # the last range's rows to the first range's rowids
        writer = sqlite3.connect(tmp_path / "t.db", timeout=0)
        try:
            writer.execute("DELETE FROM t WHERE rowid <= 100")
            writer.execute("UPDATE t SET rowid = rowid - 300 WHERE rowid > 300")
            writer.commit()
        except sqlite3.OperationalError as exc:
            refused.append(str(exc))
        finally:
            writer.close()

    hooked(data, move_rows)
    assert data.aggregate([Request(None, (), (Agg("rows"),))]) == [{(): [400]}]
    assert refused == ["database is locked"]


def test_a_writer_waiting_to_commit_leaves_one_scan_not_an_error(
    tmp_path: Path, traced: Traced
) -> None:
    """A writer holding SQLite's PENDING lock keeps new readers out: the scan goes on in the
    one read transaction it has, whole, and the writer commits after it."""
    url = write_sqlite(
        [{"x": 1.0, "n": 1, "s": "a", "d": None, "b": None}] * 400, tmp_path / "t.db"
    )
    data = opened(url, parts=PARTS)
    writer = sqlite3.connect(tmp_path / "t.db", timeout=0)

    def pending() -> None:
        writer.execute("DELETE FROM t")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            writer.commit()  # PENDING now: new readers are refused

    hooked(data, pending)
    assert data.aggregate([Request(None, (), (Agg("rows"),))]) == [{(): [400]}]
    assert traced.ranges() == []
    writer.commit()
    writer.close()
    data.split_rows = 10**9
    assert data.aggregate([Request(None, (), (Agg("rows"),))]) == [{(): [0]}]


def test_a_wal_database_is_scanned_once(tmp_path: Path, traced: Traced) -> None:
    url = write_sqlite(
        [{"x": 1.0, "n": 1, "s": "a", "d": None, "b": None}] * 100, tmp_path / "t.db"
    )
    with sqlite3.connect(tmp_path / "t.db") as con:
        con.execute("PRAGMA journal_mode = wal")
    con.close()
    data = opened(url, parts=PARTS)
    assert data.aggregate([Request(None, (), (Agg("rows"),))]) == [{(): [100]}]
    assert traced.ranges() == []


def test_a_failing_range_interrupts_the_others_at_once(tmp_path: Path) -> None:
    """The first range's scan fails: the others' connections are interrupted then, so the
    error surfaces without waiting for their scans (each waits here until interrupted)."""
    rows = [{"x": 1.0, "n": i, "s": "a", "d": None, "b": None} for i in range(400)]
    data = opened(write_sqlite(rows, tmp_path / "t.db"), parts=PARTS)
    waited: list[bool] = []  # per other range: whether it was interrupted
    connect = sqlite3.connect

    class Failing(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.stopped = threading.Event()

        def execute(self, statement: str, params: Any = (), /) -> sqlite3.Cursor:
            if "BETWEEN" in statement and params[0] == 1:
                raise sqlite3.OperationalError("disk I/O error")
            if "BETWEEN" in statement:
                waited.append(self.stopped.wait(timeout=10))
            return super().execute(statement, params)

        def interrupt(self) -> None:
            self.stopped.set()
            super().interrupt()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", lambda *a, **k: connect(*a, **k, factory=Failing))
        with pytest.raises(OperationError, match=r"the database refused \(OperationalError\)"):
            data.aggregate([Request(None, ("s",), (Agg("rows"),))])
    assert waited == [True] * (PARTS - 1)


@pytest.mark.parametrize(("affinity", "threads"), [(None, None), (64, MAX_THREADS), (2, 2)])
def test_a_sqlite_scan_takes_the_cores_it_may_run_on_at_most_a_cap(
    tmp_path: Path, affinity: int | None, threads: int | None
) -> None:
    """Where the system tells no affinity (not Linux), the CPU count; never beyond the cap."""
    url = write_sqlite([{"x": 1.0, "n": 1, "s": "a", "d": None, "b": None}], tmp_path / "t.db")
    spec = DatasetSpec.model_validate({"sql": {"url": url, "table": "t"}})
    with pytest.MonkeyPatch.context() as patch:
        if affinity is None:
            patch.delattr(os, "sched_getaffinity")
        else:
            patch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        data = open_dataset("p", "w0", spec)
    assert isinstance(data, SqlDataset)
    wanted = min(os.cpu_count() or 1, MAX_THREADS) if threads is None else threads
    assert data.threads == wanted


def test_a_split_scan_with_categories_clipping_and_filters_answers_as_one_scan(
    tmp_path: Path,
) -> None:
    """Declared categories (their parameters), clipped sums and each aggregate's own FILTER
    clause, in ranges: the same answer as one scan."""
    rows = [
        {"x": (i % 13) / 4, "n": i % 5, "s": "abcz"[i % 4], "d": None, "b": None}
        for i in range(1001)
    ]
    url = write_sqlite(rows, tmp_path / "t.db")
    spec = DatasetSpec.model_validate(
        {"sql": {"url": url, "table": "t"}, "categories": {"s": ["a", "b", "c"], "n": [0, 1, 2]}}
    )
    wanted_requests = [
        Request(Compare(column="x", op=">", value=0.5), ("s",), (Agg("rows"), Agg("present", "x"))),
        Request(
            IsIn(column="s", values=["a", "b"]),
            ("s", "n"),
            (Agg("rows"), Agg("sum", "x", clip=(0.0, 2.0))),
        ),
        Request(None, ("n",), (Agg("rows"), Agg("sum", "x", clip=(0.5, 1.5)))),
    ]
    answers = []
    for parts in (1, PARTS):
        data = open_dataset("p", "w0", spec)
        assert isinstance(data, SqlDataset)
        data.threads, data.split_rows = parts, 1
        with tracing() as trace:
            answers.append(data.aggregate(wanted_requests))
        assert (len(trace.ranges()) == PARTS) == (parts == PARTS)
        assert all("FILTER (WHERE" in s for s, _ in trace.ranges())
    assert answers[0] == answers[1]
    clipped = [r for r in rows if r["s"] in "ab"]
    for s in "ab":
        for n in range(3):
            kept = [min(max(r["x"], 0.0), 2.0) for r in clipped if r["s"] == s and r["n"] == n]
            assert answers[1][1][(s, n)] == [len(kept), sum(kept)]
    assert ("z",) not in answers[1][0] and answers[1][0][(None,)][0] > 0
