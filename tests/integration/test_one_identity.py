"""One identity, one process, against a real mosquitto with generated identities and ACL.

A second process of a node's identity exits at once with one line and exit code 4, and the
first never notices (the broker's log counts its connections); a node killed starts again
at once; one hung holds its identity until the broker drops it, and stops when it wakes;
one whose session a plain MQTT client steals stops rather than fight for it.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from helpers import MessageRecorder, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_cli_processes import STOPPED_WITHIN, TIMEOUT, cli, stopped

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.cli.demo import count_artifact
from flotta_mqtt.cli.errors import BROKER
from flotta_mqtt.client.client import Client
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import SessionClaim, encode, topics
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport import IdentityInUse
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.claims import FIGHT_LIMIT, PROBE_TIMEOUT
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

SPEC = IdentitySpec(scheduler="scheduler", workers=["w1"], workbenches=["alice"])
COUNTED = 7  # rows with x > 0.5: count_artifact's result (5 at least are released)
ROWS = "x\n" + "0.7\n" * COUNTED + "0.2\n" * 3
FEW_SECONDS = 10.0  # a second process's whole life, Python's start included, on a busy machine


@dataclass
class Deployment:
    broker: LocalBroker
    identities: Identities
    folder: Path

    def settings(self, node: str) -> BrokerSettings:
        return self.identities.broker_settings(node, self.broker.url)

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(url=(self.folder / "store").as_uri())

    def worker(self, state: str, *options: str) -> subprocess.Popen[str]:
        """`flotta-mqtt worker` as w1, with its journal in `state`: as on another machine."""
        data = self.folder / "w1.csv"
        data.write_text(ROWS)
        return cli(
            "worker",
            *("--name", "w1", "--data", f"demo={data}", "--exact", "demo"),  # counted exactly
            *("--state-dir", str(self.folder / state)),
            *("--broker", self.broker.url, "--username", "w1", "--storage", self.storage.url),
            *options,
            FLOTTA_PASSWORD=self.identities.credentials["w1"].password,
        )

    def scheduler(self, database: str) -> subprocess.Popen[str]:
        """`flotta-mqtt scheduler` (with its initiator) on its own database."""
        return cli(
            "scheduler",
            *("--database", str(self.folder / database), "--storage", self.storage.url),
            *("--broker", self.broker.url, "--username", "scheduler"),
            FLOTTA_PASSWORD=self.identities.credentials["scheduler"].password,
            FLOTTA_INITIATOR_PASSWORD=self.identities.credentials["scheduler.initiator"].password,
        )

    def scheduler_node(self) -> SchedulerNode:
        """A scheduler in this process, on the broker with its identities."""
        config = SchedulerConfig(
            broker=self.settings("scheduler"),
            initiator_broker=self.settings("scheduler.initiator"),
            storage=self.storage,
            database=self.folder / "here.db",
        )
        return SchedulerNode(config).start(wait=TIMEOUT)

    def client(self) -> Client:
        return Client(self.settings("alice"), storage=self.storage)

    def connections(self, name: str) -> int:
        """How many connections the broker has accepted as `name` (its log says each)."""
        return len(re.findall(rf" as {re.escape(name)} \(", self.broker.log_path.read_text()))


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    folder = Path(tempfile.mkdtemp(prefix="flotta-identity-"))
    identities = generate_identities(SPEC, folder / "identities")
    try:
        broker = LocalBroker(
            data_dir=folder, password_file=identities.password_file, acl_file=identities.acl_file
        )
        with broker:
            yield Deployment(broker, identities, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def online(client: Client, node: str, state: bool = True) -> None:
    """Wait until `node`'s retained presence says it is online (or offline)."""
    wait_for(
        lambda: any(p.node == node and p.online is state for p in client.workers()),
        timeout=TIMEOUT,
        interval=0.1,
        message=f"{node} never came {'online' if state else 'offline'}",
    )


def refused(process: subprocess.Popen[str]) -> str:
    """The one error line of a process that must exit with BROKER within FEW_SECONDS."""
    started = time.monotonic()
    try:
        _, err = process.communicate(timeout=FEW_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"a second process of the identity still ran after {FEW_SECONDS} s")
    assert process.returncode == BROKER, err
    assert time.monotonic() - started < FEW_SECONDS
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def exit_error(process: subprocess.Popen[str]) -> str:
    """The last line a node wrote before it exited with BROKER (its log comes before)."""
    code = stopped(process)
    err = process.communicate()[1]
    assert code == BROKER, err
    return err.splitlines()[-1]


# --- a second process -----------------------------------------------------------------------


