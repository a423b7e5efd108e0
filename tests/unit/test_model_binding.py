"""Acceptance tests for binding: steps + a SchedulerContext become a DAG of jobs joined by locks.

Locks are checked by what the jobs are (step path, node) rather than by raw ids wherever the
ids are not themselves the point, so each expectation reads like the seed's own description.
"""

from __future__ import annotations

import json

import networkx as nx
import pytest
from pydantic import ValidationError

from flotta_mqtt.model import (
    Artifact,
    BindingError,
    Collect,
    Distribute,
    Finalize,
    Initialize,
    Iterate,
    JobGraph,
    JobRole,
    LockTable,
    Operation,
    Pairwise,
    Parallel,
    RoundRobin,
    SchedulerContext,
    Sequential,
    bind,
    check_steps,
    job_count,
)

OP = Operation(name="op")
AGG = Operation(name="agg")
WORKERS = ["w1", "w2", "w3"]
CTX3 = SchedulerContext.of("init", WORKERS)


def artifact(*steps) -> Artifact:
    return Artifact(project="proj", steps=list(steps), seed=7, id="art-1")


def key(graph: JobGraph, job_id: int) -> tuple[str, str]:
    """A job by what it is: (step path, node it runs on)."""
    job = graph.jobs[job_id]
    return job.step, job.worker


def lock_keys(graph: JobGraph) -> set[tuple[tuple[str, str], tuple[str, str]]]:
    return {(key(graph, a), key(graph, b)) for a, b in graph.locks}


def ready_groups(graph: JobGraph) -> list[list[int]]:
    """Release every ready job, one wave at a time; return the waves in order."""
    table = LockTable(graph)
    groups: list[list[int]] = []
    ready = table.ready()
    while ready:
        groups.append(ready)
        newly: set[int] = set()
        for job in ready:
            newly.update(table.release(job))
        assert sorted(newly) == table.ready(), "release() must report exactly the newly ready"
        ready = table.ready()
    assert table.completed == set(range(len(graph))), "every job must eventually complete"
    return groups


# --- the anchor's scheduling example ---------------------------------------------------------


ANCHOR = artifact(
    Initialize(OP, Distribute()),
    Parallel(OP, Collect()),
    Finalize(AGG, Distribute()),
    Parallel(OP, Collect()),
    Finalize(AGG),
)


def test_anchor_has_9_jobs_and_12_locks():
    graph = bind(ANCHOR, CTX3)
    assert len(graph) == 9
    assert len(graph.locks) == 12
    assert job_count(ANCHOR.steps, 3) == 9


def test_anchor_jobs_are_in_step_order_on_the_right_nodes():
    graph = bind(ANCHOR, CTX3)
    assert [j.id for j in graph.jobs] == list(range(9))
    assert [(j.step, j.worker, j.kind, j.role) for j in graph.jobs] == [
        ("0", "init", "initialize", JobRole.INITIALIZE),
        ("1", "w1", "parallel", JobRole.LOCAL),
        ("1", "w2", "parallel", JobRole.LOCAL),
        ("1", "w3", "parallel", JobRole.LOCAL),
        ("2", "init", "finalize", JobRole.AGGREGATE),
        ("3", "w1", "parallel", JobRole.LOCAL),
        ("3", "w2", "parallel", JobRole.LOCAL),
        ("3", "w3", "parallel", JobRole.LOCAL),
        ("4", "init", "finalize", JobRole.AGGREGATE),
    ]
    initiator_jobs = {0, 4, 8}
    assert [j.on_initiator for j in graph.jobs] == [i in initiator_jobs for i in range(9)]
    assert all(j.iteration == 0 for j in graph.jobs)
    assert [j.operation for j in graph.jobs] == [OP, OP, OP, OP, AGG, OP, OP, OP, AGG]
    # The graph's nodes carry the same jobs.
    assert [graph.graph.nodes[i]["job"] for i in range(9)] == graph.jobs


