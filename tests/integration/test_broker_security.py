"""Identities, ACL and TLS on a real mosquitto, with real Bus clients.

Passwords, the ACL and certificates are generated per test into the broker's data dir
(the broker drops from root to user `mosquitto`, which must reach them).

A denial is proved with a marker: once the broker is done with the denied publish, a
message the receiver IS allowed to get is sent; once it is in, anything sent before it
would be in too. mosquitto 2.0.11 answers a denied v5 publish with PUBACK 0x87 and then
drops the publisher's connection (the PUBACK can be lost with it), so the dropped
connection is the sign the broker is done. mosquitto 2.0 grants every SUBSCRIBE under an
ACL and filters at delivery: receivers subscribe to `flotta/#` and still get only what
they may read.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import MessageRecorder, wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.broker.tls import TlsFiles, generate_tls
from flotta_mqtt.protocol import topics
from flotta_mqtt.transport import BusError
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings

pytestmark = pytest.mark.integration

SPEC = IdentitySpec(
    scheduler="scheduler",
    workers=["node-1", "node-2"],
    workbenches=["alice"],
    dashboards=["dash"],
)
EVERYTHING = "flotta/#"


def _noop(topic: str, payload: bytes) -> None:
    pass


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A broker data dir the test owns; LocalBroker opens it to user `mosquitto`."""
    path = Path(tempfile.mkdtemp(prefix="flotta-secure-broker-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def identities(data_dir: Path) -> Identities:
    return generate_identities(SPEC, data_dir / "identities")


@pytest.fixture
def tls_files(data_dir: Path) -> TlsFiles:
    return generate_tls(data_dir / "tls", clients=["node-1"])


@pytest.fixture
def secure_broker(data_dir: Path, identities: Identities) -> Iterator[LocalBroker]:
    with LocalBroker(
        data_dir=data_dir, password_file=identities.password_file, acl_file=identities.acl_file
    ) as local:
        yield local


Connect = Callable[..., Bus]


@pytest.fixture
def connect(secure_broker: LocalBroker, identities: Identities) -> Iterator[Connect]:
    """connect(node, on_message, subscriptions): a started Bus with that node's identity."""
    made: list[Bus] = []

    def make(
        node: str,
        on_message: Callable[[str, bytes], None] = _noop,
        subs: list[str] | None = None,
        reconnect_delay: tuple[int, int] = (1, 2),
    ) -> Bus:
        config = identities.broker_settings(node, secure_broker.url)
        config.reconnect_delay_min, config.reconnect_delay_max = reconnect_delay
        bus = Bus(f"{node}-{uuid.uuid4().hex[:6]}", config, on_message, subs or [], clean=True)
        made.append(bus)
        return bus.start(wait=10)

    yield make
    for bus in made:
        bus.stop()


def publish_settled(bus: Bus, topic: str, payload: bytes) -> None:
    """Publish what the ACL allows and wait for the broker's PUBACK."""
    bus.publish_raw(topic, payload)
    assert bus.flush(timeout=10), f"no PUBACK for {topic}"


def denied(connect: Connect, node: str, topic: str, payload: bytes) -> None:
    """Publish as `node` on a connection of its own; return once the broker refused it.

    The broker drops the connection after a denied publish: waiting for that drop (the
    Bus waits 10 s before reconnecting) is waiting for the broker to be done with it.
    The bus is then killed (no reconnect, no re-sending of the refused message) on a
    thread of its own: paho's network thread, sleeping out the reconnect delay, takes up
    to a second to notice. `connect`'s teardown stops the bus, which waits for the kill.
    """
    bus = connect(node, reconnect_delay=(10, 10))
    bus.publish_raw(topic, payload)
    wait_for(
        lambda: not bus.connected.is_set(),
        message=f"{node} kept its connection after publishing on {topic}: was it allowed?",
    )
    threading.Thread(target=bus.kill, name=f"kill {bus.client_id}", daemon=True).start()


# --- authentication -------------------------------------------------------------------------


def test_a_wrong_password_or_no_identity_is_refused(
    secure_broker: LocalBroker, identities: Identities
) -> None:
    config = identities.broker_settings("node-1", secure_broker.url)
    config.password = "not-" + (config.password or "")
    with pytest.raises(BusError, match="refused"):
        Bus("node-1", config, _noop, []).start(wait=10)
    with pytest.raises(BusError, match="refused"):
        Bus("anonymous", BrokerSettings(url=secure_broker.url), _noop, []).start(wait=10)
    # A node's password does not open another node's identity.
    stolen = identities.broker_settings("node-1", secure_broker.url)
    stolen.username = "scheduler"
    with pytest.raises(BusError, match="refused"):
        Bus("scheduler", stolen, _noop, []).start(wait=10)


# --- workers ---------------------------------------------------------------------------------


def test_a_worker_reads_only_its_own_jobs(connect: Connect) -> None:
    spy = MessageRecorder()
    connect("node-1", spy, [EVERYTHING])
    node_2 = MessageRecorder()
    connect("node-2", node_2, [topics.worker_inbox("node-2")])
    scheduler = connect("scheduler")

    publish_settled(scheduler, topics.jobs("node-2"), b"job for node-2")
    publish_settled(scheduler, topics.control("node-2"), b"control for node-2")
    scheduler.publish_raw(topics.jobs("node-1"), b"marker for node-1")

    spy.wait_for(lambda msgs: (topics.jobs("node-1"), b"marker for node-1") in msgs)
    assert spy.messages == [(topics.jobs("node-1"), b"marker for node-1")]
    node_2.wait(2)  # it did reach its addressee
    assert node_2.payloads == [b"job for node-2", b"control for node-2"]


def test_a_worker_cannot_publish_jobs(connect: Connect) -> None:
    """Only the scheduler sends job-ready messages and control."""
    node_2 = MessageRecorder()
    connect("node-2", node_2, [EVERYTHING])
    scheduler = connect("scheduler")

    denied(connect, "node-1", topics.jobs("node-2"), b"forged job")
    denied(connect, "node-1", topics.control("node-2"), b"forged control")
    denied(connect, "node-1", topics.jobs("node-1"), b"a job to itself")
    scheduler.publish_raw(topics.jobs("node-2"), b"marker from the scheduler")

    node_2.wait_for(lambda msgs: b"marker from the scheduler" in [p for _, p in msgs])
    assert node_2.payloads == [b"marker from the scheduler"]


def test_a_worker_cannot_write_another_workers_events_or_presence(connect: Connect) -> None:
    scheduler = MessageRecorder()
    connect("scheduler", scheduler, [topics.ALL_EVENTS, topics.ALL_PRESENCE, topics.ALL_REQUESTS])

    denied(connect, "node-1", topics.events("node-2"), b"forged event")
    denied(connect, "node-1", topics.presence("node-2"), b"forged presence")
    denied(connect, "node-1", topics.submit("node-1"), b"forged request")
    connect("node-1").publish_raw(topics.events("node-1"), b"marker event")

    scheduler.wait_for(lambda msgs: b"marker event" in [p for _, p in msgs])
    assert scheduler.messages == [(topics.events("node-1"), b"marker event")]


def test_no_other_node_can_forge_or_read_a_nodes_claim(
    connect: Connect, secure_broker: LocalBroker, identities: Identities
) -> None:
    """A forged claim would lock a node out of its identity. Only the node writes its claim
    on sessions/NODE, and only its own probe (NODE.probe, its password) reads it."""
    claimed = Bus("node-2", identities.broker_settings("node-2", secure_broker.url), _noop, [])
    claimed.start(wait=10)

    def probe(node: str, received: MessageRecorder) -> Bus:
        settings = identities.broker_settings(node, secure_broker.url)
        settings.username = f"{node}.probe"
        bus = Bus(
            f"{node}.probe", settings, received, [topics.session("+")], clean=True, claim=False
        )
        return bus.start(wait=10)

    own, other = MessageRecorder(), MessageRecorder()
    own_probe, other_probe = probe("node-2", own), probe("node-1", other)
    [(topic, claim)] = own.wait(1)
    assert topic == topics.session("node-2") and b'"client":"node-2"' in claim

    denied(connect, "node-1", topics.session("node-2"), b"forged claim")
    denied(connect, "alice", topics.session("node-2"), b"forged claim")
    own_probe.publish_raw(topics.session("node-2"), b"marker")
    other_probe.publish_raw(topics.session("node-1"), b"marker")
    assert own.wait(2) == [(topics.session("node-2"), claim), (topics.session("node-2"), b"marker")]
    assert other.wait(1) == [(topics.session("node-1"), b"marker")]
    claimed.stop()


# --- workbenches and dashboards ---------------------------------------------------------------


def test_a_workbench_submits_and_reads_its_status_and_replies(connect: Connect) -> None:
    scheduler_inbox = MessageRecorder()
    scheduler = connect("scheduler", scheduler_inbox, [topics.ALL_REQUESTS])
    alice = MessageRecorder()
    workbench = connect("alice", alice, [topics.reply("alice"), topics.status("alice", "a1")])

    workbench.publish_raw(topics.submit("alice"), b"artifact a1")
    scheduler_inbox.wait(1)
    assert scheduler_inbox.messages == [(topics.submit("alice"), b"artifact a1")]

    scheduler.publish_raw(topics.status("alice", "a1"), b"a1 running", retain=True)
    publish_settled(scheduler, topics.reply("alice"), b"rejected something")
    workbench.publish_raw(topics.reply("alice"), b"sync marker")  # as the SDK's Client.sync does
    alice.wait_for(lambda msgs: b"sync marker" in [p for _, p in msgs])
    assert sorted(alice.payloads) == [b"a1 running", b"rejected something", b"sync marker"]


def test_a_workbench_cannot_submit_as_another_or_forge_statuses(connect: Connect) -> None:
    inbox = MessageRecorder()
    scheduler = connect("scheduler", inbox, [topics.ALL_REQUESTS])
    watcher = MessageRecorder()
    connect("dash", watcher, [EVERYTHING])
    node_1 = MessageRecorder()
    connect("node-1", node_1, [EVERYTHING])

    denied(connect, "alice", topics.submit("bob"), b"as bob")
    denied(connect, "alice", topics.status("alice", "a1"), b"forged status")
    denied(connect, "alice", topics.jobs("node-1"), b"forged job")
    connect("alice").publish_raw(topics.submit("alice"), b"marker request")
    scheduler.publish_raw(topics.status("alice", "a1"), b"marker status")
    scheduler.publish_raw(topics.jobs("node-1"), b"marker job")

    inbox.wait(1)
    assert inbox.messages == [(topics.submit("alice"), b"marker request")]
    assert watcher.wait(1) == [(topics.status("alice", "a1"), b"marker status")]
    assert node_1.wait(1) == [(topics.jobs("node-1"), b"marker job")]


def test_a_dashboard_reads_status_and_presence_but_cannot_submit(connect: Connect) -> None:
    dash = MessageRecorder()
    connect("dash", dash, [EVERYTHING])
    scheduler_inbox = MessageRecorder()
    scheduler = connect("scheduler", scheduler_inbox, [topics.ALL_REQUESTS])
    node_1 = connect("node-1")

    scheduler.publish_raw(topics.status("alice", "a1"), b"a1 done", retain=True)
    scheduler.publish_raw(topics.locks("alice", "a1"), b"a1 locks")
    node_1.publish_raw(topics.presence("node-1"), b"node-1 online", retain=True)
    dash.wait(3)
    assert sorted(dash.payloads) == [b"a1 done", b"a1 locks", b"node-1 online"]

    denied(connect, "dash", topics.submit("dash"), b"dashboard submit")
    denied(connect, "dash", topics.presence("dash"), b"dashboard presence")
    connect("alice").publish_raw(topics.submit("alice"), b"marker request")
    scheduler_inbox.wait(1)
    assert scheduler_inbox.messages == [(topics.submit("alice"), b"marker request")]
    # Each identity has one session (use_username_as_clientid): the second "dash" connection
    # in denied() took the first one's place, which then reconnected and got the retained
    # messages again. A retained marker reaches it either way.
    scheduler.publish_raw(topics.status("alice", "a1"), b"marker status", retain=True)
    dash.wait_for(lambda msgs: any(payload == b"marker status" for _, payload in msgs))
    assert b"dashboard presence" not in dash.payloads  # its own presence never came back


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_broker(
    data_dir: Path, identities: Identities, tls_files: TlsFiles
) -> Iterator[LocalBroker]:
    with LocalBroker(
        data_dir=data_dir,
        password_file=identities.password_file,
        acl_file=identities.acl_file,
        certfile=tls_files.cert_file,
        keyfile=tls_files.key_file,
    ) as local:
        yield local


def test_a_node_with_the_ca_connects_over_tls(
    tls_broker: LocalBroker, identities: Identities, tls_files: TlsFiles
) -> None:
    assert tls_broker.url.startswith("mqtts://127.0.0.1:")
    received = MessageRecorder()
    node = Bus(
        "node-1",
        identities.broker_settings("node-1", tls_broker.url, ca_file=tls_files.ca_file),
        received,
        [topics.worker_inbox("node-1")],
        clean=True,
    )
    scheduler = Bus(
        "scheduler",
        identities.broker_settings("scheduler", tls_broker.url, ca_file=tls_files.ca_file),
        _noop,
        [],
        clean=True,
    )
    try:
        node.start(wait=10)
        scheduler.start(wait=10)
        scheduler.publish_raw(topics.jobs("node-1"), b"job over tls")
        assert received.wait(1) == [(topics.jobs("node-1"), b"job over tls")]
    finally:
        node.stop()
        scheduler.stop()


@pytest.mark.parametrize("how", ["plain mqtt", "tls with the system CAs"])
def test_a_node_without_the_ca_is_refused(
    tls_broker: LocalBroker, identities: Identities, how: str
) -> None:
    url = tls_broker.url
    if how == "plain mqtt":
        url = url.replace("mqtts://", "mqtt://")
    config = identities.broker_settings("node-1", url)  # no ca_file
    config.reconnect_delay_min, config.reconnect_delay_max = 1, 1
    node = Bus("node-1", config, _noop, [], clean=True)
    with pytest.raises(BusError, match="no answer"):
        node.start(wait=3)
    assert not node.connected.is_set()


def test_client_certificates_can_stand_for_passwords(
    data_dir: Path, identities: Identities
) -> None:
    """With use_identity_as_username a certificate's CN is the username the ACL applies to."""
    tls_files = generate_tls(data_dir / "tls", clients=["node-1", "scheduler"])
    with LocalBroker(
        data_dir=data_dir,
        acl_file=identities.acl_file,
        cafile=tls_files.ca_file,
        certfile=tls_files.cert_file,
        keyfile=tls_files.key_file,
        use_identity_as_username=True,
    ) as broker:

        def config(client: str | None) -> BrokerSettings:
            cert, key = tls_files.clients[client] if client else (None, None)
            return BrokerSettings(
                url=broker.url,
                ca_file=str(tls_files.ca_file),
                cert_file=str(cert) if cert else None,
                key_file=str(key) if key else None,
                reconnect_delay_min=1,
                reconnect_delay_max=1,
            )

        received = MessageRecorder()
        node = Bus("node-1", config("node-1"), received, [EVERYTHING], clean=True)
        scheduler = Bus("scheduler", config("scheduler"), _noop, [], clean=True)
        try:
            node.start(wait=10)
            scheduler.start(wait=10)
            publish_settled(scheduler, topics.jobs("node-2"), b"job for node-2")
            scheduler.publish_raw(topics.jobs("node-1"), b"job for node-1")
            received.wait(1)
            assert received.messages == [(topics.jobs("node-1"), b"job for node-1")]
        finally:
            node.stop()
            scheduler.stop()

        with pytest.raises(BusError):
            Bus("no-certificate", config(None), _noop, [], clean=True).start(wait=3)


def test_a_node_cannot_take_over_another_nodes_session(
    secure_broker: LocalBroker, identities: Identities, connect: Connect
) -> None:
    """With identities, a session is named by the username, not the client id asked for."""
    inbox = MessageRecorder()
    node_2 = Bus(
        "node-2",
        identities.broker_settings("node-2", secure_broker.url),
        inbox,
        [topics.jobs("node-2")],
    ).start(wait=10)
    node_2.stop()  # offline, its persistent session kept by the broker
    publish_settled(connect("scheduler"), topics.jobs("node-2"), b"job for node-2")

    # node-1 asks for node-2's client id with its own valid password...
    impostor = Bus("node-2", identities.broker_settings("node-1", secure_broker.url), _noop, [])
    impostor.start(wait=10)
    impostor.stop()

    # ...and node-2 still finds its queued job when it comes back.
    back = Bus(
        "node-2",
        identities.broker_settings("node-2", secure_broker.url),
        inbox,
        [topics.jobs("node-2")],
    ).start(wait=10)
    try:
        inbox.wait_for(lambda msgs: (topics.jobs("node-2"), b"job for node-2") in msgs)
    finally:
        back.stop()
