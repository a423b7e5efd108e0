"""Workflow files as a model: what is refused (naming the culprits) and how tasks bind.

A workflow's tasks bind as one `Tasks` step: one job per task on a worker of the pool that
offers the task's executor (and its labels, and its name when one is required), with one
lock per dependency. A task with `replicas` N binds to N jobs `name[i]`, each locked
behind every job of every task it depends on. No broker or worker is involved here.
"""

from __future__ import annotations

import itertools
from collections import Counter

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flotta_mqtt.model import (
    Artifact,
    BindingError,
    Collect,
    Distribute,
    Finalize,
    Initialize,
    JobGraph,
    NodeRef,
    Operation,
    Pairwise,
    SchedulerContext,
    Task,
    Tasks,
    Workflow,
    bind,
    candidates,
    check_steps,
    job_count,
    task_graph,
)
from flotta_mqtt.model.workflow import MAX_LOCKS, log_name, task_of


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


def test_a_task_goes_only_to_workers_meeting_its_requirements() -> None:
    """A container comes with a container executor (as the registry lets the scheduler
    see them); GPUs and a network are what the worker's site declares."""
    ctx = context(
        NodeRef(id="laptop", executors=["shell"], features=["network", "container"]),
        NodeRef(id="boxes", executors=["docker"]),
        NodeRef(id="cluster", executors=["kube"], features=["gpu", "network"]),
        node("calls", "api"),
    )
    tasks = [
        shell("any"),
        shell("boxed", requires=["container"]),
        shell("online", requires=["network"]),
        shell("trains", requires=["container", "gpu"]),
    ]
    placed = worker_of(bound(tasks, ctx))
    assert placed["any"] in {"laptop", "boxes", "cluster"}
    assert placed["boxed"] in {"boxes", "cluster"}, "a claimed container is not a container"
    assert placed["online"] in {"laptop", "cluster"}
    assert placed["trains"] == "cluster"
    with pytest.raises(BindingError, match=r"task gpu .*no worker runs tasks that require gpu"):
        bound([shell("gpu", requires=["gpu"])], context(NodeRef(id="w", executors=["docker"])))


def test_a_workflow_naming_an_executor_gets_a_migration_error() -> None:
    for executor in ("shell", "docker", "kube"):
        with pytest.raises(ValidationError, match=rf"`executor: {executor}` is no longer"):
            Task.model_validate({"name": "t", "executor": executor, "params": {"shell": ":"}})
    assert Task(name="t", executor="api").executor == "api", "api tasks stay their own kind"


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
        (
            Task(name="boxed", requires=["container"], params={"image": "bb"}),
            "no worker runs tasks that require container",
        ),
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
    with pytest.raises(BindingError, match=r"task a .*no worker runs tasks \(shell, docker or"):
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
    """Tasks whose dependencies form a random DAG, listed in a random order; a few have
    replicas."""
    count = draw(st.integers(min_value=1, max_value=14))
    labels = [f"t{i}" for i in range(count)]  # topological by construction: deps point back
    tasks = []
    for i, label in enumerate(labels):
        deps = draw(st.lists(st.sampled_from(labels[:i]), unique=True)) if i else []
        replicas = draw(st.sampled_from([1, 1, 1, 2, 3, 5]))
        tasks.append(shell(label, *deps, replicas=replicas))
    return draw(st.permutations(tasks))


