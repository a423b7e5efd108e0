"""Scheduler groups: which projects this scheduler serves, and its answer to the others.

Groups share one broker and one store, each in its own topic namespace (its bus's
`group`, protocol/topics.py). A scheduler names the group of each project it serves in the
directory, retained, so that workbenches find it from the project alone; it refuses a
submission of a project it does not serve, naming the group that does where it knows it.

With a registry that lists groups, the registry is the source of truth: the projects are
its group's, and the scheduler's `projects` setting, if given, must say the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from flotta_mqtt.model import Registry
from flotta_mqtt.protocol import DirectoryEntry, topics
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.effects import Outgoing


@dataclass(frozen=True)
class Served:
    """The projects a scheduler serves in its group; no projects: any submitted to it."""

    name: str
    group: str | None
    projects: frozenset[str]
    registry: Registry | None = None

    @classmethod
    def of(cls, config: SchedulerConfig, registry: Registry | None) -> Served:
        """What `config` and the registry say; ValueError when they disagree."""
        group, projects = config.broker.group, set(config.projects)
        if registry is not None and registry.groups and group is not None:
            entry = registry.groups.get(group)
            if entry is None:
                raise ValueError(f"group {group} is not one of the registry's groups")
            if entry.scheduler != config.name:
                raise ValueError(
                    f"the registry names {entry.scheduler} as group {group}'s scheduler, "
                    f"not {config.name}"
                )
            if projects and projects != set(entry.projects):
                raise ValueError(
                    f"projects {sorted(projects)} are not group {group}'s in the registry "
                    f"({sorted(entry.projects)}): give none, or the same"
                )
            projects = set(entry.projects)
        return cls(config.name, group, frozenset(projects), registry)

    def entries(self) -> list[Outgoing]:
        """The directory entries naming this group for its projects (retained); none in
        the default group, where a project with no entry is served anyway."""
        if self.group is None:
            return []
        return [
            (
                topics.directory(p),
                DirectoryEntry(project=p, group=self.group, scheduler=self.name),
                True,
            )
            for p in sorted(self.projects)
        ]

    def refusal(self, project: str) -> str | None:
        """Why this scheduler does not take an artifact of `project`, or None if it does."""
        here = f"group {self.group}" if self.group else "the default group"
        refused = f"project {project} is not served by {here} (scheduler {self.name})"
        if self.registry is not None and self.registry.groups:
            elsewhere = self.registry.group_of(project)
            if elsewhere != self.group:
                there = f"group {elsewhere}" if elsewhere else "the default group"
                return f"{refused}: {there} serves it"
        if self.projects and project not in self.projects:
            return f"{refused}: it serves {', '.join(sorted(self.projects))}"
        return None
