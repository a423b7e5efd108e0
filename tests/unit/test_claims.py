"""One identity, one process, on the in-memory transport: which buses claim, which claims
hold, what a taken-over bus does, and that a worker checks before it runs anything.
(tests/integration/test_one_identity.py holds the same against mosquitto.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MessageRecorder, job_ready, messages_of
from worker_support import TIMEOUT, Station, results, station

from flotta_mqtt.protocol import JobStarted, NodePresence, topics
from flotta_mqtt.transport import BusError, IdentityInUse, Will
from flotta_mqtt.transport.claims import FIGHT_LIMIT, Claim
from flotta_mqtt.transport.memory import MemoryBus
from flotta_mqtt.transport.memory_broker import MemoryBroker
from flotta_mqtt.transport.settings import BrokerSettings
from flotta_mqtt.worker.agent import WorkerAgent
from flotta_mqtt.worker.journal import Journal


def _noop(topic: str, payload: bytes) -> None:
    pass


def presence(node: str, online: bool, since: float) -> NodePresence:
    return NodePresence(node=node, online=online, since=since)


@pytest.fixture(name="station")
def station_fixture(tmp_path: Path) -> Iterator[Station]:
    yield from station(tmp_path)


@pytest.mark.parametrize(
    ("client_id", "username", "claims"),
    [
        ("w1", None, True),
        ("w1", "w1", True),
        ("w1-3f2a", "w1", False),  # the broker may make `w1` its client id: not its claim
        ("a/b", None, False),  # not a topic level
        ("", None, False),
    ],
)
def test_a_bus_claims_the_client_id_that_is_its_username_or_has_none(
    client_id: str, username: str | None, claims: bool
) -> None:
    settings = BrokerSettings(url="memory://x", username=username)
    claim = Claim(client_id, settings, None, MemoryBus, None)
    assert claim.eligible is claims
    assert (claim.last_will == (topics.session(client_id), b"", True)) is claims
    assert not Claim(client_id, settings, None, None, None).eligible  # a probe's own bus
    # A client certificate may be the identity: a probe would connect as the node itself.
    certified = settings.model_copy(update={"cert_file": "node.crt", "key_file": "node.key"})
    assert not Claim(client_id, certified, None, MemoryBus, None).eligible


def test_a_node_with_a_will_keeps_it_and_its_claim_names_it() -> None:
    will = Will(topics.presence("w1"), presence("w1", False, 1.0))
    claim = Claim("w1", BrokerSettings(url="memory://x"), will, MemoryBus, None)
    assert claim.last_will is not None and claim.last_will[0] == topics.presence("w1")
    assert b'"will":"' in claim.message


def test_sessions_ended_as_soon_as_begun_give_up_after_the_limit() -> None:
    heard: list[BusError] = []
    claim = Claim("w1", BrokerSettings(url="memory://x"), None, MemoryBus, heard.append)
    for _ in range(FIGHT_LIMIT - 1):
        claim.began()
        claim.ended(taken_over=False)
    claim.unreachable()  # a failed connection: not a fight, the run starts again
    for _ in range(FIGHT_LIMIT - 1):
        claim.began()
        claim.ended(taken_over=False)
    assert claim.failure is None and claim.admit() is not False
    claim.began()
    claim.ended(taken_over=False)
    assert isinstance(claim.failure, IdentityInUse) and heard == [claim.failure]
    assert f"closed its session {FIGHT_LIMIT} times in a row within 15 s" in str(claim.failure)
    assert not claim.admit()


def test_a_long_session_breaks_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("flotta_mqtt.transport.claims.time.monotonic", lambda: now[0])
    claim = Claim("w1", BrokerSettings(url="memory://x", keepalive=15), None, MemoryBus, None)
    for lasted in [1.0] * (FIGHT_LIMIT - 1) + [15.0] + [1.0] * (FIGHT_LIMIT - 1):
        claim.began()
        now[0] += lasted
        claim.ended(taken_over=False)
    assert claim.failure is None


def test_the_broker_saying_taken_over_gives_up_at_once() -> None:
    claim = Claim("w1", BrokerSettings(url="memory://x"), None, MemoryBus, None)
    claim.began()
    claim.ended(taken_over=True)
    assert str(claim.failure) == (
        "broker identity w1 was taken over by another connection: stopped rather than take it back"
    )
    watching_nothing = Claim("p", BrokerSettings(url="memory://x"), None, None, None)
    watching_nothing.ended(taken_over=True)
    assert watching_nothing.failure is None


# --- claims read by a probe ------------------------------------------------------------------


def test_a_will_retained_that_is_not_the_holders_does_not_void_its_claim(
    memory_broker: MemoryBroker,
) -> None:
    """Only the holder's own will says it is gone: not an older process's offline presence."""
    settings = memory_broker.broker_settings()
    topic = topics.presence("w1")
    MemoryBus("w1", settings, _noop, [], will=Will(topic, presence("w1", False, 1.0))).kill()
    MemoryBus("w1", settings, _noop, [], will=Will(topic, presence("w1", False, 2.0))).start()
    third = MemoryBus("w1", settings, _noop, [], will=Will(topic, presence("w1", False, 3.0)))
    with pytest.raises(IdentityInUse):
        third.start()


def test_an_invalid_claim_is_ignored_with_a_warning(
    memory_broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = memory_broker.broker_settings()
    forger = MemoryBus("forger", settings, _noop, [], claim=False).start()
    forger.publish_raw(topics.session("w1"), b'{"type": "claim", "session": "x"}', retain=True)
    with caplog.at_level(logging.WARNING):
        bus = MemoryBus("w1", settings, _noop, []).start()
    assert bus.connected.is_set()
    assert "w1: ignoring an invalid claim" in caplog.text


def test_a_stopped_bus_clears_its_claim_and_a_killed_one_s_will_does(
    memory_broker: MemoryBroker,
) -> None:
    settings = memory_broker.broker_settings()
    watched = MessageRecorder()
    MemoryBus("watcher", settings, watched, [topics.session("+")], claim=False).start()
    MemoryBus("w1", settings, _noop, []).start().stop()
    MemoryBus("w2", settings, _noop, []).start().kill()

    def claims(messages: list[tuple[str, bytes]]) -> list[tuple[str, bool]]:
        """(topic, cleared) of each claim seen, the probes' markers left out."""
        return [(t, p == b"") for t, p in messages if b'"type":"probe"' not in p]

    assert claims(watched.wait_for(lambda m: len(claims(m)) == 4)) == [
        (topics.session("w1"), False),
        (topics.session("w1"), True),
        (topics.session("w2"), False),
        (topics.session("w2"), True),
    ]


# --- nodes -----------------------------------------------------------------------------------


def test_a_second_worker_is_refused_before_it_runs_what_its_journal_holds(
    station: Station, tmp_path: Path
) -> None:
    """Its journal may be the first's (one machine, one state directory)."""
    station.worker("w1")
    state = tmp_path / "second-state"
    Journal(state).hold(job_ready(7))
    second = WorkerAgent(station.config("w1", state_dir=state))
    try:
        with pytest.raises(IdentityInUse, match="broker identity w1 is already connected"):
            second.start(wait=TIMEOUT)
        assert [held.job.job_id for held in second.journal.held()] == [7]
    finally:
        second.stop()  # says nothing: it never connected
    station.send(job_ready(8), worker="w1")  # a marker: the first is served, and alone
    station.wait_results(8)
    assert results(station.events.messages, 7) == []
    assert messages_of(station.events.messages, JobStarted, lambda s: s.job.job_id == 7) == []
