"""Queries as data: row filters and column selection that a step carries as JSON, never code.

Build them with natural syntax and put them in an operation's parameters:

    q = Query()
    adults = q[(q["age"] >= 18) & ~q["site"].isin(["test"])]
    params = adults[["x", "y"]].params()      # {"where": {...}, "columns": ["x", "y"]}

Missing values follow SQL's three-valued logic: a comparison with a missing value is
unknown, `~` of unknown is unknown, and only rows whose filter is true are kept — so a row
with no `x` matches neither `x > 0.5` nor `~(x > 0.5)`. Workers evaluate filters on column
batches (analytics/filters.py); this module only describes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Comparator = Literal["<", "<=", ">", ">=", "==", "!="]
EQUALITY = ("==", "!=")


class _Filter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def columns(self) -> set[str]:
        raise NotImplementedError

    def __and__(self, other: Filter) -> AllOf:
        return AllOf(filters=[*_parts(self, AllOf), *_parts(other, AllOf)])

    def __or__(self, other: Filter) -> AnyOf:
        return AnyOf(filters=[*_parts(self, AnyOf), *_parts(other, AnyOf)])

    def __invert__(self) -> Not:
        return Not(filter=self)


def _parts(item: _Filter, kind: type[AllOf] | type[AnyOf]) -> list[Filter]:
    """Flatten `a & b & c` into one AllOf (and `|` into one AnyOf)."""
    return list(item.filters) if isinstance(item, kind) else [item]  # type: ignore[list-item]


class Compare(_Filter):
    """`column op value`: numbers with any comparator; strings and booleans with == and !=."""

    kind: Literal["compare"] = "compare"
    column: str = Field(min_length=1)
    op: Comparator
    value: bool | int | float | str

    @field_validator("value")
    @classmethod
    def _finite(cls, value: bool | int | float | str) -> bool | int | float | str:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("compare with a finite number")
        return value

    @model_validator(mode="after")
    def _ordered_types(self) -> Compare:
        if isinstance(self.value, str | bool) and self.op not in EQUALITY:
            raise ValueError(
                f"{type(self.value).__name__} values compare only with == and != "
                f"(got {self.op}); use isin for membership"
            )
        return self

    def columns(self) -> set[str]:
        return {self.column}


class DateCompare(_Filter):
    """`column op date`: before (<), after (>) or on a calendar day, for date/time columns."""

    kind: Literal["date"] = "date"
    column: str = Field(min_length=1)
    op: Comparator
    value: date

    def columns(self) -> set[str]:
        return {self.column}


class IsIn(_Filter):
    """The column's value is one of `values` (all strings, or all numbers)."""

    kind: Literal["isin"] = "isin"
    column: str = Field(min_length=1)
    values: list[str] | list[int | float]

    def columns(self) -> set[str]:
        return {self.column}


class AllOf(_Filter):
    kind: Literal["all"] = "all"
    filters: list[Filter] = Field(min_length=1)

    def columns(self) -> set[str]:
        return set().union(*(f.columns() for f in self.filters))


class AnyOf(_Filter):
    kind: Literal["any"] = "any"
    filters: list[Filter] = Field(min_length=1)

    def columns(self) -> set[str]:
        return set().union(*(f.columns() for f in self.filters))


class Not(_Filter):
    kind: Literal["not"] = "not"
    filter: Filter

    def columns(self) -> set[str]:
        return self.filter.columns()


Filter = Annotated[Compare | DateCompare | IsIn | AllOf | AnyOf | Not, Field(discriminator="kind")]
AllOf.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()

Scalar = bool | int | float | str | date


class Column:
    """`q["x"]`: a column to compare; each comparison returns a Filter (data, not a bool)."""

    __hash__ = None  # type: ignore[assignment]  # == builds a filter, so columns are not keys

    def __init__(self, name: str) -> None:
        self.name = name

    def _compare(self, op: Comparator, value: Scalar) -> Filter:
        if isinstance(value, date):
            return DateCompare(column=self.name, op=op, value=value)
        return Compare(column=self.name, op=op, value=value)

    def __lt__(self, value: Scalar) -> Filter:
        return self._compare("<", value)

    def __le__(self, value: Scalar) -> Filter:
        return self._compare("<=", value)

    def __gt__(self, value: Scalar) -> Filter:
        return self._compare(">", value)

    def __ge__(self, value: Scalar) -> Filter:
        return self._compare(">=", value)

    def __eq__(self, value: Scalar) -> Filter:  # type: ignore[override]
        return self._compare("==", value)

    def __ne__(self, value: Scalar) -> Filter:  # type: ignore[override]
        return self._compare("!=", value)

    def isin(self, values: Sequence[str] | Sequence[int | float]) -> IsIn:
        return IsIn(column=self.name, values=list(values))

    def __repr__(self) -> str:
        return f"Column({self.name!r})"


class Query(BaseModel):
    """Which rows (`where`) and which columns (`columns`) an operation works on.

    `q["x"]` names a column, `q[filter]` keeps the rows passing it (and-ed with any filter
    already there), `q[["x", "y"]]` selects columns. Each returns a new Query.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    where: Filter | None = None
    columns: list[str] | None = Field(default=None, min_length=1)

    @overload
    def __getitem__(self, key: str) -> Column: ...

    @overload
    def __getitem__(self, key: list[str] | Filter) -> Query: ...

    def __getitem__(self, key: str | list[str] | Filter) -> Column | Query:
        if isinstance(key, str):
            return Column(key)
        if isinstance(key, list):
            return Query(where=self.where, columns=key)
        if isinstance(key, _Filter):
            where = key if self.where is None else self.where & key
            return Query(where=where, columns=self.columns)
        raise TypeError(f"a Query takes a column name, a list of names or a filter, not {key!r}")

    def params(self) -> dict[str, Any]:
        """The query as an operation's JSON parameters (`where`, `columns`)."""
        return self.model_dump(mode="json", exclude_none=True)
