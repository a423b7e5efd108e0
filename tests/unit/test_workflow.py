"""Workflow files as a model: what is refused (naming the culprits) and how tasks bind.

A workflow's tasks bind as one `Tasks` step: one job per task on a worker of the pool that
offers the task's executor (and its labels, and its name when one is required), with one
lock per dependency. No broker or worker is involved here.
"""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flotta_mqtt.model import (
    Artifact,
    BindingError,
    JobGraph,
    NodeRef,
    SchedulerContext,
    Task,
    Tasks,
    Workflow,
    bind,
    candidates,
    task_graph,
)


def shell(name: str, *depends: str, **fields: object) -> Task:
    return Task.model_validate(
        {"name": name, "depends": list(depends), "params": {"shell": "true"}, **fields}
    )


def context(*pool: NodeRef) -> SchedulerContext:
    return SchedulerContext(initiator=NodeRef(id="sched.initiator"), workers=[], pool=list(pool))


def node(name: str, *executors: str, **labels: str) -> NodeRef:
    return NodeRef(id=name, executors=list(executors), offers=labels)


def bound(tasks: list[Task], ctx: SchedulerContext) -> JobGraph:
    return bind(Artifact(project="wf", steps=[Tasks(tasks=tasks)], id="wf-1"), ctx)


def names(graph: JobGraph) -> dict[int, str]:
    return {job.id: str(job.operation.params["name"]) for job in graph.jobs}


def worker_of(graph: JobGraph) -> dict[str, str]:
    return {str(job.operation.params["name"]): job.worker for job in graph.jobs}


# --- refused, with the culprits named ----------------------------------------------------------


def test_duplicate_names_are_refused_naming_each_duplicate() -> None:
    tasks = [shell("a"), shell("b"), shell("a"), shell("c"), shell("b"), shell("b")]
    with pytest.raises(ValidationError, match=r"task names must be unique; repeated: a, b"):
        Workflow(tasks=tasks)
    with pytest.raises(ValueError, match=r"repeated: a, b$"):
        task_graph(tasks)


def test_unknown_dependencies_are_refused_naming_task_and_dependency() -> None:
    tasks = [shell("a"), shell("b", "a", "ghost"), shell("c", "nowhere")]
    with pytest.raises(ValidationError) as caught:
        Workflow(tasks=tasks)
    assert "tasks depend on tasks that do not exist: b → ghost, c → nowhere" in str(caught.value)
    with pytest.raises(ValueError) as direct:
        task_graph(tasks)
    # Exactly the unknown ones: b's known dependency on a is not listed.
    assert str(direct.value) == "tasks depend on tasks that do not exist: b → ghost, c → nowhere"


def test_a_cycle_is_refused_and_printed() -> None:
    tasks = [shell("start"), shell("x", "start", "z"), shell("y", "x"), shell("z", "y")]
    with pytest.raises(ValueError, match="the tasks form a cycle: ") as caught:
        task_graph(tasks)
    printed = str(caught.value).split("the tasks form a cycle: ")[1]
    path = printed.split(" → ")
    assert path[0] == path[-1], f"the cycle is printed closed: {printed}"
    assert set(path) == {"x", "y", "z"}, "only the tasks on the cycle, each once"
    edges = {(dep, t.name) for t in tasks for dep in t.depends}
    assert all(pair in edges for pair in itertools.pairwise(path))
    with pytest.raises(ValidationError, match="cycle"):
        Workflow(tasks=tasks)
    with pytest.raises(ValidationError, match="cycle"):
        Tasks(tasks=tasks)


def test_a_task_depending_on_itself_is_a_cycle() -> None:
    with pytest.raises(ValueError, match="the tasks form a cycle: a → a"):
        task_graph([shell("a", "a")])


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../up.txt", "a/../../b", "..", "dir\\file", "nul\0byte", ""]
)
def test_job_files_must_be_relative_without_dotdot(path: str) -> None:
    for field in ("inputs", "outputs"):
        with pytest.raises(ValidationError):
            shell("a", **{field: [path]})


@pytest.mark.parametrize("path", ["out.txt", "dir/sub/out.csv", "a..b/c", ".hidden"])
def test_relative_job_files_are_accepted(path: str) -> None:
    assert shell("a", inputs=[path], outputs=[path]).inputs == [path]


def test_a_workflow_file_round_trips_through_json() -> None:
    workflow = Workflow(
        name="diamond",
        tasks=[
            shell("a", outputs=["n.txt"]),
            shell("b", "a", inputs=["n.txt"], timeout=5, retries=2, env={"K": "v"}),
        ],
    )
    assert Workflow.model_validate_json(workflow.model_dump_json()) == workflow


# --- binding -------------------------------------------------------------------------------------


def test_tasks_spread_over_the_workers_able_to_run_them() -> None:
    tasks = [shell(f"t{i}") for i in range(6)]
    ctx = context(node("w0", "shell"), node("plain"), node("w1", "shell", "api"))
    graph = bound(tasks, ctx)
    placed = worker_of(graph)
    assert set(placed.values()) == {"w0", "w1"}, "both able workers used, never `plain`"
    assert sorted(placed.values()).count("w0") == 3
    assert graph.locks == []
    assert [job.kind for job in graph.jobs] == ["tasks"] * 6
    assert all(job.relocatable for job in graph.jobs)


