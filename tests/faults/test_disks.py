"""Full disks under real node processes: a worker's journal, the scheduler's database,
each on a small tmpfs of its own (disks.py) filled to the last byte while work flows,
then freed. Real mosquitto, real SQLite, nothing patched.

What must hold: no acknowledged job or result is lost, nothing runs twice, the node
says what is wrong while it is wrong (a worker in its presence, the scheduler in its
answers to submissions) and takes up again by itself once there is room. A node whose
store cannot be opened at all (a read-only disk) refuses to start, saying why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import (
    INITIATOR,
    TIMEOUT,
    WORKERS,
    Cluster,
    Observer,
    Stopwatch,
    gated,
    once_parallel,
    wait_status,
)
from disks import SmallDisk

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.cli.errors import INVALID
from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.protocol import JobAccepted, NodePresence, topics
from flotta_mqtt.scheduler.sqlite_repository import SqliteRepository
from flotta_mqtt.worker.journal import Journal

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FULL = "database or disk is full"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with SmallDisk(tmp_path / "small-disk") as disk:
        yield disk


def faults(watch: Observer, node: str, since: int = 0) -> list[str | None]:
    """The `fault` label of each online presence of `node` since `since`, in order."""
    return [
        m.labels.get("fault")
        for m in watch.decoded(since)
        if isinstance(m, NodePresence) and m.node == node and m.online
    ]


def ran(cluster: Cluster, artifact_id: str) -> Counter[tuple[str, int, str]]:
    return Counter(cluster.ledger_lines(artifact_id))


def test_a_worker_whose_journal_disk_fills_pauses_says_so_and_runs_every_job_once(
    small_disk: SmallDisk, cluster: Cluster, broker: LocalBroker
) -> None:
    """w0's journal is on the small disk, filled while artifacts arrive: w0 says
    "journal: database or disk is full" in its presence, takes no new job (it answers a
    re-sent one as held, and does not run it), and acknowledges nothing to the broker.
    Freed, it journals what it held, runs what waited, and clears the fault; every
    artifact completes with its exact result and every job ran exactly once."""
    clock = Stopwatch("worker journal disk full")
    subscriptions = [topics.ALL_PRESENCE, topics.events("w0")]
    with Observer(broker.url, subscriptions, cluster.logs) as watch, cluster.client() as client:
        cluster.scheduler()
        cluster.worker("w0", state_dir=small_disk.path / "w0.state")
        for name in WORKERS[1:]:
            cluster.worker(name)
        watch.wait_presence([*WORKERS, INITIATOR], online=True)
        before = client.submit(once_parallel(cluster))
        assert cluster.result(before) == len(WORKERS)
        clock.lap("one artifact before")

        small_disk.fill()
        mark = watch.mark()
        first = client.submit(once_parallel(cluster))
        watch.messages.wait_for(
            lambda _: f"journal: {FULL}" in faults(watch, "w0", mark), TIMEOUT, "no fault said"
        )
        clock.lap("w0 says its journal is full")
        waiting = client.submit(once_parallel(cluster))
        # The scheduler sends w0 its job again (it hears nothing of it): w0 answers that it
        # holds it, without running it.
        cluster.wait(
            lambda: any(
                isinstance(m, JobAccepted) and m.job.artifact_id == waiting.artifact_id
                for m in watch.decoded(mark)
            ),
            "w0 never answered the job it holds",
        )
        assert not [line for line in cluster.ledger_lines(waiting.artifact_id) if line[0] == "w0"]
        status = waiting.status()
        assert status is not None and status.state is ArtifactState.RUNNING
        clock.lap("w0 holds a job without running it")

        small_disk.free()
        for handle in (first, waiting):
            assert cluster.result(handle) == len(WORKERS)
        watch.messages.wait_for(
            lambda _: faults(watch, "w0", mark)[-1:] == [None], TIMEOUT, "the fault stayed"
        )
        clock.lap("freed: both completed, the fault cleared")
    print(clock.report())

    cluster.stop("scheduler")
    for handle in (before, first, waiting):
        rows = cluster.job_rows(handle.artifact_id)
        assert all(state == JobState.COMPLETED and attempt == 1 for *_, state, attempt in rows)
        expected = Counter((w, job, "once") for job, w, _, _ in rows if w in WORKERS)
        assert ran(cluster, handle.artifact_id) == expected
    log = (cluster.folder / "w0.log").read_text()
    assert log.count("refused a write") == 1 and "the journal takes writes again" in log


def test_a_scheduler_whose_database_disk_fills_refuses_submissions_and_loses_no_result(
    small_disk: SmallDisk, cluster: Cluster, broker: LocalBroker
) -> None:
    """The scheduler's database is on the small disk, filled while every worker runs a
    job; then the jobs end and their results arrive. Nothing can be recorded: the results
    are neither recorded nor acknowledged (held), a submission is refused with the reason.
    Freed, the scheduler takes up by itself: the artifact completes with its exact result,
    no job ran twice, and the refused artifact, sent again, runs."""
    clock = Stopwatch("scheduler database disk full")
    cluster.database = small_disk.path / "scheduler.db"
    with (
        Observer(broker.url, [topics.ALL_PRESENCE], cluster.logs) as watch,
        cluster.client() as client,
    ):
        cluster.scheduler()
        for name in WORKERS:
            cluster.worker(name)
        watch.wait_presence([*WORKERS, INITIATOR], online=True)
        running = client.submit(gated(cluster))
        wait_status(
            cluster, running, lambda s: s.counts.get(JobState.RUNNING) == 3, "ran 3 jobs at once"
        )
        clock.lap("3 jobs running")

        small_disk.fill()
        cluster.flag.touch()  # the jobs end: their results cannot be recorded
        cluster.wait(
            lambda: len(cluster.ledger_lines(running.artifact_id)) == 6, "the jobs never ended"
        )
        refused_artifact = once_parallel(cluster)
        refused = client.submit(refused_artifact)
        cluster.wait(lambda: refused.refused() is not None, "the submission was not refused")
        rejection = refused.refused()
        assert rejection is not None and rejection.reason == "unavailable"
        assert f"the submission of {refused.artifact_id} was not recorded" in rejection.error
        assert FULL in rejection.error and "send it again later" in rejection.error
        status = running.status()
        assert status is not None and status.state is ArtifactState.RUNNING
        clock.lap("full: a submission refused, the results held")

        small_disk.free()
        assert cluster.result(running) == len(WORKERS)
        clock.lap("freed: the artifact completed")
        again = client.submit(refused_artifact)
        assert cluster.result(again) == len(WORKERS)
        clock.lap("the refused artifact, sent again, completed")
    print(clock.report())

    cluster.stop("scheduler")
    rows = cluster.job_rows(running.artifact_id)
    assert all(state == JobState.COMPLETED and attempt == 1 for *_, state, attempt in rows), rows
    expected = Counter(
        (w, j, what) for j, w, _, _ in rows if w in WORKERS for what in ("start", "end")
    )
    assert ran(cluster, running.artifact_id) == expected, "a job ran again"
    log = (cluster.folder / "scheduler.log").read_text()
    assert log.count("refused a write") == 1 and "takes writes again" in log


def test_nodes_whose_stores_are_on_a_read_only_disk_refuse_to_start(
    small_disk: SmallDisk, cluster: Cluster
) -> None:
    """A scheduler database and a worker journal made, then their disk remounted
    read-only: each node refuses to start, in one line naming its store and what to check,
    with exit code 2."""
    cluster.database = small_disk.path / "scheduler.db"
    SqliteRepository(cluster.database).close()
    Journal(small_disk.path / "w0.state").close()
    small_disk.read_only()
    cluster.scheduler()
    cluster.worker("w0", state_dir=small_disk.path / "w0.state")
    for name, store in [("scheduler", "scheduler database"), ("w0", "worker journal")]:
        assert cluster.processes[name].wait(timeout=TIMEOUT) == INVALID, cluster.logs()
        errors = [
            line
            for line in (cluster.folder / f"{name}.log").read_text().splitlines()
            if line.startswith("error:")
        ]
        assert len(errors) == 1, cluster.logs()
        assert f"cannot open the {store}" in errors[0], errors
        assert "unable to open database file" in errors[0], errors
        assert "writable" in errors[0], errors
