"""SchedulerContext: the nodes an artifact is bound to."""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.model.ids import SafeId


class NodeRef(BaseModel):
    """A node that can run jobs, and what it offers (labels, capabilities...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: SafeId
    offers: dict[str, str] = Field(default_factory=dict)  # labels, e.g. {"gpu": "yes"}
    executors: list[str] = Field(default_factory=list)  # task executors it runs
    features: list[str] = Field(default_factory=list)  # what its site gives tasks: gpu, network


class SchedulerContext(BaseModel):
    """The initiator (usually the scheduler node itself) and the workers holding the data.

    Workers keep the order given: it is the order a Sequential step visits them in.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    initiator: NodeRef
    workers: list[NodeRef]  # the nodes holding the project's data
    pool: list[NodeRef] = Field(default_factory=list)  # every worker, for workflow tasks
    # Holders of the project's data the artifact was not bound to (a quorum was enough).
    missing: list[SafeId] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_workers(self) -> SchedulerContext:
        counts = Counter(w.id for w in self.workers)
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"workers appear more than once: {', '.join(duplicates)}")
        return self

    @classmethod
    def of(cls, initiator: str, workers: list[str]) -> SchedulerContext:
        """Shorthand for tests and examples: nodes by id alone."""
        return cls(initiator=NodeRef(id=initiator), workers=[NodeRef(id=w) for w in workers])
