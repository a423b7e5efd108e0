"""Processes crash mid-artifact: a worker is SIGKILLed mid-job, or with a finished result it
could not send yet; the broker is restarted (gracefully, and SIGKILLed) while jobs run
and wait. Real node processes on a real mosquitto with persistence on; on loopback, but
for the worker whose result is held back by a link down (in its own namespace).

What must hold: the artifact completes with the exact result, and nothing is lost or done
twice in a way a user can see (ledgers of every execution; attempts in the scheduler's
database).
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from cluster import (
    INITIATOR,
    TIMEOUT,
    WORKERS,
    Cluster,
    Observer,
    Stopwatch,
    completed,
    count_example,
    gated,
    wait_status,
)
from netns import Netns

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import ArtifactHandle
from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.protocol import topics

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def started_everywhere(cluster: Cluster, handle: ArtifactHandle) -> None:
    cluster.wait(
        lambda: {node for node, _, _ in cluster.ledger_lines(handle.artifact_id)} == set(WORKERS),
        f"the workers never all started their jobs (status: {handle.status()})",
    )


def runs(cluster: Cluster, artifact_id: str) -> Counter[tuple[str, int, str]]:
    """How many times each (node, job) started and ended, from the ledger."""
    return Counter(cluster.ledger_lines(artifact_id))


@pytest.mark.parametrize("journal", ["kept", "lost"], ids=["journal-kept", "journal-lost"])
def test_worker_killed_mid_job_gets_it_again_when_restarted(
    cluster: Cluster, broker: LocalBroker, tmp_path: Path, journal: str
) -> None:
    """SIGKILL w1 while its job runs; the others finish; restart w1 under the same name,
    with its journal (the same state_dir) or without it (a fresh one: a new machine).

    By policy a job bound to a worker's data waits for that worker: it is never moved to
    another node (its data is not there) and is not failed for the worker being away. So
    the scheduler keeps the job at attempt 1 and, when w1's presence comes back online,
    sends it again; a w1 that kept its journal also finds the job there. Either way w1 runs
    it once more (the killed run left a `start` and no `end`), and the result is exact.
    """
    clock = Stopwatch(f"SIGKILL worker mid-job (journal {journal})")
    w1_state = tmp_path / "w1.state"
    with (
        Observer(broker.url, [topics.ALL_PRESENCE], cluster.logs) as watch,
        cluster.client() as client,
    ):
        cluster.scheduler()
        for name in WORKERS:
            cluster.worker(name)
        watch.wait_presence([*WORKERS, INITIATOR], online=True)
        handle = client.submit(gated(cluster))
        started_everywhere(cluster, handle)
        clock.lap("jobs running")

        mark = watch.mark()
        cluster.kill("w1")
        clock.lap("w1 killed")
        watch.wait_presence(["w1"], online=False, since=mark)  # its last will
        clock.lap("w1's will seen")

        cluster.flag.touch()
        status = wait_status(cluster, handle, lambda s: completed(s) == 2, "ran w0's and w2's jobs")
        assert status.state is ArtifactState.RUNNING  # w1's job and the Finalize wait
        clock.lap("w0, w2 done; w1's job waits")

        cluster.worker("w1", state_dir=w1_state if journal == "kept" else tmp_path / "w1.new")
        assert cluster.result(handle, TIMEOUT) == len(WORKERS)
        clock.lap("artifact completed")
    print(clock.report())

    cluster.stop("scheduler")
    rows = cluster.job_rows(handle.artifact_id)
    assert all(state == JobState.COMPLETED and attempt == 1 for _, _, state, attempt in rows), rows
    w1_job = next(job for job, worker, _, _ in rows if worker == "w1")
    counts = runs(cluster, handle.artifact_id)
    expected = Counter({(w, j, "start"): 1 for j, w, _, _ in rows if w in WORKERS})
    expected.update({(w, j, "end"): 1 for j, w, _, _ in rows if w in WORKERS})
    expected[("w1", w1_job, "start")] = 2  # the killed run, then the one that finished
    assert counts == expected


def journaled_results(journal: Path) -> int:
    """Results a worker's journal holds, not yet acknowledged by the scheduler."""
    if not journal.exists():
        return 0
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        count: int = db.execute("SELECT count(*) FROM jobs WHERE final IS NOT NULL").fetchone()[0]
    return count


