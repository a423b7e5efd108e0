"""Schedulers of one name on one PostgreSQL database: one leads, holding the lease; one
that loses it (its lease connection terminated, as a cut-off leader's is) publishes
nothing more and stops, and its late commits are fenced off by the next leader's epoch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import psycopg
import pytest
from helpers import MessageRecorder, messages_of, wait_for
from hypothesis import given
from hypothesis import strategies as st

from flotta_mqtt.model import Artifact, ArtifactState, Operation, Parallel
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import ArtifactStatus, NodePresence, topics
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.lease import Lease, LeaseLost, redacted
from flotta_mqtt.scheduler.postgres_repository import PostgresRepository
from flotta_mqtt.scheduler.service import Scheduler
from flotta_mqtt.transport import BusError
from flotta_mqtt.transport.memory import MemoryBus, fresh_memory_broker

TIMEOUT = 10.0


def terminate_lease(url: str) -> int:
    """End the connection holding an advisory lock in this database (as an operator's
    pg_terminate_backend, or a network cut, would); how many were ended."""
    with psycopg.connect(url, autocommit=True) as db:
        ended = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())"
        ).fetchall()
    return len(ended)


def test_a_leader_that_lost_its_lease_commits_nothing_once_another_took_it(
    postgres_url: str,
) -> None:
    old = PostgresRepository(postgres_url, "scheduler")
    old_lease = Lease(postgres_url, "scheduler")
    assert old_lease.acquire() and old_lease.epoch == 1
    old.fence(old_lease.epoch)
    with old.transaction():  # it leads: its writes go in
        old.save_node(NodePresence(node="w0", online=True, since=1.0))
    standby = Lease(postgres_url, "scheduler")
    stop_waiting = threading.Event()
    stop_waiting.set()
    assert not standby.acquire(stop_waiting)  # held by the leader: it stands by
    assert terminate_lease(postgres_url) == 1
    assert standby.acquire() and standby.epoch == 2
    late = r"leads on .* since this one took its lease \(epoch 1\)"
    with pytest.raises(LeaseLost, match=late), old.transaction():
        old.save_node(NodePresence(node="w0", online=False, since=2.0))
    new = PostgresRepository(postgres_url, "scheduler")
    assert [node.online for node in new.nodes()] == [True]  # the late write is not there
    for closing in (old, new):
        closing.close()
    standby.release()
    old_lease.release()


class Pair:
    """A leader and a standby of one scheduler on one database, on a memory broker."""

    def __init__(self, url: str) -> None:
        settings = fresh_memory_broker("lease").broker_settings()
        self.config = SchedulerConfig(database=url, broker=settings, run_initiator=False)
        self.seen = MessageRecorder()
        self.workbench = MemoryBus(
            "wb", settings, self.seen, [topics.ALL_STATUS, topics.reply("wb")]
        ).start(wait=TIMEOUT)
        presence = NodePresence(
            node="w0", online=True, projects=["p"], operations=["noop"], since=1.0
        )
        self.workbench.publish(topics.presence("w0"), presence, retain=True)
        self.failures: list[BusError] = []
        self.lost = threading.Event()
        self.leader = Scheduler(self.config, self._failed).start(wait=TIMEOUT)
        self.standby = Scheduler(self.config)
        self.took_over = threading.Event()
        self._standing_by = threading.Thread(target=self._stand_by, daemon=True)
        self._standing_by.start()

    def _failed(self, error: BusError) -> None:
        self.failures.append(error)
        self.lost.set()

    def _stand_by(self) -> None:
        self.standby.start(wait=TIMEOUT)  # waits for the lease first
        self.took_over.set()

    def close(self) -> None:
        self.leader.stop()
        self._standing_by.join(timeout=TIMEOUT)
        self.standby.stop()
        self.workbench.stop()


@pytest.fixture
def pair(postgres_url: str) -> Iterator[Pair]:
    running = Pair(postgres_url)
    try:
        yield running
    finally:
        running.close()


def running_status(pair: Pair, artifact: Artifact) -> None:
    pair.seen.wait_for(
        lambda m: messages_of(
            m,
            ArtifactStatus,
            lambda s: s.artifact_id == artifact.id and s.state is ArtifactState.RUNNING,
        ),
        TIMEOUT,
        f"{artifact.id} was never running",
    )


def test_a_cut_off_leader_publishes_nothing_more_and_a_standby_takes_over(pair: Pair) -> None:
    first = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    pair.workbench.publish(topics.submit("wb"), first)
    running_status(pair, first)  # the leader serves
    assert not pair.took_over.is_set()  # the standby waits for the lease

    published: list[str] = []
    bus = pair.leader.bus
    for method in ("publish", "publish_many", "publish_raw"):
        real = getattr(bus, method)

        def counted(topic: str, *args: object, _real: object = real, **kwargs: object) -> None:
            published.append(topic)
            _real(topic, *args, **kwargs)  # type: ignore[operator]

        setattr(bus, method, counted)
    assert terminate_lease(str(pair.config.database)) == 1
    assert pair.lost.wait(TIMEOUT), "the leader never noticed its lease was lost"
    assert isinstance(pair.failures[0], LeaseLost)
    wait_for(lambda: not pair.leader.running, TIMEOUT, "the old leader kept serving")
    assert pair.took_over.wait(TIMEOUT), "the standby never took over"

    second = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    pair.workbench.publish(topics.submit("wb"), second)  # both buses receive it
    running_status(pair, second)  # answered by the new leader
    assert published == []  # the old leader published nothing since it lost the lease


# A URL's user and password as written in one: unreserved characters and percent escapes.
URL_PART = st.text(alphabet="abcXYZ019-._~!$&'()*+,;=%", min_size=1)


@given(user=URL_PART, password=URL_PART, host=st.sampled_from(["db", "10.0.0.7", "[::1]"]))
def test_a_url_named_in_logs_never_shows_its_password(user: str, password: str, host: str) -> None:
    url = f"postgresql://{user}:{password}@{host}:5432/flotta"
    assert redacted(url) == f"postgresql://{user}:***@{host}:5432/flotta"
    assert redacted(f"postgresql://{user}@{host}/flotta") == f"postgresql://{user}@{host}/flotta"


def test_a_standby_node_touches_no_identity_and_stops_while_it_waits(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """A SchedulerNode standing by (as `flotta-mqtt scheduler` runs) returns from start()
    at once, leaves the leader's session alone while it waits, and stops when told."""
    caplog.set_level(logging.INFO, logger="flotta_mqtt.scheduler.lease")
    before = caplog.text.count("standing by")  # the pair's standby may have said it
    node = SchedulerNode(pair.config, pair.failures.append).start(wait=TIMEOUT)
    wait_for(lambda: caplog.text.count("standing by") > before, TIMEOUT, "it never stood by")
    artifact = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    pair.workbench.publish(topics.submit("wb"), artifact)
    running_status(pair, artifact)  # the leader still serves, its session its own
    stopping = threading.Thread(target=node.stop)
    stopping.start()
    stopping.join(TIMEOUT)
    assert not stopping.is_alive() and pair.failures == []
    assert node.scheduler.lease is not None and not node.scheduler.lease.held
