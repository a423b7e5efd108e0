"""The Artifact: what a workbench submits, and the payload of "artifact submitted"."""

from __future__ import annotations

import secrets
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.model.ids import SafeId
from flotta_mqtt.model.steps import Step, check_steps


def new_artifact_id() -> str:
    return uuid.uuid4().hex


class Artifact(BaseModel):
    """An ordered list of steps to run over the workers holding a project's data.

    Constructing one checks its distributions (a ValidationError carries the specific
    BindingError message), so a bad combination never reaches a scheduler.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    id: SafeId = Field(default_factory=new_artifact_id)
    project: SafeId
    steps: list[Step] = Field(min_length=1)
    seed: int = Field(default_factory=lambda: secrets.randbits(32), ge=0, lt=2**63)
    # Seconds after submission by which the artifact must be done, or it fails.
    deadline: float | None = Field(default=None, gt=0)
    # Proceed with this many of the project's holders (an int), or this fraction of them
    # (a float in (0, 1]), the first that are online; None: all of them, nothing less.
    quorum: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _distributions_fit(self) -> Artifact:
        check_steps(self.steps)
        return self
