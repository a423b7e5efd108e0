"""The scheduler service on the in-memory transport: the core wired to a bus and a
repository, with a stand-in worker and workbench and no broker process. What the
repository decides runs on both engines (`engines`); a lease lost, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import MessageRecorder, Messages, messages_of, wait_for

from flotta_mqtt.model import Artifact, ArtifactState, Operation, Parallel
from flotta_mqtt.protocol import (
    ArtifactStatus,
    EventAck,
    JobFinished,
    JobReady,
    NodePresence,
    RequestRejected,
    Resource,
    topics,
)
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.service import Scheduler
from flotta_mqtt.transport.memory import MemoryBus, fresh_memory_broker

TIMEOUT = 10.0
WORKERS = ("w0", "w1")


class Site:
    """A scheduler on a fresh memory:// broker, stand-in workers and a workbench."""

    def __init__(self, database: Path | str) -> None:
        self.settings = fresh_memory_broker("sched").broker_settings()
        self.config = SchedulerConfig(database=database, broker=self.settings, run_initiator=False)
        self.jobs = MessageRecorder()
        self.seen = MessageRecorder()
        self.workers = MemoryBus(
            "workers",
            self.settings,
            self.jobs,
            [topic for w in WORKERS for topic in (topics.jobs(w), topics.control(w))],
        ).start(wait=TIMEOUT)
        self.workbench = MemoryBus(
            "wb", self.settings, self.seen, [topics.ALL_STATUS, topics.reply("wb")]
        ).start(wait=TIMEOUT)
        for worker in WORKERS:
            presence = NodePresence(
                node=worker, online=True, projects=["p"], operations=["noop"], since=1.0
            )
            self.workers.publish(topics.presence(worker), presence, retain=True)
        self.scheduler = Scheduler(self.config).start(wait=TIMEOUT)

    def status(self, artifact_id: str, state: ArtifactState, after_seq: int = 0) -> ArtifactStatus:
        """The first status of the artifact in `state` with a seq over `after_seq`."""

        def reached(messages: Messages) -> list[ArtifactStatus]:
            statuses: list[ArtifactStatus] = messages_of(
                messages,
                ArtifactStatus,
                lambda s: s.artifact_id == artifact_id and s.state is state and s.seq > after_seq,
            )
            return statuses

        return reached(self.seen.wait_for(reached, TIMEOUT, f"{artifact_id} never {state}"))[0]

    def close(self) -> None:
        self.scheduler.stop()
        self.workbench.stop()
        self.workers.stop()


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    """On SQLite, or on PostgreSQL where a test is parametrised with `engines`."""
    engine = getattr(request, "param", "sqlite")
    if engine == "sqlite":
        running = Site(tmp_path / "scheduler.db")
    else:
        running = Site(request.getfixturevalue("postgres_url"))
    try:
        yield running
    finally:
        running.close()


engines = pytest.mark.parametrize("site", ["sqlite", "postgres"], indirect=True)


@engines
def test_an_artifact_is_dispatched_completed_and_its_results_acknowledged(site: Site) -> None:
    artifact = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    site.workbench.publish(topics.submit("wb"), artifact)
    readies = messages_of(site.jobs.wait(len(WORKERS), timeout=TIMEOUT), JobReady)
    assert sorted(r.job_id for r in readies) == [0, 1]
    for ready in readies:
        product = Resource(url=f"file:///p/{ready.job_id}", sha256="0" * 64, size=1)
        finished = JobFinished(job=ready.ref, product=product, started_at=1.0, finished_at=2.0)
        site.workers.publish(topics.events(f"w{ready.job_id}"), finished)
    status = site.status(artifact.id, ArtifactState.COMPLETED)
    assert [r.url for r in status.results] == ["file:///p/0", "file:///p/1"]
    site.jobs.wait_for(
        lambda messages: len(messages_of(messages, EventAck)) >= 1,
        TIMEOUT,
        "the results were never acknowledged",
    )
    gauges = site.scheduler.snapshot()
    assert gauges is not None and sum(gauges.artifacts.values()) == 0


@engines
def test_a_restarted_scheduler_resumes_and_answers_a_resubmission(site: Site) -> None:
    artifact = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    site.workbench.publish(topics.submit("wb"), artifact)
    site.jobs.wait(len(WORKERS), timeout=TIMEOUT)
    site.scheduler.stop()
    site.scheduler = Scheduler(site.config).start(wait=TIMEOUT)
    # Whatever was dispatched before the restart is asked about again: the same attempts.
    again = messages_of(site.jobs.wait(2 * len(WORKERS), timeout=TIMEOUT), JobReady)
    assert {(r.job_id, r.attempt) for r in again} == {(0, 1), (1, 1)}
    resumed = site.status(artifact.id, ArtifactState.RUNNING, after_seq=1)  # announced again
    site.workbench.publish(topics.submit("wb"), artifact)  # answered with its status
    site.status(artifact.id, ArtifactState.RUNNING, after_seq=resumed.seq)


