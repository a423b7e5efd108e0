"""The Bus against a real mosquitto: delivery, sessions, window, guards, auth, wills, reconnects.

Each test gets a fresh broker (conftest `broker`). Nothing waits by sleeping: tests wait on
MessageRecorder (a Condition), threading.Event, or the bounded `wait_for` poll. A negative
("nothing else arrived") is checked with a marker message sent after the event in question
on the same path: once the marker is in, anything sent before it would be in too.
"""

from __future__ import annotations

import logging
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import MessageRecorder, wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.protocol import (
    MAX_MESSAGE_BYTES,
    JobReady,
    NodePresence,
    ProtocolError,
    decode,
    encode,
    topics,
)
from flotta_mqtt.protocol.messages import CancelArtifact
from flotta_mqtt.transport import BusError, MessageHandler, Will
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings

pytestmark = pytest.mark.integration

BusFactory = Callable[..., Bus]


def _noop(topic: str, payload: bytes) -> None:
    pass


@pytest.fixture(params=[True, False], ids=["threaded", "pumped"])
def threaded(request: pytest.FixtureRequest) -> bool:
    """Both ways of driving a bus: paho's network thread, or a thread of ours pumping it."""
    return bool(request.param)


@pytest.fixture
def make_bus(broker_settings: BrokerSettings) -> Iterator[BusFactory]:
    """Build (not start) Buses on the test's broker; every one is stopped after the test.

    An unthreaded bus (`threaded=False`) gets a thread that pumps it, as a node's own
    thread would, until the test ends.
    """
    made: list[Bus] = []
    done = threading.Event()
    pumps: list[threading.Thread] = []

    def pump(bus: Bus) -> None:
        while not done.is_set():
            bus.pump(0.05)

    def make(
        client_id: str | None = None,
        on_message: MessageHandler = _noop,
        subscriptions: list[str] | None = None,
        settings: BrokerSettings | None = None,
        **kwargs: object,
    ) -> Bus:
        bus = Bus(
            client_id or f"test-{uuid.uuid4().hex[:8]}",
            settings or broker_settings,
            on_message,
            subscriptions or [],
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(bus)
        if not bus.threaded:
            pumps.append(threading.Thread(target=pump, args=(bus,), daemon=True))
            pumps[-1].start()
        return bus

    yield make
    done.set()
    for thread in pumps:
        thread.join(timeout=5)
    for bus in made:
        try:
            bus._client.disconnect()
            bus._client.loop_stop()
        except Exception:  # a killed bus has a closed socket; nothing to clean then
            pass


def job(n: int = 0, worker_artifact: str = "a1") -> JobReady:
    return JobReady(
        artifact_id=worker_artifact,
        job_id=n,
        attempt=1,
        project="proj",
        seed=7,
        step="count",
        kind="parallel",
        role="local",
        iteration=0,
        operation={"name": "count", "params": {"column": "x", "n": n}},
    )


def cancel(n: int) -> CancelArtifact:
    return CancelArtifact(artifact_id=f"art-{n}")


def presence(node: str, online: bool, how: str = "") -> NodePresence:
    return NodePresence(node=node, online=online, since=1.0, details={"how": how})


# --- delivery -----------------------------------------------------------------------------


def test_round_trip_delivers_the_exact_bytes(make_bus: BusFactory, threaded: bool) -> None:
    received = MessageRecorder()
    make_bus("worker-1", received, [topics.worker_inbox("worker-1")], threaded=threaded).start()
    publisher = make_bus("scheduler", threaded=threaded).start()

    message = job(3)
    publisher.publish(topics.jobs("worker-1"), message)

    [(topic, payload)] = received.wait(1)
    assert topic == topics.jobs("worker-1")
    assert payload == encode(message)
    address, decoded = decode(topic, payload)
    assert address == topics.Address(topics.Channel.JOBS, "worker-1")
    assert decoded == message
    assert publisher.flush(timeout=5)
    assert publisher.unacknowledged == 0


def test_nagle_is_off_and_a_qos1_round_trip_is_fast(make_bus: BusFactory) -> None:
    arrived = threading.Event()
    topic = topics.events("echo")
    bus = make_bus("echo", lambda t, p: arrived.set(), [topic]).start()

    sock = bus._client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    # Publish to itself and wait for the copy: PUBLISH → broker → PUBLISH back (+ acks).
    # With Nagle on either side the median is ~44-88 ms; without it, well under 1 ms.
    message = cancel(0)
    timings = []
    for _ in range(60):
        arrived.clear()
        start = time.perf_counter()
        bus.publish(topic, message)
        assert arrived.wait(5), "the echo did not arrive"
        timings.append(time.perf_counter() - start)
    median_ms = statistics.median(timings[10:]) * 1000
    assert median_ms < 20, f"QoS 1 round trip median {median_ms:.1f} ms: is Nagle on?"


# --- persistent sessions --------------------------------------------------------------------


def test_persistent_session_receives_everything_published_while_away(
    make_bus: BusFactory, threaded: bool
) -> None:
    topic = topics.jobs("w-away")
    first = make_bus("w-away", _noop, [topic], threaded=threaded).start()
    first.stop()

    publisher = make_bus("scheduler", threaded=threaded).start()
    sent = {encode(cancel(n)) for n in range(500)}
    for n in range(500):
        publisher.publish(topic, cancel(n))
    assert publisher.flush(timeout=10), "the broker did not acknowledge every publish"

    received = MessageRecorder()
    make_bus("w-away", received, [topic], threaded=threaded).start()
    received.wait_for(lambda msgs: {p for _, p in msgs} >= sent, message="500 queued messages")
    assert set(received.payloads) == sent
    assert len(sent) == 500


def test_session_expiry_is_sent_on_connect(
    make_bus: BusFactory, broker_settings: BrokerSettings
) -> None:
    settings = BrokerSettings(url=broker_settings.url, session_expiry=1)
    bus = make_bus("expiring", settings=settings).start()
    properties = bus._client._connect_properties
    assert properties is not None
    assert properties.SessionExpiryInterval == 1


def test_a_zero_session_expiry_keeps_nothing_while_away(
    make_bus: BusFactory, broker_settings: BrokerSettings
) -> None:
    """Clean start off with expiry 0 is no session at all: the contrast to the test above."""
    topic = topics.jobs("w-zero")
    settings = BrokerSettings(url=broker_settings.url, session_expiry=0)
    make_bus("w-zero", _noop, [topic], settings=settings).start().stop()

    publisher = make_bus("scheduler").start()
    publisher.publish(topic, cancel(1))
    assert publisher.flush(timeout=5)

    received = MessageRecorder()
    make_bus("w-zero", received, [topic], settings=settings).start()
    marker = cancel(2)
    publisher.publish(topic, marker)
    assert received.wait(1) == [(topic, encode(marker))]


def test_clean_session_reports_no_session_present(make_bus: BusFactory) -> None:
    present: list[bool] = []
    done = threading.Event()

    def on_connect(session_present: bool) -> None:
        present.append(session_present)
        done.set()

    make_bus("fresh", _noop, [topics.jobs("fresh")], clean=True, on_connect=on_connect).start()
    assert done.wait(5)
    assert present == [False]


# --- the publish window ---------------------------------------------------------------------


def test_window_blocks_while_the_broker_is_down_then_drains_after_restart(
    make_bus: BusFactory, broker: LocalBroker, broker_settings: BrokerSettings, threaded: bool
) -> None:
    topic = topics.jobs("w-window")
    received = MessageRecorder()
    subscriber = make_bus("w-window", received, [topic], threaded=threaded).start()
    settings = BrokerSettings(
        url=broker_settings.url, window=5, reconnect_delay_min=1, reconnect_delay_max=1
    )
    publisher = make_bus("scheduler", settings=settings, threaded=threaded).start()

    broker.stop()
    wait_for(lambda: not publisher.connected.is_set(), 10, "the publisher saw no disconnect")

    queued = [cancel(n) for n in range(5)]
    for message in queued:
        publisher.publish(topic, message, timeout=0.2)  # queued by paho: returns at once
    assert publisher.unacknowledged == 5
    started = time.monotonic()
    with pytest.raises(BusError, match="5 publishes unacknowledged"):
        publisher.publish(topic, cancel(99), timeout=0.3)
    assert time.monotonic() - started >= 0.3

    broker.start()
    assert publisher.flush(timeout=10), "queued messages were not sent after the restart"
    assert publisher.unacknowledged == 0
    publisher.publish(topic, cancel(5), timeout=1)  # the window is open again

    expected = {encode(m) for m in [*queued, cancel(5)]}
    received.wait_for(lambda msgs: {p for _, p in msgs} >= expected, 15)
    assert encode(cancel(99)) not in received.payloads
    # Queued messages may arrive before the SUBACK that sets `connected`.
    assert subscriber.connected.wait(10)


# --- callbacks are guarded ------------------------------------------------------------------


def test_an_exception_in_a_handler_does_not_kill_the_network_thread(
    make_bus: BusFactory, caplog: pytest.LogCaptureFixture, threaded: bool
) -> None:
    topic = topics.control("w-boom")
    received = MessageRecorder()

    def handler(topic: str, payload: bytes) -> None:
        received(topic, payload)
        if len(received.messages) == 1:
            raise RuntimeError("handler bug")

    make_bus("w-boom", handler, [topic], threaded=threaded).start()
    publisher = make_bus("scheduler", threaded=threaded).start()
    with caplog.at_level(logging.ERROR, logger="flotta_mqtt.transport.bus"):
        publisher.publish(topic, cancel(1))
        publisher.publish(topic, cancel(2))
        received.wait(2)
    assert received.payloads == [encode(cancel(1)), encode(cancel(2))]
    assert any(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in caplog.records), (
        "the handler's exception was not logged"
    )


def test_publishing_from_a_handler_is_refused_and_the_bus_keeps_working(
    make_bus: BusFactory, caplog: pytest.LogCaptureFixture, threaded: bool
) -> None:
    topic = topics.control("w-reentrant")
    received = MessageRecorder()
    errors: list[BusError] = []
    buses: list[Bus] = []

    def handler(topic: str, payload: bytes) -> None:
        received(topic, payload)
        if len(received.messages) == 1:
            try:
                buses[0].publish(topics.events("w-reentrant"), cancel(100))
            except BusError as exc:
                errors.append(exc)
                raise

    buses.append(make_bus("w-reentrant", handler, [topic], threaded=threaded).start())
    publisher = make_bus("scheduler", threaded=threaded).start()
    with caplog.at_level(logging.ERROR, logger="flotta_mqtt.transport.bus"):
        publisher.publish(topic, cancel(1))
        publisher.publish(topic, cancel(2))
        received.wait(2)
    assert len(errors) == 1
    assert "callback" in str(errors[0])
    assert any(r.exc_info and r.exc_info[1] is errors[0] for r in caplog.records)
    assert buses[0].unacknowledged == 0  # the refused publish took no window slot
    buses[0].publish(topics.events("w-reentrant"), cancel(3), timeout=1)
    assert buses[0].flush(timeout=5)


def test_an_oversize_message_is_refused_before_publishing(
    make_bus: BusFactory, broker_settings: BrokerSettings
) -> None:
    topic = topics.presence("big")
    received = MessageRecorder()
    make_bus("watcher", received, [topics.ALL_PRESENCE]).start()
    settings = BrokerSettings(url=broker_settings.url, window=1)
    publisher = make_bus("big", settings=settings).start()

    big = NodePresence(
        node="big", online=True, since=1.0, details={"blob": "x" * MAX_MESSAGE_BYTES}
    )
    with pytest.raises(ProtocolError, match="over the"):
        publisher.publish(topic, big, timeout=0.5)
    assert publisher.unacknowledged == 0  # refused before taking the only window slot

    marker = presence("big", True, "marker")
    publisher.publish(topic, marker)
    assert received.wait(1) == [(topic, encode(marker))]


# --- authentication -------------------------------------------------------------------------


@pytest.fixture
def password_broker() -> Iterator[LocalBroker]:
    """A broker that accepts only `flotta-user` / `right-pass` (password file made here)."""
    data_dir = Path(tempfile.mkdtemp(prefix="flotta-auth-broker-"))
    password_file = data_dir / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(password_file), "flotta-user", "right-pass"],
        check=True,
        capture_output=True,
    )
    password_file.chmod(0o644)  # the broker runs as user `mosquitto` once started as root
    try:
        with LocalBroker(data_dir=data_dir, password_file=password_file) as local:
            yield local
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_wrong_password_is_refused_and_the_right_one_connects(
    password_broker: LocalBroker,
) -> None:
    def settings(password: str) -> BrokerSettings:
        return BrokerSettings(url=password_broker.url, username="flotta-user", password=password)

    intruder = Bus("intruder", settings("wrong-pass"), _noop, [])
    with pytest.raises(BusError, match="refused intruder") as refused:
        intruder.start(wait=10)
    assert "authori" in str(refused.value).lower() or "password" in str(refused.value).lower()
    assert not intruder.connected.is_set()

    anonymous = Bus("anonymous", BrokerSettings(url=password_broker.url), _noop, [])
    with pytest.raises(BusError, match="refused"):
        anonymous.start(wait=10)

    node = Bus("node", settings("right-pass"), _noop, []).start(wait=10)
    try:
        assert node.connected.is_set()
        node.publish(topics.presence("node"), presence("node", True))
        assert node.flush(timeout=5)
    finally:
        node.stop()


