"""The transport contract, held by both implementations: the in-memory bus and the paho Bus
against a real mosquitto. Every test runs on each; the roles' unit tests trust the memory
one to behave as the broker will.

Nothing waits by sleeping: tests wait on MessageRecorder, an Event, or `wait_for`. That
nothing else arrived is checked with a marker published after it on the same path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest
from helpers import MessageRecorder, wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.protocol import MAX_MESSAGE_BYTES, NodePresence, encode
from flotta_mqtt.transport import (
    BusError,
    IdentityInUse,
    MessageHandler,
    Transport,
    Will,
    open_bus,
)
from flotta_mqtt.transport.claims import FIGHT_LIMIT
from flotta_mqtt.transport.memory_broker import MemoryBroker
from flotta_mqtt.transport.settings import BrokerSettings


class Connect(Protocol):
    def __call__(
        self,
        client_id: str,
        on_message: MessageHandler = ...,
        subscriptions: list[str] | None = None,
        **kwargs: Any,
    ) -> Transport: ...


def _noop(topic: str, payload: bytes) -> None:
    pass


@pytest.fixture(params=["memory", pytest.param("mosquitto", marks=pytest.mark.integration)])
def settings(request: pytest.FixtureRequest) -> BrokerSettings:
    """Where the test's nodes connect: a fresh in-memory broker, or a fresh mosquitto."""
    if request.param == "memory":
        memory: MemoryBroker = request.getfixturevalue("memory_broker")
        return memory.broker_settings()
    broker: LocalBroker = request.getfixturevalue("broker")
    return BrokerSettings(url=broker.url)


@pytest.fixture
def connect(settings: BrokerSettings) -> Iterator[Connect]:
    """connect(client_id, on_message, subscriptions, **open_bus options): a started bus.
    An unthreaded one is pumped by a thread of its own unless `pumped=False` (then the
    test pumps it and starts it itself)."""
    made: list[Transport] = []
    done = threading.Event()
    pumps: list[threading.Thread] = []

    def pump(bus: Transport) -> None:
        while not done.is_set():
            bus.pump(0.05)

    def make(
        client_id: str,
        on_message: MessageHandler = _noop,
        subscriptions: list[str] | None = None,
        *,
        pumped: bool = True,
        **kwargs: Any,
    ) -> Transport:
        options = {"settings": settings, **kwargs}
        bus = open_bus(
            client_id, on_message=on_message, subscriptions=subscriptions or [], **options
        )
        made.append(bus)
        if not kwargs.get("threaded", True):
            if not pumped:
                return bus
            pumps.append(threading.Thread(target=pump, args=(bus,), daemon=True))
            pumps[-1].start()
        return bus.start()

    yield make
    for bus in made:
        bus.stop()
    done.set()
    for thread in pumps:
        thread.join(timeout=5)


def _sent_by(bus: Transport, topic: str, payload: bytes) -> None:
    bus.publish_raw(topic, payload)
    assert bus.flush(timeout=5)


def presence(node: str, how: str) -> NodePresence:
    return NodePresence(node=node, online=how == "online", since=1.0, details={"how": how})


# --- publish and subscribe ----------------------------------------------------------------


def test_wildcards_match_and_overlapping_subscriptions_each_get_a_copy(connect: Connect) -> None:
    received = MessageRecorder()
    connect("sub", received, ["t/+/b", "t/#", "solo"])
    publisher = connect("pub")
    for topic in ("t/a/b", "t/a", "t", "u/a/b", "t/a/b/c", "solo"):
        publisher.publish_raw(topic, topic.encode())
    assert publisher.flush(timeout=5)
    got = received.wait_for(lambda msgs: ("solo", b"solo") in msgs)
    # `t/#` matches `t` itself; `t/a/b` matches both filters: one copy for each.
    assert sorted(got) == sorted(
        [(t, t.encode()) for t in ("t/a/b", "t/a/b", "t/a", "t", "t/a/b/c", "solo")]
    )


def test_retained_reaches_late_subscribers_until_an_empty_payload_clears_it(
    connect: Connect,
) -> None:
    publisher = connect("pub")
    publisher.publish_raw("r/1", b"on", retain=True)
    publisher.publish_raw("r/2", b"plain")
    assert publisher.flush(timeout=5)

    late = MessageRecorder()
    watcher = connect("late", late, ["r/+"])
    assert late.wait(1) == [("r/1", b"on")]
    publisher.publish_raw("r/1", b"", retain=True)  # clears it, and reaches subscribers
    assert late.wait(2)[1] == ("r/1", b"")

    later = MessageRecorder()
    connect("later", later, ["r/+", "marker"])
    _sent_by(watcher, "marker", b"m")
    assert later.wait(1) == [("marker", b"m")]


