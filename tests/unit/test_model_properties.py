"""Hypothesis properties of binding, over random valid (and possibly invalid) step lists.

The oracles here are written from the seed's rules, not from the model's code: step sizes
are counted over concrete workers, and sources are derived from which steps carry a
distribution.
"""

from __future__ import annotations

import itertools
import random

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flotta_mqtt.model import (
    Artifact,
    BindingError,
    Collect,
    Distribute,
    Finalize,
    Initialize,
    Iterate,
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

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

OP_CLASSES = {
    "initialize": Initialize,
    "parallel": Parallel,
    "sequential": Sequential,
    "finalize": Finalize,
}
DISTRIBUTIONS = {
    "collect": Collect,
    "distribute": Distribute,
    "pairwise": Pairwise,
    "round_robin": RoundRobin,
}
# A few operations, built once: drawing pydantic models field by field is slow.
OPERATIONS = st.sampled_from(
    [
        Operation(name="load"),
        Operation(name="train", params={"lr": 0.1, "layers": [3, 2]}),
        Operation(name="count.v2", params={"where": {"x": ">0.5"}, "strict": True}),
        Operation(name="mean_x", params={"cols": None}),
    ]
)

# --- shapes: the steps without their distributions ------------------------------------------
# ("op", kind) or ("iterate", rounds, [shape, ...]); Iterate nests at most two deep.


def shape_lists(depth: int = 0) -> st.SearchStrategy[list[tuple]]:
    leaf = st.sampled_from(sorted(OP_CLASSES)).map(lambda kind: ("op", kind))
    if depth >= 2:
        element = leaf
    else:
        element = st.one_of(
            leaf,
            st.tuples(st.just("iterate"), st.integers(1, 3), shape_lists(depth + 1)),
        )
    return st.lists(element, min_size=1, max_size=4 if depth == 0 else 3)


def entry_kind(shape: tuple) -> str:
    return entry_kind(shape[2][0]) if shape[0] == "iterate" else shape[1]


def exit_kind(shape: tuple) -> str:
    return exit_kind(shape[2][-1]) if shape[0] == "iterate" else shape[1]


def many(kind: str) -> bool:
    """Only a Parallel step starts or ends with one job per worker."""
    return kind == "parallel"


def valid_distributions(exit_: str, entry: str) -> list[str | None]:
    options: list[str | None] = [None]
    if not many(entry):
        options.append("collect")
    if not many(exit_):
        options.append("distribute")
    if many(exit_) == many(entry):
        options += ["pairwise", "round_robin"]
    return options


@st.composite
def valid_steps(draw, shapes: list[tuple] | None = None, follows: str | None = None) -> list:
    """Steps whose every distribution fits the jobs it joins.

    `follows` is the kind of the step the list's last step hands over to: the block's own
    first step inside an Iterate (the next round), None at the top level (nothing follows).
    """
    if shapes is None:
        shapes = draw(shape_lists())
    steps = []
    for i, shape in enumerate(shapes):
        nxt = entry_kind(shapes[i + 1]) if i + 1 < len(shapes) else follows
        options = [None] if nxt is None else valid_distributions(exit_kind(shape), nxt)
        name = draw(st.sampled_from(options))
        distribution = None if name is None else DISTRIBUTIONS[name]()
        if shape[0] == "op":
            steps.append(OP_CLASSES[shape[1]](draw(OPERATIONS), distribution))
        else:
            block = draw(valid_steps(shape[2], follows=entry_kind(shape[2][0])))
            steps.append(Iterate(shape[1], block, distribution=distribution))
    return steps


@st.composite
def any_steps(draw, shapes: list[tuple] | None = None) -> list:
    """Steps with distributions drawn anywhere, fitting or not."""
    if shapes is None:
        shapes = draw(shape_lists())
    steps = []
    names = st.sampled_from([None, None, None, *DISTRIBUTIONS])
    for shape in shapes:
        name = draw(names)
        distribution = None if name is None else DISTRIBUTIONS[name]()
        if shape[0] == "op":
            steps.append(OP_CLASSES[shape[1]](Operation(name="op"), distribution))
        else:
            steps.append(Iterate(shape[1], draw(any_steps(shape[2])), distribution=distribution))
    return steps


# --- oracles ---------------------------------------------------------------------------------


def size(kind: str, workers: int) -> int:
    return workers if kind == "parallel" else 1


def entry_size(step, workers: int) -> int:
    if step.kind == "iterate":
        return entry_size(step.steps[0], workers)
    return size(step.kind, workers)


def exit_size(step, workers: int) -> int:
    if step.kind == "iterate":
        return exit_size(step.steps[-1], workers)
    return size(step.kind, workers)


def join_fits(distribution, exits: int, entries: int) -> bool:
    """Whether the distribution can draw its locks between these numbers of jobs."""
    return {
        "collect": entries == 1,
        "distribute": exits == 1,
        "pairwise": exits == entries,
        "round_robin": exits == entries,
    }[distribution.kind]


def oracle_invalid(steps, top: bool = True) -> bool:
    """Over two workers a one-job step and a per-worker step differ in size, so a join that
    cannot draw its locks there is wrong for any context: that is the arity rule."""
    n = 2
    for i, step in enumerate(steps):
        if step.kind == "iterate":
            if oracle_invalid(step.steps, top=False):
                return True
            last = step.steps[-1]
            if last.distribution is not None and not join_fits(
                last.distribution, exit_size(last, n), entry_size(step.steps[0], n)
            ):
                return True  # the joint between two rounds
        if step.distribution is None:
            continue
        if i + 1 == len(steps):
            if top:
                return True  # nothing follows the artifact's last step
            continue  # a block's last step: the joint between rounds, checked above
        if not join_fits(step.distribution, exit_size(step, n), entry_size(steps[i + 1], n)):
            return True
    return False


def expected_count(steps, workers: int) -> int:
    total = 0
    for step in steps:
        if step.kind == "iterate":
            total += step.rounds * expected_count(step.steps, workers)
        else:
            total += {"parallel": workers, "sequential": workers + 2}.get(step.kind, 1)
    return total


def expected_jobs(steps, workers: list[str], prefix: str = "", iteration: int = 0, locked=False):
    """Every job in binding order as (step path, node, role, iteration, is a source).

    A job is a source by design when it is an entry job of its step and nothing locks that
    entry: the step is the first of the artifact, or the step before it has no distribution.
    The first step of a block is locked in every round after the first (by the joint or by
    the barrier), and in round 0 exactly when the Iterate itself is.
    """
    out = []
    previous = None
    for i, step in enumerate(steps):
        path = f"{prefix}{i}"
        entry_locked = locked if previous is None else previous.distribution is not None
        if step.kind == "iterate":
            for round_ in range(step.rounds):
                out += expected_jobs(
                    step.steps, workers, f"{path}.", round_, entry_locked or round_ > 0
                )
        elif step.kind == "initialize":
            out.append((path, "init", JobRole.INITIALIZE, iteration, not entry_locked))
        elif step.kind == "finalize":
            out.append((path, "init", JobRole.AGGREGATE, iteration, not entry_locked))
        elif step.kind == "parallel":
            out += [(path, w, JobRole.LOCAL, iteration, not entry_locked) for w in workers]
        else:  # sequential
            out.append((path, "init", JobRole.INITIALIZE, iteration, not entry_locked))
            out += [(path, w, JobRole.LOCAL, iteration, False) for w in workers]
            out.append((path, "init", JobRole.AGGREGATE, iteration, False))
        previous = step
    return out


def expected_locks(steps, workers: int) -> set[tuple[int, int]]:
    """Every lock, drawn from the seed's rules over concrete job ids in binding order."""
    count = 0
    locks: set[tuple[int, int]] = set()

    def new(n: int) -> list[int]:
        nonlocal count
        count += n
        return list(range(count - n, count))

    def join(distribution, exits: list[int], entries: list[int]) -> None:
        if distribution is None:
            return
        n = len(exits)
        if distribution.kind == "collect":
            locks.update((e, entries[0]) for e in exits)
        elif distribution.kind == "distribute":
            locks.update((exits[0], e) for e in entries)
        elif distribution.kind == "pairwise":
            locks.update((exits[i], entries[i]) for i in range(n))
        else:  # round_robin
            locks.update((exits[i], entries[(i + 1) % n]) for i in range(n))

    def step_jobs(step) -> tuple[list[int], list[int]]:
        if step.kind == "parallel":
            jobs = new(workers)
            return jobs, jobs
        if step.kind == "sequential":
            chain = new(workers + 2)
            locks.update(itertools.pairwise(chain))
            return chain[:1], chain[-1:]
        if step.kind == "iterate":
            first, last = list_jobs(step.steps)
            for _ in range(step.rounds - 1):
                entries, exits = list_jobs(step.steps)
                if step.steps[-1].distribution is None:  # barrier
                    locks.update((a, b) for a in last for b in entries)
                else:
                    join(step.steps[-1].distribution, last, entries)
                last = exits
            return first, last
        jobs = new(1)
        return jobs, jobs

    def list_jobs(block) -> tuple[list[int], list[int]]:
        first, exits = step_jobs(block[0])
        for before, step in itertools.pairwise(block):
            entries, next_exits = step_jobs(step)
            join(before.distribution, exits, entries)
            exits = next_exits
        return first, exits

    list_jobs(steps)
    return locks


def needs_workers(steps) -> bool:
    return any(
        needs_workers(s.steps) if s.kind == "iterate" else s.kind in ("parallel", "sequential")
        for s in steps
    )


def context(workers: int) -> SchedulerContext:
    return SchedulerContext.of("init", [f"w{i + 1}" for i in range(workers)])


def make_artifact(steps) -> Artifact:
    return Artifact(project="proj", steps=steps, seed=1, id="prop")


WORKER_COUNTS = st.integers(1, 6)


# --- properties of valid artifacts -----------------------------------------------------------


@SETTINGS
@given(valid_steps(), WORKER_COUNTS)
def test_bound_graph_shape(steps, workers):
    check_steps(steps)
    graph = bind(make_artifact(steps), context(workers))

    assert nx.is_directed_acyclic_graph(graph.graph)
    assert all(before < after for before, after in graph.locks)
    assert len(graph) == job_count(steps, workers) == expected_count(steps, workers)
    assert [job.id for job in graph.jobs] == list(range(len(graph)))
    assert all(graph.graph.nodes[job.id]["job"] is job for job in graph.jobs)
    assert len(set(graph.locks)) == len(graph.locks)

    expected = expected_jobs(steps, [f"w{i + 1}" for i in range(workers)])
    assert [(j.step, j.worker, j.role, j.iteration) for j in graph.jobs] == [
        e[:4] for e in expected
    ]
    assert graph.sources() == [i for i, e in enumerate(expected) if e[4]]
    assert graph.sources()[0] == 0
    assert set(graph.locks) == expected_locks(steps, workers)
    assert [j.on_initiator for j in graph.jobs] == [j.worker == "init" for j in graph.jobs]


@SETTINGS
@given(valid_steps(), WORKER_COUNTS)
def test_sequential_jobs_form_a_private_chain(steps, workers):
    """Inside a Sequential step each job after the first consumes exactly the job before
    it, and each worker job unlocks exactly the job after it."""
    graph = bind(make_artifact(steps), context(workers))
    for job in graph.jobs:
        if job.kind != "sequential":
            continue
        if job.role is not JobRole.INITIALIZE:
            assert graph.consumes(job.id) == [job.id - 1]
        if job.role is JobRole.LOCAL:
            assert graph.unlocks(job.id) == [job.id + 1]


@SETTINGS
@given(valid_steps())
def test_artifact_json_round_trip(steps):
    art = make_artifact(steps)
    back = Artifact.model_validate_json(art.model_dump_json())
    assert back == art
    assert back.model_dump_json() == art.model_dump_json()
    assert bind(back, context(2)).locks == bind(art, context(2)).locks


@SETTINGS
@given(valid_steps(), WORKER_COUNTS, st.randoms(use_true_random=False))
def test_draining_the_lock_table_completes_every_job_once(steps, workers, rnd: random.Random):
    graph = bind(make_artifact(steps), context(workers))
    table = LockTable(graph)
    completed: list[int] = []
    done: set[int] = set()
    ready = set(table.ready())
    assert ready == set(graph.sources())
    while ready:
        # Everything ready has all its predecessors completed, and nothing else is ready.
        for job in ready:
            assert set(graph.consumes(job)) <= done
        assert ready == {
            j for j in range(len(graph)) if j not in done and set(graph.consumes(j)) <= done
        }
        job = rnd.choice(sorted(ready))
        newly = table.release(job)
        assert table.release(job) == []  # idempotent
        completed.append(job)
        done.add(job)
        assert set(newly) == set(table.ready()) - (ready - {job})
        for j in newly:
            assert set(graph.consumes(j)) <= done
        ready = set(table.ready())
        # A scheduler resuming from the completed jobs sees the same.
        if rnd.random() < 0.2:
            assert LockTable(graph, completed=done).ready() == sorted(ready)
    assert sorted(completed) == list(range(len(graph)))  # each job exactly once
    assert table.completed == set(range(len(graph)))


@settings(max_examples=60, deadline=None)
@given(valid_steps())
def test_no_workers_fails_only_when_a_step_needs_them(steps):
    art = make_artifact(steps)
    empty = SchedulerContext.of("init", [])
    if needs_workers(steps):
        with pytest.raises(BindingError, match="needs workers"):
            bind(art, empty)
    else:
        graph = bind(art, empty)
        assert len(graph) == expected_count(steps, 0)
        assert all(job.worker == "init" for job in graph.jobs)


# --- possibly invalid artifacts --------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(any_steps(), WORKER_COUNTS)
def test_check_steps_artifact_and_oracle_agree(steps, workers):
    try:
        check_steps(steps)
    except BindingError as exc:
        direct: str | None = str(exc)
    else:
        direct = None

    try:
        art = make_artifact(steps)
    except ValidationError as exc:
        assert direct is not None, f"Artifact refused steps check_steps accepts: {exc}"
        assert direct in str(exc)
        assert "step " in direct
        assert any(name in direct for name in ("Collect", "Distribute", "Pairwise", "RoundRobin"))
        art = None
    else:
        assert direct is None, f"Artifact accepted steps check_steps refuses: {direct}"

    assert (art is None) == oracle_invalid(steps), direct
    if art is not None:
        graph = bind(art, context(workers))
        assert len(graph) == expected_count(steps, workers)
        assert nx.is_directed_acyclic_graph(graph.graph)


@settings(max_examples=60, deadline=None)
@given(valid_steps())
def test_valid_strategy_only_draws_valid_steps(steps):
    """Guards the generator above: it must agree with the oracle it is built next to."""
    assert not oracle_invalid(steps)