@engines
def test_a_request_that_cannot_be_read_is_rejected_by_name(site: Site) -> None:
    site.workbench.publish_raw(topics.submit("wb"), b'{"id": "named", "steps": 1}')
    site.seen.wait_for(
        lambda messages: messages_of(messages, RequestRejected),
        TIMEOUT,
        "no rejection came",
    )
    [rejection] = messages_of(site.seen.messages, RequestRejected)
    assert rejection.artifact_id == "named" and rejection.topic == topics.submit("wb")


# --- a database that refuses writes -------------------------------------------------------


def finish(site: Site, ready: JobReady) -> None:
    """The stand-in worker reports a job done, once (it never re-sends)."""
    product = Resource(url=f"file:///p/{ready.job_id}", sha256="0" * 64, size=1)
    finished = JobFinished(job=ready.ref, product=product, started_at=1.0, finished_at=2.0)
    site.workers.publish(topics.events(f"w{ready.job_id}"), finished)  # as bound


def refusal(site: Site, artifact_id: str) -> RequestRejected:
    messages = site.seen.wait_for(
        lambda m: messages_of(m, RequestRejected, lambda r: r.artifact_id == artifact_id),
        TIMEOUT,
        f"{artifact_id} was never refused",
    )
    [refused] = messages_of(messages, RequestRejected, lambda r: r.artifact_id == artifact_id)
    return refused


@pytest.mark.parametrize("then", ["put-back", "crash"])
def test_a_database_that_refuses_writes_refuses_submissions_and_loses_nothing(
    site: Site, tmp_path: Path, then: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database file moved away (a real refused write, as a full disk's): a worker's
    result is neither recorded nor acknowledged, a submission is refused saying why. Put
    back, the scheduler takes up again by itself; or crashed meanwhile, the broker
    delivers again what it was never acknowledged, and a restarted scheduler records it."""
    first = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    site.workbench.publish(topics.submit("wb"), first)
    readies = messages_of(site.jobs.wait(len(WORKERS), timeout=TIMEOUT), JobReady)
    database, aside = Path(site.config.database), tmp_path / "aside.db"
    database.rename(aside)

    finish(site, readies[0])
    second = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    site.workbench.publish(topics.submit("wb"), second)
    refused = refusal(site, second.id)
    assert refused.reason == "unavailable" and refused.topic == topics.submit("wb")
    assert f"the submission of {second.id} was not recorded" in refused.error
    assert "its file was moved or deleted while in use" in refused.error
    assert messages_of(site.jobs.messages, EventAck) == []  # the result is not recorded
    assert caplog.text.count("refused a write") == 1

    if then == "crash":
        site.scheduler.bus.kill()  # the broker keeps its session: nothing was acknowledged
        site.scheduler.stop()
        aside.rename(database)
        site.scheduler = Scheduler(site.config).start(wait=TIMEOUT)
    else:
        aside.rename(database)
    finish(site, readies[1])
    status = site.status(first.id, ArtifactState.COMPLETED)
    assert [r.url for r in status.results] == ["file:///p/0", "file:///p/1"]
    site.workbench.publish(topics.submit("wb"), second)  # sent again: taken now
    site.status(second.id, ArtifactState.RUNNING)


def test_a_new_database_where_the_broker_remembers_the_scheduler_is_reported(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """The database deleted while the scheduler was stopped: it cannot know what it held,
    but the broker kept its session, so it says its database is new to someone who ran."""
    site.scheduler.stop()
    assert "is new, but the broker kept" not in caplog.text  # the first start: no session
    for path in Path(site.config.database).parent.glob("scheduler.db*"):
        path.unlink()
    site.scheduler = Scheduler(site.config).start(wait=TIMEOUT)
    wait_for(lambda: "is new, but the broker kept" in caplog.text, TIMEOUT, "never reported")


@pytest.mark.parametrize("site", ["postgres"], indirect=True)
def test_a_lost_postgresql_connection_is_a_refused_write_and_loses_nothing(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """The database connection terminated (a server restart, a network cut) while the lease
    holds: the results arriving meanwhile wait, and the scheduler connects again."""
    artifact = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    site.workbench.publish(topics.submit("wb"), artifact)
    readies = messages_of(site.jobs.wait(len(WORKERS), timeout=TIMEOUT), JobReady)
    with psycopg.connect(str(site.config.database), autocommit=True) as db:
        ended = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid NOT IN "
            "(SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
        ).fetchall()
    assert len(ended) == 1  # the repository's; the lease's holds
    for ready in readies:
        finish(site, ready)
    status = site.status(artifact.id, ArtifactState.COMPLETED)
    assert [r.url for r in status.results] == ["file:///p/0", "file:///p/1"]
    assert caplog.text.count("refused a write") == 1
    assert site.scheduler.running