def test_a_subscription_added_later_gets_what_is_retained(connect: Connect) -> None:
    publisher = connect("pub")
    publisher.publish_raw("r/kept", b"on", retain=True)
    assert publisher.flush(timeout=5)
    received = MessageRecorder()
    bus = connect("sub", received, [])
    bus.subscribe("r/#")
    assert received.wait(1) == [("r/kept", b"on")]


# --- sessions -----------------------------------------------------------------------------


def test_a_persistent_session_queues_what_arrives_while_away(connect: Connect) -> None:
    present: list[bool] = []
    connect("away", _noop, ["jobs/away"], on_connect=present.append).stop()
    publisher = connect("pub")
    for n in range(3):
        publisher.publish_raw("jobs/away", b"%d" % n)
    assert publisher.flush(timeout=5)

    received = MessageRecorder()
    back = connect("away", received, ["jobs/away"], on_connect=present.append)
    assert received.wait(3) == [("jobs/away", b"%d" % n) for n in range(3)]
    wait_for(lambda: len(present) == 2, message="the second connection was not reported")
    assert present == [False, True]
    assert back.connected.is_set()


def test_a_clean_session_keeps_nothing(connect: Connect) -> None:
    present: list[bool] = []
    connect("fresh", _noop, ["jobs/fresh"], clean=True, on_connect=present.append).stop()
    publisher = connect("pub")
    _sent_by(publisher, "jobs/fresh", b"lost")

    received = MessageRecorder()
    connect("fresh", received, ["jobs/fresh"], clean=True, on_connect=present.append)
    _sent_by(publisher, "jobs/fresh", b"marker")
    assert received.wait(1) == [("jobs/fresh", b"marker")]
    wait_for(lambda: len(present) == 2, message="the second connection was not reported")
    assert present == [False, False]


def test_a_second_process_of_an_identity_is_refused_and_the_first_keeps_its_session(
    connect: Connect, settings: BrokerSettings
) -> None:
    sessions: list[bool] = []
    first_got = MessageRecorder()
    first = connect("twin", first_got, ["jobs/twin"], on_connect=sessions.append)
    second = open_bus("twin", settings, _noop, ["jobs/twin"])
    with pytest.raises(IdentityInUse, match="broker identity twin is already connected"):
        second.check()
    with pytest.raises(IdentityInUse, match="twin is already connected: process"):
        second.start(wait=5)
    assert second.failure is not None and not second.connected.is_set()

    _sent_by(connect("pub"), "jobs/twin", b"after")
    assert first_got.wait(1) == [("jobs/twin", b"after")]
    assert sessions == [False] and first.connected.is_set() and first.failure is None


def test_a_session_taken_over_is_not_taken_back(connect: Connect, settings: BrokerSettings) -> None:
    """By a client that does not claim the identity: the first bus gives up, at once where
    the broker says why (memory, mosquitto 2.0.15 on), else after a few short sessions."""
    sessions: list[bool] = []
    first = connect("twin", _noop, ["jobs/twin"], on_connect=sessions.append)
    second_got = MessageRecorder()
    second = connect("twin", second_got, ["jobs/twin"], claim=False)
    wait_for(lambda: first.failure is not None, timeout=30, message="the first fought on")
    assert isinstance(first.failure, IdentityInUse)
    assert "twin was taken over" in str(first.failure)
    assert len(sessions) <= FIGHT_LIMIT

    wait_for(second.connected.is_set, message="the second did not keep the session")
    _sent_by(connect("pub"), "jobs/twin", b"after")
    assert ("jobs/twin", b"after") in second_got.wait_for(lambda m: ("jobs/twin", b"after") in m)
    assert not first.connected.is_set() and len(sessions) <= FIGHT_LIMIT
    with pytest.raises(IdentityInUse):
        first.publish_raw("jobs/twin", b"from the first")


@pytest.mark.parametrize("own_will", [True, False], ids=["with-will", "no-will"])
def test_a_killed_process_s_identity_is_free_at_once(connect: Connect, own_will: bool) -> None:
    """Its will says it is gone: the node's own (a claim names its hash), or the claim's
    clearing."""
    will = Will("p/crash", presence("crash", "will")) if own_will else None
    connect("crash", will=will).kill()
    again = connect("crash", will=will)
    assert again.connected.is_set() and again.failure is None


