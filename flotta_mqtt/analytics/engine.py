"""The query engine behind the operations: DuckDB, scanning a worker's files in place.

Chosen by measurement (bench/README.md, `analytics`) and by fit: one SQL compiler
(sql.py) serves files here and the databases a site holds (databases.py), DuckDB skips
the Parquet row groups whose statistics exclude a filter (Polars 2.1 read them all),
streams gzip and zstd CSVs, and keeps to a memory limit, spilling to disk beyond it.
Rows never reach Python: a job's aggregates come back as one row per group. A worker's
copy of a dataset's files (copies.py) is a database file of DuckDB's own, attached here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from flotta_mqtt.analytics import sql
from flotta_mqtt.analytics.plan import Select

# A CSV's missing values, for both readers (datasets.py's pyarrow reader too): an empty
# cell and R's NA; "nan" is read as NaN, itself missing. Each marker more costs every cell
# a comparison: pyarrow's default list of 17 made DuckDB's scan about 40% slower.
NULL_TEXTS = ("", "NA")
MEMORY_LIMIT = "512MB"  # per query; DuckDB spills to a temporary directory beyond it
COPY_TABLE = "data"  # the rows' table in a dataset's copy (copies.py)
Connection = duckdb.DuckDBPyConnection

_TYPES = {
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.uint8(): "UTINYINT",
    pa.uint16(): "USMALLINT",
    pa.uint32(): "UINTEGER",
    pa.uint64(): "UBIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.date32(): "DATE",
}


class EngineError(Exception):
    """DuckDB refused a file or a value: its message may quote the data, so only its kind
    leaves (the caller words the error)."""


def duck_type(type_: pa.DataType) -> str:
    if pa.types.is_timestamp(type_):
        return "TIMESTAMPTZ" if type_.tz is not None else "TIMESTAMP"
    found = _TYPES.get(type_)
    if found is None:
        raise ValueError(f"the engine reads no column of type {type_}")
    return found


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def file_source(csv: Sequence[Path], parquet: Sequence[Path], schema: pa.Schema) -> str:
    """The FROM clause over a dataset's files, each column read as `schema` says.

    A CSV is parsed with the schema's types (no guessing per file); a Parquet column
    whose type differs is cast. Paths are the site's configuration, quoted as literals.
    """
    columns = ", ".join(f"{sql.quote(f.name, sql.DUCKDB)}" for f in schema)
    parts = []
    if csv:
        types = ", ".join(f"{_literal(f.name)}: {_literal(duck_type(f.type))}" for f in schema)
        nulls = ", ".join(_literal(t) for t in NULL_TEXTS)
        files = ", ".join(_literal(str(p)) for p in csv)
        parts.append(
            f"SELECT {columns} FROM read_csv([{files}], header = true, auto_detect = false, "
            f"columns = {{{types}}}, nullstr = [{nulls}])"
        )
    if parquet:
        casts = ", ".join(
            f"CAST({sql.quote(f.name, sql.DUCKDB)} AS {duck_type(f.type)}) AS "
            f"{sql.quote(f.name, sql.DUCKDB)}"
            for f in schema
        )
        files = ", ".join(_literal(str(p)) for p in parquet)
        parts.append(f"SELECT {casts} FROM read_parquet([{files}])")
    return f"({' UNION ALL '.join(parts)}) AS source"


# Every database here reads as every other: a copy made under other settings would answer
# differently from the files it copies (COPY_FORMAT names them).
_SETTINGS = (
    f"SET memory_limit = {_literal(MEMORY_LIMIT)}",
    "SET GLOBAL TimeZone = 'UTC'",  # a date filter on a zoned column: UTC midnight
    # Arrow leaves NaN out of a Parquet column's min and max and writes no NaN count; DuckDB
    # took those to mean "no NaN" (2.0.1): isnan folded to false, a NaN counted as a value
    # when the column had no null. The prefilter's bound (sql.Dialect.below_nan) keeps the
    # row groups the statistics exclude skipped.
    "SET GLOBAL parquet_can_have_nan = true",
)
# What a copy's contents depend on besides its statement (copy_statement): made again when
# it changes. The number is raised with any other change to how copies are made.
COPY_FORMAT = f"copy 1; duckdb {duckdb.__version__}; {'; '.join(_SETTINGS)}"


def _configured(con: Connection) -> Connection:
    for setting in _SETTINGS:
        con.execute(setting)
    return con


@functools.cache
def database() -> Connection:
    """One in-memory database per process: opening one costs tens of milliseconds, so a
    dataset opens it (at the worker's start), not its first job."""
    return _configured(duckdb.connect(":memory:"))


def copy_statement(source: str, schema: pa.Schema) -> str:
    """The statement that fills a copy with the rows of `source` (a FROM clause), as
    `schema` types them, a float's NaN as NULL (missing, as everywhere: the copy's own
    statements then need no NaN test, scan(copied)).

    DuckDB's own storage, compressed per column with statistics per row group, which it
    scans several times faster than a CSV or Parquet file.
    """
    columns = []
    for field in schema:
        name = sql.quote(field.name, sql.DUCKDB)
        if pa.types.is_floating(field.type):
            name = f"CASE WHEN isnan({name}) THEN NULL ELSE {name} END AS {name}"
        columns.append(name)
    return f"CREATE TABLE {COPY_TABLE} AS SELECT {', '.join(columns)} FROM {source}"


def copy_database(path: Path) -> Connection:
    """A new database file for a dataset's copy: a database of its own, so that its spill
    folder is its own and it can be interrupted."""
    con = _configured(duckdb.connect(str(path)))
    con.execute(f"SET temp_directory = {_literal(str(path.with_suffix('.spill')))}")
    con.execute("SET enable_progress_bar = false")
    return con


def write_copy(con: Connection, statement: str) -> None:
    """Run a copy_statement on a copy_database."""
    try:
        con.execute(statement)
    except duckdb.Error as exc:
        raise EngineError(type(exc).__name__) from None


def attach(path: Path, alias: str) -> str:
    """Open a copy (write_copy) for reading under `alias`: the FROM clause of its rows."""
    try:
        with database().cursor() as con:
            con.execute(f"ATTACH {_literal(str(path))} AS {alias} (READ_ONLY)")
    except duckdb.Error as exc:
        raise EngineError(type(exc).__name__) from None
    return f"{alias}.main.{COPY_TABLE} AS source"


def detach(alias: str) -> None:
    with database().cursor() as con:
        con.execute(f"DETACH DATABASE IF EXISTS {alias}")


def _connect() -> duckdb.DuckDBPyConnection:
    """A connection of its own for each query: jobs run on several threads at once."""
    con = database().cursor()
    con.execute("SET enable_progress_bar = false")  # a worker has no terminal
    return con


def scan(
    source: str,
    select: Select,
    schema: pa.Schema,
    who: str,
    categories: Mapping[str, Sequence[object]] | None = None,
    copied: bool = False,
) -> list[tuple[Any, ...]]:
    """One scan of `source` (`copied`: a copy, attach) answering `select`: a row per group.

    Always one statement, a float's NaN read as missing: the work must not depend on the
    data (a second scan where a row held NaN timed whether it did, for no measurable gain).
    """
    dialect = sql.DUCKDB_COPY if copied else sql.DUCKDB
    statement, params = sql.compile_select(select, source, schema, dialect, who, categories)
    try:
        with _connect() as con:
            return con.execute(statement, params).fetchall()
    except duckdb.Error as exc:
        raise EngineError(type(exc).__name__) from None


def scan_batches(
    batches: Iterator[pa.RecordBatch],
    select: Select,
    schema: pa.Schema,
    who: str,
    categories: Mapping[str, Sequence[object]] | None = None,
) -> list[tuple[Any, ...]]:
    """One scan of a stream of batches answering `select` (a source DuckDB cannot read
    itself): a row per group."""
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    statement, params = sql.compile_select(select, "batches", schema, sql.DUCKDB, who, categories)
    try:
        with _connect() as con:
            con.register("batches", reader)
            return con.execute(statement, params).fetchall()
    except duckdb.Error as exc:
        raise EngineError(type(exc).__name__) from None
