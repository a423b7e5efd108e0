"""A worker taking jobs off its bus, on the in-memory transport: a job is journaled before
it runs and acknowledged to the broker after that commit, so a worker that dies before
the commit gets it again; a job whose journal write fails is not run, and taken when the
scheduler sends it again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import job_ready, wait_for
from worker_support import GATES, TIMEOUT, Station, gated, station

from flotta_mqtt.protocol import JobReady


@pytest.fixture(name="station")
def station_fixture(tmp_path: Path) -> Iterator[Station]:
    yield from station(tmp_path)


def test_a_batch_is_journaled_then_run_once(station: Station) -> None:
    agent = station.worker()
    station.send(gated(0, gate="batch"), gated(1, gate="batch"))
    GATES.wait_for(lambda: GATES.runs.count(("batch", 1)) == 2, "the jobs never started")
    # Both started: both were journaled first, in one transaction.
    assert sorted((h.job.job_id, h.final) for h in agent.journal.held()) == [(0, None), (1, None)]
    GATES.release("batch")
    first = [station.wait_results(0)[0], station.wait_results(1)[0]]
    station.send(gated(0, gate="batch"), gated(1, gate="batch"))  # redelivered
    assert [station.wait_results(0, 2)[1], station.wait_results(1, 2)[1]] == first
    assert GATES.runs.count(("batch", 1)) == 2  # answered, not run again


def test_jobs_whose_journal_write_fails_are_not_run_and_are_taken_when_sent_again(
    station: Station, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job runs only once journaled: if the write fails, nothing reaches a runner and
    nothing is remembered, so the scheduler's re-send is taken as a new job."""
    agent = station.worker()
    hold = agent.journal.hold

    def failing(ready: JobReady) -> None:
        if ready.job_id == 1:
            raise OSError("disk full")
        hold(ready)

    monkeypatch.setattr(agent.journal, "hold", failing)
    station.send(gated(0, gate="disk"), gated(1, gate="disk"))
    wait_for(lambda: "2 jobs not taken" in caplog.text, TIMEOUT, "the failure was never logged")
    assert agent.journal.held() == []  # the transaction was rolled back whole
    assert GATES.runs.count(("disk", 1)) == 0

    monkeypatch.setattr(agent.journal, "hold", hold)
    GATES.release("disk")
    station.send(gated(0, gate="disk"), gated(1, gate="disk"))
    station.wait_results(0)
    station.wait_results(1)
    assert GATES.runs.count(("disk", 1)) == 2


def test_a_job_is_acknowledged_once_journaled(station: Station) -> None:
    """A worker that dies while a journaled job runs does not get it again from the
    broker (the scheduler moves or re-sends it): a new machine runs only what follows."""
    first = station.worker(state_dir=station.tmp_path / "first")
    station.send(gated(0, gate="acknowledged"))
    GATES.wait_for(lambda: ("acknowledged", 1) in GATES.running, "the job never started")
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
    GATES.release("redelivered")
    station.send(gated(0, gate="redelivered"))
    wait_for(lambda: not first.bus.connected.is_set(), TIMEOUT, "the bus never died")
    station.workers.remove(first)
    first.stop()
    assert GATES.runs.count(("redelivered", 1)) == 0
    station.worker(state_dir=station.tmp_path / "new-machine")
    station.wait_results(0)
    assert GATES.runs.count(("redelivered", 1)) == 1
