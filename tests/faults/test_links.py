"""A worker's network link fails: it goes down (pending job, running job), or turns lossy and
slow. Real processes, real mosquitto, a real kernel network namespace for the worker.

Layout: the scheduler, w0 and w1 run on the host and reach the broker on loopback; w2
runs in its own namespace (`ip netns exec`) and reaches the broker across a veth pair
(or through the delay proxy), with keepalive 2 so an outage longer than 3 s is one the
broker notices. The test waits for what the system says — the broker publishing w2's
last will ("offline"), jobs dispatched to w2, statuses — never for a fixed time.

What must hold: the artifact completes with the exact result, and no job ran twice (the
`once` / `faults.gated` ledgers have one line per job; the scheduler's database shows
attempt 1 for every worker job: a data-bound job waits for its worker, it is not moved).
"""

from __future__ import annotations

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
    once_parallel,
    once_rounds,
    wait_status,
)
from netns import Netns
from proxy import DelayProxy

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.protocol import JobFinished, topics

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SLOW = 60.0  # waits over a lossy, slow link


def start(cluster: Cluster, observer: Observer, w2_url: str, netns: Netns) -> None:
    """The scheduler, w0 and w1 on the host; w2 in `netns`, reaching the broker at `w2_url`."""
    cluster.scheduler()
    cluster.worker("w0")
    cluster.worker("w1")
    cluster.worker("w2", netns=netns, url=w2_url, keepalive=2)
    observer.wait_presence([*WORKERS, INITIATOR], online=True)


def assert_ran_once(cluster: Cluster, artifact_id: str, lines_per_job: int = 1) -> None:
    """Every worker job of the artifact: completed at attempt 1, in the ledger once."""
    rows = cluster.job_rows(artifact_id)
    assert all(state == JobState.COMPLETED for _, _, state, _ in rows), rows
    local = {job: worker for job, worker, _, _ in rows if worker != INITIATOR}
    assert all(attempt == 1 for job, _, _, attempt in rows if job in local), rows
    lines = cluster.ledger_lines(artifact_id)
    assert sorted((job, node) for node, job, _ in lines) == sorted(
        (job, worker) for job, worker in local.items() for _ in range(lines_per_job)
    ), f"a worker job ran twice or never: {lines}"


def test_link_down_while_a_job_is_pending(
    netns: Netns, ns_broker: LocalBroker, ns_cluster: Cluster
) -> None:
    """w2's link is down (past keepalive: the broker has published its will) when two
    artifacts are submitted; their w2 jobs wait in w2's persistent session. Link up: w2
    reconnects, gets them, and both artifacts complete exactly."""
    cluster = ns_cluster
    clock = Stopwatch("link down, job pending")
    subscriptions = [topics.ALL_PRESENCE, topics.jobs("w2")]
    with Observer(ns_broker.url, subscriptions, cluster.logs) as watch, cluster.client() as client:
        start(cluster, watch, netns.url(ns_broker.port), netns)
        clock.lap("nodes online")

        mark = watch.mark()
        netns.link_down()
        clock.lap("link down")
        watch.wait_presence(["w2"], online=False, since=mark)  # the broker gave up on w2
        clock.lap("w2's will seen")

        count = client.submit(count_example())
        once = client.submit(once_parallel(cluster))
        wanted = {count.artifact_id, once.artifact_id}
        cluster.wait(
            lambda: {job.artifact_id for job in watch.dispatches("w2", mark)} >= wanted,
            "the scheduler never dispatched w2's jobs",
        )
        for handle in (count, once):  # w0's and w1's jobs done; w2's and the Finalize wait
            status = wait_status(
                cluster, handle, lambda s: completed(s) == 2, "ran w0's and w1's jobs"
            )
            assert status.state is ArtifactState.RUNNING and status.total == 4
        clock.lap("w2's jobs pending")

        netns.link_up()
        clock.lap("link up")
        assert cluster.result(count, TIMEOUT) == cluster.expected_count()
        clock.lap("count completed")
        assert cluster.result(once, TIMEOUT) == len(WORKERS)
        clock.lap("once completed")
    print(clock.report())

    cluster.stop("scheduler")  # its database, closed, is the record of attempts
    assert_ran_once(cluster, once.artifact_id)
    rows = cluster.job_rows(count.artifact_id)
    assert [(w, s, a) for _, w, s, a in rows if w != INITIATOR] == [
        (w, JobState.COMPLETED, 1) for w in WORKERS
    ]


