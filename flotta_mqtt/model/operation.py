"""What a step asks a node to run: a registered operation's name and its parameters."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

OperationName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]


def _finite(value: JsonValue) -> JsonValue:
    """JSON has no inf or nan: refuse them rather than let them turn into null in transit.

    One loop over the whole value: a validator per item of a job's params cost more than
    decoding the rest of its message.
    """
    items = [value]
    for item in items:  # the list grows as containers are met: every item is seen once
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{item} is not a finite number")
        elif isinstance(item, dict):
            items.extend(item.values())
        elif isinstance(item, list):
            items.extend(item)
    return value


FiniteJson = Annotated[JsonValue, AfterValidator(_finite)]
# A JSON object with only finite numbers, checked in one pass (see _finite).
FiniteJsonObject = Annotated[dict[str, JsonValue], AfterValidator(_finite)]


class Operation(BaseModel):
    """A reference to an operation by name; the analytics layer validates `params` against it.

    Steps carry data, never code: a node runs only operations it has registered.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: OperationName
    params: FiniteJsonObject = Field(default_factory=dict)
