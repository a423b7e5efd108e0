"""The operator's node registry: who the nodes are and what each may do.

It is the one source of truth for a deployment's membership and rights: broker identities
and their ACL are generated from it, and the scheduler reads it to decide which holders
an artifact binds to and what a node's presence may claim. A presence is a claim: it never
gives a node more than its entry here.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.model.ids import SafeId

CODE_EXECUTOR = "python"  # the executor that runs code shipped by callers


class WorkerEntry(BaseModel):
    """A data site's worker: the projects it holds and what it may run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    projects: list[SafeId] = Field(default_factory=list)
    executors: list[str] = Field(default_factory=list)  # workflow task executors
    allow_code: bool = False  # may run `@distributed` functions and the python executor
    tenants: list[SafeId] | None = None  # whose artifacts it takes part in; None: everyone's


class WorkbenchEntry(BaseModel):
    """A user's workbench: the tenant its artifacts belong to, and whether it administers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: SafeId | None = None  # None: a tenant of its own, named as the workbench
    admin: bool = False  # may see, cancel and prune every tenant's artifacts


class DashboardEntry(BaseModel):
    """A viewer: the tenants whose artifacts it may watch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenants: list[SafeId] = Field(default_factory=list)


class Registry(BaseModel):
    """Every node of a deployment, by role (a YAML file the operator keeps)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: SafeId = "scheduler"
    workers: dict[SafeId, WorkerEntry] = Field(default_factory=dict)
    workbenches: dict[SafeId, WorkbenchEntry] = Field(default_factory=dict)
    dashboards: dict[SafeId, DashboardEntry] = Field(default_factory=dict)
    # A site broker's bridge → the nodes it carries to the central broker.
    bridges: dict[SafeId, list[SafeId]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_role_per_name(self) -> Self:
        names = [self.scheduler, f"{self.scheduler}.initiator"]
        names += [*self.workers, *self.workbenches, *self.dashboards, *self.bridges]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"named more than once: {', '.join(repeated)}")
        return self

    def holders(self, project: str, tenant: str) -> list[str]:
        """The workers registered as holding a project's data for a tenant, by name."""
        return sorted(
            name
            for name, entry in self.workers.items()
            if project in entry.projects and self.serves(name, tenant)
        )

    def serves(self, worker: str, tenant: str) -> bool:
        """Whether a registered worker takes part in a tenant's artifacts."""
        entry = self.workers.get(worker)
        return entry is not None and (entry.tenants is None or tenant in entry.tenants)

    def executors(self, worker: str) -> set[str]:
        """What a registered worker may run (the code executor only if it may run code)."""
        entry = self.workers[worker]
        allowed = set(entry.executors) - {CODE_EXECUTOR}
        return allowed | {CODE_EXECUTOR} if entry.allow_code else allowed

    def tenant(self, workbench: str) -> str:
        """The tenant a workbench's artifacts belong to."""
        entry = self.workbenches.get(workbench)
        return entry.tenant if entry is not None and entry.tenant else workbench

    def is_admin(self, client: str) -> bool:
        entry = self.workbenches.get(client)
        return entry is not None and entry.admin

    def members(self, tenant: str) -> list[str]:
        """The workbenches whose artifacts belong to a tenant."""
        return sorted(name for name in self.workbenches if self.tenant(name) == tenant)