def test_worker_killed_with_an_unsent_result_sends_it_after_restarting(
    netns: Netns, ns_broker: LocalBroker, ns_cluster: Cluster
) -> None:
    """w2 (in its namespace) finishes its job while its link is down, so the result is in
    its journal and nowhere else; then w2 is SIGKILLed, the link comes back and w2 starts
    again with the same state_dir. The journal re-sends the result: the artifact completes
    and w2's job is not run a second time."""
    cluster = ns_cluster
    clock = Stopwatch("SIGKILL worker holding an unsent result")
    journal = cluster.folder / "w2.state" / "journal.db"
    w2_url = netns.url(ns_broker.port)
    watch = Observer(ns_broker.url, [topics.ALL_PRESENCE], cluster.logs)
    with watch, cluster.client() as client:
        cluster.scheduler()
        cluster.worker("w0")
        cluster.worker("w1")
        cluster.worker("w2", netns=netns, url=w2_url, keepalive=2)
        watch.wait_presence([*WORKERS, INITIATOR], online=True)
        handle = client.submit(gated(cluster))
        running = JobState.RUNNING
        wait_status(cluster, handle, lambda s: s.counts.get(running) == 3, "ran 3 jobs at once")

        mark = watch.mark()
        netns.link_down()
        watch.wait_presence(["w2"], online=False, since=mark)
        clock.lap("w2 cut off")
        cluster.flag.touch()
        cluster.wait(lambda: journaled_results(journal) == 1, "w2 never journaled its result")
        wait_status(cluster, handle, lambda s: completed(s) == 2, "ran w0's and w1's jobs")
        clock.lap("w2's result journaled, unsent")

        cluster.kill("w2")
        netns.link_up()
        cluster.worker("w2", netns=netns, url=w2_url, keepalive=2)
        clock.lap("w2 restarted")
        assert cluster.result(handle, TIMEOUT) == len(WORKERS)
        clock.lap("artifact completed")
        cluster.wait(lambda: journaled_results(journal) == 0, "w2's result never acknowledged")
    print(clock.report())

    cluster.stop("scheduler")
    rows = cluster.job_rows(handle.artifact_id)
    assert all(state == JobState.COMPLETED and attempt == 1 for _, _, state, attempt in rows), rows
    expected = Counter(
        (w, j, what) for j, w, _, _ in rows if w in WORKERS for what in ("start", "end")
    )
    assert runs(cluster, handle.artifact_id) == expected, "w2's job ran again"


@pytest.mark.parametrize("how", ["graceful", "sigkill", "sigkill-state-lost"])
def test_broker_restarted_mid_artifact(cluster: Cluster, broker: LocalBroker, how: str) -> None:
    """Restart mosquitto (persistence on) while results are flowing: artifact A's jobs run
    on every worker (held by the flag) and artifact B's count jobs wait behind them
    (max_jobs 1); the flag is set and, as soon as the first job has ended, the broker
    goes down and comes back on the same port and data directory:
    - graceful: `broker.restart()`, SIGTERM: it saves its state and restores it;
    - sigkill: `broker.restart(kill=True)` after at least one autosave (every 5 s): it
      comes back with a stale snapshot, so it has lost what was PUBACKed since, and
      redelivers what it had queued then and has delivered since;
    - sigkill-state-lost: SIGKILL and its snapshot deleted before it starts again, as
      if it died before any autosave or lost its disk: no session, no queued message, no
      retained presence or status survives.

    Application-level acknowledgement and re-sending (workers re-send results until the
    scheduler acknowledges them, the scheduler re-sends dispatches until workers answer,
    the workbench re-submits until it sees a status, nodes re-publish their presence on
    reconnecting) must cover whatever was lost, and idempotent handling must absorb
    whatever comes twice.
    """
    snapshot = broker.data_dir / "mosquitto.db"
    clock = Stopwatch(f"broker restart ({how}) mid-artifact")
    with (
        Observer(broker.url, [topics.ALL_PRESENCE], cluster.logs) as watch,
        cluster.client() as client,
    ):
        cluster.scheduler()
        for name in WORKERS:
            cluster.worker(name, max_jobs=1)
        watch.wait_presence([*WORKERS, INITIATOR], online=True)
        a = client.submit(gated(cluster))
        started_everywhere(cluster, a)
        b = client.submit(count_example())
        wait_status(cluster, b, lambda s: s.state is ArtifactState.RUNNING, "was dispatched")
        clock.lap("A running, B queued")
        if how == "sigkill":
            cluster.wait(snapshot.exists, "mosquitto never autosaved")
            clock.lap("autosaved")

        cluster.flag.touch()
        cluster.wait(
            lambda: any(what == "end" for _, _, what in cluster.ledger_lines(a.artifact_id)),
            "no job of A ended",
        )
        clock.lap("first job ended")
        began = time.monotonic()
        if how == "sigkill-state-lost":
            broker.stop(kill=True)
            snapshot.unlink(missing_ok=True)
            broker.start()
        else:
            broker.restart(kill=how == "sigkill")
        clock.lap(f"broker back ({time.monotonic() - began:.2f}s down)")

        assert cluster.result(a, TIMEOUT) == len(WORKERS)
        clock.lap("A completed")
        assert cluster.result(b, TIMEOUT) == cluster.expected_count()
        clock.lap("B completed")
    print(clock.report())

    cluster.stop("scheduler")
    for artifact_id in (a.artifact_id, b.artifact_id):
        rows = cluster.job_rows(artifact_id)
        assert all(s == JobState.COMPLETED for _, _, s, _ in rows), rows
        assert all(attempt == 1 for _, w, _, attempt in rows if w != INITIATOR), rows
    expected = Counter(
        (w, j, what)
        for j, w, _, _ in cluster.job_rows(a.artifact_id)
        if w in WORKERS
        for what in ("start", "end")
    )
    assert runs(cluster, a.artifact_id) == expected, "a job of A ran twice or never"
