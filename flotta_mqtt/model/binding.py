"""Binding: an artifact's steps plus a SchedulerContext become a DAG of jobs joined by locks."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from flotta_mqtt.model.artifact import Artifact
from flotta_mqtt.model.context import SchedulerContext
from flotta_mqtt.model.distribution import Lock
from flotta_mqtt.model.errors import BindingError
from flotta_mqtt.model.operation import Operation
from flotta_mqtt.model.steps import (
    Finalize,
    Initialize,
    Iterate,
    JobRole,
    Parallel,
    SecureAggregation,
    SecureRound,
    Sequential,
    Step,
    Tasks,
    check_steps,
)
from flotta_mqtt.model.workflow import Task, candidates, task_graph

OperationStep = Initialize | Parallel | Sequential | Finalize


@dataclass(frozen=True, slots=True)
class Job:
    """One job: a step's operation on one node. Its id is its index in binding order."""

    id: int
    worker: str
    step: str  # the step's path in the artifact: "2", or "1.0" inside an Iterate
    kind: str  # the step's kind: initialize, parallel, sequential, finalize
    role: JobRole
    iteration: int  # round of the innermost Iterate, from 0; 0 outside any Iterate
    operation: Operation
    on_initiator: bool
    timeout: float | None = None  # seconds an attempt may run
    retries: int = 0  # attempts after a failure
    # Seconds after its dispatch by which a round of a secure aggregation must be done,
    # or its site drops out of the round (None: the job is waited for, as any other).
    dropout: float | None = None
    handler: str | None = None  # a workflow's exit handler: "exit" or "failure"

    @property
    def relocatable(self) -> bool:
        """Whether another attempt may run while the first one's node is gone.

        A worker's job is bound to the data only that worker holds, so it waits for that
        worker (until the artifact's deadline); an initiator job or a workflow task holds
        no data and is simply run again (a task on another able worker).
        """
        return self.on_initiator or self.kind == "tasks"


class JobGraph:
    """The bound DAG: one node per job (attribute `job`), one edge per lock.

    Every job produces one resource (its product); it consumes the products of its
    predecessors and its completion releases the locks on its successors.
    """

    def __init__(self, artifact_id: str, jobs: list[Job], locks: list[Lock]) -> None:
        import networkx as nx  # here: only a scheduler binds; other processes skip its import

        self.artifact_id = artifact_id
        self.jobs = jobs
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from((job.id, {"job": job}) for job in jobs)
        self.graph.add_edges_from(locks)
        self.handlers = [job.id for job in jobs if job.handler is not None]
        # Whether a job may drop out of a secure round: only then is a tick's look due.
        self.dropouts = any(job.dropout is not None for job in jobs)
        if len(self.graph.edges) != len(locks):
            raise BindingError("a lock was drawn twice between the same two jobs")
        # Binding only ever locks a job behind jobs created before it, so job order is a
        # topological order: checking that proves the graph acyclic in one linear pass.
        if any(before >= after for before, after in locks):
            raise BindingError(f"the bound jobs form a cycle: {nx.find_cycle(self.graph)}")

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    @property
    def locks(self) -> list[Lock]:
        return list(self.graph.edges)

    def consumes(self, job_id: int) -> list[int]:
        """Jobs whose products this job consumes, in job order."""
        return sorted(self.graph.predecessors(job_id))

    def unlocks(self, job_id: int) -> list[int]:
        """Jobs whose locks this job releases when it completes, in job order."""
        return sorted(self.graph.successors(job_id))

    def sources(self) -> list[int]:
        """Jobs with no lock: ready as soon as the artifact starts."""
        return [j for j, degree in self.graph.in_degree() if degree == 0]

    def sinks(self) -> list[int]:
        """Jobs nobody waits for: their products are the artifact's result."""
        return [j for j, degree in self.graph.out_degree() if degree == 0]


def bind(artifact: Artifact, context: SchedulerContext) -> JobGraph:
    """Bind the artifact's steps to the context's nodes.

    Job ids are deterministic for the same artifact and context. Raises BindingError when
    the steps need workers and the context has none.
    """
    check_steps(artifact.steps)
    binder = _Binder(context)
    binder.bind_steps(artifact.steps, prefix="", iteration=0)
    return JobGraph(artifact.id, binder.jobs, binder.locks)


def job_count(steps: Iterable[Step], workers: int) -> int:
    """How many jobs the steps bind to over `workers` workers, by formula per step type."""
    total = 0
    for step in steps:
        if isinstance(step, Iterate):
            total += step.rounds * job_count(step.steps, workers)
        elif isinstance(step, Parallel):
            total += workers if step.secure is None else 4 * workers + 1
        elif isinstance(step, Sequential):
            total += (2 * workers if step.masked else workers) + 2
        elif isinstance(step, Tasks):
            total += sum(task.replicas for task in step.tasks)
        else:
            total += 1
    return total