def test_anchor_lock_sets_by_step_and_worker():
    graph = bind(ANCHOR, CTX3)
    expected = (
        {(("0", "init"), ("1", w)) for w in WORKERS}  # initiator → every worker
        | {(("1", w), ("2", "init")) for w in WORKERS}  # every worker → middle finalize
        | {(("2", "init"), ("3", w)) for w in WORKERS}  # middle finalize → every worker
        | {(("3", w), ("4", "init")) for w in WORKERS}  # every worker → last finalize
    )
    assert lock_keys(graph) == expected
    # The same, job by job.
    assert graph.unlocks(0) == [1, 2, 3]
    for worker_job in (1, 2, 3):
        assert graph.consumes(worker_job) == [0]
        assert graph.unlocks(worker_job) == [4]
    assert graph.consumes(4) == [1, 2, 3]
    assert graph.unlocks(4) == [5, 6, 7]
    for worker_job in (5, 6, 7):
        assert graph.consumes(worker_job) == [4]
        assert graph.unlocks(worker_job) == [8]
    assert graph.consumes(8) == [5, 6, 7]
    assert graph.unlocks(8) == []
    assert graph.sources() == [0]
    assert graph.sinks() == [8]


def test_anchor_becomes_ready_in_groups_1_3_1_3_1():
    graph = bind(ANCHOR, CTX3)
    groups = ready_groups(graph)
    assert [len(g) for g in groups] == [1, 3, 1, 3, 1]
    assert [sorted(key(graph, j) for j in g) for g in groups] == [
        [("0", "init")],
        [("1", w) for w in WORKERS],
        [("2", "init")],
        [("3", w) for w in WORKERS],
        [("4", "init")],
    ]


def test_anchor_middle_finalize_waits_for_every_worker():
    graph = bind(ANCHOR, CTX3)
    table = LockTable(graph)
    assert table.ready() == [0]
    assert table.release(0) == [1, 2, 3]
    assert table.release(0) == []  # idempotent
    assert table.release(1) == []
    assert table.release(2) == []
    assert table.held(4) == 1
    assert table.ready() == [3]
    assert table.release(3) == [4]
    assert table.release(3) == []
    assert table.ready() == [4]


def test_lock_table_resumes_from_completed_jobs():
    graph = bind(ANCHOR, CTX3)
    assert LockTable(graph, completed=[0, 1, 2]).ready() == [3]
    assert LockTable(graph, completed=[0, 1, 2, 3]).ready() == [4]
    assert LockTable(graph, completed=range(9)).ready() == []


# --- Iterate ---------------------------------------------------------------------------------


def test_iterate_two_rounds_with_one_worker():
    art = artifact(Iterate(2, [Parallel(OP, Collect()), Finalize(AGG)]))
    graph = bind(art, SchedulerContext.of("init", ["w1"]))
    assert len(graph) == 4 == job_count(art.steps, 1)
    assert [(j.step, j.worker, j.iteration, j.role) for j in graph.jobs] == [
        ("0.0", "w1", 0, JobRole.LOCAL),
        ("0.1", "init", 0, JobRole.AGGREGATE),
        ("0.0", "w1", 1, JobRole.LOCAL),
        ("0.1", "init", 1, JobRole.AGGREGATE),
    ]
    # Round 2 starts only once round 1's finalize completed (barrier: Finalize has no
    # distribution of its own).
    assert sorted(graph.locks) == [(0, 1), (1, 2), (2, 3)]
    assert graph.consumes(2) == [1]
    assert [len(g) for g in ready_groups(graph)] == [1, 1, 1, 1]
    table = LockTable(graph)
    table.release(0)
    assert table.ready() == [1]
    assert table.release(1) == [2]


