"""Secure aggregation end to end: a scheduler and four worker processes on a real mosquitto,
one worker SIGKILLed mid-round, a spy subscribed to `flotta/#` (the test broker is
anonymous, so it reads every message), and every object the artifact left in the store
read afterwards. No site's sum, nor its exact fixed-point encoding, shows anywhere, alone
or as the difference of two numbers; the result is the sum over the sites whose masked
input came in, which are exactly the sites that did not drop out before it.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MessageRecorder, decoded, wait_for
from leaks import store_objects, unmasked

from flotta_mqtt import analytics as operations
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import (
    Artifact,
    Collect,
    Finalize,
    JobRole,
    JobState,
    Operation,
    Parallel,
    SecureAggregation,
)
from flotta_mqtt.protocol import JobFinished, JobReady, topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROJECT = "survey"
SITES = ("w0", "w1", "w2", "w3")  # bound in this order: each site's jobs in its rounds
VICTIM = "w2"
ROWS = (40, 70, 55, 110)
# Seconds a site may take over one round before it is left out: the victim's wait. A round's
# job took 10-50 ms here, the first round's included.
DROPOUT = 4.0
TIMEOUT = 60.0
SUM = Operation(name="sum", params={"column": "x"})


class Cluster:
    """The scheduler and the workers as processes, each logging to a file in `folder`."""

    def __init__(self, broker_url: str, folder: Path) -> None:
        self.broker_url, self.folder = broker_url, folder
        self.store = folder / "store"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTTA_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        rng = random.Random(19)
        self.data: dict[str, Path] = {}
        for site, rows in zip(SITES, ROWS, strict=True):
            path = folder / f"{site}.csv"
            path.write_text("x\n" + "".join(f"{rng.uniform(-20, 80)!r}\n" for _ in range(rows)))
            self.data[site] = path

    def start(self, name: str, args: list[str]) -> None:
        common = ["--broker", self.broker_url, "--storage", self.store.as_uri()]
        with (self.folder / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "flotta_mqtt.cli", *args, *common, "--log-level", "INFO"],
                cwd=self.folder,  # where the nodes keep their state and database
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye, nothing flushed; the broker publishes its last will."""
        self.processes[name].send_signal(signal.SIGKILL)

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def site_sum(self, site: str) -> float:
        """A site's sum exactly as its worker measures it (the same code, the same file)."""
        spec = operations.DatasetSpec.model_validate(
            {"paths": [self.data[site]], "privacy": {"exact": True}}
        )
        data = operations.FileDataset(PROJECT, site, spec)
        definition, params = operations.lookup(SUM)
        ready = JobReady(
            artifact_id="oracle",
            job_id=0,
            attempt=1,
            project=PROJECT,
            seed=0,
            step="0",
            kind="parallel",
            role=JobRole.LOCAL,
            iteration=0,
            operation=SUM,
        )
        ctx = operations.JobContext(job=ready, node=site, inputs=[], data=data)
        return float(definition.measure(params, ctx)[0])  # type: ignore[attr-defined]


@pytest.fixture
def cluster(broker: LocalBroker, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(broker.url, tmp_path)
    config = tmp_path / "scheduler.yaml"
    config.write_text("worker_grace: 10\n")
    try:
        running.start("scheduler", ["scheduler", "--config", str(config)])
        for site in SITES:
            # The site answers exactly (its policy's choice); the sum is what is checked.
            dataset = {"paths": [str(running.data[site])], "privacy": {"exact": True}}
            worker = tmp_path / f"{site}.yaml"
            worker.write_text(json.dumps({"datasets": {PROJECT: dataset}}))  # JSON is YAML
            running.start(site, ["worker", "--config", str(worker), "--name", site])
        yield running
    finally:
        running.close()


class Spy(MessageRecorder):
    """Records every message; SIGKILLs the victim the moment it reports its shares dealt,
    so that it is gone before its masked input is asked for."""

    def __init__(self, cluster: Cluster, share_job: int) -> None:
        super().__init__()
        self.cluster, self.share_job = cluster, share_job
        self.killed = threading.Event()

    def __call__(self, topic: str, payload: bytes) -> None:
        if not self.killed.is_set() and topic == topics.events(VICTIM):
            for _, message in decoded([(topic, payload)]):
                if isinstance(message, JobFinished) and message.job.job_id == self.share_job:
                    self.cluster.kill(VICTIM)
                    self.killed.set()
        super().__call__(topic, payload)


def test_a_secure_sum_with_a_site_killed_mid_round_reveals_no_site_and_sums_the_rest(
    cluster: Cluster, broker: LocalBroker
) -> None:
    settings = BrokerSettings(url=broker.url)
    step = Parallel(SUM, Collect(), secure=SecureAggregation(threshold=3, dropout=DROPOUT))
    artifact = Artifact(project=PROJECT, steps=[step, Finalize(SUM)])
    # Jobs in binding order: keys w0..w3, shares w0..w3, masked inputs, reveals, then the
    # initiator's unmasking and the Finalize.
    rounds = {
        name: {site: 4 * r + i for i, site in enumerate(SITES)}
        for r, name in enumerate(("keys", "share", "mask", "reveal"))
    }
    spy = Spy(cluster, rounds["share"][VICTIM])
    bus = Bus("spy", settings, spy, ["flotta/#"], clean=True)
    bus.start(wait=TIMEOUT)
    storage = StorageSettings(url=cluster.store.as_uri())
    with Client(settings, storage=storage, resend_interval=1.0) as client:
        wait_for(  # and the scheduler: a submission before it listens waits for a re-send
            lambda: (
                {*SITES, "scheduler.initiator"}
                <= {p.node for p in client.workers(timeout=TIMEOUT) if p.online}
            ),
            timeout=TIMEOUT,
            message="the workers never came online",
        )
        handle = client.submit(artifact)
        got = handle.result(timeout=TIMEOUT + DROPOUT)
        status = handle.status()
    bus.stop()
    assert spy.killed.is_set()

    # What the result covers: the sites whose masked input came in; the victim dropped out
    # of the round at its masked input, and its later round with it.
    assert status is not None and status.jobs is not None
    jobs = {job.id: job for job in status.jobs}
    dropped = {rounds[r][VICTIM] for r in ("mask", "reveal")}
    for job_id in dropped:
        assert jobs[job_id].state is JobState.CANCELLED
        assert (jobs[job_id].error or "").startswith("DroppedOut: w2 did not finish job")
    assert all(jobs[j].state is JobState.COMPLETED for j in jobs if j not in dropped)
    sums = {site: cluster.site_sum(site) for site in SITES}
    survivors = [site for site in SITES if site != VICTIM]
    assert got == math.fsum(sums[site] for site in survivors)  # exact, rounded once
    assert not math.isclose(got, math.fsum(sums.values()))

    # Every message and every object: no site's sum in plain, as a number, in the ring's
    # fixed point, nor as the difference of two numbers found there.
    objects = store_objects(cluster.store, artifact.id)
    # Every product of every round is read: the survivors' masked inputs and reveals too
    # (the sum and the result, small, travel inline in their messages, read there).
    assert len(objects) == 4 * len(SITES) - 2
    leaks = unmasked([*objects.values(), *spy.payloads], dict(sums))
    assert leaks == [], leaks
    assert len(spy.messages) > 50  # the spy did read the round's traffic