def test_a_second_worker_exits_at_once_and_the_first_runs_on(deployment: Deployment) -> None:
    scheduler = deployment.scheduler_node()
    first = deployment.worker("w1-first")
    try:
        with deployment.client() as client:
            online(client, "w1")
            line = refused(deployment.worker("w1-second"))
            assert line.startswith(
                f"error: broker identity w1 is already connected: process {first.pid} on "
            )
            assert "within 30 s (2 of its keepalives)" in line
            assert client.submit(count_artifact()).result(timeout=TIMEOUT) == COUNTED
        assert first.poll() is None
        assert deployment.connections("w1") == 1  # the first never lost its session
        assert deployment.connections("w1.probe") == 2  # each process checked once
    finally:
        first.send_signal(signal.SIGTERM)
        assert stopped(first) == 0
        scheduler.stop()


def test_a_second_scheduler_exits_at_once_and_the_first_runs_on(deployment: Deployment) -> None:
    """Its initiator has an identity of its own: the two never find each other."""
    first = deployment.scheduler("first.db")
    worker = deployment.worker("w1")
    try:
        with deployment.client() as client:
            online(client, "w1")
            online(client, "scheduler.initiator")
            line = refused(deployment.scheduler("second.db"))
            assert line.startswith("error: broker identity scheduler is already connected: ")
            assert client.submit(count_artifact()).result(timeout=TIMEOUT) == COUNTED
        assert first.poll() is None
        for name in ("scheduler", "scheduler.initiator"):
            assert deployment.connections(name) == 1, name
    finally:
        for process in (worker, first):
            process.send_signal(signal.SIGTERM)
            assert stopped(process) == 0


def test_a_second_workbench_is_refused_and_the_first_still_syncs(deployment: Deployment) -> None:
    with deployment.client() as first:
        with pytest.raises(IdentityInUse, match="broker identity alice is already connected"):
            deployment.client()
        first.sync(timeout=5)
    with deployment.client() as again:  # the first's claim went with it
        again.sync(timeout=5)


# --- crashes and hangs ----------------------------------------------------------------------


@pytest.mark.parametrize("node", ["worker", "scheduler"])
def test_a_node_killed_starts_again_at_once(deployment: Deployment, node: str) -> None:
    """Its will tells the broker at once: the scheduler's clears its claim, the worker's
    presence is the will its claim names."""
    start = (
        (lambda: deployment.worker("w1"))
        if node == "worker"
        else (lambda: deployment.scheduler("s.db"))
    )
    watched = "w1" if node == "worker" else "scheduler.initiator"
    with deployment.client() as client:
        first = start()
        online(client, watched)
        first.kill()
        first.wait(timeout=STOPPED_WITHIN)
        online(client, watched, False)
        again = start()
        try:
            wait_for(
                lambda: deployment.connections(watched) == 2 or again.poll() is not None,
                timeout=TIMEOUT,
            )
            online(client, watched)
            assert again.poll() is None, again.communicate()[1]
        finally:
            again.send_signal(signal.SIGTERM)
            assert stopped(again) == 0


def test_a_hung_worker_holds_its_identity_until_the_broker_drops_it(
    deployment: Deployment,
) -> None:
    """Refused meanwhile, with how long to wait; woken after another took the identity,
    it stops with the error rather than take the session back."""
    config = deployment.folder / "keepalive.yaml"
    config.write_text("broker:\n  keepalive: 5\n")
    scheduler = deployment.scheduler_node()
    first = deployment.worker("w1-first", "--config", str(config))
    second = None
    with deployment.client() as client:
        online(client, "w1")
        first.send_signal(signal.SIGSTOP)
        try:
            line = refused(deployment.worker("w1-second", "--config", str(config)))
            assert "is already connected" in line and "within 10 s" in line
            online(client, "w1", False)  # the broker gave up on it: its will
            second = deployment.worker("w1-second", "--config", str(config))
            online(client, "w1")
        finally:
            first.send_signal(signal.SIGCONT)
        assert second is not None
        try:
            last = exit_error(first)
            assert last.startswith("error: broker identity w1 is already connected"), last
            assert second.poll() is None
            assert client.submit(count_artifact()).result(timeout=TIMEOUT) == COUNTED
            assert deployment.connections("w1") == 2  # the first never took it back
        finally:
            second.send_signal(signal.SIGTERM)
            assert stopped(second) == 0
            scheduler.stop()


