"""A worker taking jobs off its bus, on the in-memory transport: a job is acknowledged to
the broker only once journaled, so a worker that dies before the commit gets it again; a
job whose journal write fails is stopped and forgotten, and taken when the scheduler
sends it again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import job_ready, messages_of, wait_for
from worker_support import GATES, TIMEOUT, Station, gated, results, station

from flotta_mqtt.protocol import JobAccepted, JobFinished, JobReady


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


def test_jobs_whose_journal_write_fails_are_stopped_and_taken_when_sent_again(
    station: Station, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the write fails, the jobs (already handed to the runners) are cancelled and
    forgotten: no result of theirs is published, and the scheduler's re-send is taken
    as a new job."""
    agent = station.worker()
    hold = agent.journal.hold

    def failing(ready: JobReady) -> None:
        if ready.job_id == 1:
            raise OSError("disk full")
        hold(ready)

    monkeypatch.setattr(agent.journal, "hold", failing)
    station.send(gated(0, gate="disk"), gated(1, gate="disk"))
    wait_for(
        lambda: "2 jobs and 0 results not journaled" in caplog.text,
        TIMEOUT,
        "the failure was never logged",
    )
    assert agent.journal.held() == []  # the transaction was rolled back whole
    GATES.wait_for(
        lambda: GATES.runs.count(("disk", 1)) == GATES.cancelled.count(("disk", 1)),
        "a job whose write failed ran on",
    )

    monkeypatch.setattr(agent.journal, "hold", hold)
    GATES.release("disk")
    station.send(gated(0, gate="disk"), gated(1, gate="disk"))
    station.wait_results(0)
    station.wait_results(1)
    station.send(job_ready(2))  # a marker
    station.wait_results(2)
    assert [len(results(station.events.messages, i)) for i in (0, 1)] == [1, 1]


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
