"""A worker taking jobs off its bus (inside its agent thread's pump), without a broker:
what it hands to its runners, and when."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import job_ready

from flotta_mqtt.protocol import JobBatch, JobReady, encode, topics
from flotta_mqtt.roles.config import StorageSettings
from flotta_mqtt.roles.worker.agent import WorkerAgent, WorkerConfig


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    """A worker whose threads and bus are never started: taken jobs wait for its agent."""
    config = WorkerConfig(
        name="w0", state_dir=tmp_path / "state", storage=StorageSettings(url=tmp_path.as_uri())
    )
    worker = WorkerAgent(config)
    yield worker
    worker.journal.close()


def handed(agent: WorkerAgent) -> list[JobReady]:
    """The jobs taken for the runners since last asked (the agent thread submits them)."""
    taken, agent._taken = agent._taken, []
    assert not agent._ready  # nothing reaches a runner before its journal write commits
    return [attempt.job for attempt in taken]


def test_a_batch_is_journaled_then_handed_to_the_runners_once(agent: WorkerAgent) -> None:
    batch = encode(JobBatch(jobs=[job_ready(0), job_ready(1)]))
    agent._arrived(topics.jobs("w0"), batch)
    assert [j.job_id for j in handed(agent)] == [0, 1]
    assert sorted(h.job.job_id for h in agent.journal.held()) == [0, 1]

    agent._arrived(topics.jobs("w0"), batch)  # redelivered: answered, not run again
    assert handed(agent) == []


def test_jobs_whose_journal_write_fails_are_not_run_and_are_taken_when_sent_again(
    agent: WorkerAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job runs only once journaled: if the write fails, nothing is handed to a runner
    and nothing is remembered, so the scheduler's re-send is taken as a new job."""
    hold = agent.journal.hold

    def failing(ready: JobReady) -> None:
        if ready.job_id == 1:
            raise OSError("disk full")
        hold(ready)

    monkeypatch.setattr(agent.journal, "hold", failing)
    agent._arrived(topics.jobs("w0"), encode(JobBatch(jobs=[job_ready(0), job_ready(1)])))
    assert handed(agent) == []
    assert agent.journal.held() == []  # the transaction was rolled back whole

    monkeypatch.setattr(agent.journal, "hold", hold)
    agent._arrived(topics.jobs("w0"), encode(JobBatch(jobs=[job_ready(0), job_ready(1)])))
    assert [j.job_id for j in handed(agent)] == [0, 1]
    assert sorted(h.job.job_id for h in agent.journal.held()) == [0, 1]