def test_link_down_while_a_job_runs(
    netns: Netns, ns_broker: LocalBroker, ns_cluster: Cluster
) -> None:
    """w2's link goes down while its job runs; the job finishes while w2 is cut off, so
    its result waits in w2's outbox (journal + paho queue). Link up: w2 reconnects and
    re-sends it, the artifact completes, and the job ran once."""
    cluster = ns_cluster
    clock = Stopwatch("link down, job running")
    subscriptions = [topics.ALL_PRESENCE, topics.events("w2")]
    with Observer(ns_broker.url, subscriptions, cluster.logs) as watch, cluster.client() as client:
        start(cluster, watch, netns.url(ns_broker.port), netns)
        handle = client.submit(gated(cluster))
        # Running as the scheduler sees it: each worker's JobStarted has crossed the link.
        running = JobState.RUNNING
        wait_status(cluster, handle, lambda s: s.counts.get(running) == 3, "ran 3 jobs at once")
        clock.lap("jobs running")

        mark = watch.mark()
        netns.link_down()
        clock.lap("link down")
        watch.wait_presence(["w2"], online=False, since=mark)
        clock.lap("w2's will seen")

        cluster.flag.touch()  # every job may finish now; w2's result cannot get out
        cluster.wait(
            lambda: ("w2", "end") in {(n, w) for n, _, w in cluster.ledger_lines()},
            "w2's job never finished",
        )
        status = wait_status(cluster, handle, lambda s: completed(s) == 2, "ran w0's and w1's jobs")
        assert status.state is ArtifactState.RUNNING
        assert status.counts.get(JobState.RUNNING) == 1  # w2's, as far as the scheduler knows
        clock.lap("w2 finished offline")

        netns.link_up()
        clock.lap("link up")
        assert cluster.result(handle, TIMEOUT) == len(WORKERS)
        clock.lap("artifact completed")
        finished = [m for m in watch.decoded(mark) if isinstance(m, JobFinished)]
        assert finished, "w2's result never crossed the link"
    print(clock.report())

    cluster.stop("scheduler")
    assert_ran_once(cluster, handle.artifact_id, lines_per_job=2)  # a start and an end each


def test_lossy_slow_link(netns: Netns, broker: LocalBroker, cluster: Cluster) -> None:
    """w2's link drops 5% of packets each way (nftables in its namespace) and delays every
    chunk by 100 ms each way (the proxy w2 connects through: 200 ms more per round trip).
    The seed's count example and a chain of `once` rounds through w2 complete exactly."""
    clock = Stopwatch("5% loss + 100 ms delay")
    with (
        DelayProxy((netns.host_address, 0), ("127.0.0.1", broker.port), delay=0.1) as proxy,
        Observer(broker.url, [topics.ALL_PRESENCE], cluster.logs) as watch,
        cluster.client() as client,
    ):
        netns.loss(5)
        start(cluster, watch, netns.url(proxy.address[1]), netns)
        clock.lap("nodes online")

        count = client.submit(count_example())
        rounds = 10  # 50 jobs one after another, 10 of them across the bad link
        chain = client.submit(once_rounds(cluster, rounds))
        assert cluster.result(count, SLOW) == cluster.expected_count()
        clock.lap("count completed")
        assert cluster.result(chain, SLOW) == rounds * len(WORKERS)
        clock.lap(f"{rounds} rounds completed")
        dropped = netns.dropped()
        cluster.close()  # before the proxy goes: w2 says goodbye through it
    print(clock.report(), f"dropped {dropped} packets, proxied {proxy.stats}")
    assert dropped > 0, "the loss rules dropped nothing: the link was not lossy"
    assert proxy.stats.connections >= 1, "w2 did not go through the delay proxy"
    assert_ran_once(cluster, chain.artifact_id)
