"""The job and artifact state machines, and JobStatus with its attempts."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt.model import (
    ARTIFACT_FINAL,
    JOB_FINAL,
    ArtifactState,
    IllegalTransition,
    JobState,
    JobStatus,
    StaleAttempt,
    check_artifact_transition,
    check_job_transition,
)

J = JobState
A = ArtifactState

# Every legal move, written out: anything not listed must be refused.
JOB_TABLE: dict[JobState, set[JobState]] = {
    # an on_failure exit handler is skipped without running when no task failed
    J.WAITING: {J.READY, J.CANCELLED, J.SKIPPED},
    J.READY: {J.DISPATCHED, J.CANCELLED},
    # finished may overtake started; a lost worker sends the job back to READY; a task
    # whose `when` is false finishes skipped
    J.DISPATCHED: {J.RUNNING, J.COMPLETED, J.FAILED, J.READY, J.CANCELLED, J.SKIPPED},
    J.RUNNING: {J.COMPLETED, J.FAILED, J.READY, J.CANCELLED, J.SKIPPED},
    J.COMPLETED: set(),
    J.SKIPPED: set(),
    J.FAILED: set(),
    J.CANCELLED: set(),
}

ARTIFACT_TABLE: dict[ArtifactState, set[ArtifactState]] = {
    A.SUBMITTED: {A.RUNNING, A.FAILED, A.CANCELLED},
    A.RUNNING: {A.COMPLETED, A.FAILED, A.CANCELLED},
    A.COMPLETED: set(),
    A.FAILED: set(),
    A.CANCELLED: set(),
}


def test_tables_cover_every_state():
    assert set(JOB_TABLE) == set(JobState)
    assert set(ARTIFACT_TABLE) == set(ArtifactState)


def test_final_states_are_exactly_those_with_no_way_out():
    assert {s for s, nxt in JOB_TABLE.items() if not nxt} == JOB_FINAL
    assert {J.COMPLETED, J.FAILED, J.CANCELLED, J.SKIPPED} == JOB_FINAL
    assert {s for s, nxt in ARTIFACT_TABLE.items() if not nxt} == ARTIFACT_FINAL
    assert {A.COMPLETED, A.FAILED, A.CANCELLED} == ARTIFACT_FINAL


@pytest.mark.parametrize(("current", "new"), list(itertools.product(JobState, JobState)))
def test_job_transition_matches_table(current, new):
    if new in JOB_TABLE[current]:
        check_job_transition(current, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{current}.*{new}"):
            check_job_transition(current, new)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(ArtifactState, ArtifactState)))
def test_artifact_transition_matches_table(current, new):
    if new in ARTIFACT_TABLE[current]:
        check_artifact_transition(current, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{current}.*{new}"):
            check_artifact_transition(current, new)


@pytest.mark.parametrize(
    "path",
    [
        [A.SUBMITTED, A.RUNNING, A.COMPLETED],
        [A.SUBMITTED, A.RUNNING, A.FAILED],
        [A.SUBMITTED, A.RUNNING, A.CANCELLED],
        [A.SUBMITTED, A.FAILED],  # refused at submission
        [A.SUBMITTED, A.CANCELLED],
    ],
)
def test_artifact_legal_paths(path):
    for current, new in itertools.pairwise(path):
        check_artifact_transition(current, new)


# --- JobStatus -------------------------------------------------------------------------------


def test_new_status_is_waiting_with_no_attempt():
    status = JobStatus()
    assert (status.state, status.attempt, status.final) == (J.WAITING, 0, False)


def test_happy_path():
    status = JobStatus().ready()
    assert (status.state, status.attempt) == (J.READY, 0)
    status = status.dispatch()
    assert (status.state, status.attempt) == (J.DISPATCHED, 1)
    status = status.start(1)
    assert (status.state, status.attempt) == (J.RUNNING, 1)
    status = status.complete(1)
    assert (status.state, status.attempt, status.final) == (J.COMPLETED, 1, True)


def test_finished_may_overtake_started():
    status = JobStatus().ready().dispatch().complete(1)
    assert status.state is J.COMPLETED


def test_failure_is_final():
    assert JobStatus().ready().dispatch().fail(1).final
    assert JobStatus().ready().dispatch().start(1).fail(1).state is J.FAILED


def test_status_is_immutable():
    status = JobStatus()
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.state = J.READY  # type: ignore[misc]
    ready = status.ready()
    assert status.state is J.WAITING
    assert ready is not status
    assert ready == JobStatus(J.READY, 0)


def test_dispatch_increments_the_attempt():
    status = JobStatus().ready()
    for expected in (1, 2, 3, 4):
        status = status.dispatch()
        assert status.attempt == expected
        status = status.requeue(expected)
        assert (status.state, status.attempt) == (J.READY, expected)


@pytest.mark.parametrize("lost_while", [J.DISPATCHED, J.RUNNING])
def test_requeue_after_loss_then_dispatch_gives_attempt_2(lost_while):
    status = JobStatus().ready().dispatch()
    if lost_while is J.RUNNING:
        status = status.start(1)
    assert status.state is lost_while
    status = status.requeue(1)
    assert (status.state, status.attempt) == (J.READY, 1)
    status = status.dispatch()
    assert (status.state, status.attempt) == (J.DISPATCHED, 2)
    assert status.start(2).complete(2).state is J.COMPLETED


@pytest.mark.parametrize("event", ["start", "complete", "fail"])
@pytest.mark.parametrize("stale", [0, 1, 3])
def test_an_event_for_another_attempt_raises_stale(event, stale):
    status = JobStatus().ready().dispatch().requeue(1).dispatch()
    assert status.attempt == 2
    with pytest.raises(StaleAttempt, match=f"{stale}.*2"):
        getattr(status, event)(stale)
    running = status.start(2)
    if event != "start":
        with pytest.raises(StaleAttempt):
            getattr(running, event)(stale)
    # The current attempt still goes through.
    getattr(status, event)(2)


def test_late_result_of_an_abandoned_attempt_changes_nothing():
    status = JobStatus().ready().dispatch().start(1).requeue(1).dispatch().start(2)
    with pytest.raises(StaleAttempt):
        status.complete(1)
    with pytest.raises(StaleAttempt):
        status.fail(1)
    assert status == JobStatus(J.RUNNING, 2)


def final_statuses() -> list[JobStatus]:
    dispatched = JobStatus().ready().dispatch()
    return [
        dispatched.complete(1),
        dispatched.start(1).complete(1),
        dispatched.fail(1),
        dispatched.start(1).fail(1),
        JobStatus().cancel(),
        JobStatus().ready().cancel(),
        dispatched.cancel(),
        dispatched.start(1).cancel(),
    ]


@pytest.mark.parametrize("status", final_statuses(), ids=lambda s: f"{s.state}-{s.attempt}")
def test_final_states_are_terminal(status):
    assert status.final
    for move in (status.ready, status.dispatch, status.cancel):
        with pytest.raises(IllegalTransition):
            move()
    with pytest.raises(IllegalTransition):
        status.requeue(status.attempt)
    for event in (status.start, status.complete, status.fail):
        with pytest.raises(IllegalTransition):
            event(status.attempt)
        with pytest.raises(StaleAttempt):
            event(status.attempt + 1)


@pytest.mark.parametrize(
    "status",
    [
        JobStatus(),
        JobStatus().ready(),
        JobStatus().ready().dispatch(),
        JobStatus().ready().dispatch().start(1),
    ],
    ids=lambda s: str(s.state),
)
def test_every_unfinished_job_can_be_cancelled(status):
    cancelled = status.cancel()
    assert (cancelled.state, cancelled.attempt, cancelled.final) == (
        J.CANCELLED,
        status.attempt,
        True,
    )


def test_a_job_cannot_skip_ahead():
    waiting = JobStatus()
    with pytest.raises(IllegalTransition):
        waiting.dispatch()
    for event in (waiting.start, waiting.complete, waiting.fail):
        with pytest.raises(IllegalTransition):
            event(0)
    ready = waiting.ready()
    for event in (ready.start, ready.complete, ready.fail):
        with pytest.raises(IllegalTransition):
            event(0)
    with pytest.raises(IllegalTransition):
        ready.ready()
    running = ready.dispatch().start(1)
    with pytest.raises(IllegalTransition):
        running.start(1)
    with pytest.raises(IllegalTransition):
        running.dispatch()


# --- any sequence of events ------------------------------------------------------------------

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["ready", "dispatch", "start", "complete", "fail", "requeue", "cancel"]),
        st.integers(-1, 1),  # attempt offset for the events that carry one
    ),
    max_size=25,
)

TARGET = {
    "ready": J.READY,
    "dispatch": J.DISPATCHED,
    "start": J.RUNNING,
    "complete": J.COMPLETED,
    "fail": J.FAILED,
    "requeue": J.READY,
    "cancel": J.CANCELLED,
}


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_any_event_sequence_follows_the_table(events):
    status = JobStatus()
    dispatches = 0
    for name, offset in events:
        before = status
        with_attempt = name in ("start", "complete", "fail", "requeue")
        attempt = status.attempt + offset
        stale = with_attempt and offset != 0
        legal = TARGET[name] in JOB_TABLE[status.state]
        if name == "ready":  # ready() is the release of the last lock, from WAITING only
            legal = legal and status.state is J.WAITING
        if name == "requeue":  # a lost worker: only a dispatched or running attempt
            legal = legal and status.state in (J.DISPATCHED, J.RUNNING)
        try:
            status = getattr(status, name)(attempt) if with_attempt else getattr(status, name)()
        except StaleAttempt:
            assert stale
            assert status == before
            continue
        except IllegalTransition:
            assert not legal and not stale
            assert status == before
            continue
        assert legal and not stale
        assert status.state is TARGET[name]
        dispatches += name == "dispatch"
        assert status.attempt == dispatches
        if before.final:
            pytest.fail(f"{name} moved a final job from {before.state}")


def test_requeue_is_refused_for_a_stale_attempt_or_an_undispatched_job():
    running = JobStatus().ready().dispatch().start(1).requeue(1).dispatch().start(2)
    with pytest.raises(StaleAttempt):
        running.requeue(1)  # a late "worker lost" about attempt 1 leaves attempt 2 alone
    with pytest.raises(IllegalTransition):
        JobStatus().requeue(0)
    with pytest.raises(IllegalTransition):
        JobStatus().ready().dispatch().ready()
