"""Workflows: task graphs from a YAML/JSON file, bound like any step into jobs and locks."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from flotta_mqtt.model.context import NodeRef
from flotta_mqtt.model.operation import FiniteJsonObject
from flotta_mqtt.model.templating import (
    MAX_PARAMETERS,
    Condition,
    ForEach,
    Parameter,
    ParameterName,
    check_names,
    condition_names,
    placeholders,
    task_reference,
)

_TASK_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
TaskName = Annotated[str, Field(pattern=rf"^{_TASK_NAME}$")]
# A job's task name: the task's own, or `name[i]` for replica i of a replicated task (which
# binding sets, with `replica`). A workflow file's schema shows only plain names.
_JOB_NAME = re.compile(rf"^({_TASK_NAME})(?:\[(0|[1-9][0-9]{{0,5}})\])?$")
JobTaskName = Annotated[
    str,
    Field(pattern=_JOB_NAME.pattern),
    WithJsonSchema({"type": "string", "pattern": rf"^{_TASK_NAME}$"}),
]
# Bounds that keep a small file from binding into a graph no scheduler could hold: N
# replicas depending on M replicas take N x M locks.
MAX_REPLICAS = 100_000
MAX_JOBS = 1_000_000  # jobs of one workflow, replicas counted
MAX_LOCKS = 1_000_000  # locks of one workflow's dependencies, replicas counted
# What runs a task: `run` (the default) is whichever of RUN_EXECUTORS the worker's site
# configured, so a workflow names none of them; `api` calls an HTTP endpoint; `python` runs
# `@distributed` calls; `noop` does nothing: only the benchmarks register it (bench/_noop.py),
# to measure the engine's own cost per task.
ExecutorName = Literal["run", "api", "python", "noop"]
RUN_EXECUTORS = ("shell", "docker", "kube")  # a site's ways of running a `run` task
CONTAINER_EXECUTORS = frozenset({"docker", "kube"})
# What a `run` task may need of the worker that runs it: a container (its image's own
# entrypoint or files), GPUs, a network. Only workers offering all of them get it.
Requirement = Literal["container", "gpu", "network"]

if TYPE_CHECKING:
    import networkx as nx


def _relative(path: str) -> str:
    """Job files live inside the artifact's own storage: no absolute paths, no `..`."""
    if path.startswith("/") or ".." in path.split("/") or "\0" in path or "\\" in path:
        raise ValueError(f"job file {path!r} must be a relative path without '..'")
    return path


# A job file: a relative path inside the artifact's shared job-file storage.
JobFile = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_relative)]
# A secret a worker's site defines, by name; a task that names it gets it as the
# environment variable of that name (see the site policy, workflows/executors/policy.py).
SecretName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
MAX_SECRETS = 64