# --- last will and goodbye ------------------------------------------------------------------


def test_a_killed_node_leaves_its_retained_will(make_bus: BusFactory, threaded: bool) -> None:
    watched = MessageRecorder()
    make_bus("watcher", watched, [topics.ALL_PRESENCE], threaded=threaded).start()
    will = presence("n-crash", False, "will")
    node = make_bus(
        "n-crash", will=Will(topics.presence("n-crash"), will), threaded=threaded
    ).start()
    node.publish(topics.presence("n-crash"), presence("n-crash", True), retain=True)
    watched.wait(1)

    node.kill()
    assert watched.wait(2)[1] == (topics.presence("n-crash"), encode(will))

    late = MessageRecorder()  # retained: a node that starts now sees it at once
    make_bus("late", late, [topics.presence("n-crash")], threaded=threaded).start()
    assert late.wait(1) == [(topics.presence("n-crash"), encode(will))]


def test_a_node_stopped_with_goodbye_publishes_it_and_no_will(
    make_bus: BusFactory, threaded: bool
) -> None:
    watched = MessageRecorder()
    make_bus("watcher", watched, [topics.ALL_PRESENCE], threaded=threaded).start()
    node = make_bus(
        "n-polite",
        will=Will(topics.presence("n-polite"), presence("n-polite", False, "will")),
        threaded=threaded,
    ).start()

    goodbye = presence("n-polite", False, "goodbye")
    node.stop(goodbye=[(topics.presence("n-polite"), goodbye, True)])
    # The marker travels after the node's DISCONNECT: a will would have arrived before it.
    marker = presence("marker", True)
    make_bus("marker", threaded=threaded).start().publish(topics.presence("marker"), marker)
    assert watched.wait(2) == [
        (topics.presence("n-polite"), encode(goodbye)),
        (topics.presence("marker"), encode(marker)),
    ]