def test_a_task_runs_only_where_its_executor_is_offered() -> None:
    tasks = [shell("s"), Task(name="call", executor="api", params={"url": "http://x/"})]
    ctx = context(node("only-shell", "shell"), node("only-api", "api"))
    assert worker_of(bound(tasks, ctx)) == {"s": "only-shell", "call": "only-api"}


def test_worker_and_selector_are_respected() -> None:
    ctx = context(
        node("w0", "shell"),
        node("w1", "shell", gpu="yes", zone="eu"),
        node("w2", "shell", gpu="yes", zone="us"),
    )
    tasks = [
        shell("pinned", worker="w0"),
        shell("gpu", selector={"gpu": "yes"}),
        shell("gpu-us", selector={"gpu": "yes", "zone": "us"}),
        shell("pinned-too", "pinned", worker="w2", selector={"zone": "us"}),
    ]
    placed = worker_of(bound(tasks, ctx))
    assert placed["pinned"] == "w0"
    assert placed["gpu"] in {"w1", "w2"}
    assert placed["gpu-us"] == "w2"
    assert placed["pinned-too"] == "w2"
    for _ in range(3):  # deterministic: the same artifact and context bind the same way
        assert worker_of(bound(tasks, ctx)) == placed


@pytest.mark.parametrize(
    ("task", "culprit"),
    [
        (Task(name="boxed", executor="docker", params={}), "no worker runs the docker executor"),
        (shell("needs-gpu", selector={"gpu": "yes"}), "with labels {'gpu': 'yes'}"),
        (shell("pinned", worker="w9"), "under the name w9"),
        (shell("pinned", worker="plain"), "under the name plain"),
    ],
)
def test_binding_fails_naming_the_task_no_worker_can_run(task: Task, culprit: str) -> None:
    ctx = context(node("w0", "shell", gpu="no"), node("plain", "api"))
    with pytest.raises(BindingError) as caught:
        bound([shell("fine"), task], ctx)
    message = str(caught.value)
    assert message.startswith(f"task {task.name} (step 0): ")
    assert culprit in message


def test_binding_fails_when_the_pool_is_empty() -> None:
    with pytest.raises(BindingError, match=r"task a .*no worker runs the shell executor"):
        bound([shell("a")], context())


def test_candidates_filter_on_executor_labels_and_name() -> None:
    pool = [node("a", "shell", x="1"), node("b", "shell"), node("c", "api", x="1")]
    assert [n.id for n in candidates(shell("t"), pool)] == ["a", "b"]
    assert [n.id for n in candidates(shell("t", selector={"x": "1"}), pool)] == ["a"]
    assert [n.id for n in candidates(shell("t", worker="b"), pool)] == ["b"]
    assert candidates(shell("t", worker="c"), pool) == []


# --- property: any DAG of tasks binds to the same DAG of jobs ---------------------------------


@st.composite
def task_dags(draw: st.DrawFn) -> list[Task]:
    """Tasks whose dependencies form a random DAG, listed in a random order."""
    count = draw(st.integers(min_value=1, max_value=14))
    labels = [f"t{i}" for i in range(count)]  # topological by construction: deps point back
    tasks = []
    for i, label in enumerate(labels):
        deps = draw(st.lists(st.sampled_from(labels[:i]), unique=True)) if i else []
        tasks.append(shell(label, *deps))
    return draw(st.permutations(tasks))


@settings(max_examples=150, deadline=None)
@given(task_dags(), st.integers(min_value=1, max_value=4))
def test_random_dags_bind_to_jobs_locked_exactly_by_their_dependencies(
    tasks: list[Task], workers: int
) -> None:
    ctx = context(*(node(f"w{i}", "shell") for i in range(workers)))
    graph = bound(tasks, ctx)
    ids = {name: job_id for job_id, name in names(graph).items()}
    assert sorted(ids) == sorted(t.name for t in tasks), "one job per task"
    expected = {(ids[dep], ids[t.name]) for t in tasks for dep in t.depends}
    assert set(graph.locks) == expected
    assert len(graph.locks) == len(expected)
    assert all(before < after for before, after in graph.locks), "locks point forward"
    assert nx.is_directed_acyclic_graph(graph.graph)
    assert {job.worker for job in graph.jobs} <= {n.id for n in ctx.pool}
    assert set(graph.sources()) == {ids[t.name] for t in tasks if not t.depends}
    for job in graph.jobs:
        task = Task.model_validate(job.operation.params)
        assert task in tasks, "the job carries its task unchanged"


def test_task_params_are_checked_by_their_executor_before_anything_runs() -> None:
    from flotta_mqtt.roles.executors import check_task

    check_task(Task(name="ok", params={"shell": "true"}))
    with pytest.raises(ValueError, match=r"task both: invalid shell params.*exactly one of"):
        check_task(Task(name="both", params={"shell": "true", "command": ["true"]}))
    with pytest.raises(ValueError, match=r"task api: invalid api params.*url"):
        check_task(Task(name="api", executor="api", params={}))
