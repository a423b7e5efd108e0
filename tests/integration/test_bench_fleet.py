"""The `workers` bench's simulated workers speak the protocol: the real scheduler, on a
real mosquitto, completes with them an artifact bound to all of them and a small workflow
pinned to a few, as it would with worker agents. So the bench cannot silently rot."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MessageRecorder, wait_for

from bench.fleet import Fleet
from bench.workers import PROJECT, fleet_artifact, small_workflow
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import ArtifactState, JobState, Operation
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import (
    EventAck,
    JobBatch,
    JobFailed,
    JobFinished,
    JobReady,
    Resource,
    decode,
    topics,
    unbatch,
)
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

WORKERS = 20
ROUNDS = 3


@pytest.fixture
def fleet(broker: LocalBroker, tmp_path: Path) -> Iterator[Fleet]:
    """WORKERS simulated workers, served on a thread of their own until the test ends."""
    names = [f"sim{i:02d}" for i in range(WORKERS)]
    fleet = Fleet(names, broker.host, broker.port, PROJECT, (tmp_path / "store").as_uri())
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            fleet.step(0.02)
        fleet.stop()

    thread = threading.Thread(target=serve, name="fleet", daemon=True)
    thread.start()
    try:
        wait_for(lambda: fleet.ready == WORKERS, timeout=20, message="simulated workers ready")
        yield fleet
    finally:
        stop.set()
        thread.join(20)


def test_the_real_scheduler_completes_work_with_simulated_workers(
    broker: LocalBroker, fleet: Fleet, tmp_path: Path
) -> None:
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    config = SchedulerConfig(
        broker=BrokerSettings(url=broker.url),
        storage=storage,
        database=tmp_path / "scheduler.db",
        run_initiator=False,
    )
    scheduler = SchedulerNode(config).start()
    try:
        with Client(BrokerSettings(url=broker.url), storage=storage) as client:
            big = client.submit(fleet_artifact(ROUNDS))
            pinned = [w.name for w in fleet.workers[:3]]
            small = client.submit(small_workflow(pinned))
            big_status = big.wait(timeout=30)
            small_status = small.wait(timeout=30)
        # The scheduler acknowledges every result: nothing is left to re-send.
        wait_for(lambda: not any(w.unacknowledged for w in fleet.workers), timeout=10)
    finally:
        scheduler.stop()

    assert big_status.state is ArtifactState.COMPLETED, big_status.error
    assert big_status.total == ROUNDS * WORKERS
    assert big_status.counts.get(JobState.COMPLETED) == ROUNDS * WORKERS
    assert sorted(big_status.holders) == sorted(w.name for w in fleet.workers)
    assert small_status.state is ArtifactState.COMPLETED, small_status.error
    assert [job.worker for job in small_status.jobs or []] == pinned
    stats = fleet.stats
    assert stats.jobs == ROUNDS * WORKERS + 3
    assert stats.errors == stats.stale == stats.failed == 0
    # Each worker's rounds were dependent: round r + 1 came after its result for round r.
    assert len(stats.turnaround) == (ROUNDS - 1) * WORKERS


def _job(job_id: int, attempt: int = 1, inputs: list[Resource] | None = None) -> JobReady:
    return JobReady(
        artifact_id="a1",
        job_id=job_id,
        attempt=attempt,
        project=PROJECT,
        seed=1,
        step="0",
        kind="parallel",
        role="local",
        iteration=0,
        operation=Operation(name="noop"),
        inputs=inputs or [],
    )


def test_a_simulated_worker_answers_duplicates_stale_attempts_and_bad_inputs_as_a_worker(
    broker: LocalBroker, fleet: Fleet
) -> None:
    """Driven by a scheduler's messages as the worker agent is: a duplicate gets the same
    result again, a stale attempt nothing, an input whose bytes do not match its sha256
    a JobFailed, a job acknowledged and sent again a new run."""
    worker = fleet.workers[0].name
    events = MessageRecorder()
    bus = Bus("fake-scheduler", BrokerSettings(url=broker.url), events, [topics.events(worker)])
    bus.start()
    forged = Resource(url="data:application/json;base64,bnVsbA==", sha256="0" * 64, size=4)
    try:
        for job in (_job(7, attempt=2), _job(7, attempt=2), _job(7, attempt=1), _job(8)):
            bus.publish(topics.jobs(worker), job)
        bus.publish(topics.jobs(worker), JobBatch(jobs=[_job(9, inputs=[forged]), _job(10)]))
        answers = [
            message
            for _, payload in events.wait(4)
            for message in unbatch(decode(topics.events(worker), payload)[1])
        ]
        first, again, eighth, ninth, tenth = answers
        assert isinstance(first, JobFinished) and first.job == _job(7, attempt=2).ref
        assert again == first  # the same result, not a second run
        assert isinstance(eighth, JobFinished) and eighth.job.job_id == 8  # stale: nothing
        assert isinstance(ninth, JobFailed) and ninth.error.type == "IntegrityError"
        assert isinstance(tenth, JobFinished) and tenth.job.job_id == 10
        bus.publish(topics.control(worker), EventAck(jobs=[first.job]))
        bus.publish(topics.jobs(worker), _job(7, attempt=2))
        rerun = decode(topics.events(worker), events.wait(5)[-1][1])[1]
        assert isinstance(rerun, JobFinished) and rerun.job == first.job
        assert rerun.finished_at >= first.finished_at
    finally:
        bus.stop()
    stats = fleet.stats
    assert (stats.duplicates, stats.stale, stats.failed, stats.jobs, stats.errors) == (
        1,
        1,
        1,
        5,
        0,
    )