class Task(BaseModel):
    """One task of a workflow: what to run (`params`), after which tasks.

    A `run` task says what to run, not how: each worker runs it with the executor its site
    configured (shell, docker or kube), and `requires` routes it to workers able to. With
    `replicas` N > 1 it runs N times, as independent jobs name[0] to name[N-1] (an array
    job), each told its index in FLOTTA_REPLICA. `secrets` names secrets of the worker's
    site: the task carries their names only, never their values. With `cache`, a run of the
    same definition on the same inputs (by sha256) for the same tenant that succeeded
    before is reused instead of run (workflows/caching.py).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: JobTaskName
    depends: list[TaskName] = Field(default_factory=list)
    executor: ExecutorName = "run"
    requires: list[Requirement] = Field(default_factory=list)
    params: FiniteJsonObject = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[SecretName] = Field(default_factory=list, max_length=MAX_SECRETS)
    inputs: list[JobFile] = Field(default_factory=list)  # job files fetched before it runs
    outputs: list[JobFile] = Field(default_factory=list)  # job files stored after it ran
    timeout: float | None = Field(default=None, gt=0)
    retries: int = Field(default=0, ge=0, le=100)
    worker: str | None = None  # run on this worker only
    selector: dict[str, str] = Field(default_factory=dict)  # labels a worker must have
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)  # independent runs of the task
    cache: bool = False  # reuse the outputs of an earlier successful run of the same inputs
    # Which replica a job runs, 0 to replicas - 1: binding sets it, with the name `name[i]`,
    # in each replica's job params; never in a workflow file.
    replica: SkipJsonSchema[int | None] = Field(default=None, ge=0)
    when: Condition | None = None  # run only if true; else the task is skipped
    for_each: ForEach | None = None  # one job per item; `{{ item }}` in params and env
    # The parameter values its placeholders and `when` read, set at submission from the
    # workflow's parameters (model/resolution.py); never in a workflow file.
    arguments: SkipJsonSchema[FiniteJsonObject] = Field(default_factory=dict)
    # Set for a workflow's `on_exit` and `on_failure` tasks, which run after all others.
    handler: SkipJsonSchema[Literal["exit", "failure"] | None] = None
    # What an exit handler's `workflow.status` reads: set by the scheduler when it runs.
    workflow_status: SkipJsonSchema[Literal["Succeeded", "Failed"] | None] = None

    @model_validator(mode="before")
    @classmethod
    def _one_job_per_item(cls, data: Any) -> Any:
        """A for_each task binds like replicas: one job per item (or per slot of `max`)."""
        if isinstance(data, dict) and isinstance(data.get("for_each"), dict | ForEach):
            slots = ForEach.model_validate(data["for_each"]).slots
            if slots is not None and "replicas" not in data:
                data = {**data, "replicas": slots}
        return data

    @model_validator(mode="before")
    @classmethod
    def _no_executor_named(cls, data: Any) -> Any:
        """A workflow file of before: its task named the executor it wanted; now the site
        chooses, and the file says what the task needs instead."""
        if isinstance(data, dict) and data.get("executor") in RUN_EXECUTORS:
            raise ValueError(
                f"task {data.get('name')}: `executor: {data['executor']}` is no longer a "
                "task's to choose: drop it, and each worker runs the task with the executor "
                "its site configured; a task that needs a container says "
                "`requires: [container]` (see the README's workflow section)"
            )
        return data

    @model_validator(mode="after")
    def _replica_fits(self) -> Task:
        """A replica's job is named `task[i]` after its index; a task is named plainly."""
        match = _JOB_NAME.match(self.name)
        assert match is not None  # the field's pattern
        index = match.group(2)
        if self.replica is None and index is not None:
            raise ValueError(
                f"task name {self.name!r}: `[i]` is how binding names replica i of a task; "
                "name the task without it and set `replicas`"
            )
        if self.replica is not None and (
            index is None or int(index) != self.replica or self.replica >= self.replicas
        ):
            raise ValueError(
                f"task {self.name}: replica {self.replica} of {self.replicas} must be named "
                f"{match.group(1)}[{self.replica}], with an index below replicas"
            )
        clashes = sorted(set(self.secrets) & set(self.env))
        if clashes:
            raise ValueError(
                f"task {self.name}: {', '.join(clashes)} named both in `env` and in `secrets`; "
                "a secret reaches the task as the variable of its name"
            )
        slots = self.for_each.slots if self.for_each else None
        if self.replica is None and self.for_each and self.for_each.first:
            raise ValueError(f"task {self.name}: for_each `first` is set by binding")
        if self.replica is None and slots is not None and slots != self.replicas:
            raise ValueError(
                f"task {self.name}: for_each binds {slots} jobs, one per item: "
                "it sets `replicas` itself"
            )
        if self.replicas > 1 and self.outputs:
            raise ValueError(
                f"task {self.name}: its {self.replicas} replicas would each store the same "
                f"outputs ({', '.join(self.outputs)}), each overwriting the others'"
            )
        return self

    @model_serializer(mode="wrap")
    def _lean(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A plain task dumps as it did before replicas, secrets and caching: no
        `replicas: 1`, no `replica`, no empty `secrets`, no `cache: false`.

        Submissions and jobs carry every task, under a message size limit.
        """
        data: dict[str, Any] = handler(self)
        if "replica" in data and data["replica"] is None:
            del data["replica"]
        if data.get("replicas") == 1:
            del data["replicas"]
        for key, empty in (("secrets", []), ("requires", []), ("arguments", {})):
            if data.get(key) == empty:
                del data[key]
        for key in ("when", "for_each", "handler", "workflow_status"):
            if key in data and data[key] is None:
                del data[key]
        if data.get("cache") is False:
            del data["cache"]
        return data


def task_of(job_name: str) -> str:
    """The task a job name belongs to: `t` for `t` and for its replica `t[3]`."""
    match = _JOB_NAME.match(job_name)
    return job_name if match is None else match.group(1)


def log_name(job_name: str) -> str:
    """The folder of a job's logs in the store: the task's name, `_t.3` for replica 3 of t.

    A store path segment cannot hold brackets, and no task name starts with `_`, so a
    replica's folder never meets a task's.
    """
    match = _JOB_NAME.match(job_name)
    if match is None or match.group(2) is None:
        return job_name
    return f"_{match.group(1)}.{match.group(2)}"


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
    # A task's input comes with the sha256 its producer announced: a dependency's.
    outputs = {task.name: set(task.outputs) for task in tasks}
    unsourced = sorted(
        f"{task.name} reads {path}"
        for task in tasks
        for path in task.inputs
        if sum(path in outputs[dep] for dep in task.depends) != 1
    )
    if unsourced:
        raise ValueError(
            "each job file a task reads must be output by exactly one task it depends on: "
            + ", ".join(unsourced)
        )
    bound = sorted(task.name for task in tasks if task.replica is not None)
    if bound:
        raise ValueError(
            f"tasks carry a replica index, which binding sets: {', '.join(bound)}; "
            "a workflow sets `replicas`"
        )
    _check_size(tasks)
    _check_flow(tasks)
    import networkx as nx  # here: a command that never checks a workflow skips its import

    graph = nx.DiGraph()
    graph.add_nodes_from(task.name for task in tasks)
    graph.add_edges_from((dep, task.name) for task in tasks for dep in task.depends)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    path = " → ".join([*(a for a, _ in cycle), cycle[0][0]])
    raise ValueError(f"the tasks form a cycle: {path}")


def _check_flow(tasks: list[Task]) -> None:
    """Refuse conditions and for_each that read what a task cannot know when it runs, and
    exit handlers tangled with the tasks they follow."""
    by_name = {task.name: task for task in tasks}
    for task in tasks:
        refs = list(condition_names(task.when))
        if task.for_each is not None and not isinstance(task.for_each.items, list):
            refs.append(task.for_each.source)
        for ref in refs:
            if ref.path[0] == "tasks":
                source = by_name[task_reference(task.name, ref, task.depends)]
                if source.replicas > 1:
                    raise ValueError(
                        f"task {task.name}: {ref} reads task {source.name}, which runs as "
                        f"{source.replicas} jobs: a condition reads a single job's result"
                    )
                if source.cache and "outputs" in ref.path:
                    raise ValueError(
                        f"task {task.name}: {ref} reads what task {source.name} printed, but "
                        "it is cached (`cache: true`): a reused run keeps its files, not its "
                        "stdout"
                    )
        if task.for_each is None and any(ref.path[0] == "item" for ref in refs):
            raise ValueError(f"task {task.name}: `item` is only known in a task with for_each")
        tangled = [
            dep for dep in task.depends if (by_name[dep].handler is None) != (task.handler is None)
        ]
        if tangled:
            raise ValueError(
                f"task {task.name} depends on {', '.join(tangled)}: exit handlers run after "
                "every other task and depend only on one another"
            )


def _check_size(tasks: list[Task]) -> None:
    """Refuse replicas that would bind to more jobs or locks than a scheduler should hold.

    Names the largest contributions: the tasks, or the dependencies `task → dependency`.
    """
    replicas = {task.name: task.replicas for task in tasks}
    jobs = sum(replicas.values())
    if jobs > MAX_JOBS:
        big = sorted(tasks, key=lambda task: -task.replicas)[:3]
        raise ValueError(
            f"the tasks would run as {jobs:,} jobs, more than {MAX_JOBS:,}: "
            + ", ".join(f"{task.name} has {task.replicas:,} replicas" for task in big)
        )
    edges = [
        (replicas[task.name] * replicas[dep], task.name, dep)
        for task in tasks
        for dep in task.depends
    ]
    locks = sum(n for n, _, _ in edges)
    if locks > MAX_LOCKS:
        big_edges = sorted(edges, key=lambda edge: (-edge[0], edge[1], edge[2]))[:3]
        raise ValueError(
            f"the tasks' dependencies would take {locks:,} locks, more than {MAX_LOCKS:,} "
            "(each replica of a task waits for each replica of its dependencies): "
            + ", ".join(
                f"{task} → {dep} takes {replicas[task]:,} x {replicas[dep]:,}"
                for _, task, dep in big_edges
            )
        )


class Workflow(BaseModel):
    """A workflow file: tasks with names and dependencies forming a DAG."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TaskName = "workflow"
    project: str = "workflows"
    parameters: dict[ParameterName, Parameter] = Field(
        default_factory=dict, max_length=MAX_PARAMETERS
    )
    tasks: list[Task] = Field(min_length=1)
    on_exit: list[Task] = Field(default_factory=list)  # run after all tasks, whatever the outcome
    on_failure: list[Task] = Field(default_factory=list)  # run after all tasks if one failed

    @model_validator(mode="after")
    def _is_a_dag(self) -> Workflow:
        tasks = self.all_tasks()
        task_graph(tasks)
        for task in tasks:
            names = [*placeholders(task.params), *placeholders(task.env)]
            names += [str(ref) for ref in condition_names(task.when) if ref.path[0] != "tasks"]
            if task.for_each is not None and not isinstance(task.for_each.items, list):
                source = task.for_each.source
                names += [str(source)] if source.path[0] == "params" else []
            is_handler = task.handler is not None
            item = task.for_each is not None
            check_names(task.name, iter(names), self.parameters, item, is_handler)
        return self

    def all_tasks(self) -> list[Task]:
        """Its tasks, then its exit handlers marked as such."""
        return [
            *self.tasks,
            *(task.model_copy(update={"handler": "exit"}) for task in self.on_exit),
            *(task.model_copy(update={"handler": "failure"}) for task in self.on_failure),
        ]


def candidates(task: Task, pool: list[NodeRef]) -> list[NodeRef]:
    """The nodes that can run a task: they run it and carry its labels."""
    return [
        node
        for node in pool
        if runs(node, task)
        and all(node.offers.get(k) == v for k, v in task.selector.items())
        and (task.worker is None or node.id == task.worker)
    ]


def runs(node: NodeRef, task: Task) -> bool:
    """Whether a node runs the task's executor, and for a `run` task meets its requirements."""
    if task.executor != "run":
        return task.executor in node.executors
    return bool(set(node.executors) & set(RUN_EXECUTORS)) and set(task.requires) <= provides(node)


def provides(node: NodeRef) -> set[str]:
    """What a node's `run` tasks may have: a container if it runs a container executor
    (as its registry allows), and what its site declares (GPUs, a network)."""
    container = {"container"} if CONTAINER_EXECUTORS & set(node.executors) else set()
    return container | (set(node.features) - {"container"})
