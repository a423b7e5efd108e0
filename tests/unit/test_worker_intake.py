"""A worker taking jobs off its bus (inside its agent thread's pump), without a broker:
what it journals, what it hands to its runners, and when."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import job_ready

from flotta_mqtt.protocol import JobBatch, JobFinished, JobReady, Resource, encode, topics
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.transport.store import sha256_hex
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig, _Attempt


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    """A worker whose threads and bus are never started: taken jobs wait for its agent."""
    config = WorkerConfig(
        name="w0", state_dir=tmp_path / "state", storage=StorageSettings(url=tmp_path.as_uri())
    )
    worker = WorkerAgent(config)
    yield worker
    worker.journal.close()


def read(agent: WorkerAgent, *jobs: JobReady) -> list[_Attempt]:
    """What the agent's pump reads: the new jobs it will take."""
    agent._arrived(topics.jobs("w0"), encode(JobBatch(jobs=list(jobs))))
    taken, agent._taken = agent._taken, []
    return taken


def queued(agent: WorkerAgent) -> list[int]:
    return [attempt.job.job_id for attempt in agent._ready]


def test_a_batch_is_journaled_then_handed_to_the_runners_once(agent: WorkerAgent) -> None:
    taken = read(agent, job_ready(0), job_ready(1))
    assert agent.journal.held() == []  # read, not yet taken
    assert agent._take(taken) is None  # two jobs: for the runners
    assert queued(agent) == [0, 1]
    assert sorted(h.job.job_id for h in agent.journal.held()) == [0, 1]

    assert read(agent, job_ready(0), job_ready(1)) == []  # redelivered: answered, not run again


def test_jobs_whose_journal_write_fails_are_not_run_and_are_taken_when_sent_again(
    agent: WorkerAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued job runs only once journaled: if the write fails, nothing is handed to a
    runner and nothing is remembered, so the scheduler's re-send is taken as a new job."""
    hold = agent.journal.hold

    def failing(ready: JobReady) -> None:
        if ready.job_id == 1:
            raise OSError("disk full")
        hold(ready)

    monkeypatch.setattr(agent.journal, "hold", failing)
    assert agent._take(read(agent, job_ready(0), job_ready(1))) is None
    assert queued(agent) == []
    assert agent.journal.held() == []  # the transaction was rolled back whole

    monkeypatch.setattr(agent.journal, "hold", hold)
    assert agent._take(read(agent, job_ready(0), job_ready(1))) is None
    assert queued(agent) == [0, 1]
    assert sorted(h.job.job_id for h in agent.journal.held()) == [0, 1]


def finished(job: JobReady) -> JobFinished:
    data = b"null"
    product = Resource(url="data:,null", sha256=sha256_hex(data), size=len(data))
    return JobFinished(job=job.ref, product=product, started_at=1.0, finished_at=2.0)


@pytest.mark.parametrize("taken_over", [False, True], ids=["alone", "taken-over"])
def test_a_lone_job_on_an_idle_worker_is_run_first_and_journaled_with_its_result(
    agent: WorkerAgent, taken_over: bool
) -> None:
    """The agent runs a lone job at once, journaling it after; if another thread takes
    the agent's turn meanwhile, it journals the job first and the result follows. Either
    way the journal ends with the job and its result, and nothing is journaled twice."""
    (lone,) = read(agent, job_ready(0))
    assert agent._take([lone]) is lone  # for the agent itself: not queued, not journaled
    assert queued(agent) == [] and agent.journal.held() == []
    if taken_over:
        agent._journal([])
        assert [(h.job.job_id, h.final) for h in agent.journal.held()] == [(0, None)]
    agent._journal([finished(lone.job)])
    agent._journal([])  # later turns find nothing left to journal
    assert [(h.job.job_id, h.final) for h in agent.journal.held()] == [(0, finished(lone.job))]


def test_a_lone_job_whose_journal_write_fails_is_reported_and_the_agent_goes_on(
    agent: WorkerAgent, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The result was sent already: a failed write is logged, not raised into the thread
    that runs the agent, and the next lone job is journaled as usual."""
    hold = agent.journal.hold

    def failing(ready: JobReady) -> None:
        raise OSError("disk full")

    (lone,) = read(agent, job_ready(0))
    assert agent._take([lone]) is lone
    monkeypatch.setattr(agent.journal, "hold", failing)
    agent._journal([finished(lone.job)])
    assert "1 results and job art1/0 not journaled" in caplog.text
    assert agent.journal.held() == []

    monkeypatch.setattr(agent.journal, "hold", hold)
    agent._running = 0  # the first job's runner is done
    (second,) = read(agent, job_ready(1))
    assert agent._take([second]) is second
    agent._journal([finished(second.job)])
    assert [(h.job.job_id, h.final) for h in agent.journal.held()] == [(1, finished(second.job))]
