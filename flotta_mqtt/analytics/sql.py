"""Filters and aggregates compiled to parameterised SQL, for DuckDB, SQLite and PostgreSQL.

One compiler for every source, so that a filter means the same everywhere: SQL's
three-valued logic (model/query.py), NaN taken as missing. Values are never written into
the statement: each is a placeholder with its value in the parameters. Column names are
checked against the source's schema, then quoted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time

import pyarrow as pa

from flotta_mqtt.analytics.filters import is_number, is_text
from flotta_mqtt.analytics.plan import Agg, Select
from flotta_mqtt.analytics.registry import UnknownColumn
from flotta_mqtt.model.query import AllOf, AnyOf, DateCompare, Filter, IsIn, Not


@dataclass(frozen=True)
class Dialect:
    name: str
    placeholder: str  # "?" (DuckDB, SQLite) or "%s" (psycopg)
    double: str  # the type name of a float64
    nan: str | None  # the test of a NaN value (SQLite stores NaN as NULL: none)
    least: str  # the smaller of two values: LEAST, or SQLite's two-argument MIN
    greatest: str
    sum: str  # the sum of floats
    # A float column's bound that NaN fails, joined to a pushed-down comparison: DuckDB
    # orders NaN above all, so that a Parquet row group whose statistics exclude the
    # filter may still be skipped while its column may hold NaN (engine.py).
    below_nan: str | None = None


# DuckDB's NULLIF(x, 'NaN') let NaN through from Parquet (1.x and 2.0), and so did isnan
# where the column had no null, until parquet_can_have_nan (engine.database).
# Its threads add a sum's parts in any order, so `sum` differed in the last bits from one
# run to the next; `fsum` (compensated: Kahan) gave the same every run, for a few percent.
DUCKDB = Dialect(
    "duckdb", "?", "DOUBLE", "isnan({})", "LEAST", "GREATEST", "fsum", "{} <= 'inf'::DOUBLE"
)
# A worker's copy of its files (engine.write_copy) stores NaN as NULL, as SQLite does: its
# statement needs no NaN test, and its filter is pushed down as it is.
DUCKDB_COPY = Dialect("duckdb", "?", "DOUBLE", None, "LEAST", "GREATEST", "fsum")
SQLITE = Dialect("sqlite", "?", "REAL", None, "MIN", "MAX", "sum")
POSTGRES = Dialect(
    "postgresql", "%s", "DOUBLE PRECISION", "{} = 'NaN'::float8", "LEAST", "GREATEST", "sum"
)


def quote(name: str, dialect: Dialect) -> str:
    """An identifier as SQL text: in double quotes, a quote doubled (and psycopg's % too)."""
    text = '"' + name.replace('"', '""') + '"'
    return text.replace("%", "%%") if dialect.placeholder == "%s" else text


class Compiler:
    """Builds one statement's text and its parameters, left to right."""

    def __init__(self, schema: pa.Schema, dialect: Dialect, where: str) -> None:
        self.schema = schema
        self.dialect = dialect
        self.where = where  # who asks, for errors: "worker w0: project p"
        self.params: list[object] = []

    def value(self, value: object) -> str:
        self.params.append(value)
        return self.dialect.placeholder

    def column(self, name: str, plain: bool = False) -> str:
        """A column as SQL: its NaN read as NULL unless `plain` (for the pushed-down prefilter)."""
        if name not in self.schema.names:
            raise UnknownColumn(
                f"{self.where} has no column {name} (columns: {', '.join(self.schema.names)})"
            )
        text = quote(name, self.dialect)
        nan = self.dialect.nan
        if plain or nan is None or not pa.types.is_floating(self.type(name)):
            return text
        return f"(CASE WHEN {nan.format(text)} THEN NULL ELSE {text} END)"

    def declared(
        self, source: str, columns: Sequence[str], categories: Mapping[str, Sequence[object]]
    ) -> str:
        """`source` with each declared column's values outside its categories read as NULL.

        A subquery the database inlines (still one scan), so that the rest of the statement
        names each column as it would without categories: each declared value is a
        parameter, so the set is bound once and GROUP BY repeats no placeholder. Values
        compare byte for byte (`binary`): a column's collation or padding finds none that
        is not declared (groups.py folds what a source returns all the same).
        """
        if not any(c in categories for c in columns):
            return source
        items = []
        for name in columns:
            text = quote(name, self.dialect)
            if name in categories:
                value = self.binary(name)
                wanted = ", ".join(self.value(v) for v in categories[name])
                text = f"CASE WHEN {value} IN ({wanted}) THEN {value} END"
            items.append(f"{text} AS {quote(name, self.dialect)}")
        return f"(SELECT {', '.join(items)} FROM {source}) AS declared"

    def binary(self, name: str) -> str:
        """A declared column as its values compare byte for byte: SQLite's column may be
        declared COLLATE NOCASE; PostgreSQL's char(n) compares and returns its values padded
        (text drops the padding, the C collation compares bytes). DuckDB compares bytes."""
        text = quote(name, self.dialect)
        if self.dialect is SQLITE:
            return f"{text} COLLATE BINARY"
        if self.dialect is POSTGRES and is_text(self.type(name)):
            return f'CAST({text} AS TEXT) COLLATE "C"'
        return text

    def plain_is_exact(self, where: Filter) -> bool:
        """Whether `where`'s prefilter is `where` itself (no NaN to read as NULL)."""
        for column in where.columns():
            self.column(column)  # an unknown column is refused here first
        floats = any(pa.types.is_floating(self.type(c)) for c in where.columns())
        return prefilter(where) == where and (self.dialect.nan is None or not floats)

    def type(self, name: str) -> pa.DataType:
        return self.schema.field(name).type

    def number(self, name: str) -> str:
        return f"CAST({self.column(name)} AS {self.dialect.double})"

    def filter(self, where: Filter, plain: bool = False) -> str:
        """`where` as a boolean SQL expression."""
        if isinstance(where, AllOf | AnyOf):
            joiner = " AND " if isinstance(where, AllOf) else " OR "
            return "(" + joiner.join(self.filter(f, plain) for f in where.filters) + ")"
        if isinstance(where, Not):
            return f"(NOT {self.filter(where.filter, plain)})"
        if isinstance(where, IsIn):
            return self._isin(where)
        column = self.column(where.column, plain)
        op = "=" if where.op == "==" else "<>" if where.op == "!=" else where.op
        if isinstance(where, DateCompare):
            return f"({column} {op} {self.value(self._day(where))})"
        bound = self.dialect.below_nan
        if plain and bound is not None and pa.types.is_floating(self.type(where.column)):
            return f"({column} {op} {self.value(where.value)} AND {bound.format(column)})"
        return f"({column} {op} {self.value(where.value)})"

    def _day(self, where: DateCompare) -> object:
        type_ = self.type(where.column)
        if pa.types.is_timestamp(type_):
            # Midnight of the day (UTC when the column has a time zone), as filters.mask.
            midnight = datetime.combine(where.value, time())
            return midnight if self.dialect is not SQLITE else midnight.isoformat(" ")
        return where.value if self.dialect is not SQLITE else where.value.isoformat()

    def _isin(self, where: IsIn) -> str:
        if not where.values:
            return f"(CASE WHEN {self.column(where.column)} IS NULL THEN NULL ELSE 1 = 0 END)"
        # Numbers meet as float64 (2.5 may be looked for in an integer column).
        numbers = is_number(self.type(where.column))
        column = self.number(where.column) if numbers else self.column(where.column)
        wanted = ", ".join(self.value(float(v) if numbers else v) for v in where.values)
        return f"({column} IN ({wanted}))"

    def aggregate(self, agg: Agg) -> str:
        if agg.kind == "rows":
            return "count(*)"
        assert agg.column is not None
        if agg.kind in ("present", "within"):
            return f"count({self.column(agg.column)})"
        number = self.number(agg.column)
        if agg.kind == "sum" and agg.clip is not None:
            low, high = self.value(float(agg.clip[0])), self.value(float(agg.clip[1]))
            # LEAST and GREATEST skip a NULL (SQLite's MIN and MAX return it): a missing
            # value stays missing.
            clipped = f"{self.dialect.least}({self.dialect.greatest}({number}, {low}), {high})"
            number = f"CASE WHEN {number} IS NULL THEN NULL ELSE {clipped} END"
        return f"{self.dialect.sum if agg.kind == 'sum' else agg.kind}({number})"

    def range(self, agg: Agg) -> str | None:
        """The bounds of a `within` aggregate, as a condition on its column."""
        if agg.kind != "within":
            return None
        assert agg.column is not None
        parts = []
        if agg.low is not None:
            op = ">" if agg.low_open else ">="
            parts.append(f"{self.number(agg.column)} {op} {self.value(float(agg.low))}")
        if agg.high is not None:
            op = "<=" if agg.high_closed else "<"
            parts.append(f"{self.number(agg.column)} {op} {self.value(float(agg.high))}")
        return " AND ".join(parts) or None


def compile_select(
    select: Select,
    source: str,
    schema: pa.Schema,
    dialect: Dialect,
    where: str,
    categories: Mapping[str, Sequence[object]] | None = None,
) -> tuple[str, list[object]]:
    """`select` over `source` (a table, or a subquery without parameters: these are
    numbered in the statement's order, the aggregates' first) as one statement and its
    parameters: the rows are the groups' values, then each aggregate. A column with
    declared `categories` reads a value outside them as NULL."""
    c = Compiler(schema, dialect, where)
    by = [c.column(b) for b in select.by]
    filters = {f.model_dump_json() if f is not None else "" for f, _ in select.aggs}
    shared = len(filters) == 1
    items = []
    for where_, agg in select.aggs:
        text = c.aggregate(agg)  # first: the parameters go in the statement's order
        conditions = [c.filter(where_)] if where_ is not None and not shared else []
        bounds = c.range(agg)
        conditions += [bounds] if bounds is not None else []
        items.append(text + (f" FILTER (WHERE {' AND '.join(conditions)})" if conditions else ""))
    source = c.declared(source, _used(select), categories or {})
    statement = f"SELECT {', '.join([*by, *items])} FROM {source}"
    statement += _where(c, [f for f, _ in select.aggs], shared)
    if by:
        statement += f" GROUP BY {', '.join(by)}"
    return statement, c.params


def _used(select: Select) -> list[str]:
    """The columns `select` reads (grouped by, aggregated or filtered on), in order."""
    return sorted(
        {*select.by, *(a.column for _, a in select.aggs if a.column is not None)}
        | {c for f, _ in select.aggs if f is not None for c in f.columns()}
    )


def _where(c: Compiler, filters: list[Filter | None], shared: bool) -> str:
    """The WHERE clause: the one filter every aggregate shares (and its prefilter), or the
    prefilters of all, or-ed; none when an aggregate takes every row."""
    if any(f is None for f in filters):
        return ""
    distinct = list({f.model_dump_json(): f for f in filters if f is not None}.values())
    weaker = [prefilter(f) for f in distinct]
    parts = []
    if None not in weaker and not (shared and c.plain_is_exact(distinct[0])):
        parts.append(" OR ".join(c.filter(w, plain=True) for w in weaker if w is not None))
    if shared:
        parts.append(c.filter(distinct[0]))
    return f" WHERE {' AND '.join(parts)}" if parts else ""


def prefilter(where: Filter) -> Filter | None:
    """A weaker filter a source can push into its scan (Parquet row-group statistics skip
    on plain column comparisons): `where` with its negated parts taken as true; None when
    nothing is left. NaN passes it only where the exact filter then rejects it."""
    if isinstance(where, Not):
        return None
    if isinstance(where, AllOf | AnyOf):
        parts = [prefilter(f) for f in where.filters]
        kept = [p for p in parts if p is not None]
        if not kept or (isinstance(where, AnyOf) and len(kept) < len(parts)):
            return None
        return type(where)(filters=kept)
    return where