def _replica_operations(task: Task) -> Iterator[Operation]:
    """The operation of each job of a task: the task itself, or each replica of it.

    A replica's params are the task's dump, dumped and validated once, with its own
    `name[i]` and `replica` index: 10,000 replicas cost 10,000 dict copies, not dumps. A
    for_each over a list gives each job its own item only, not the whole list.
    """
    params = task.model_dump(mode="json")
    if task.replicas == 1:
        yield Operation(name="task", params=params)
        return
    template = Operation(name="task", params=params)
    fan_out = template.params.get("for_each")
    items = fan_out.get("items") if isinstance(fan_out, dict) else None
    for i in range(task.replicas):
        replica = {**template.params, "name": f"{task.name}[{i}]", "replica": i}
        if isinstance(fan_out, dict) and isinstance(items, list):
            replica["for_each"] = {**fan_out, "items": items[i : i + 1], "first": i}
        yield Operation.model_construct(name=template.name, params=replica)


class _Binder:
    def __init__(self, context: SchedulerContext) -> None:
        self.context = context
        self.jobs: list[Job] = []
        self.locks: list[Lock] = []

    def bind_steps(
        self, steps: list[Step], prefix: str, iteration: int
    ) -> tuple[list[int], list[int]]:
        """Bind a list of steps; return the jobs it starts with and those it ends with."""
        first: list[int] | None = None
        previous: tuple[Step, list[int]] | None = None
        for i, step in enumerate(steps):
            entries, exits = self.bind_step(step, f"{prefix}{i}", iteration)
            if previous is not None and previous[0].distribution is not None:
                self.locks += previous[0].distribution.locks(previous[1], entries)
            first = entries if first is None else first
            previous = (step, exits)
        assert first is not None and previous is not None  # steps are never empty
        return first, previous[1]

    def bind_step(self, step: Step, path: str, iteration: int) -> tuple[list[int], list[int]]:
        if isinstance(step, Iterate):
            return self._iterate(step, path)
        if isinstance(step, Initialize):
            job = self._initiator_job(step, path, JobRole.INITIALIZE, iteration)
            return [job], [job]
        if isinstance(step, Finalize):
            job = self._initiator_job(step, path, JobRole.AGGREGATE, iteration)
            return [job], [job]
        if isinstance(step, Parallel) and step.secure is not None:
            return self._secure(step, step.secure, path, iteration)
        if isinstance(step, Parallel):
            jobs = self._worker_jobs(step, path, iteration)
            return jobs, jobs
        if isinstance(step, Tasks):
            return self._tasks(step, path, iteration)
        # Sequential: initiator → worker 1 → … → worker N → initiator. Masked, each hop
        # also consumes the keys its next hop advertised, to seal the running value to it.
        keys = self._round(step, SecureRound.KEYS, {}, path, iteration) if step.masked else []
        first = self._initiator_job(step, path, JobRole.INITIALIZE, iteration)
        workers = self._worker_jobs(step, path, iteration)
        last = self._initiator_job(step, path, JobRole.AGGREGATE, iteration)
        chain = [first, *workers, last]
        self.locks += list(itertools.pairwise(chain))
        # The initiator's first job seals to worker 1, worker i to worker i + 1; the last
        # worker seals to the initiator, whose key travels along the chain.
        self.locks += [(keys[i], chain[i]) for i in range(len(keys))]
        return [first], [last]

    def _secure(
        self, step: Parallel, secure: SecureAggregation, path: str, iteration: int
    ) -> tuple[list[int], list[int]]:
        """A secure Parallel: four rounds of one job per worker, then the initiator's
        unmasking. Keys and shares go ahead at once; the step's entries are the masked
        inputs, which consume what the previous step hands on."""
        threshold = {"threshold": secure.threshold, "neighbours": secure.neighbours}
        inner = {"operation": step.operation.model_dump(mode="json"), **threshold}
        rounds: list[list[int]] = []
        for name, params in (
            (SecureRound.KEYS, {}),
            (SecureRound.SHARE, threshold),
            (SecureRound.MASK, inner),
            (SecureRound.REVEAL, threshold),
        ):
            jobs = self._round(step, name, params, path, iteration, secure.dropout)
            self.locks += [
                (before, job) for earlier in rounds for before in earlier for job in jobs
            ]
            rounds.append(jobs)
        operation = Operation(name=SecureRound.UNMASK, params=inner)
        unmask = self._new_job(
            self.context.initiator.id, step, path, JobRole.AGGREGATE, iteration, operation
        )
        self.locks += [(before, unmask) for jobs in rounds for before in jobs]
        return rounds[2], [unmask]

    def _round(
        self,
        step: Parallel | Sequential,
        name: SecureRound,
        params: dict[str, Any],
        path: str,
        iteration: int,
        dropout: float | None = None,
    ) -> list[int]:
        """One job per worker running a round `name` of a secure aggregation."""
        if not self.context.workers:
            raise BindingError(f"step {path} ({step.kind}) needs workers, but the context has none")
        operation = Operation(name=name, params=params)
        return [
            self._new_job(w.id, step, path, JobRole.LOCAL, iteration, operation, dropout)
            for w in self.context.workers
        ]

    def _iterate(self, step: Iterate, path: str) -> tuple[list[int], list[int]]:
        first: list[int] = []
        exits: list[int] = []
        joint = step.steps[-1].distribution
        for round_ in range(step.rounds):
            entries, round_exits = self.bind_steps(step.steps, f"{path}.", round_)
            if round_ == 0:
                first = entries
            elif joint is not None:
                self.locks += joint.locks(exits, entries)
            else:
                self.locks += [(a, b) for a in exits for b in entries]
            exits = round_exits
        return first, exits

    def _tasks(self, step: Tasks, path: str, iteration: int) -> tuple[list[int], list[int]]:
        """One job per task replica, created in dependency order so every lock points forward.

        A task's replicas are consecutive jobs, spread round robin over its able workers
        with the rest of the step's jobs; each one waits for every job of every task it
        depends on.
        """
        graph = task_graph(step.tasks)
        by_name = {task.name: task for task in step.tasks}
        order = {task.name: i for i, task in enumerate(step.tasks)}
        ids: dict[str, range] = {}
        spread = 0  # the step's job count so far: consecutive jobs go to consecutive workers
        import networkx as nx

        for name in nx.lexicographical_topological_sort(graph, key=order.get):
            task = by_name[name]
            able = candidates(task, self.context.pool)
            if not able:
                raise BindingError(
                    f"task {name} (step {path}): no worker {_able(task)}"
                    + (f" with labels {task.selector}" if task.selector else "")
                    + (f" under the name {task.worker}" if task.worker else "")
                )
            waits_for = [job_id for dep in task.depends for job_id in ids[dep]]
            first = len(self.jobs)
            for operation in _replica_operations(task):
                job = Job(
                    id=len(self.jobs),
                    worker=able[spread % len(able)].id,
                    step=path,
                    kind=step.kind,
                    role=JobRole.LOCAL,
                    iteration=iteration,
                    operation=operation,
                    on_initiator=False,
                    timeout=task.timeout,
                    retries=task.retries,
                    handler=task.handler,
                )
                self.jobs.append(job)
                if waits_for:
                    self.locks += [(before, job.id) for before in waits_for]
                spread += 1
            ids[name] = range(first, len(self.jobs))
        roots = [job_id for t in step.tasks if not t.depends for job_id in ids[t.name]]
        leaves = [job_id for name, out in graph.out_degree() if out == 0 for job_id in ids[name]]
        return sorted(roots), sorted(leaves)

    def _worker_jobs(self, step: Parallel | Sequential, path: str, iteration: int) -> list[int]:
        if not self.context.workers:
            raise BindingError(f"step {path} ({step.kind}) needs workers, but the context has none")
        return [
            self._new_job(w.id, step, path, JobRole.LOCAL, iteration) for w in self.context.workers
        ]

    def _initiator_job(
        self, step: Initialize | Sequential | Finalize, path: str, role: JobRole, iteration: int
    ) -> int:
        return self._new_job(self.context.initiator.id, step, path, role, iteration)

    def _new_job(
        self,
        worker: str,
        step: OperationStep,
        path: str,
        role: JobRole,
        iteration: int,
        operation: Operation | None = None,
        dropout: float | None = None,
    ) -> int:
        job = Job(
            id=len(self.jobs),
            worker=worker,
            step=path,
            kind=step.kind,
            role=role,
            iteration=iteration,
            operation=operation or step.operation,
            on_initiator=worker == self.context.initiator.id,
            timeout=step.timeout,
            retries=step.retries,
            dropout=dropout,
        )
        self.jobs.append(job)
        return job.id


def _able(task: Task) -> str:
    """What a worker must do to run a task, as a refusal names it."""
    if task.executor != "run":
        return f"runs the {task.executor} executor"
    if not task.requires:
        return "runs tasks (shell, docker or kube)"
    return f"runs tasks that require {', '.join(task.requires)}"
