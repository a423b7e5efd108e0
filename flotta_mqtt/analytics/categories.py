"""Declared categories: the values a site says a text or integer column takes.

They are the site's public information, as its schema is. Every source reads a value
outside them as missing, in the same scan (sql.py; filters.py for column batches), as a
pandas Categorical with fixed categories does. A filter naming another value is refused,
since a typo would otherwise count no rows. A grouped answer over declared columns lists
every combination of their values and missing: under differential privacy each gets a
noisy count and none is dropped, so no threshold is needed and whether a rare value is
present does not show in which groups appear (the public-keys approach). Whatever keys a
source returns (a collation, a float for an integer, padding), `folded` maps them onto
the declared values or missing before any group is released.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import pyarrow as pa
from pydantic import Field, StrictInt, StrictStr

from flotta_mqtt.analytics.filters import is_text
from flotta_mqtt.analytics.registry import OperationError

# An integer category fits the int64 every source reads integers as.
Category = StrictStr | Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]
Categories = Mapping[str, Sequence[Category]]

MAX_VALUES = 10_000  # per column
MAX_BYTES = 64 << 10  # a dataset's categories as JSON: they travel in its worker's presence
# All of a worker's datasets' categories as JSON: its presence carries every dataset's, and
# a message holds 256 KiB at most (five datasets at MAX_BYTES made 270,308 bytes).
MAX_TOTAL_BYTES = 128 << 10
MAX_GROUPS = 10_000  # the combinations a grouped answer lists; beyond, only those observed


def validated(categories: dict[str, list[Category]]) -> dict[str, list[Category]]:
    """A spec's categories, or a ValueError naming the column and the limit."""
    for column, values in categories.items():
        if not values:
            raise ValueError(f"categories of {column}: declare at least one value")
        if len(values) > MAX_VALUES:
            raise ValueError(
                f"categories of {column}: {len(values)} values, more than the {MAX_VALUES} allowed"
            )
        if len({type(v) for v in values}) > 1:
            raise ValueError(f"categories of {column} mix text and integers")
        seen: set[Category] = set()
        for value in values:
            if value in seen:
                raise ValueError(f"categories of {column}: {value!r} is declared twice")
            seen.add(value)
    size = len(json.dumps(categories))
    if size > MAX_BYTES:
        raise ValueError(f"categories take {size} bytes as JSON, more than the {MAX_BYTES} allowed")
    return categories


def within_total(every: Iterable[Categories]) -> None:
    """Raise a ValueError when a worker's datasets' categories together pass MAX_TOTAL_BYTES."""
    size = sum(len(json.dumps(dict(categories))) for categories in every)
    if size > MAX_TOTAL_BYTES:
        raise ValueError(
            f"the datasets' categories take {size} bytes as JSON in all, more than the "
            f"{MAX_TOTAL_BYTES} a worker may announce"
        )


def fitted(schema: pa.Schema, categories: Categories, who: str) -> dict[str, tuple[Any, ...]]:
    """The categories, each checked to name a column of its kind (text, or integers)."""
    for column, values in categories.items():
        if column not in schema.names:
            raise OperationError(f"{who}: categories name column {column}, which the data lacks")
        type_ = schema.field(column).type
        text = isinstance(values[0], str)
        if not (is_text(type_) if text else pa.types.is_integer(type_)):
            raise OperationError(
                f"{who}: the categories of column {column} are "
                f"{'text' if text else 'integers'} but the column is {type_} (set its type "
                "in the dataset's `types`)"
            )
    return {column: tuple(values) for column, values in categories.items()}


def public_keys(by: Sequence[str], categories: Categories) -> list[tuple[Any, ...]] | None:
    """Every combination of the `by` columns' declared values and missing (None): the
    groups an answer lists whatever the data holds. None when a column is not declared,
    or the combinations are more than MAX_GROUPS."""
    if not all(column in categories for column in by):
        return None
    if math.prod(len(categories[column]) + 1 for column in by) > MAX_GROUPS:
        return None
    return list(itertools.product(*[(*categories[column], None) for column in by]))


def folded(
    by: Sequence[str], categories: Categories, groups: Mapping[tuple[Any, ...], Sequence[float]]
) -> dict[tuple[Any, ...], list[float]]:
    """`groups` (a key per row of `by` values, then its sums) with each declared column's
    value replaced by the declared value it equals (1.0 finds 1), or None when it equals
    none, the sums of keys that meet added up: whatever a source returns (a collation that
    finds 'A' in ['a'], a REAL column's 1.0, a padded char(3)), no undeclared value leaves."""
    found = [{v: v for v in categories[column]} if column in categories else None for column in by]
    merged: dict[tuple[Any, ...], list[float]] = {}
    for key, sums in groups.items():
        public = tuple(
            value if values is None else values.get(value)
            for value, values in zip(key, found, strict=True)
        )
        before = merged.get(public)
        merged[public] = (
            list(sums) if before is None else [a + b for a, b in zip(before, sums, strict=True)]
        )
    return merged