def test_a_claim_is_refreshed_while_held_and_expires_when_left_behind(
    broker: LocalBroker,
) -> None:
    """A claim the broker kept while its process went (the broker crashed between) expires
    after 2 keepalives; one whose process is there is refreshed every keepalive."""
    settings = BrokerSettings(url=broker.url, keepalive=2)
    seen = MessageRecorder()
    Bus("watcher", settings, seen, [topics.session("w1")], claim=False).start()
    holder = Bus("w1", settings, lambda topic, payload: None, []).start()

    def claims(messages: list[tuple[str, bytes]]) -> int:
        return sum(b'"type":"claim"' in payload for _, payload in messages)

    seen.wait_for(lambda m: claims(m) >= 3, timeout=15)  # held 4 s: as long as it lives
    with pytest.raises(IdentityInUse):
        Bus("w1", settings, lambda topic, payload: None, []).check()
    holder.stop()

    left = SessionClaim(client="w1", session="f" * 32, host="gone", pid=1, since=1.0, keepalive=2)
    properties = Properties(PacketTypes.PUBLISH)
    properties.MessageExpiryInterval = 3
    crashed = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="crashed", protocol=mqtt.MQTTv5)
    crashed.connect("127.0.0.1", broker.port)
    crashed.loop_start()
    sent = crashed.publish(
        topics.session("w1"), encode(left), qos=1, retain=True, properties=properties
    )
    sent.wait_for_publish(timeout=5)
    crashed.disconnect()
    crashed.loop_stop()
    with pytest.raises(IdentityInUse, match="process 1 on gone holds it"):
        Bus("w1", settings, lambda topic, payload: None, []).check()

    def free() -> bool:
        try:
            Bus("w1", settings, lambda topic, payload: None, []).check()
        except IdentityInUse:
            return False
        return True

    wait_for(free, timeout=10, interval=0.5, message="the claim left behind never expired")


def test_a_node_started_before_its_broker_is_not_held_up_by_its_probe(
    broker: LocalBroker,
) -> None:
    """Its probe learns at once that nothing answers (not after PROBE_TIMEOUT), and the
    node connects as soon as the broker is up."""
    settings = BrokerSettings(url=broker.url)
    broker.stop()
    bus = Bus("w1", settings, lambda topic, payload: None, [])
    started = time.monotonic()
    bus.check()  # nothing to check against yet: no error
    assert time.monotonic() - started < PROBE_TIMEOUT / 2
    bus.start(wait=None)
    try:
        broker.start()
        wait_for(bus.connected.is_set, timeout=TIMEOUT, message="never connected")
    finally:
        bus.stop()


# --- a session taken over anyway ------------------------------------------------------------


def test_a_worker_whose_session_a_plain_client_steals_stops_rather_than_fight(
    deployment: Deployment,
) -> None:
    """mosquitto 2.0.11 says nothing to the connection it drops for another: the worker
    sees its sessions end as soon as they begin, and stops after FIGHT_LIMIT of them."""
    first = deployment.worker("w1")
    thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="w1", protocol=mqtt.MQTTv5)
    thief.username_pw_set("w1", deployment.identities.credentials["w1"].password)
    thief.reconnect_delay_set(1, 1)  # as eager as paho's default after a good connection
    stolen: list[object] = []
    thief.on_connect = lambda *args: stolen.append(args)
    try:
        with deployment.client() as client:
            online(client, "w1")
            thief.connect_async("127.0.0.1", deployment.broker.port)
            thief.loop_start()
            last = exit_error(first)
        assert last == (
            "error: broker identity w1 was taken over by another connection: stopped rather "
            f"than take it back: the broker closed its session {FIGHT_LIMIT} times in a row "
            "within 15 s of accepting it, as it does when another connection uses the same "
            "identity"
        )
        wait_for(thief.is_connected, message="the thief lost the session for good")
        # The worker's first session, then at most one per round it fought.
        assert deployment.connections("w1") - len(stolen) <= 1 + FIGHT_LIMIT
    finally:
        thief.disconnect()
        thief.loop_stop()


def test_identities_generated_before_claims_still_let_nodes_connect(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    """No probe identity, no right on sessions/: the check is skipped with a warning, and
    the claim the broker refuses (QoS 0) costs the node nothing."""
    passwords, acl = deployment.identities.password_file, deployment.identities.acl_file
    users = [line for line in passwords.read_text().splitlines() if ".probe:" not in line]
    passwords.write_text("\n".join(users) + "\n")
    blocks = acl.read_text().split("\n\n")
    old = [block for block in blocks if ".probe" not in block and "/sessions/" not in block]
    old += [b.replace("\ntopic write flotta/+/sessions/w1", "") for b in blocks if "user w1\n" in b]
    acl.write_text("\n\n".join(old) + "\n")
    assert "sessions" not in acl.read_text() and "user w1\n" in acl.read_text()
    deployment.broker.restart()
    with caplog.at_level(logging.WARNING):
        bus = Bus("w1", deployment.settings("w1"), lambda topic, payload: None, []).start()
    try:
        for n in range(3):  # acknowledged, on the one connection the broker ever accepted
            bus.publish_raw(topics.events("w1"), b"%d" % n)
            assert bus.flush(timeout=5)
        assert deployment.connections("w1") == 1 and bus.connected.is_set()
        assert "w1: cannot check that no other process uses this identity" in caplog.text
        assert "the broker refused its probe" in caplog.text
    finally:
        bus.stop()
