"""The operator's node registry: who the nodes are and what each may do.

It is the one source of truth for a deployment's membership and rights: broker identities
and their ACL are generated from it, and the scheduler reads it to decide which holders
an artifact binds to and what a node's presence may claim. A presence is a claim: it never
gives a node more than its entry here.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.model.ids import GroupName, SafeId

CODE_EXECUTOR = "python"  # the executor that runs code shipped by callers


class WorkerEntry(BaseModel):
    """A data site's worker: the projects it holds and what it may run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    projects: list[SafeId] = Field(default_factory=list)
    executors: list[str] = Field(default_factory=list)  # workflow task executors
    allow_code: bool = False  # may run `@distributed` functions and the python executor
    tenants: list[SafeId] | None = None  # whose artifacts it takes part in; None: everyone's
    group: GroupName | None = None  # the scheduler group it works in; None: the default one


class WorkbenchEntry(BaseModel):
    """A user's workbench: the tenant its artifacts belong to, and whether it administers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: SafeId | None = None  # None: a tenant of its own, named as the workbench
    admin: bool = False  # may see, cancel and prune every tenant's artifacts


class DashboardEntry(BaseModel):
    """A viewer: the tenants whose artifacts it may watch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenants: list[SafeId] = Field(default_factory=list)


class GroupEntry(BaseModel):
    """A scheduler group: its scheduler and the projects it serves (each in one group)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: SafeId
    projects: list[SafeId] = Field(default_factory=list)


class Registry(BaseModel):
    """Every node of a deployment, by role (a YAML file the operator keeps)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: SafeId = "scheduler"
    workers: dict[SafeId, WorkerEntry] = Field(default_factory=dict)
    workbenches: dict[SafeId, WorkbenchEntry] = Field(default_factory=dict)
    dashboards: dict[SafeId, DashboardEntry] = Field(default_factory=dict)
    # A site broker's bridge → the nodes it carries to the central broker.
    bridges: dict[SafeId, list[SafeId]] = Field(default_factory=dict)
    # Scheduler groups sharing the broker and the store, each in its own topic namespace
    # (see protocol/topics.py); `scheduler` above serves the default group.
    groups: dict[GroupName, GroupEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_role_per_name(self) -> Self:
        names = [self.scheduler, f"{self.scheduler}.initiator"]
        for entry in self.groups.values():
            names += [entry.scheduler, f"{entry.scheduler}.initiator"]
        names += [*self.workers, *self.workbenches, *self.dashboards, *self.bridges]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"named more than once: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _groups_apart(self) -> Self:
        """Each project in one group at most; a worker in a group that exists, holding
        only projects its group serves."""
        served: dict[str, str] = {}
        for group, entry in self.groups.items():
            for project in entry.projects:
                if served.setdefault(project, group) != group:
                    raise ValueError(
                        f"project {project} is in groups {served[project]} and {group}"
                    )
        for name, worker in self.workers.items():
            if worker.group is not None and worker.group not in self.groups:
                raise ValueError(f"worker {name} is in group {worker.group}, which is not listed")
            for project in worker.projects:
                if served.get(project) != worker.group:
                    where = f"group {worker.group}" if worker.group else "the default group"
                    owner = f"group {served[project]}" if project in served else "the default group"
                    raise ValueError(
                        f"worker {name} is in {where} but holds project {project} of {owner}"
                    )
        return self

    def group_of(self, project: str) -> str | None:
        """The group serving a project (None: the default group)."""
        return next((g for g, entry in self.groups.items() if project in entry.projects), None)

    def node_group(self, name: str) -> str | None:
        """The group a scheduler (or its initiator) or a worker works in; None: the default."""
        for group, entry in self.groups.items():
            if name in (entry.scheduler, f"{entry.scheduler}.initiator"):
                return group
        worker = self.workers.get(name)
        return worker.group if worker is not None else None

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
