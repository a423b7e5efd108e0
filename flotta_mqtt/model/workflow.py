"""Workflows: task graphs from a YAML/JSON file, bound like any step into jobs and locks."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

import networkx as nx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.model.context import NodeRef
from flotta_mqtt.model.operation import FiniteJson

TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# `noop` does nothing: only the benchmarks register it (bench/_noop.py), to measure the
# engine's own cost per task; a worker offers an executor only once one is registered.
ExecutorName = Literal["shell", "docker", "kube", "api", "python", "noop"]


def _relative(path: str) -> str:
    """Job files live inside the artifact's own storage: no absolute paths, no `..`."""
    if path.startswith("/") or ".." in path.split("/") or "\0" in path or "\\" in path:
        raise ValueError(f"job file {path!r} must be a relative path without '..'")
    return path


# A job file: a relative path inside the artifact's shared job-file storage.
JobFile = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_relative)]


class Task(BaseModel):
    """One task of a workflow: what to run, with which executor, after which tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TaskName
    depends: list[TaskName] = Field(default_factory=list)
    executor: ExecutorName = "shell"
    params: dict[str, FiniteJson] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    inputs: list[JobFile] = Field(default_factory=list)  # job files fetched before it runs
    outputs: list[JobFile] = Field(default_factory=list)  # job files stored after it ran
    timeout: float | None = Field(default=None, gt=0)
    retries: int = Field(default=0, ge=0, le=100)
    worker: str | None = None  # run on this worker only
    selector: dict[str, str] = Field(default_factory=dict)  # labels a worker must have


def task_graph(tasks: list[Task]) -> nx.DiGraph:
    """The tasks as a DAG (edge: dependency → dependent), or ValueError naming the culprits."""
    counts = Counter(task.name for task in tasks)
    duplicates = sorted(name for name, n in counts.items() if n > 1)
    if duplicates:
        raise ValueError(f"task names must be unique; repeated: {', '.join(duplicates)}")
    unknown = sorted(
        f"{task.name} → {dep}" for task in tasks for dep in task.depends if dep not in counts
    )
    if unknown:
        raise ValueError(f"tasks depend on tasks that do not exist: {', '.join(unknown)}")
    graph = nx.DiGraph()
    graph.add_nodes_from(task.name for task in tasks)
    graph.add_edges_from((dep, task.name) for task in tasks for dep in task.depends)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    path = " → ".join([*(a for a, _ in cycle), cycle[0][0]])
    raise ValueError(f"the tasks form a cycle: {path}")


class Workflow(BaseModel):
    """A workflow file: tasks with names and dependencies forming a DAG."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TaskName = "workflow"
    project: str = "workflows"
    tasks: list[Task] = Field(min_length=1)

    @model_validator(mode="after")
    def _is_a_dag(self) -> Workflow:
        task_graph(self.tasks)
        return self


def candidates(task: Task, pool: list[NodeRef]) -> list[NodeRef]:
    """The nodes that can run a task: they offer its executor and carry its labels."""
    return [
        node
        for node in pool
        if task.executor in node.executors
        and all(node.offers.get(k) == v for k, v in task.selector.items())
        and (task.worker is None or node.id == task.worker)
    ]
