"""A worker taking jobs off its bus, on the in-memory transport: a job is acknowledged to
the broker only once journaled, so a worker that dies before the commit gets it again; a
journal that refuses writes pauses the worker (jobs taken run on, new ones wait) until
it takes them again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MessageRecorder, job_ready, messages_of, wait_for
from worker_support import GATES, TIMEOUT, Station, gated, results, station

from flotta_mqtt.protocol import JobAccepted, JobFinished, JobReady, NodePresence, topics
from flotta_mqtt.transport.memory import MemoryBus


@pytest.fixture(name="station")
def station_fixture(tmp_path: Path) -> Iterator[Station]:
    yield from station(tmp_path)


def test_a_batch_is_journaled_and_run_once(station: Station) -> None:
    agent = station.worker()
    station.send(gated(0, gate="batch"), gated(1, gate="batch"))
    GATES.wait_for(lambda: GATES.runs.count(("batch", 1)) == 2, "the jobs never started")
    wait_for(
        lambda: (
            sorted((h.job.job_id, h.final) for h in agent.journal.held()) == [(0, None), (1, None)]
        ),
        TIMEOUT,
        "the jobs were never journaled",
    )
    GATES.release("batch")
    first = [station.wait_results(0)[0], station.wait_results(1)[0]]
    station.send(gated(0, gate="batch"), gated(1, gate="batch"))  # redelivered
    assert [station.wait_results(0, 2)[1], station.wait_results(1, 2)[1]] == first
    assert GATES.runs.count(("batch", 1)) == 2  # answered, not run again


def test_a_refused_journal_write_pauses_the_worker_until_the_journal_takes_writes(
    station: Station, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The write fails (as on a full disk): the jobs already handed to the runners run
    on, the fault is said once in the log and in the presence, a job arriving meanwhile
    waits; once the journal takes writes, every job is journaled, the waiting one starts,
    the fault is cleared, and each job has one result. (tests/faults/test_disks.py does
    this on a real full disk.)"""
    presences = MessageRecorder()
    watch = MemoryBus("watch", station.broker.broker_settings(), presences, [topics.presence("w0")])
    watch.start(wait=TIMEOUT)
    agent = station.worker()
    hold = agent.journal.hold

    def failing(ready: JobReady) -> None:
        if ready.job_id == 1:
            raise sqlite3.OperationalError("database or disk is full")
        hold(ready)

    monkeypatch.setattr(agent.journal, "hold", failing)
    station.send(gated(0, gate="disk"), gated(1, gate="disk"))
    presences.wait_for(
        lambda m: "journal: database or disk is full" in faults(m), TIMEOUT, "no fault said"
    )
    GATES.wait_for(lambda: GATES.runs.count(("disk", 1)) == 2, "the jobs did not run on")
    station.send(gated(2, gate="disk"))
    station.send(gated(0, gate="disk"))  # a marker: answered once job 2 was taken
    station.events.wait_for(
        lambda m: messages_of(m, JobAccepted), TIMEOUT, "the duplicate was not answered"
    )
    assert GATES.runs.count(("disk", 1)) == 2  # job 2 waits for the journal
    assert agent.journal.held() == []  # nothing written: the transaction is whole or none

    monkeypatch.setattr(agent.journal, "hold", hold)
    presences.wait_for(lambda m: faults(m)[-1:] == [None], TIMEOUT, "the fault never cleared")
    wait_for(
        lambda: sorted(h.job.job_id for h in agent.journal.held()) == [0, 1, 2],
        TIMEOUT,
        "the jobs were never journaled",
    )
    GATES.release("disk")
    for job_id in (0, 1, 2):
        station.wait_results(job_id)
    station.send(job_ready(3))  # a marker
    station.wait_results(3)
    assert [len(results(station.events.messages, i)) for i in (0, 1, 2)] == [1, 1, 1]
    assert GATES.runs.count(("disk", 1)) == 3
    assert caplog.text.count("refused a write") == 1
    watch.stop()


def faults(messages: list[tuple[str, bytes]]) -> list[str | None]:
    """The `fault` label of each online presence, in order."""
    return [p.labels.get("fault") for p in messages_of(messages, NodePresence) if p.online]


def test_a_job_is_acknowledged_once_journaled(station: Station) -> None:
    """A worker that dies while a journaled job runs does not get it again from the
    broker (the scheduler moves or re-sends it): a new machine runs only what follows."""
    first = station.worker(state_dir=station.tmp_path / "first")
    job = gated(0, gate="acknowledged")
    station.send(job)
    GATES.wait_for(lambda: ("acknowledged", 1) in GATES.running, "the job never started")
    station.send(job)  # answered after the first was journaled and acknowledged
    station.events.wait_for(lambda m: messages_of(m, JobAccepted), TIMEOUT, "never accepted")
    first.bus.kill()  # a crash: the broker sends the will, keeps the session
    station.workers.remove(first)
    first.stop()  # reaps its threads; what it does now reaches nobody
    GATES.release("acknowledged")
    station.worker(state_dir=station.tmp_path / "new-machine")
    station.send(job_ready(1))  # a marker: whatever the broker delivers again comes first
    station.wait_results(1)
    assert GATES.runs.count(("acknowledged", 1)) == 1


def test_a_job_cut_off_before_its_journal_commit_is_delivered_again(
    station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker dies between reading a job and committing it: the broker never had an
    acknowledgement, and delivers the job again to the worker's next connection, even on
    a new machine with an empty journal."""
    first = station.worker(state_dir=station.tmp_path / "first")

    def crash(ready: JobReady) -> None:
        first.bus.kill()
        raise OSError("the machine is gone")

    monkeypatch.setattr(first.journal, "hold", crash)
    station.send(gated(0, gate="redelivered"))
    wait_for(lambda: not first.bus.connected.is_set(), TIMEOUT, "the bus never died")
    station.workers.remove(first)
    first.stop()  # what it ran of the job (it was queued before the commit) is cancelled
    GATES.wait_for(
        lambda: GATES.runs.count(("redelivered", 1)) == GATES.cancelled.count(("redelivered", 1)),
        "the first run was never stopped",
    )
    GATES.release("redelivered")
    station.worker(state_dir=station.tmp_path / "new-machine")
    (result,) = station.wait_results(0)
    assert isinstance(result, JobFinished)