@settings(max_examples=150, deadline=None)
@given(task_dags(), st.integers(min_value=1, max_value=4))
def test_random_dags_bind_to_jobs_locked_exactly_by_their_dependencies(
    tasks: list[Task], workers: int
) -> None:
    ctx = context(*(node(f"w{i}", "shell") for i in range(workers)))
    graph = bound(tasks, ctx)
    ids = {name: job_id for job_id, name in names(graph).items()}
    expected_names = [
        t.name if t.replicas == 1 else f"{t.name}[{i}]" for t in tasks for i in range(t.replicas)
    ]
    assert sorted(ids) == sorted(expected_names), "one job per task, or per replica"
    assert len(graph) == len(expected_names) == sum(t.replicas for t in tasks)
    assert len(graph) == job_count([Tasks(tasks=tasks)], workers)
    jobs_of = {t.name: [ids[n] for n in expected_names if task_of(n) == t.name] for t in tasks}
    expected = {
        (before, after)
        for t in tasks
        for dep in t.depends
        for before in jobs_of[dep]
        for after in jobs_of[t.name]
    }
    assert set(graph.locks) == expected
    assert len(graph.locks) == len(expected)
    assert all(before < after for before, after in graph.locks), "locks point forward"
    assert nx.is_directed_acyclic_graph(graph.graph)
    assert {job.worker for job in graph.jobs} <= {n.id for n in ctx.pool}
    assert set(graph.sources()) == {j for t in tasks if not t.depends for j in jobs_of[t.name]}
    for t in tasks:  # each task's replicas are spread evenly over the (all able) workers
        spread = Counter(graph.jobs[j].worker for j in jobs_of[t.name])
        assert max(spread.values()) - min(spread.values(), default=0) <= 1
        assert len(spread) == min(t.replicas, workers)
    for job in graph.jobs:
        task = Task.model_validate(job.operation.params)
        if task.replica is None:
            assert task in tasks, "the job carries its task unchanged"
            continue
        assert task.name == f"{task_of(task.name)}[{task.replica}]"
        plain = {**job.operation.params, "name": task_of(task.name)}
        del plain["replica"]
        assert Task.model_validate(plain) in tasks, "a replica carries its task, indexed"


