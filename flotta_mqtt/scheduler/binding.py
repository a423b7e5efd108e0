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
from flotta_mqtt.scheduler.job_messages import oversize_job
from flotta_mqtt.scheduler.membership import Members
from flotta_mqtt.workflows.executors import check_task


@dataclass(frozen=True)
class Bound:
    """An artifact bound to the workers known: its context and its DAG of jobs."""

    context: SchedulerContext
    graph: JobGraph


@dataclass(frozen=True)
class Refused:
    """Why an artifact cannot be bound to the workers known now; `final` when no worker
    coming online could change that (its failure need not wait for their presence)."""

    kind: str
    message: str
    final: bool = False


def node_ref(node: NodePresence) -> NodeRef:
    return NodeRef(
        id=node.node, offers=node.labels, executors=node.executors, features=node.features
    )


def bind_artifact(
    artifact: Artifact, nodes: Mapping[str, NodePresence], initiator: str, members: Members
) -> Bound | Refused:
    """Bind to the members' holders of the project's data; workflow tasks to any worker
    offering their executor, online ones first."""
    workers = [node for node in nodes.values() if not node.initiator]
    holders = [node_ref(nodes[h]) if h in nodes else NodeRef(id=h) for h in members.holders]
    pool = sorted((n for n in workers if n.executors), key=lambda n: (not n.online, n.node))
    context = SchedulerContext(
        initiator=NodeRef(id=initiator),
        workers=holders,
        pool=[node_ref(n) for n in pool],
        missing=members.missing,
    )
    try:
        with gc_paused():
            graph = bind(artifact, context)
        check_operations(graph, nodes)
    except (BindingError, analytics.OperationError) as exc:
        if not holders and any(_needs_data(step) for step in artifact.steps):
            return Refused("NoWorkers", f"no worker holds data for project {artifact.project}")
        return Refused(type(exc).__name__, str(exc))
    too_large = oversize_job(artifact, graph)
    if too_large is not None:
        return Refused("MessageTooLarge", too_large, final=True)
    uniterable = uniterable_job(graph)
    if uniterable is not None:
        return Refused("OperationError", uniterable, final=True)
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


def uniterable_job(graph: JobGraph) -> str | None:
    """Why an Iterate's round r + 1 cannot take round r's product, if a job's operation
    part cannot (an estimator's would fail with a TypeError at run time)."""
    for before, after in graph.locks:
        job = graph.jobs[after]
        if job.iteration != graph.jobs[before].iteration + 1:
            continue  # not a round's product handed to the next round
        definition = analytics.REGISTRY.get(job.operation.name)
        if definition is not None and not definition.iterable(job.role):
            return (
                f"operation {job.operation.name!r} cannot be iterated: in round "
                f"{job.iteration + 1} of step {job.step}, its {job.role} part would receive "
                f"round {job.iteration}'s result, but it only merges the states of one round; "
                "run it once (outside the Iterate), or iterate an operation that refines "
                "its previous round's result, such as a model"
            )
    return None


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