# --- reconnects -----------------------------------------------------------------------------


@pytest.mark.parametrize("kill", [False, True], ids=["terminated", "killed"])
def test_a_subscriber_reconnects_by_itself_after_a_broker_restart(
    make_bus: BusFactory,
    broker: LocalBroker,
    broker_settings: BrokerSettings,
    kill: bool,
    threaded: bool,
) -> None:
    topic = topics.jobs("w-again")
    received = MessageRecorder()
    connects = MessageRecorder()  # one entry per CONNACK (+ SUBACK)
    settings = BrokerSettings(url=broker_settings.url, reconnect_delay_min=1, reconnect_delay_max=1)
    subscriber = make_bus(
        "w-again",
        received,
        [topic],
        settings=settings,
        on_connect=lambda present: connects("connect", b"%d" % present),
        threaded=threaded,
    ).start()
    connects.wait(1)

    broker.restart(kill=kill)
    connects.wait(2, timeout=15)
    assert subscriber.connected.is_set()

    publisher = make_bus("scheduler", threaded=threaded).start()
    publisher.publish(topic, cancel(1))
    assert received.wait(1) == [(topic, encode(cancel(1)))]


# --- acknowledgements of an unthreaded bus --------------------------------------------------


def _pump_until(bus: Bus, done: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Drive an unthreaded bus from the test's thread until `done()` (each pump waits on
    the socket, 0.05 s at most)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout} s)")
        bus.pump(0.05)