def test_iterate_barrier_between_rounds_over_three_workers():
    art = artifact(Iterate(2, [Parallel(OP, Collect()), Finalize(AGG)]))
    graph = bind(art, CTX3)
    assert len(graph) == 8
    # Round 0: jobs 0-2 (workers), 3 (finalize); round 1: 4-6, 7.
    assert set(graph.locks) == {(0, 3), (1, 3), (2, 3), (3, 4), (3, 5), (3, 6), (4, 7), (5, 7)} | {
        (6, 7)
    }
    assert [j.iteration for j in graph.jobs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [len(g) for g in ready_groups(graph)] == [3, 1, 3, 1]


def test_iterate_barrier_joins_every_last_job_to_every_first_job():
    # No distribution on the block's last step: all last jobs of round r → all first jobs
    # of round r + 1.
    art = artifact(Iterate(2, [Parallel(OP)]))
    graph = bind(art, CTX3)
    assert set(graph.locks) == {(a, b) for a in (0, 1, 2) for b in (3, 4, 5)}


def test_iterate_rounds_joined_by_block_last_distribution():
    art = artifact(Iterate(3, [Parallel(OP, Pairwise())]))
    graph = bind(art, CTX3)
    assert len(graph) == 9
    assert set(graph.locks) == {(0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8)}
    assert {(key(graph, a)[1], key(graph, b)[1]) for a, b in graph.locks} == {
        (w, w) for w in WORKERS
    }
    assert [j.iteration for j in graph.jobs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_iterate_own_distribution_joins_last_round_to_next_step():
    art = artifact(
        Initialize(OP, Distribute()),
        Iterate(2, [Parallel(OP, Collect()), Initialize(OP, Distribute())], distribution=Collect()),
        Finalize(AGG),
    )
    # init(0); round0: w1..w2 (1,2), init (3); round1: (4,5), init (6); finalize (7)
    graph = bind(art, SchedulerContext.of("init", ["w1", "w2"]))
    assert len(graph) == 8 == job_count(art.steps, 2)
    assert set(graph.locks) == {
        (0, 1),
        (0, 2),
        (1, 3),
        (2, 3),
        (3, 4),  # round joint: the block's last step's Distribute
        (3, 5),
        (4, 6),
        (5, 6),
        (6, 7),  # the Iterate's own Collect: last round → the next step
    }
    assert graph.sources() == [0]
    assert graph.sinks() == [7]


def test_nested_iterate_iteration_is_the_innermost_round():
    art = artifact(Iterate(2, [Initialize(OP), Iterate(2, [Finalize(AGG)])]))
    graph = bind(art, SchedulerContext.of("init", []))
    assert [(j.step, j.iteration) for j in graph.jobs] == [
        ("0.0", 0),
        ("0.1.0", 0),
        ("0.1.0", 1),
        ("0.0", 1),
        ("0.1.0", 0),
        ("0.1.0", 1),
    ]
    # Initialize has no distribution, so it locks nothing; the rounds are barriers.
    assert set(graph.locks) == {(1, 2), (2, 3), (4, 5)}
    assert graph.sources() == [0, 1, 4]


# --- Sequential ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [["w1", "w2", "w3"], ["w3", "w1", "w2"]])
def test_sequential_is_one_chain_in_context_order(workers):
    art = artifact(Sequential(OP))
    graph = bind(art, SchedulerContext.of("init", workers))
    assert len(graph) == 5 == job_count(art.steps, 3)
    assert [(j.worker, j.role) for j in graph.jobs] == [
        ("init", JobRole.INITIALIZE),
        *[(w, JobRole.LOCAL) for w in workers],
        ("init", JobRole.AGGREGATE),
    ]
    assert [j.on_initiator for j in graph.jobs] == [True, False, False, False, True]
    assert all(j.kind == "sequential" and j.step == "0" for j in graph.jobs)
    assert sorted(graph.locks) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert graph.sources() == [0]
    assert graph.sinks() == [4]
    assert [len(g) for g in ready_groups(graph)] == [1, 1, 1, 1, 1]


def test_sequential_is_joined_from_its_last_job_and_into_its_first():
    art = artifact(Initialize(OP, Pairwise()), Sequential(OP, Distribute()), Parallel(OP))
    graph = bind(art, CTX3)
    # init(0); sequential: init(1) w1(2) w2(3) w3(4) init(5); parallel (6, 7, 8)
    assert set(graph.locks) == {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (5, 7), (5, 8)}


# --- RoundRobin / Pairwise -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_round_robin_between_parallel_steps(n):
    workers = [f"w{i}" for i in range(n)]
    graph = bind(
        artifact(Parallel(OP, RoundRobin()), Parallel(OP)), SchedulerContext.of("init", workers)
    )
    assert len(graph) == 2 * n
    assert set(graph.locks) == {(i, n + (i + 1) % n) for i in range(n)}
    assert len(graph.locks) == n
    by_worker = {(key(graph, a), key(graph, b)) for a, b in graph.locks}
    assert by_worker == {(("0", workers[i]), ("1", workers[(i + 1) % n])) for i in range(n)}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_pairwise_between_parallel_steps(n):
    workers = [f"w{i}" for i in range(n)]
    graph = bind(
        artifact(Parallel(OP, Pairwise()), Parallel(OP)), SchedulerContext.of("init", workers)
    )
    assert set(graph.locks) == {(i, n + i) for i in range(n)}
    assert {(key(graph, a), key(graph, b)) for a, b in graph.locks} == {
        (("0", w), ("1", w)) for w in workers
    }


def test_pairwise_and_round_robin_between_initiator_steps():
    for dist in (Pairwise(), RoundRobin()):
        graph = bind(artifact(Initialize(OP, dist), Finalize(AGG)), CTX3)
        assert graph.locks == [(0, 1)]


def test_step_without_distribution_adds_no_locks():
    graph = bind(artifact(Initialize(OP), Parallel(OP), Finalize(AGG)), CTX3)
    assert graph.locks == []
    assert graph.sources() == list(range(5))


# --- invalid combinations --------------------------------------------------------------------


INVALID = {
    "collect into parallel": (
        [Parallel(OP, Collect()), Parallel(OP)],
        ["step 0 (parallel)", "step 1 (parallel)", "Collect"],
    ),
    "collect from initiator into parallel": (
        [Initialize(OP, Collect()), Parallel(OP)],
        ["step 0 (initialize)", "step 1 (parallel)", "Collect"],
    ),
    "collect into an iterate starting with parallel": (
        [Initialize(OP, Collect()), Iterate(2, [Parallel(OP)])],
        ["step 0 (initialize)", "step 1 (iterate)", "Collect"],
    ),
    "distribute out of parallel": (
        [Parallel(OP, Distribute()), Finalize(AGG)],
        ["step 0 (parallel)", "step 1 (finalize)", "Distribute"],
    ),
    "distribute out of an iterate ending with parallel": (
        [Iterate(2, [Parallel(OP)], distribution=Distribute()), Finalize(AGG)],
        ["step 0 (iterate)", "Distribute"],
    ),
    "pairwise one to many": (
        [Initialize(OP, Pairwise()), Parallel(OP)],
        ["step 0 (initialize)", "step 1 (parallel)", "Pairwise"],
    ),
    "pairwise many to one": (
        [Parallel(OP, Pairwise()), Finalize(AGG)],
        ["step 0 (parallel)", "step 1 (finalize)", "Pairwise"],
    ),
    "round robin one to many": (
        [Sequential(OP, RoundRobin()), Parallel(OP)],
        ["step 0 (sequential)", "step 1 (parallel)", "RoundRobin"],
    ),
    "round robin many to one": (
        [Parallel(OP, RoundRobin()), Sequential(OP)],
        ["step 0 (parallel)", "step 1 (sequential)", "RoundRobin"],
    ),
    "distribution on the last step": (
        [Initialize(OP, Distribute()), Parallel(OP, Collect()), Finalize(AGG, Collect())],
        ["step 2 (finalize)", "Collect", "no step follows"],
    ),
    "distribution on a last iterate": (
        [Iterate(2, [Finalize(AGG)], distribution=Pairwise())],
        ["step 0 (iterate)", "Pairwise", "no step follows"],
    ),
    "bad join inside an iterate block": (
        [Initialize(OP), Iterate(2, [Parallel(OP, Collect()), Parallel(OP)])],
        ["step 1.0 (parallel)", "step 1.1 (parallel)", "Collect"],
    ),
    "collect between rounds into a block starting with parallel": (
        [Iterate(2, [Parallel(OP), Finalize(AGG, Collect())])],
        ["step 0 (iterate)", "rounds", "Collect"],
    ),
    "single-step parallel block collected into itself": (
        [Iterate(3, [Parallel(OP, Collect())]), Finalize(AGG)],
        ["step 0 (iterate)", "rounds", "Collect"],
    ),
    "nested iterate joint between outer rounds": (
        [Iterate(2, [Parallel(OP), Iterate(2, [Finalize(AGG)], distribution=Collect())])],
        ["step 0 (iterate)", "rounds", "Collect"],
    ),
    "bad join inside a nested block": (
        [Iterate(2, [Initialize(OP), Iterate(2, [Parallel(OP, Distribute()), Finalize(AGG)])])],
        ["step 0.1.0 (parallel)", "step 0.1.1 (finalize)", "Distribute"],
    ),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_combination_is_refused_naming_step_and_distribution(case):
    steps, fragments = case
    with pytest.raises(BindingError) as direct:
        check_steps(steps)
    message = str(direct.value)
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(ValidationError) as wrapped:
        Artifact(project="proj", steps=steps)
    assert message in str(wrapped.value)
    (error,) = wrapped.value.errors()
    assert isinstance(error["ctx"]["error"], BindingError)
    # Nor can it sneak in through JSON.
    payload = json.dumps(
        {"project": "proj", "steps": [s.model_dump(mode="json") for s in steps]},
    )
    with pytest.raises(ValidationError) as from_json:
        Artifact.model_validate_json(payload)
    assert message in str(from_json.value)


@pytest.mark.parametrize(
    "steps",
    [
        # Collect from the last step of a block into a first step that has one job.
        [Iterate(2, [Initialize(OP, Distribute()), Parallel(OP, Collect())])],
        [Iterate(2, [Sequential(OP, Distribute()), Parallel(OP, Collect())]), Finalize(AGG)],
        # Pairwise / RoundRobin between rounds of a block that starts and ends with MANY.
        [Iterate(2, [Parallel(OP, Pairwise()), Parallel(OP, RoundRobin())])],
        # Distribute out of a block ending on the initiator into a block starting with MANY.
        [Iterate(2, [Parallel(OP, Collect()), Finalize(AGG, Distribute())])],
        # A distribution on the last step of a block is a round joint, not "last step".
        [Initialize(OP), Iterate(2, [Finalize(AGG, Pairwise())])],
    ],
)
def test_valid_iterate_joints_are_accepted(steps):
    check_steps(steps)
    art = Artifact(project="proj", steps=steps)
    graph = bind(art, CTX3)
    assert len(graph) == job_count(steps, 3)
    assert nx.is_directed_acyclic_graph(graph.graph)


def test_context_with_no_workers_is_refused_for_worker_steps():
    empty = SchedulerContext.of("init", [])
    with pytest.raises(BindingError, match=r"step 1 \(parallel\).*no"):
        bind(artifact(Initialize(OP, Distribute()), Parallel(OP, Collect()), Finalize(AGG)), empty)
    with pytest.raises(BindingError, match=r"step 0 \(sequential\)"):
        bind(artifact(Sequential(OP)), empty)
    with pytest.raises(BindingError, match=r"step 0\.1 \(parallel\)"):
        bind(artifact(Iterate(2, [Initialize(OP, Distribute()), Parallel(OP)])), empty)


def test_context_with_no_workers_binds_initiator_only_steps():
    graph = bind(artifact(Initialize(OP, Pairwise()), Finalize(AGG)), SchedulerContext.of("i", []))
    assert [j.worker for j in graph.jobs] == ["i", "i"]
    assert graph.locks == [(0, 1)]


def test_context_refuses_duplicate_workers():
    with pytest.raises(ValidationError, match="w1"):
        SchedulerContext.of("init", ["w1", "w2", "w1"])


# --- determinism -----------------------------------------------------------------------------


DETERMINISM = artifact(
    Initialize(OP, Distribute()),
    Iterate(
        2,
        [Parallel(OP, RoundRobin()), Parallel(OP, Collect()), Sequential(AGG, Distribute())],
        distribution=Collect(),
    ),
    Finalize(AGG),
)


def test_binding_twice_gives_identical_graphs():
    first = bind(DETERMINISM, CTX3)
    second = bind(DETERMINISM, CTX3)
    assert first.jobs == second.jobs
    assert first.locks == second.locks
    assert first.artifact_id == second.artifact_id == "art-1"
    assert nx.utils.graphs_equal(first.graph, second.graph)


def test_binding_an_equal_artifact_and_context_gives_identical_graphs():
    copy = Artifact.model_validate_json(DETERMINISM.model_dump_json())
    context = SchedulerContext.model_validate_json(CTX3.model_dump_json())
    first = bind(DETERMINISM, CTX3)
    second = bind(copy, context)
    assert [j.id for j in second.jobs] == list(range(len(second)))
    assert first.jobs == second.jobs
    assert first.locks == second.locks
    assert nx.utils.graphs_equal(first.graph, second.graph)


# --- serialisation ---------------------------------------------------------------------------


def full_artifact() -> Artifact:
    setup = Operation(
        name="setup.v2",
        params={"lr": 0.1, "layers": [1, 2, 3], "opts": {"a": None, "b": True, "c": "x"}},
    )
    return Artifact(
        id="everything",
        project="proj",
        seed=2**40 + 3,
        steps=[
            Initialize(setup, Distribute()),  # ONE → MANY
            Parallel(OP, Pairwise()),  # MANY → MANY
            Parallel(OP, RoundRobin()),  # MANY → MANY
            Parallel(OP, Collect()),  # MANY → ONE
            Sequential(OP, Distribute()),  # ONE → MANY
            Iterate(2, [Parallel(OP)], distribution=Collect()),  # barrier rounds; MANY → ONE
            Iterate(
                3,
                [
                    Initialize(OP, Distribute()),
                    Parallel(OP, Collect()),
                    Iterate(2, [Finalize(AGG, Pairwise())], distribution=RoundRobin()),
                ],
                distribution=Pairwise(),
            ),
            Finalize(AGG),
        ],
    )


def test_artifact_json_round_trip_with_every_step_and_distribution():
    art = full_artifact()
    text = art.model_dump_json()
    back = Artifact.model_validate_json(text)
    assert back == art
    assert back.model_dump_json() == text
    # Plain dict round trip too, and the kinds are on the wire.
    assert Artifact.model_validate(json.loads(text)) == art
    kinds = text.count('"kind"')
    assert kinds >= 8 + 3 + 8  # every top-level step, nested steps and distributions
    for kind in (
        "initialize",
        "parallel",
        "sequential",
        "finalize",
        "iterate",
        "collect",
        "distribute",
        "pairwise",
        "round_robin",
    ):
        assert f'"kind":"{kind}"' in text
    # The round-tripped artifact binds to the very same graph.
    assert bind(back, CTX3).jobs == bind(art, CTX3).jobs
    assert bind(back, CTX3).locks == bind(art, CTX3).locks
    assert len(bind(art, CTX3)) == job_count(art.steps, 3)


def test_artifact_json_schema_covers_every_step_and_distribution():
    schema = Artifact.model_json_schema()
    json.dumps(schema)  # serialisable
    defs = schema["$defs"]
    for name in (
        "Initialize",
        "Parallel",
        "Sequential",
        "Finalize",
        "Iterate",
        "Collect",
        "Distribute",
        "Pairwise",
        "RoundRobin",
        "Operation",
    ):
        assert name in defs
    assert set(schema["required"]) >= {"project", "steps"}
