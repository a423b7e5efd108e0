"""Queries evaluated on a worker: filters checked against the schema, then applied per batch.

Every check happens before any data is read, so a wrong column or type fails at once with
an error naming the worker and the column. Evaluation is vectorised with pyarrow.compute
and follows SQL's three-valued logic (see model/query.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flotta_mqtt.analytics.registry import ColumnTypeError, Dataset
from flotta_mqtt.model.query import AllOf, AnyOf, Compare, DateCompare, Filter, IsIn, Not

_COMPARE: dict[str, Callable[[pa.Array, pa.Scalar], pa.Array]] = {
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
    "==": pc.equal,
    "!=": pc.not_equal,
}


def is_number(type_: pa.DataType) -> bool:
    return bool(pa.types.is_integer(type_) or pa.types.is_floating(type_))


def is_text(type_: pa.DataType) -> bool:
    return bool(pa.types.is_string(type_) or pa.types.is_large_string(type_))


def shown(values: Sequence[object], most: int = 10) -> str:
    """Declared values for an error message: the first few, and how many in all."""
    text = ", ".join(repr(v) for v in values[:most])
    return text if len(values) <= most else f"{text}, ... ({len(values)} in all)"


def is_temporal(type_: pa.DataType) -> bool:
    return bool(pa.types.is_date(type_) or pa.types.is_timestamp(type_))


def _fits(value: object, type_: pa.DataType) -> bool:
    if isinstance(value, bool):
        return bool(pa.types.is_boolean(type_))
    if isinstance(value, int | float):
        return is_number(type_)
    return is_text(type_)


def _check(where: Filter, data: Dataset) -> None:
    """Raise ColumnTypeError where a filter compares a column with a value of another type."""
    if isinstance(where, AllOf | AnyOf):
        for part in where.filters:
            _check(part, data)
        return
    if isinstance(where, Not):
        _check(where.filter, data)
        return
    type_ = data.schema().field(where.column).type
    if isinstance(where, DateCompare):
        ok, wanted = is_temporal(type_), "dates"
    elif isinstance(where, IsIn):
        ok = not where.values or _fits(where.values[0], type_)
        wanted = "strings" if where.values and isinstance(where.values[0], str) else "numbers"
    else:
        kind = {bool: "boolean", int: "number", float: "number", str: "string"}
        ok, wanted = _fits(where.value, type_), f"the {kind[type(where.value)]} {where.value!r}"
    if not ok:
        raise ColumnTypeError(
            f"worker {data.node}: column {where.column} of project {data.project} is "
            f"{type_}; the filter compares it with {wanted}"
        )
    _check_declared(where, data)


def _check_declared(where: IsIn | DateCompare | Compare, data: Dataset) -> None:
    """Refuse a value outside a column's declared categories where it is looked for
    (==, !=, isin): it matches no row, so it is a mistake (a typo would count 0)."""
    declared = data.categories.get(where.column)
    if declared is None or isinstance(where, DateCompare):
        return
    if isinstance(where, IsIn):
        values: list[object] = list(where.values)
    elif where.op in ("==", "!="):
        values = [where.value]
    else:
        return
    known = set(declared)
    outside = [v for v in values if v not in known]
    if outside:
        raise ColumnTypeError(
            f"worker {data.node}: the filter looks for {outside[0]!r} in column "
            f"{where.column} of project {data.project}, which takes only its declared "
            f"categories: {shown(declared)}"
        )


def check(data: Dataset, columns: set[str], where: Filter | None) -> None:
    """Every column exists and the filter's values fit their columns' types."""
    data.require(columns | (where.columns() if where is not None else set()))
    if where is not None:
        _check(where, data)


def declared(data: Dataset, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The dataset's batches of `columns`, each declared column's values outside its
    categories read as missing (as the SQL every aggregate runs reads them: sql.py)."""
    for batch in data.batches(columns):
        for name, values in data.categories.items():
            index = batch.schema.get_field_index(name)
            if index >= 0:
                column = batch.column(index)
                kept = pc.is_in(column, value_set=pa.array(values))
                batch = batch.set_column(
                    index,
                    batch.schema.field(index),
                    pc.if_else(kept, column, pa.scalar(None, column.type)),
                )
        yield batch


