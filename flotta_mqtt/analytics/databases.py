"""A project's data in a SQL table: a SQLite file or a PostgreSQL database.

The database does the work: a job's filter and aggregates are sent as one parameterised
statement (sql.py) and it returns a row per group, never the rows. The site's
configuration names the table; its columns and their types are read from the database,
and a type the site declares (`types`) must be of the same kind (number, text, ...).
Connections are read-only.

A large SQLite table is scanned on every core: split into rowid ranges, each range's
statement on a connection and thread of its own (sqlite3 lets go of the GIL while SQLite
steps), and `answer` adds up the parts' rows of a group. PostgreSQL runs its own parallel
workers on a large scan.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flotta_mqtt.analytics import sql
from flotta_mqtt.analytics.categories import Categories, fitted
from flotta_mqtt.analytics.filters import is_number, is_text
from flotta_mqtt.analytics.plan import Groups, Request, Select, answer
from flotta_mqtt.analytics.policy import PrivacyPolicy
from flotta_mqtt.analytics.registry import Dataset, OperationError

BATCH_ROWS = 1 << 16
# The fewest rowids a range of a split SQLite scan covers: below, a connection and a thread
# cost more than they save (measured: bench/README.md, `analytics`).
SPLIT_ROWS = 200_000
MAX_THREADS = 8  # a split SQLite scan's ranges, at most: a worker runs other jobs too
# The names SQLite gives a rowid table's row number, unless a column takes the name.
_ROWID_NAMES = ("rowid", "_rowid_", "oid")

# Column types as the databases name them, in the order SQLite's affinity rules test them.
_SQLITE_TYPES = (
    ("INT", pa.int64()),
    ("CHAR", pa.string()),
    ("CLOB", pa.string()),
    ("TEXT", pa.string()),
    ("REAL", pa.float64()),
    ("FLOA", pa.float64()),
    ("DOUB", pa.float64()),
    ("NUMERIC", pa.float64()),
    ("DECIMAL", pa.float64()),
    ("BOOL", pa.bool_()),
    ("DATETIME", pa.timestamp("us")),
    ("TIMESTAMP", pa.timestamp("us")),
    ("DATE", pa.date32()),
)
_POSTGRES_TYPES = {
    "smallint": pa.int64(),
    "integer": pa.int64(),
    "bigint": pa.int64(),
    "real": pa.float64(),
    "double precision": pa.float64(),
    "numeric": pa.float64(),
    "text": pa.string(),
    "character varying": pa.string(),
    "character": pa.string(),
    "boolean": pa.bool_(),
    "date": pa.date32(),
    "timestamp without time zone": pa.timestamp("us"),
    "timestamp with time zone": pa.timestamp("us", tz="UTC"),
}


def _cores() -> int:
    """The cores this process may run on (where the system says), at most MAX_THREADS."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    return min(cores, MAX_THREADS)


def _kind(type_: pa.DataType) -> str:
    for kind, test in (
        ("number", is_number),
        ("text", is_text),
        ("boolean", pa.types.is_boolean),
        ("date", pa.types.is_date),
        ("timestamp", pa.types.is_timestamp),
    ):
        if test(type_):
            return kind
    return str(type_)


def same_kind(found: pa.DataType, declared: pa.DataType) -> bool:
    """Whether a source's column can be read as the type a site declares for it."""
    return _kind(found) == _kind(declared)


