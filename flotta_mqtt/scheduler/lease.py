"""Which of the schedulers sharing one PostgreSQL database leads: the one holding the lease.

The lease is a session-level advisory lock, keyed by the scheduler's name, held on a
connection of its own: PostgreSQL frees it the moment that connection ends (its process
killed, the connection terminated, or found dead by TCP keepalives), and a standby polling
for it every LEASE_POLL s takes it then. The standby takes it BEFORE it touches the
scheduler's broker identity, so two processes never fight over one MQTT session; the new
leader then takes the session over, with the requests and events queued in it while
nobody led.

Two fences stop a leader that lost the lease:
- the lease's own connection is checked every LEASE_CHECK s (a query, with a short TCP
  timeout): when it fails the scheduler is told at once, publishes nothing more and stops;
- each taking of the lease raises an epoch (a fencing token) in the table
  scheduler_leases, and every transaction of the leader first re-writes its own epoch
  there: the row lock orders that against the next leader's raise, so once a standby
  has taken over, a late commit of the old leader fails with LeaseLost instead of writing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flotta_mqtt.transport import BusError, IdentityInUse

if TYPE_CHECKING:  # imported where used: a scheduler on SQLite never loads it (0.2 s)
    import psycopg

log = logging.getLogger(__name__)

LEASE_POLL = 0.25  # seconds between a standby's attempts to take the lease
LEASE_CHECK = 0.5  # seconds between a leader's checks that its lease connection lives
# Every connection notices a dead peer within seconds (client side: a request unanswered
# for tcp_user_timeout ms; server side, so that a cut-off leader's lease is freed: the
# keepalives) rather than the system's two hours.
CONNECT: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 3000,
    "options": "-c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 "
    "-c tcp_keepalives_count=3 -c tcp_user_timeout=5000",
}


class LeaseLost(BusError):
    """This scheduler no longer leads (its lease connection died, or another took over):
    it stopped publishing; restart it to stand by again."""


def connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection that notices a dead peer within seconds."""
    import psycopg

    return psycopg.connect(url, autocommit=True, **CONNECT)


def redacted(url: str) -> str:
    """`url` without its password, to name the database in logs and errors."""
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url)


def lease_key(name: str) -> int:
    """The advisory lock's key: a signed 64-bit hash of the scheduler's name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), signed=True)


class Lease:
    """The lease of the scheduler `name` in the database at `url` (whose schema, with
    scheduler_leases, is made: see postgres_repository)."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.key = lease_key(name)
        self.epoch: int | None = None  # set while held
        self._db: psycopg.Connection[tuple[object, ...]] | None = None
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.epoch is not None

    def acquire(self, stopping: threading.Event | None = None) -> bool:
        """Wait until this process leads (True), or `stopping` is set (False)."""
        import psycopg

        waiting = unreachable = False
        stopping = stopping or threading.Event()
        while not stopping.is_set():
            try:
                if self._take():
                    return True
                unreachable = False
            except psycopg.Error as exc:
                if not unreachable:  # said once an outage
                    why = " ".join(str(exc).split())
                    log.warning("scheduler %s: cannot reach %s (%s)", self.name, self.where, why)
                unreachable = True
                self._close()
            if not waiting:
                log.info(
                    "scheduler %s: standing by: another process leads on %s",
                    self.name,
                    self.where,
                )
                waiting = True
            stopping.wait(LEASE_POLL)
        return False

    def lead(
        self,
        fence: Callable[[int], None],
        on_lost: Callable[[LeaseLost], None],
        stopping: threading.Event | None = None,
    ) -> bool:
        """acquire(), then `fence` the database with the epoch and watch the lease."""
        if not self.acquire(stopping):
            return False
        assert self.epoch is not None
        fence(self.epoch)
        self.watch(on_lost)
        return True

    @property
    def where(self) -> str:
        return redacted(self.url)

    def _take(self) -> bool:
        if self._db is None or self._db.closed:
            self._db = connect(self.url)
        row = self._db.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        if row is None or not row[0]:
            return False
        raised = self._db.execute(
            "INSERT INTO scheduler_leases (name, epoch) VALUES (%s, 1) ON CONFLICT (name) "
            "DO UPDATE SET epoch = scheduler_leases.epoch + 1 RETURNING epoch",
            (self.name,),
        ).fetchone()
        assert raised is not None
        self.epoch = int(str(raised[0]))
        log.warning("scheduler %s: leads on %s (epoch %d)", self.name, self.where, self.epoch)
        return True

    def watch(self, on_lost: Callable[[LeaseLost], None]) -> None:
        """Check the lease every LEASE_CHECK s; call `on_lost` once if it is lost."""
        import psycopg

        db = self._db
        assert db is not None and self.held

        def check() -> None:
            while not self._done.wait(LEASE_CHECK):
                try:
                    db.execute("SELECT 1")
                except psycopg.Error as exc:
                    if not self._done.is_set():
                        why = " ".join(str(exc).split())
                        on_lost(LeaseLost(f"its lease on {self.where} was lost ({why})"))
                    return

        self._watcher = threading.Thread(target=check, name="lease", daemon=True)
        self._watcher.start()

    def release(self) -> None:
        """Stop watching and end the lease's connection: a standby takes over at once."""
        self._done.set()
        if self._watcher not in (None, threading.current_thread()):  # stopped by on_lost
            self._watcher.join(timeout=5)
        self._close()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db, self.epoch = None, None


def take_identity(check: Callable[[], None], keepalive: float) -> None:
    """Run a bus's check(), again while it raises IdentityInUse for up to 2.5 `keepalive`s:
    the leader just taken over from may hold the identity a while more: one cut off from
    the database stops within LEASE_CHECK s, one cut off from the broker too is judged gone
    by it within 2 keepalives. (A keepalive of 0: checked once.)"""
    deadline = time.monotonic() + 2.5 * keepalive
    while True:
        try:
            return check()
        except IdentityInUse:
            if time.monotonic() > deadline:
                raise
        time.sleep(LEASE_CHECK)


__all__ = [
    "LEASE_CHECK",
    "LEASE_POLL",
    "Lease",
    "LeaseLost",
    "connect",
    "redacted",
    "take_identity",
]
