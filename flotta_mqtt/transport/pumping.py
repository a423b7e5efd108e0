"""Driving a Bus's connection without a network thread (threaded=False): the node's
own thread calls `pump()`, which reads, writes, acknowledges and reconnects with backoff,
and a publisher waiting for the window pumps when no other thread does."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from flotta_mqtt.transport.claims import Claim
from flotta_mqtt.transport.settings import BrokerSettings

log = logging.getLogger(__name__)


class Pumping:
    """The Bus's unthreaded half (a mixin: the Bus sets these attributes up)."""

    client_id: str
    settings: BrokerSettings
    _client: Any  # the paho client (paho itself is bus.py's alone)
    _claim: Claim
    _io: threading.RLock  # paho is driven by pump() and by publishers, one at a time
    _pumping: threading.Thread | None  # who calls pump()
    _started: bool  # start() was called: pump() may connect
    _stopped: bool
    _reconnect_at: float  # when pump() may try to connect again
    _reconnect_delay: float
    _wake_r: socket.socket  # pump() waits on the socket and on this pair: wake() ends it
    _wake_w: socket.socket
    _received: list[tuple[int, int]]  # (mid, qos) to acknowledge
    _withheld: bool  # acknowledgements held back (see withhold)

    def _lost(self, rc: Any) -> bool:
        """Whether paho's return code `rc` means it lost the connection (bus.py)."""
        raise NotImplementedError

    def _admitted(self) -> bool:
        """Whether the claim lets a connection attempt go now (bus.py)."""
        raise NotImplementedError

    def wake(self) -> None:
        """End a `pump()` waiting in another thread (work for its thread has arrived)."""
        with contextlib.suppress(OSError):  # full (already woken) or closed (stopped)
            self._wake_w.send(b"!")

    def acknowledge(self) -> None:
        """Unthreaded: tell the broker that what was received so far is handled (unless
        acknowledgements are withheld)."""
        if not self._received or self._withheld:  # called once per loop: most often nothing
            return
        with self._io:
            received, self._received = self._received, []
            for mid, qos in received:
                self._client.ack(mid, qos)

    def withhold(self, held: bool) -> None:
        """Unthreaded: hold back every acknowledgement (True), from `pump()` and
        `acknowledge()` alike, until what was received is durable (False): a message the
        node handles after the pump that read it is delivered again if the node goes away
        first. All are held, so acknowledgements still go in the order received."""
        self._withheld = held

    def pump(self, timeout: float) -> None:
        """Unthreaded: wait up to `timeout` s for traffic, hand what arrived to the
        handlers, send what is due (pings, acknowledgements) and reconnect with backoff.

        Called over and over by one thread at a time, at least every keepalive/2 seconds;
        returns early when messages arrived or `wake()` was called.
        """
        self._pumping = threading.current_thread()
        if self._stopped:  # nothing to drive any more; the caller is about to stop too
            time.sleep(min(timeout, 0.1))
            return
        self.acknowledge()  # whatever the node did not acknowledge itself
        sock = self._client.socket()
        if sock is None:
            self._connect_if_due()
            sock = self._client.socket()
        waiting: list[Any] = [self._wake_r] if sock is None else [self._wake_r, sock]
        if sock is None and self._started:
            timeout = min(timeout, max(0.0, self._reconnect_at - time.monotonic()))
        writing = [sock] if sock is not None and self._client.want_write() else []
        try:
            readable, writable, _ = select.select(waiting, writing, [], max(0.0, timeout))
        except (OSError, ValueError):  # the socket closed under us: reconnect next time
            return
        with self._io:
            if self._stopped:
                return
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            if sock is None or self._client.socket() is not sock:
                return
            if sock in readable:
                self._read_all(sock)
            if self._client.socket() is sock and (sock in writable or self._client.want_write()):
                self._lost(self._client.loop_write())
            if self._client.socket() is sock:
                self._lost(self._client.loop_misc())

    def _read_all(self, sock: Any, most: int = 1000) -> None:
        """Read every packet already received (up to `most`): one burst for the handler."""
        for _ in range(most):
            if self._lost(self._client.loop_read()):
                return
            current = self._client.socket()
            if current is None or current is not sock:
                return
            pending = current.pending() if isinstance(current, ssl.SSLSocket) else 0
            if not pending and not select.select([current], [], [], 0)[0]:
                return

    def _schedule_reconnect(self) -> None:
        low, high = self.settings.reconnect_delay_min, self.settings.reconnect_delay_max
        self._reconnect_delay = min(high, max(low, self._reconnect_delay * 2))
        self._reconnect_at = time.monotonic() + self._reconnect_delay

    def _connect_if_due(self) -> None:
        if not self._started or self._stopped or time.monotonic() < self._reconnect_at:
            return
        if not self._admitted():
            self._schedule_reconnect()
            return
        with self._io:
            try:
                self._client.reconnect()  # blocks for the TCP connect: the broker's address
            except (OSError, ValueError) as exc:
                log.warning("%s: cannot reach the broker: %s", self.client_id, exc)
                self._claim.unreachable()
                self._schedule_reconnect()

    def _pumped_elsewhere(self) -> bool:
        """Whether another live thread pumped this unthreaded bus last, and so drives it:
        waiting is then enough."""
        pumping = self._pumping
        current = threading.current_thread()
        return pumping is not None and pumping is not current and pumping.is_alive()

    def _pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Unthreaded, with nobody else pumping: pump until `done()`, or False at `timeout`
        (what the caller waits for comes in through this thread alone)."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= deadline:
                return False
            self.pump(min(0.05, deadline - time.monotonic()))
        return True