class SqlSource(BaseModel):
    """`sql: {url, table}` in a dataset spec: `sqlite:///absolute/path.db` (a path is read
    from the root), or a PostgreSQL URL (`postgresql://user:password@host:5432/db`, the
    site's own configuration: it never leaves the worker)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    table: str = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _known(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("a database URL starts with sqlite:/// or postgresql://")
        return url

    @property
    def dialect(self) -> sql.Dialect:
        return sql.SQLITE if urlsplit(self.url).scheme == "sqlite" else sql.POSTGRES


class SqlDataset(Dataset):
    """A project's table in a SQLite file or a PostgreSQL database."""

    def __init__(
        self,
        project: str,
        node: str,
        source: SqlSource,
        types: dict[str, str],
        min_group_size: int,
        privacy: PrivacyPolicy,
        categories: Categories | None = None,
    ) -> None:
        super().__init__(project, node, min_group_size, privacy)
        self.source = source
        self.dialect = source.dialect
        self.who = f"worker {node}: project {project}"
        self._table = sql.quote(source.table, self.dialect)
        columns = self._columns()
        self._schema = self._declared(columns, types)
        self.categories = fitted(self._schema, categories or {}, self.who)
        self._rowid = self._rowid_name(columns) if self.dialect is sql.SQLITE else None
        self.threads = _cores() if self._rowid is not None else 1  # a SQLite scan's ranges
        self.split_rows = SPLIT_ROWS

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        """A read-only connection; a database's error names its kind only (it may quote a
        value, and the URL may hold a password)."""
        try:
            if self.dialect is sql.SQLITE:
                path = Path("/" + urlsplit(self.source.url).path.lstrip("/"))  # absolute
                if not path.is_file():
                    raise OperationError(f"{self.who}: database file not found: {path}")
                with contextlib.closing(
                    # A split scan opens it here and steps it on a thread of its own.
                    sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
                ) as con:
                    yield con
                return
            import psycopg

            with psycopg.connect(self.source.url, connect_timeout=10) as con:
                con.read_only = True
                con.execute("SET TIME ZONE 'UTC'")
                yield con
        except (sqlite3.Error, OSError) as exc:
            raise OperationError(
                f"{self.who}: the database refused ({type(exc).__name__})"
            ) from None
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise OperationError(
                    f"{self.who}: the database refused ({type(exc).__name__})"
                ) from None
            raise

    def _columns(self) -> list[tuple[str, str]]:
        with self._connect() as con:
            if self.dialect is sql.SQLITE:
                query = "SELECT name, type FROM pragma_table_info(?)"
            else:
                query = (
                    "SELECT column_name, data_type FROM information_schema.columns WHERE "
                    "table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position"
                )
            rows = con.execute(query, [self.source.table]).fetchall()
        if not rows:
            raise OperationError(f"{self.who}: the database has no table {self.source.table}")
        return [(str(name), str(type_)) for name, type_ in rows]

    def _rowid_name(self, columns: list[tuple[str, str]]) -> str | None:
        """How a statement names the table's rowid; None when it has none to split a scan
        by (a view, a WITHOUT ROWID or virtual table, every rowid name taken by a column)."""
        with self._connect() as con:
            try:
                kinds = con.execute(
                    "SELECT type, wr FROM pragma_table_list(?)", [self.source.table]
                )
            except sqlite3.OperationalError:  # SQLite before 3.37 (2021): no table_list
                return None
            if kinds.fetchall() != [("table", 0)]:
                return None
        taken = {name.lower() for name, _ in columns}
        return next((name for name in _ROWID_NAMES if name not in taken), None)

    def _declared(self, columns: list[tuple[str, str]], types: dict[str, str]) -> pa.Schema:
        """The table's columns the engine reads (others stay unseen), with the site's types."""
        fields = {}
        for name, declared in columns:
            type_ = self._arrow(declared)
            if type_ is not None:
                fields[name] = type_
        for name, alias in types.items():
            wanted = pa.type_for_alias(alias)
            if name not in fields:
                raise OperationError(
                    f"{self.who}: types names column {name}, which the table lacks"
                )
            if not same_kind(fields[name], wanted):
                raise OperationError(
                    f"{self.who}: column {name} is {fields[name]} in table "
                    f"{self.source.table} but the site declares {wanted} (types)"
                )
            fields[name] = wanted
        return pa.schema(list(fields.items()))

    def _arrow(self, declared: str) -> pa.DataType | None:
        if self.dialect is sql.POSTGRES:
            return _POSTGRES_TYPES.get(declared)
        upper = declared.upper()
        return next((t for part, t in _SQLITE_TYPES if part in upper), None)

    def schema(self) -> pa.Schema:
        return self._schema

    def count_rows(self) -> int:
        with self._connect() as con:
            # Parameters, though none: psycopg then reads the %% of a quoted name as %.
            return int(con.execute(f"SELECT count(*) FROM {self._table}", []).fetchone()[0])

    def aggregate(self, requests: Sequence[Request]) -> list[Groups]:
        def scan(select: Select) -> list[tuple[Any, ...]]:
            if self.dialect is sql.SQLITE:
                rows = self._sqlite_rows(select)
            else:
                statement, params = sql.compile_select(
                    select, self._table, self._schema, self.dialect, self.who, self.categories
                )
                with self._connect() as con:
                    rows = con.execute(statement, params).fetchall()
            # SQLite stores booleans as 0 and 1: a group's key reads as every source's.
            flags = [pa.types.is_boolean(self._schema.field(b).type) for b in select.by]
            return [
                tuple(
                    bool(v) if f and v is not None else v for v, f in zip(row, flags, strict=False)
                )
                + tuple(row[len(flags) :])
                for row in rows
            ]

        return answer(requests, scan)

    def _sqlite_rows(self, select: Select) -> list[tuple[Any, ...]]:
        """`select`'s rows: those of each rowid range's scan, run at once, when the table
        splits. Every range reads the same snapshot of the table: the first connection's
        read transaction (its SHARED lock) keeps any writer from committing until each other
        connection has begun its own (a rollback journal's locking; a WAL database, whose
        writers do not wait for readers, is scanned once, as when a writer waiting to
        commit keeps new readers out)."""
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(self._connect())
            first.execute("BEGIN")
            ranges = self._ranges(first)
            others = self._readers(stack, len(ranges) - 1)
            if len(ranges) < 2 or others is None:
                statement, params = sql.compile_select(
                    select, self._table, self._schema, self.dialect, self.who, self.categories
                )
                return list(first.execute(statement, params).fetchall())
            # The range as a named subquery ahead of the statement, so its bounds are its
            # first parameters (an aggregate's come before FROM); SQLite flattens it into a
            # search of the rowids. Its name is never the table's (that would name itself).
            part = sql.quote(f"{self.source.table} part", self.dialect)
            statement, params = sql.compile_select(
                select, part, self._schema, self.dialect, self.who, self.categories
            )
            statement = (
                f"WITH {part} AS (SELECT * FROM {self._table} "
                f"WHERE {self._rowid} BETWEEN ? AND ?) {statement}"
            )

            def scan(con: sqlite3.Connection, bounds: tuple[int, int]) -> list[Any]:
                return list(con.execute(statement, [*bounds, *params]).fetchall())

            connections = [first, *others]
            with ThreadPoolExecutor(len(ranges)) as pool:
                futures = [
                    pool.submit(scan, *part) for part in zip(connections, ranges, strict=True)
                ]
                for future in as_completed(futures):
                    failed = future.exception()
                    if failed is not None:
                        for con in connections:  # the others stop now, not at their end
                            con.interrupt()
                        raise failed
        return [row for future in futures for row in future.result()]

    def _readers(self, stack: contextlib.ExitStack[Any], count: int) -> list[Any] | None:
        """`count` more connections, each in a read transaction begun (its snapshot taken);
        None when a writer keeps them out (SQLite's PENDING lock: they would wait for it,
        and it for the first connection)."""
        readers = []
        for _ in range(count):
            con = stack.enter_context(self._connect())
            try:
                con.execute("PRAGMA busy_timeout = 0")
                con.execute("BEGIN")
                con.execute(f"SELECT 1 FROM {self._table} LIMIT 1").fetchall()
            except sqlite3.OperationalError:
                return None
            readers.append(con)
        return readers

    def _ranges(self, con: sqlite3.Connection) -> list[tuple[int, int]]:
        """The rowid ranges splitting the table (read in `con`'s read transaction), one per
        thread and of `split_rows` rowids at least; none when the table does not split."""
        if self._rowid is None or self.threads < 2:
            return []
        rowid = self._rowid
        low, high = con.execute(
            f"SELECT (SELECT min({rowid}) FROM {self._table}), "
            f"(SELECT max({rowid}) FROM {self._table})"
        ).fetchone()
        if low is None or con.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return []
        span = high - low + 1
        parts = min(self.threads, span // max(1, self.split_rows))
        step = -(-span // max(1, parts))
        return [(start, min(high, start + step - 1)) for start in range(low, high + 1, step)]

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        if not columns:
            raise ValueError("batches() needs at least one column")
        target = pa.schema([self._schema.field(c) for c in columns])
        names = ", ".join(sql.quote(c, self.dialect) for c in columns)
        with self._connect() as con:
            cursor = con.cursor() if self.dialect is sql.SQLITE else con.cursor(name="rows")
            cursor.execute(f"SELECT {names} FROM {self._table}", [])
            while rows := cursor.fetchmany(BATCH_ROWS):
                arrays = [
                    pa.array([row[i] for row in rows]).cast(f.type) for i, f in enumerate(target)
                ]
                yield pa.RecordBatch.from_arrays(arrays, schema=target)
