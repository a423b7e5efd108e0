"""Binding policy: which workers an artifact binds to, what is refused at submission
rather than at run time, and where a task goes when its worker is lost."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flotta_mqtt import analytics
from flotta_mqtt.model import (
    Artifact,
    BindingError,
    Iterate,
    JobGraph,
    NodeRef,
    Parallel,
    SchedulerContext,
    Sequential,
    Step,
    Task,
    bind,
    candidates,
)
from flotta_mqtt.protocol import NodePresence
from flotta_mqtt.scheduler.gc_pause import gc_paused
from flotta_mqtt.workflows.executors import check_task


@dataclass(frozen=True)
class Bound:
    """An artifact bound to the workers known: its context and its DAG of jobs."""

    context: SchedulerContext
    graph: JobGraph


@dataclass(frozen=True)
class Refused:
    """Why an artifact cannot be bound to the workers known now."""

    kind: str
    message: str


def node_ref(node: NodePresence) -> NodeRef:
    return NodeRef(id=node.node, offers=node.labels, executors=node.executors)


def bind_artifact(
    artifact: Artifact, nodes: Mapping[str, NodePresence], initiator: str
) -> Bound | Refused:
    """Bind to the workers holding the project's data; workflow tasks to any worker
    offering their executor, online ones first."""
    workers = [node for node in nodes.values() if not node.initiator]
    holders = sorted((n for n in workers if artifact.project in n.projects), key=lambda n: n.node)
    pool = sorted((n for n in workers if n.executors), key=lambda n: (not n.online, n.node))
    context = SchedulerContext(
        initiator=NodeRef(id=initiator),
        workers=[node_ref(n) for n in holders],
        pool=[node_ref(n) for n in pool],
    )
    try:
        with gc_paused():
            graph = bind(artifact, context)
        check_operations(graph, nodes)
    except (BindingError, analytics.OperationError) as exc:
        if not holders and any(_needs_data(step) for step in artifact.steps):
            return Refused("NoWorkers", f"no worker holds data for project {artifact.project}")
        return Refused(type(exc).__name__, str(exc))
    return Bound(context, graph)


def check_operations(graph: JobGraph, nodes: Mapping[str, NodePresence]) -> None:
    """Refuse at submission what a node could only refuse at run time."""
    seen: set[tuple[str, str]] = set()
    for job in graph.jobs:
        if job.kind == "tasks":
            if job.operation.params.get("replica"):
                continue  # a task's replicas differ only in their index: one check is enough
            try:  # the worker was chosen for its executor; its params are checked here
                check_task(Task.model_validate(job.operation.params))
            except ValueError as exc:
                raise BindingError(str(exc)) from None
            continue
        if (job.worker, job.operation.name) in seen:
            continue
        seen.add((job.worker, job.operation.name))
        node = nodes.get(job.worker)
        if node is not None and job.operation.name not in node.operations:
            raise analytics.OperationError(
                f"operation {job.operation.name!r} is not available on {job.worker}"
            )
        if job.operation.name in analytics.REGISTRY:
            analytics.lookup(job.operation)  # validates the parameters
    _check_rounds(graph)


def _check_rounds(graph: JobGraph) -> None:
    """Refuse an Iterate whose round r + 1 would feed round r's product to an operation
    part that cannot take it (an estimator's: it would fail with a TypeError at run time)."""
    for before, after in graph.locks:
        job = graph.jobs[after]
        if job.iteration != graph.jobs[before].iteration + 1:
            continue  # not a round's product handed to the next round
        definition = analytics.REGISTRY.get(job.operation.name)
        if definition is not None and not definition.iterable(job.role):
            raise analytics.OperationError(
                f"operation {job.operation.name!r} cannot be iterated: in round "
                f"{job.iteration + 1} of step {job.step}, its {job.role} part would receive "
                f"round {job.iteration}'s result, but it only merges the states of one round; "
                "run it once (outside the Iterate), or iterate an operation that refines "
                "its previous round's result, such as a model"
            )


def relocate_task(
    graph: JobGraph, job_id: int, nodes: Mapping[str, NodePresence], away_from: str
) -> str | None:
    """Another online worker able to run a task whose worker was lost, if there is one."""
    task = Task.model_validate(graph.jobs[job_id].operation.params)
    pool = [
        node_ref(n)
        for name, n in sorted(nodes.items())
        if n.online and not n.initiator and name != away_from
    ]
    able = candidates(task, pool)
    return able[job_id % len(able)].id if able else None


def _needs_data(step: Step) -> bool:
    """Whether a step binds jobs to the workers holding the project's data."""
    if isinstance(step, Iterate):
        return any(_needs_data(inner) for inner in step.steps)
    return isinstance(step, Parallel | Sequential)
