"""Row filters as data: a step carries them as JSON, never as code, and every node reads them."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Comparator = Literal["<", "<=", ">", ">=", "==", "!="]

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


class _Filter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Compare(_Filter):
    """`column op value`, e.g. x > 0.5."""

    kind: Literal["compare"] = "compare"
    column: str = Field(min_length=1)
    op: Comparator
    value: float | int | str

    def columns(self) -> set[str]:
        return {self.column}

    def matches(self, row: Mapping[str, Any]) -> bool:
        return _COMPARE[self.op](row[self.column], self.value)


class AllOf(_Filter):
    kind: Literal["all"] = "all"
    filters: list[Filter] = Field(min_length=1)

    def columns(self) -> set[str]:
        return set().union(*(f.columns() for f in self.filters))

    def matches(self, row: Mapping[str, Any]) -> bool:
        return all(f.matches(row) for f in self.filters)


class AnyOf(_Filter):
    kind: Literal["any"] = "any"
    filters: list[Filter] = Field(min_length=1)

    def columns(self) -> set[str]:
        return set().union(*(f.columns() for f in self.filters))

    def matches(self, row: Mapping[str, Any]) -> bool:
        return any(f.matches(row) for f in self.filters)


class Not(_Filter):
    kind: Literal["not"] = "not"
    filter: Filter

    def columns(self) -> set[str]:
        return self.filter.columns()

    def matches(self, row: Mapping[str, Any]) -> bool:
        return not self.filter.matches(row)


Filter = Annotated[Compare | AllOf | AnyOf | Not, Field(discriminator="kind")]
AllOf.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()