# --- wills --------------------------------------------------------------------------------


def test_a_killed_node_leaves_its_retained_will(connect: Connect) -> None:
    will = presence("crash", "will")
    node = connect("crash", will=Will("p/crash", will))
    _sent_by(node, "p/crash", encode(presence("crash", "online")))
    node.kill()

    late = MessageRecorder()
    connect("late", late, ["p/crash"])
    assert late.wait(1) == [("p/crash", encode(will))]


def test_a_stopped_node_says_goodbye_and_leaves_no_will(connect: Connect) -> None:
    watched = MessageRecorder()
    connect("watcher", watched, ["p/#"])
    node = connect("polite", will=Will("p/polite", presence("polite", "will")))
    goodbye = presence("polite", "goodbye")
    node.stop(goodbye=[("p/polite", goodbye, True)])
    _sent_by(connect("marker"), "p/marker", b"m")  # after the DISCONNECT: a will would precede
    assert watched.wait(2) == [("p/polite", encode(goodbye)), ("p/marker", b"m")]


# --- acknowledgements ---------------------------------------------------------------------


def _pump_until(bus: Transport, done: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited 10 s)")
        bus.pump(0.05)


@pytest.mark.parametrize("handling", ["withheld", "acknowledged"])
def test_what_an_unthreaded_node_did_not_acknowledge_comes_again_after_a_crash(
    connect: Connect, handling: str
) -> None:
    first = MessageRecorder()
    node = connect("acker", first, ["jobs/acker"], threaded=False, pumped=False)
    node.start(wait=None)
    _pump_until(node, node.connected.is_set, "the unthreaded bus never connected")
    publisher = connect("pub")
    _sent_by(publisher, "jobs/acker", b"job")
    node.withhold(handling == "withheld")
    _pump_until(node, lambda: first.messages, "the message never arrived")
    node.acknowledge()
    node.pump(0.01)  # a pump acknowledges too, unless withheld
    node.kill()

    again = MessageRecorder()
    connect("acker", again, ["jobs/acker"])
    _sent_by(publisher, "jobs/acker", b"marker")
    got = again.wait_for(lambda msgs: ("jobs/acker", b"marker") in msgs)
    expected = [("jobs/acker", b"job")] if handling == "withheld" else []
    assert got == [*expected, ("jobs/acker", b"marker")]


def test_start_reaches_a_pump_already_waiting(connect: Connect) -> None:
    node = connect("early", threaded=False, pumped=False)
    stopping = threading.Event()

    def pump() -> None:
        while not stopping.is_set():
            node.pump(30)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        node.start(wait=5)  # BusError if the waiting pump saw nothing of it
    finally:
        stopping.set()
        node.wake()
        pumping.join(5)


def test_wake_ends_a_pump_early(connect: Connect) -> None:
    node = connect("idle", threaded=False, pumped=False)
    node.start(wait=None)
    returned = threading.Event()

    def pump() -> None:
        node.pump(30)
        returned.set()

    threading.Thread(target=pump, daemon=True).start()
    node.wake()
    assert returned.wait(5)


# --- guards ---------------------------------------------------------------------------------


def test_an_oversize_publish_is_refused_before_it_is_sent(connect: Connect) -> None:
    bus = connect("big")
    with pytest.raises(BusError, match="over"):
        bus.publish_raw("big", b"x" * (MAX_MESSAGE_BYTES + 1))
    assert bus.flush(timeout=1)


@pytest.mark.parametrize("threaded", [True, False], ids=["threaded", "pumped"])
def test_a_handler_may_not_publish_and_a_failing_one_stops_nothing(
    connect: Connect, threaded: bool
) -> None:
    received = MessageRecorder()
    errors: list[BusError] = []
    buses: list[Transport] = []

    def handler(topic: str, payload: bytes) -> None:
        received(topic, payload)
        try:
            buses[0].publish_raw("out", b"from a handler")
        except BusError as exc:
            errors.append(exc)
            raise

    buses.append(connect("reentrant", handler, ["in"], threaded=threaded))
    publisher = connect("pub")
    publisher.publish_raw("in", b"1")
    publisher.publish_raw("in", b"2")
    assert received.wait(2) == [("in", b"1"), ("in", b"2")]
    assert len(errors) == 2 and all("callback" in str(e) for e in errors)
    _sent_by(buses[0], "out", b"from the node's thread")