def _day(value: DateCompare, type_: pa.DataType) -> pa.Scalar:
    if pa.types.is_date(type_):
        return pa.scalar(value.value, type=type_)
    # Timestamps compare with midnight of the day (UTC when the column has a time zone).
    return pa.scalar(datetime.combine(value.value, time()), type=type_)


def mask(where: Filter, batch: pa.RecordBatch) -> pa.Array:
    """Whether each row passes: true, false, or null (unknown) where a value is missing."""
    if isinstance(where, AllOf | AnyOf):
        combine = pc.and_kleene if isinstance(where, AllOf) else pc.or_kleene
        result = mask(where.filters[0], batch)
        for part in where.filters[1:]:
            result = combine(result, mask(part, batch))
        return result
    if isinstance(where, Not):
        return pc.invert(mask(where.filter, batch))
    column = batch.column(where.column)
    if isinstance(where, IsIn):
        wanted = pa.array(where.values, type=None if is_number(column.type) else column.type)
        if is_number(column.type):
            # Numbers meet as float64 (2.5 may be looked for in an integer column), with
            # 0.0 added so that -0.0 hashes as the 0.0 it equals.
            column = pc.add(pc.cast(column, pa.float64()), 0.0)
            wanted = pc.add(pc.cast(wanted, pa.float64()), 0.0)
        found = pc.is_in(column, value_set=wanted)
        return pc.if_else(pc.is_valid(column), found, pa.scalar(None, pa.bool_()))
    if isinstance(where, DateCompare):
        return _COMPARE[where.op](column, _day(where, column.type))
    return _COMPARE[where.op](column, pa.scalar(where.value))


def checked(
    data: Dataset, columns: Sequence[str], where: Filter | None, numbers: Sequence[str]
) -> list[str]:
    """Check a selection before reading anything; return the columns to read."""
    check(data, {*columns, *numbers}, where)
    schema = data.schema()
    for column in numbers:
        type_ = schema.field(column).type
        if not (is_number(type_) or pa.types.is_boolean(type_)):
            raise ColumnTypeError(
                f"worker {data.node}: column {column} of project {data.project} is {type_}, "
                "not numbers"
            )
    read = list(dict.fromkeys([*columns, *(sorted(where.columns()) if where else [])]))
    return read or schema.names[:1]


def select(
    data: Dataset, columns: Sequence[str], where: Filter | None, numbers: Sequence[str] = ()
) -> Iterator[pa.RecordBatch]:
    """The named columns of the rows passing `where`, batch by batch.

    Checked before the first batch is read: every column exists, the filter fits their
    types, and the columns in `numbers` hold numbers (or booleans).
    """
    read = checked(data, columns, where, numbers)
    return (
        (batch if where is None else batch.filter(mask(where, batch))).select(list(columns))
        for batch in declared(data, read)
    )


def select_numbered(
    data: Dataset, columns: Sequence[str], where: Filter | None, numbers: Sequence[str] = ()
) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """As `select`, with each kept row's position in the dataset (for seeded splits)."""
    read = checked(data, columns, where, numbers)
    return _numbered(data, read, columns, where)


def _numbered(
    data: Dataset, read: list[str], columns: Sequence[str], where: Filter | None
) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    offset = 0
    for batch in declared(data, read):
        rows = np.arange(offset, offset + batch.num_rows)
        offset += batch.num_rows
        if where is not None:
            keep = mask(where, batch)
            batch = batch.filter(keep)
            rows = rows[pc.fill_null(keep, False).to_numpy(zero_copy_only=False)]
        yield batch.select(list(columns)), rows


def present(array: pa.Array) -> pa.Array:
    """Which values are present: missing ones are null, or NaN in a float column."""
    valid = pc.is_valid(array)
    if pa.types.is_floating(array.type):
        valid = pc.and_(valid, pc.invert(pc.is_nan(array)))
    return valid


def values(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A numeric column's present values as float64."""
    array = batch.column(column)
    if array.null_count or pa.types.is_floating(array.type):
        array = array.filter(present(array))
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)