def test_a_run_tasks_needs_are_stated_and_its_stdin_bounded() -> None:
    from flotta_mqtt.model.run import MAX_STDIN_BYTES
    from flotta_mqtt.workflows.executors import check_task

    with pytest.raises(ValueError, match=r"task e runs its image's entrypoint.*requires: \[co"):
        check_task(Task(name="e", params={"image": "bb"}))
    check_task(Task(name="e", params={"image": "bb"}, requires=["container"]))
    with pytest.raises(ValueError, match=r"task g asks for GPUs: add `requires: \[gpu\]`"):
        check_task(Task(name="g", params={"shell": ":", "resources": {"gpus": 1}}))
    check_task(Task(name="s", params={"shell": "cat", "stdin": "x" * MAX_STDIN_BYTES}))
    with pytest.raises(ValueError, match=rf"`stdin` is {MAX_STDIN_BYTES + 2} bytes, more th"):
        check_task(
            Task(name="s", params={"shell": "cat", "stdin": "é" * (MAX_STDIN_BYTES // 2 + 1)})
        )
    for target, path in (("data", "data"), ("data", "data/x.csv"), ("d/e", "d")):
        task = Task(
            name="c",
            params={"shell": ":", "mounts": [{"source": "/srv", "target": target}]},
            outputs=[path],
        )
        with pytest.raises(
            ValueError, match=rf"a mount would hide or hold .*: {target} and {path}"
        ):
            check_task(task)
    mount = {"source": "/srv", "target": "data"}
    check_task(Task(name="c", params={"shell": ":", "mounts": [mount]}, outputs=["database"]))
    for target in ("/etc", "../up", "a/../../b"):
        mount = {"source": "/data", "target": target}
        with pytest.raises(ValueError, match="must be a relative path"):
            check_task(Task(name="m", params={"shell": ":", "mounts": [mount]}))


def test_task_params_are_checked_by_their_executor_before_anything_runs() -> None:
    from flotta_mqtt.workflows.executors import check_task

    check_task(Task(name="ok", params={"shell": "true"}))
    with pytest.raises(ValueError, match=r"task both: invalid run params.*at most one of"):
        check_task(Task(name="both", params={"shell": "true", "command": ["true"]}))
    with pytest.raises(ValueError, match=r"task api: invalid api params.*url"):
        check_task(Task(name="api", executor="api", params={}))


# --- replicas: array tasks -----------------------------------------------------------------------


def replicated(name: str, replicas: int, *depends: str) -> Task:
    return shell(name, *depends, replicas=replicas)


def test_replicas_bind_to_jobs_named_by_index_carrying_the_index() -> None:
    ctx = context(node("w0", "shell"), node("w1", "shell"))
    graph = bound([replicated("t", 3)], ctx)
    assert list(names(graph).values()) == ["t[0]", "t[1]", "t[2]"]
    for i, job in enumerate(graph.jobs):
        task = Task.model_validate(job.operation.params)
        assert (task.name, task.replica, task.replicas) == (f"t[{i}]", i, 3)
        assert task.params == {"shell": "true"}
        assert job.kind == "tasks" and job.relocatable
    assert graph.locks == []
    assert graph.sources() == graph.sinks() == [0, 1, 2]
    assert [job.worker for job in graph.jobs] == ["w0", "w1", "w0"]
    assert bound([replicated("t", 3)], ctx).jobs == graph.jobs, "deterministic"


def test_ten_thousand_replicas_spread_evenly_over_four_workers() -> None:
    ctx = context(*(node(f"w{i}", "shell") for i in range(4)), node("plain", "api"))
    graph = bound([shell("first"), replicated("t", 10_000)], ctx)
    assert len(graph) == 10_001
    spread = Counter(job.worker for job in graph.jobs[1:])
    assert spread == {f"w{i}": 2_500 for i in range(4)}, "never `plain`, 2,500 each"
    assert graph.jobs[-1].operation.params["name"] == "t[9999]"


def test_a_task_after_a_replicated_one_waits_for_every_replica() -> None:
    ctx = context(node("w0", "shell"), node("w1", "shell"))
    graph = bound([replicated("t", 5), shell("agg", "t")], ctx)
    ids = {name: job_id for job_id, name in names(graph).items()}
    assert sorted(graph.locks) == [(ids[f"t[{i}]"], ids["agg"]) for i in range(5)]
    assert graph.consumes(ids["agg"]) == [ids[f"t[{i}]"] for i in range(5)]
    agg = graph.jobs[ids["agg"]].operation.params
    assert agg["name"] == "agg" and "replica" not in agg and "replicas" not in agg
    assert graph.sinks() == [ids["agg"]]


def test_replicas_after_replicas_wait_for_every_replica_before_them() -> None:
    ctx = context(node("w0", "shell"), node("w1", "shell"), node("w2", "shell"))
    tasks = [shell("setup"), replicated("a", 3, "setup"), replicated("b", 4, "a")]
    graph = bound(tasks, ctx)
    ids = {name: job_id for job_id, name in names(graph).items()}
    a = [ids[f"a[{i}]"] for i in range(3)]
    b = [ids[f"b[{i}]"] for i in range(4)]
    assert set(graph.locks) == {(ids["setup"], j) for j in a} | set(itertools.product(a, b))
    assert len(graph.locks) == 3 + 3 * 4
    assert all(before < after for before, after in graph.locks)
    assert graph.sources() == [ids["setup"]] and graph.sinks() == b


def test_replicas_one_binds_exactly_as_a_plain_task() -> None:
    ctx = context(node("w0", "shell"), node("w1", "shell"))
    plain = [shell("a"), shell("b", "a", env={"K": "v"})]
    explicit = [shell("a", replicas=1), shell("b", "a", env={"K": "v"}, replicas=1)]
    assert explicit == plain
    graph = bound(explicit, ctx)
    assert graph.jobs == bound(plain, ctx).jobs
    assert names(graph) == {0: "a", 1: "b"} and graph.locks == [(0, 1)]
    params = graph.jobs[1].operation.params
    assert params == {
        "name": "b",
        "depends": ["a"],
        "executor": "run",
        "params": {"shell": "true"},
        "env": {"K": "v"},
        "inputs": [],
        "outputs": [],
        "timeout": None,
        "retries": 0,
        "worker": None,
        "selector": {},
    }, "no replicas or replica key: a plain task dumps as it did before replicas"


def test_too_many_locks_are_refused_naming_the_dependencies() -> None:
    tasks = [replicated("t", 100_000), replicated("agg", 11, "t"), shell("x", "agg")]
    with pytest.raises(ValidationError) as caught:
        Workflow(tasks=tasks)
    message = str(caught.value)
    assert f"would take 1,100,011 locks, more than {MAX_LOCKS:,}" in message
    assert "agg → t takes 11 x 100,000" in message
    with pytest.raises(ValidationError, match="1,100,011 locks"):
        Tasks(tasks=tasks)
    # Just under the bound binds.
    fits = [replicated("t", 100_000), replicated("agg", 10, "t")]
    graph = bound(fits, context(node("w0", "shell")))
    assert len(graph.locks) == 1_000_000


def test_too_many_jobs_are_refused_naming_the_tasks() -> None:
    tasks = [replicated(f"t{i}", 100_000) for i in range(10)] + [replicated("big", 100)]
    with pytest.raises(ValidationError) as caught:
        Workflow(tasks=tasks)
    assert "the tasks would run as 1,000,100 jobs, more than 1,000,000" in str(caught.value)
    assert "t0 has 100,000 replicas" in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "culprit"),
    [
        ({"name": "t", "replicas": 0}, "greater than or equal to 1"),
        ({"name": "t", "replicas": 100_001}, "less than or equal to 100000"),
        ({"name": "t[0]"}, "`[i]` is how binding names replica i"),
        ({"name": "t[1]", "replicas": 3}, "`[i]` is how binding names replica i"),
        ({"name": "t", "replica": 1, "replicas": 3}, "must be named t[1]"),
        ({"name": "t[2]", "replica": 1, "replicas": 3}, "must be named t[1]"),
        ({"name": "t[3]", "replica": 3, "replicas": 3}, "an index below replicas"),
        ({"name": "t", "replicas": 2, "outputs": ["o.txt"]}, "would each store the same"),
    ],
)
def test_bad_replicas_are_refused(fields: dict[str, object], culprit: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Task.model_validate({"params": {"shell": "true"}, **fields})
    assert culprit in str(caught.value)


def test_a_workflow_cannot_set_a_replica_index() -> None:
    job = Task(name="t[1]", replica=1, replicas=2)  # what binding puts in a job's params
    with pytest.raises(ValidationError, match=r"replica index, which binding sets: t\[1\]"):
        Workflow(tasks=[job])
    assert "replica" not in Workflow.model_json_schema()["$defs"]["Task"]["properties"]


def test_a_replicated_task_starts_and_ends_with_many_jobs() -> None:
    """Entry and exit arity count replicas: a Collect may gather them, a Pairwise from
    one initiator job may not."""
    op = Operation(name="op")
    pool = [node("w0", "shell"), node("w1", "shell")]
    ctx = SchedulerContext(initiator=NodeRef(id="init"), workers=[], pool=pool)
    fan = Tasks(tasks=[replicated("t", 3)], distribution=Collect())
    graph = bind(
        Artifact(project="p", steps=[Initialize(op, Distribute()), fan, Finalize(op)]), ctx
    )
    assert sorted(graph.locks) == [(0, 1), (0, 2), (0, 3), (1, 4), (2, 4), (3, 4)]
    assert len(graph) == job_count([Initialize(op), fan, Finalize(op)], 0) == 5
    with pytest.raises(BindingError, match="Pairwise"):
        check_steps([Initialize(op, Pairwise()), Tasks(tasks=[replicated("t", 3)])])
    with pytest.raises(BindingError, match="Pairwise"):
        check_steps([Tasks(tasks=[replicated("t", 3)], distribution=Pairwise()), Finalize(op)])
    check_steps([Initialize(op, Pairwise()), Tasks(tasks=[replicated("t", 1)])])


def test_replica_log_folders_and_task_names() -> None:
    assert [log_name(n) for n in ("t", "t[0]", "a.b-c[12]")] == ["t", "_t.0", "_a.b-c.12"]
    assert [task_of(n) for n in ("t", "t[0]", "a.b-c[12]")] == ["t", "t", "a.b-c"]
    # A replica's folder never meets a task's: task names start with a letter or digit.
    with pytest.raises(ValidationError):
        shell("_t.0")


def test_a_replica_is_told_its_index_in_its_env() -> None:
    from flotta_mqtt.workflows.executors.runner import task_env

    plain = shell("t", env={"K": "v"})
    assert task_env(plain) == {"K": "v"}, "a plain task's env is its own"
    graph = bound([shell("t", env={"K": "v"}, replicas=3)], context(node("w0", "shell")))
    envs = [task_env(Task.model_validate(job.operation.params)) for job in graph.jobs]
    assert envs == [{"K": "v", "FLOTTA_REPLICA": str(i), "FLOTTA_REPLICAS": "3"} for i in range(3)]


def test_each_input_comes_from_exactly_one_task_it_depends_on() -> None:
    """Its sha256 travels in that task's product: a file from anywhere else has none."""
    make = {"name": "make", "outputs": ["x.txt"]}
    again = {"name": "again", "outputs": ["x.txt"]}
    cases = [
        [make, {"name": "use", "inputs": ["x.txt"]}],  # staged by nobody it waits for
        [
            make,
            {"name": "mid", "depends": ["make"]},
            {"name": "use", "depends": ["mid"], "inputs": ["x.txt"]},
        ],
        [make, again, {"name": "use", "depends": ["make", "again"], "inputs": ["x.txt"]}],
    ]
    for tasks in cases:
        with pytest.raises(ValidationError) as caught:
            Workflow.model_validate({"tasks": tasks})
        assert (
            "each job file a task reads must be output by exactly one task it depends on: "
            "use reads x.txt"
        ) in str(caught.value)
    fine = Workflow.model_validate(
        {"tasks": [make, {"name": "use", "depends": ["make"], "inputs": ["x.txt"]}]}
    )
    assert [task.name for task in fine.tasks] == ["make", "use"]


# --- the run params: parsed the same wherever they come from -----------------------------------

_words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    form=st.sampled_from(["command", "shell", "image"]),
    words=st.lists(_words, min_size=1, max_size=4),
    args=st.lists(_words, max_size=4),
)
def test_run_params_give_argv_with_args_after_whatever_the_form(
    form: str, words: list[str], args: list[str]
) -> None:
    from flotta_mqtt.model.run import RunParams

    given_form = {"command": words} if form == "command" else {"shell": " ".join(words)}
    data = {"image": "bb:1", "args": args, **({} if form == "image" else given_form)}
    params = RunParams.model_validate(data)
    assert RunParams.model_validate(params.model_dump()) == params, "round trip"
    argv = params.argv()
    if form == "image":
        assert argv is None, "the image's entrypoint, given the args"
    else:
        assert argv is not None and argv[len(argv) - len(args) :] == args
        assert (
            argv[: len(words)] == words
            if form == "command"
            else argv[:3] == ["sh", "-c", " ".join(words)]
        )


@given(
    a=st.lists(st.sampled_from(["a", "b", "ab"]), min_size=1, max_size=3),
    b=st.lists(st.sampled_from(["a", "b", "ab"]), min_size=1, max_size=3),
)
def test_a_mount_clashes_with_a_job_file_exactly_when_one_path_holds_the_other(
    a: list[str], b: list[str]
) -> None:
    from flotta_mqtt.workflows.executors import check_task

    mount = {"source": "/srv", "target": "/".join(a)}
    task = Task(name="t", params={"shell": ":", "mounts": [mount]}, outputs=["/".join(b)])
    if a[: len(b)] == b or b[: len(a)] == a:
        with pytest.raises(ValueError, match="a mount would hide or hold its job files"):
            check_task(task)
    else:
        check_task(task)
