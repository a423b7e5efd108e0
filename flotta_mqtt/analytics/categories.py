"""Declared categories: the values a site says a text or integer column takes.

They are the site's public information, as its schema is. Every source reads a value
outside them as missing, in the same scan (sql.py; filters.py for column batches), as a
pandas Categorical with fixed categories does. A filter naming another value is refused,
since a typo would otherwise count no rows. A grouped answer over declared columns lists
every combination of their values and missing: under differential privacy each gets a
noisy count and none is dropped, so no threshold is needed and whether a rare value is
present does not show in which groups appear (the public-keys approach).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import pyarrow as pa
from pydantic import Field, StrictInt, StrictStr

from flotta_mqtt.analytics.registry import OperationError

# An integer category fits the int64 every source reads integers as.
Category = StrictStr | Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]
Categories = Mapping[str, Sequence[Category]]

MAX_VALUES = 10_000  # per column
MAX_BYTES = 64 << 10  # a dataset's categories as JSON: they travel in its worker's presence
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


def fitted(schema: pa.Schema, categories: Categories, who: str) -> dict[str, tuple[Any, ...]]:
    """The categories, each checked to name a column of its kind (text, or integers)."""
    for column, values in categories.items():
        if column not in schema.names:
            raise OperationError(f"{who}: categories name column {column}, which the data lacks")
        type_ = schema.field(column).type
        text = isinstance(values[0], str)
        if not (_text(type_) if text else pa.types.is_integer(type_)):
            raise OperationError(
                f"{who}: the categories of column {column} are "
                f"{'text' if text else 'integers'} but the column is {type_} (set its type "
                "in the dataset's `types`)"
            )
    return {column: tuple(values) for column, values in categories.items()}


def _text(type_: pa.DataType) -> bool:
    return bool(pa.types.is_string(type_) or pa.types.is_large_string(type_))


def public_keys(by: Sequence[str], categories: Categories) -> list[tuple[Any, ...]] | None:
    """Every combination of the `by` columns' declared values and missing (None): the
    groups an answer lists whatever the data holds. None when a column is not declared,
    or the combinations are more than MAX_GROUPS."""
    if not all(column in categories for column in by):
        return None
    if math.prod(len(categories[column]) + 1 for column in by) > MAX_GROUPS:
        return None
    return list(itertools.product(*[(*categories[column], None) for column in by]))


def shown(values: Sequence[Category], most: int = 10) -> str:
    """Declared values for an error message: the first few, and how many in all."""
    text = ", ".join(repr(v) for v in values[:most])
    return text if len(values) <= most else f"{text}, ... ({len(values)} in all)"
