"""What a step asks a node to run: a registered operation's name and its parameters."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

OperationName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]


def _finite(value: JsonValue) -> JsonValue:
    """JSON has no inf or nan: refuse them rather than let them turn into null in transit."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    if isinstance(value, list):
        for item in value:
            _finite(item)
    elif isinstance(value, dict):
        for item in value.values():
            _finite(item)
    return value


FiniteJson = Annotated[JsonValue, AfterValidator(_finite)]


class Operation(BaseModel):
    """A reference to an operation by name; the analytics layer validates `params` against it.

    Steps carry data, never code: a node runs only operations it has registered.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: OperationName
    params: dict[str, FiniteJson] = Field(default_factory=dict)
