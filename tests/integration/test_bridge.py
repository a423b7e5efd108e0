"""A site broker bridged to a central one: traffic both ways, and queueing while the WAN is down.

Two LocalBrokers per test. A message forwarded by the bridge reaching central is also the
sign that the link is up and subscribed: on connecting, the bridge subscribes on central
before it forwards anything, and central handles one connection's packets in order.
Every wait is bounded; nothing waits by sleeping.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import MessageRecorder, wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.bridge import SITE_TOPICS, render_bridge, site_topics
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.broker.tls import generate_tls
from flotta_mqtt.protocol import topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings

ROOT = Path(__file__).resolve().parents[2]
FAST_RETRY = (1, 2)  # the bridge's reconnect backoff in tests, in seconds


def _noop(topic: str, payload: bytes) -> None:
    pass


def distinct(payloads: list[bytes]) -> list[bytes]:
    """Payloads in order of first arrival, without the duplicates QoS 1 allows."""
    return list(dict.fromkeys(payloads))


def test_the_shipped_template_is_the_rendered_one() -> None:
    rendered = render_bridge(
        "SITE",
        "CENTRAL_HOST",
        8883,
        username="SITE",
        password="BRIDGE_PASSWORD",
        ca_file=Path("/etc/flotta-mqtt/tls/ca.crt"),
    )
    assert (ROOT / "broker" / "bridge.conf.template").read_text() == rendered


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Both brokers' data, and the identities they share; mosquitto must reach it."""
    path = Path(tempfile.mkdtemp(prefix="flotta-bridge-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


Connect = Callable[..., Bus]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """connect(broker, name, on_message, subs, config=None, clean=True): a started Bus."""
    made: list[Bus] = []

    def make(
        broker: LocalBroker,
        name: str,
        on_message: Callable[[str, bytes], None] = _noop,
        subs: list[str] | None = None,
        config: BrokerSettings | None = None,
        clean: bool = True,
    ) -> Bus:
        config = config or BrokerSettings(url=broker.url)
        config.reconnect_delay_min, config.reconnect_delay_max = 1, 2
        client_id = name if not clean else f"{name}-{uuid.uuid4().hex[:6]}"
        bus = Bus(client_id, config, on_message, subs or [], clean=clean)
        made.append(bus)
        return bus.start(wait=10)

    yield make
    # At once: a bus whose broker a test stopped waits out paho's reconnect sleep (1 s).
    with ThreadPoolExecutor(max_workers=len(made) or 1) as stopping:
        list(stopping.map(Bus.stop, made))


class Wan:
    """A TCP relay standing for a site's WAN link: it can be cut and restored."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self.refused = 0  # connection attempts while cut
        self._up = True
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if not self._up:
                    self.refused += 1
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self._target))
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection through the link and refuse new ones."""
        with self._lock:
            self._up = False
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open = []

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._closing.set()
        self.cut()
        self._thread.join(timeout=5)
        self._server.close()


# --- the bridge, as the WAN comes and goes ------------------------------------------------------


@pytest.mark.integration
def test_site_and_central_exchange_and_queue_while_central_is_down(
    data_dir: Path, connect: Connect
) -> None:
    with LocalBroker(data_dir=data_dir / "central") as central:
        bridge = render_bridge("site-a", central.host, central.port, restart_timeout=FAST_RETRY)
        with LocalBroker(data_dir=data_dir / "site", bridges=[bridge]) as site:
            # The scheduler's session on central persists: it must get what arrives while
            # it reconnects after central's restart.
            scheduler = MessageRecorder()
            to_workers = connect(central, "scheduler", scheduler, [topics.ALL_EVENTS], clean=False)
            worker = MessageRecorder()
            node_1 = connect(site, "node-1", worker, [topics.worker_inbox("node-1")])
            site_watch = MessageRecorder()
            connect(site, "site-watch", site_watch, [topics.ALL_EVENTS])

            # Site → central; once it is in, the bridge has subscribed on central too.
            node_1.publish_raw(topics.events("node-1"), b"event 1")
            scheduler.wait_for(lambda msgs: b"event 1" in [p for _, p in msgs])
            # Central → site.
            to_workers.publish_raw(topics.jobs("node-1"), b"job 1")
            worker.wait_for(lambda msgs: b"job 1" in [p for _, p in msgs])

            central.stop()  # the WAN, or central, is gone
            node_1.publish_raw(topics.events("node-1"), b"event while central is down")
            assert node_1.flush(timeout=10), "the site broker must keep accepting"
            site_watch.wait_for(lambda msgs: b"event while central is down" in [p for _, p in msgs])
            assert b"event while central is down" not in scheduler.payloads

            central.start()  # same port, same data: the bridge reconnects with its session
            scheduler.wait_for(
                lambda msgs: b"event while central is down" in [p for _, p in msgs],
                timeout=20,
            )
            # QoS 1: what was in flight when central stopped may come twice, never not at all.
            assert distinct(scheduler.payloads) == [b"event 1", b"event while central is down"]


@pytest.fixture
def identities(data_dir: Path) -> Identities:
    spec = IdentitySpec(
        scheduler="scheduler",
        workers=["node-1", "node-2"],
        workbenches=["alice"],
        bridges={"site-a": ["node-1"]},
    )
    return generate_identities(spec, data_dir / "identities")


@pytest.mark.integration
def test_central_queues_for_the_site_while_the_wan_is_cut(
    data_dir: Path, connect: Connect, identities: Identities
) -> None:
    """As deployed: identities and ACL on both brokers, TLS to central, site-a's topics only.

    Central must keep the bridge's session while it is away: this is what an MQTT v5
    bridge on mosquitto 2.0.11 does not get (no session expiry on its CONNECT).
    """
    secured = {"password_file": identities.password_file, "acl_file": identities.acl_file}
    tls = generate_tls(data_dir / "tls")
    central_tls = {"certfile": tls.cert_file, "keyfile": tls.key_file}
    with LocalBroker(data_dir=data_dir / "central", **secured, **central_tls) as central:
        wan = Wan(central.port)
        site_a = identities.credentials["site-a"]
        bridge = render_bridge(
            "site-a",
            "127.0.0.1",
            wan.port,
            username=site_a.username,
            password=site_a.password,
            ca_file=tls.ca_file,
            topics=site_topics(site_a.carries),
            restart_timeout=FAST_RETRY,
        )
        try:
            with LocalBroker(data_dir=data_dir / "site", bridges=[bridge], **secured) as site:
                scheduler = MessageRecorder()
                sched = connect(
                    central,
                    "scheduler",
                    scheduler,
                    [topics.ALL_EVENTS],
                    config=identities.broker_settings("scheduler", central.url, tls.ca_file),
                )
                worker = MessageRecorder()
                node_1 = connect(
                    site,
                    "node-1",
                    worker,
                    [topics.worker_inbox("node-1")],
                    config=identities.broker_settings("node-1", site.url),
                    clean=False,
                )
                node_1.publish_raw(topics.events("node-1"), b"event 1")
                scheduler.wait_for(lambda msgs: b"event 1" in [p for _, p in msgs])
                sched.publish_raw(topics.jobs("node-1"), b"job 1")
                worker.wait_for(lambda msgs: b"job 1" in [p for _, p in msgs])

                wan.cut()
                wait_for(lambda: wan.refused > 0, message="the bridge did not try to reconnect")
                sched.publish_raw(topics.jobs("node-1"), b"job during the cut")
                assert sched.flush(timeout=10)
                node_1.publish_raw(topics.events("node-1"), b"event during the cut")
                assert node_1.flush(timeout=10)

                wan.restore()
                worker.wait_for(
                    lambda msgs: b"job during the cut" in [p for _, p in msgs], timeout=20
                )
                scheduler.wait_for(
                    lambda msgs: b"event during the cut" in [p for _, p in msgs], timeout=20
                )
                # QoS 1: what was in flight at the cut may come twice, never not at all.
                assert distinct(worker.payloads) == [b"job 1", b"job during the cut"]
                assert distinct(scheduler.payloads) == [b"event 1", b"event during the cut"]
        finally:
            wan.close()


@pytest.mark.integration
def test_central_sends_a_site_only_what_its_nodes_may_read(
    data_dir: Path, connect: Connect, identities: Identities
) -> None:
    """Even with the catch-all topics, central's ACL keeps node-2's jobs off site-a.

    The site here has no ACL, so a spy on it sees everything the bridge brings in.
    """
    secured = {"password_file": identities.password_file, "acl_file": identities.acl_file}
    with LocalBroker(data_dir=data_dir / "central", **secured) as central:
        site_a = identities.credentials["site-a"]
        bridge = render_bridge(
            "site-a",
            central.host,
            central.port,
            username=site_a.username,
            password=site_a.password,
            topics=SITE_TOPICS,
            restart_timeout=FAST_RETRY,
        )
        with LocalBroker(data_dir=data_dir / "site", bridges=[bridge]) as site:
            scheduler = MessageRecorder()
            sched = connect(
                central,
                "scheduler",
                scheduler,
                [topics.ALL_EVENTS],
                config=identities.broker_settings("scheduler", central.url),
            )
            spy = MessageRecorder()
            node_1 = connect(site, "spy", spy, ["flotta/#"])
            node_1.publish_raw(topics.events("node-1"), b"link up")
            scheduler.wait_for(lambda msgs: b"link up" in [p for _, p in msgs])

            sched.publish_raw(topics.jobs("node-2"), b"job for node-2")
            sched.publish_raw(topics.control("node-2"), b"control for node-2")
            sched.publish_raw(topics.reply("alice"), b"reply for alice")
            sched.publish_raw(topics.jobs("node-1"), b"job for node-1")
            spy.wait_for(lambda msgs: b"job for node-1" in [p for _, p in msgs])
            # The spy's own claim on the site (sessions/) is the site's: the rest came in.
            claims = topics.session("")
            assert [p for t, p in spy.messages if not t.startswith(claims)] == [
                b"link up",
                b"job for node-1",
            ]
