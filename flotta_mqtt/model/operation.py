"""What a step asks a node to run: a registered operation's name and its parameters."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue

OperationName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]


class Operation(BaseModel):
    """A reference to an operation by name; the roles layer validates `params` against it.

    Steps carry data, never code: a node runs only operations it has registered.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: OperationName
    params: dict[str, JsonValue] = Field(default_factory=dict)