@pytest.mark.parametrize("handling", ["unacknowledged", "acknowledged", "withheld", "released"])
def test_an_unthreaded_bus_acknowledges_what_it_received_when_told(
    make_bus: BusFactory, broker_settings: BrokerSettings, handling: str
) -> None:
    """A message the node has not acknowledged is delivered again after it went away: one
    it acknowledged (after handling it) is not. While acknowledgements are withheld,
    neither `acknowledge()` nor `pump()` acknowledges; once released, they do."""
    topic = topics.jobs("w-ack")
    first = MessageRecorder()
    node = Bus("w-ack", broker_settings, first, [topic], threaded=False).start(wait=None)
    _pump_until(node, node.connected.is_set, "the unthreaded bus never connected")
    publisher = make_bus("scheduler").start()
    publisher.publish(topic, cancel(1))
    _pump_until(node, lambda: first.messages, "the message never arrived")
    if handling in ("withheld", "released"):
        node.withhold(True)
        node.acknowledge()
        node.pump(0.01)
        node.withhold(handling == "withheld")
    if handling != "unacknowledged":
        node.acknowledge()
    node.stop()  # DISCONNECT after anything acknowledged; the session stays
    acknowledged = handling in ("acknowledged", "released")

    again = MessageRecorder()
    make_bus("w-ack", again, [topic]).start()
    publisher.publish(topic, cancel(2))  # a marker: whatever is re-delivered comes before it
    again.wait_for(lambda msgs: encode(cancel(2)) in [p for _, p in msgs])
    redelivered = encode(cancel(1)) in again.payloads
    assert redelivered is not acknowledged
