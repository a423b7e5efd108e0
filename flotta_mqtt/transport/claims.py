"""One identity, one process: the claim a bus holds on its broker identity.

MQTT gives a client id's session to whoever connected last: a second process of the same
identity takes the session over, the first reconnects and takes it back, and so on. So:

- Connected, a bus claims its identity with a SessionClaim retained on sessions/{client},
  published at each CONNACK and every keepalive, expiring after two. Its stop clears the
  claim, and so does its will when the node has no will of its own.
- Before each connection, and in `check()` (a node calls it before touching its state),
  a probe reads that claim on a short clean connection of its own: under the username
  `{username}.probe` (with `use_username_as_clientid` the broker makes the username the
  client id, so the probe needs a username of its own, generated with the node's
  password) or, with no username, as the client `{client}.probe`. Another process's live
  claim stops the bus with IdentityInUse before it disturbs anything.
- A claim is void once its process's own will (a worker's presence) has been published:
  the broker judged that connection gone. So a node killed starts again at once; one hung
  or cut off once the broker notices (1.5 keepalives); a claim that a broker crash
  left behind expires within 2 keepalives.
- A bus taken over anyway (two processes starting together, a client that does not
  claim) gives up rather than take the session back: when the broker says so (DISCONNECT
  0x8E, from mosquitto 2.0.15), when its probe before reconnecting finds another
  process's claim, or, as mosquitto 2.0.11 just closes the socket, after FIGHT_LIMIT
  sessions in a row that ended within a keepalive of beginning, each reconnection
  accepted at once.

The claim applies to a bus whose client id is a safe topic level and is its username, or
that has no username: under another username the broker may use another client id. Not
to one with a client certificate, which may be its identity (`use_identity_as_username`):
its probe, with no certificate of its own, would connect as the node itself. A bus
claims only while its probe can read: a broker whose identities predate claims (no
probe identity, no right on sessions/) would drop a connection publishing a claim, so
there the check is skipped, with a warning, and nothing is claimed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from flotta_mqtt.model.ids import SAFE_ID
from flotta_mqtt.protocol import ProtocolError, SessionClaim, SessionProbe, decode, encode, topics
from flotta_mqtt.transport.base import (
    BrokerRefused,
    BusError,
    FailureHandler,
    IdentityInUse,
    Transport,
    Will,
)
from flotta_mqtt.transport.settings import BrokerSettings

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # seconds a probe may take to connect, and then to read the claim
FIGHT_LIMIT = 3  # sessions in a row ended soon after they began: another holds the id
SESSION_TAKEN_OVER = 142  # the MQTT v5 DISCONNECT reason code
TAKEN = "was taken over by another connection: stopped rather than take it back"

ProbeBus = Callable[..., Transport]  # a bus class: (client_id, settings, handler, subs, **kw)


def probe_username(username: str) -> str:
    """The broker identity a node's probe connects as (the node's password): it may read
    the node's claim and will, and write its own marker beside the claim."""
    return f"{username}.probe"


@dataclass(frozen=True)
class _Reading:
    """What a probe read: the claim retained for the identity, and what is retained on
    the node's will topic (each None when nothing is)."""

    claim: SessionClaim | None
    will: bytes | None


@dataclass(frozen=True)
class _Unread:
    """Why a probe read nothing; `reached` is False when the broker did not answer."""

    reason: str
    reached: bool


class Claim:
    """One bus's claim on its broker identity: the will to connect with, the claim to
    publish, the probe before each connection, and the watch for a session taken over.

    `probe_with` is the bus class to probe with; None for a probe's own bus, which claims
    and watches nothing. Called from whichever thread connects the bus.
    """

    def __init__(
        self,
        client_id: str,
        settings: BrokerSettings,
        will: Will | None,
        probe_with: ProbeBus | None,
        on_failure: FailureHandler | None,
    ) -> None:
        username = settings.username
        self.watching = probe_with is not None
        self.eligible = (
            self.watching
            and SAFE_ID.fullmatch(client_id) is not None
            and username in (None, client_id)
            and settings.cert_file is None
        )
        self.claiming = False  # eligible, and the last probe could read: see the docstring
        self.client_id = client_id
        self.topic = topics.session(client_id)
        self.keepalive = settings.keepalive
        self.expiry = 2 * settings.keepalive  # refreshed every keepalive
        self.session = uuid.uuid4().hex
        self.failure: BusError | None = None
        self._probe_with = probe_with
        probing = {} if username is None else {"username": probe_username(username)}
        self._probe_settings = settings.model_copy(update=probing)
        self._on_failure = on_failure
        self._node_will = None if will is None else (will.topic, encode(will.message), will.retain)
        self.message = self._claim_message() if self.eligible else b""
        self._fresh = False  # check() found the identity free: the next connection goes
        self._warned = False
        self._began: float | None = None  # when the present session began (monotonic)
        self._short = 0  # sessions in a row that ended within a keepalive of beginning
        self._released = threading.Event()

    def _claim_message(self) -> bytes:
        return encode(
            SessionClaim(
                client=self.client_id,
                session=self.session,
                host=socket.gethostname()[:255],
                pid=os.getpid(),
                since=time.time(),
                keepalive=self.keepalive,
                will=None if self._node_will is None else _sha256(self._node_will[1]),
            )
        )

    @property
    def last_will(self) -> tuple[str, bytes, bool] | None:
        """(topic, payload, retain) to connect with: the node's own will, or else, when
        eligible, the empty retained message that clears the claim."""
        if self._node_will is not None:
            return self._node_will
        return (self.topic, b"", True) if self.eligible else None

    # --- before connecting --------------------------------------------------------------

    def check(self) -> None:
        """Raise IdentityInUse if another live process holds the identity now (checked
        once until the next connection: a second check before it finds the same)."""
        if not self.eligible or self._fresh:
            return
        reached, holder = self._holder_now()
        if holder is not None:
            raise IdentityInUse(self._in_use(holder))
        self._fresh = reached

    def admit(self) -> bool:
        """Whether to connect now, asked before each connection attempt: not while the
        broker does not answer (try later), and never again once another process holds
        the identity (the claim gives up)."""
        if self.failure is not None:
            return False
        if not self.eligible or self._fresh:
            self._fresh = False
            return True
        reached, holder = self._holder_now()
        if holder is not None:
            self.give_up(IdentityInUse(self._in_use(holder)))
        return reached and holder is None

    def _holder_now(self) -> tuple[bool, SessionClaim | None]:
        """Whether the broker answered the probe, and the other live process it says
        holds the identity (None when it could not tell: warned once, then allowed, and
        nothing claimed)."""
        read = self._probe()
        if isinstance(read, _Unread):
            self.claiming = False
            if read.reached and not self._warned:
                self._warned = True
                log.warning(
                    "%s: cannot check that no other process uses this identity: %s",
                    self.client_id,
                    read.reason,
                )
            return read.reached, None
        holder = self._holder(read)
        self.claiming = holder is None
        return True, holder

    def _holder(self, read: _Reading) -> SessionClaim | None:
        """The other live process holding the identity: not when there is no claim, when
        it is ours, or when its process's will has been published since."""
        claim = read.claim
        if claim is None or claim.session == self.session:
            return None
        if claim.will is not None and read.will and _sha256(read.will) == claim.will:
            return None
        return claim

    def _probe(self) -> _Reading | _Unread:
        """Read the claim, and the node's will topic, on a short clean connection of the
        probe's own: what is retained arrives before the marker it sends itself."""
        assert self._probe_with is not None
        nonce = uuid.uuid4().hex
        claims: list[SessionClaim | None] = [None]  # the latest (an empty payload clears)
        wills: list[bytes] = []
        back = threading.Event()

        def arrived(topic: str, payload: bytes) -> None:
            if topic != self.topic:
                wills.append(payload)
                return
            try:
                message = decode(topic, payload)[1] if payload else None
            except ProtocolError as exc:
                log.warning("%s: ignoring an invalid claim: %s", self.client_id, exc)
                return
            if isinstance(message, SessionProbe):
                if message.nonce == nonce:  # another probe's marker is not ours
                    back.set()
            else:
                claims.append(message)

        will_topic = None if self._node_will is None else self._node_will[0]
        wanted = [self.topic] + ([will_topic] if will_topic is not None else [])
        probe = self._probe_with(
            f"{self.client_id}.probe",
            self._probe_settings,
            arrived,
            wanted,
            clean=True,
            claim=False,
            once=True,  # an unreachable broker is known at once, not after PROBE_TIMEOUT
        )
        try:
            probe.start(wait=PROBE_TIMEOUT)
        except BrokerRefused as exc:
            return _Unread(f"the broker refused its probe ({exc})", reached=True)
        except BusError as exc:
            return _Unread(str(exc), reached=False)
        try:
            probe.publish(self.topic, SessionProbe(nonce=nonce), timeout=PROBE_TIMEOUT)
            if not back.wait(PROBE_TIMEOUT):
                return _Unread(f"its probe read nothing on {self.topic}", reached=True)
        except BusError as exc:
            return _Unread(f"its probe could not write on {self.topic}: {exc}", reached=True)
        finally:
            probe.stop()
        return _Reading(claims[-1], wills[-1] if wills else None)

    def _in_use(self, holder: SessionClaim) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.since))
        return (
            f"broker identity {self.client_id} is already connected: process {holder.pid} "
            f"on {holder.host} holds it since {since}. Stop that process first; if it is "
            f"gone, the broker frees the identity within {2 * holder.keepalive} s "
            "(2 of its keepalives)"
        )

    # --- while connected ---------------------------------------------------------------

    def keep(self, publish: Callable[[], None], connected: threading.Event) -> None:
        """Claim again every keepalive while connected, on a thread of its own, until
        `release()` or the claim gives up (the claim expires after two keepalives)."""

        def refresh() -> None:
            while not self._released.wait(self.keepalive):
                if self.claiming and connected.is_set():
                    try:
                        publish()
                    except Exception:  # claimed again at the next CONNACK
                        log.exception("%s: the claim was not refreshed", self.client_id)

        if self.eligible:
            name = f"claim-{self.client_id}"
            threading.Thread(target=refresh, name=name, daemon=True).start()

    def release(self) -> None:
        self._released.set()

    def began(self) -> None:
        """A session began (a CONNACK accepted it)."""
        self._began = time.monotonic()

    def ended(self, taken_over: bool) -> None:
        """A session ended without this process asking: give up when the broker said that
        another connection took it over, or when sessions keep ending as soon as begun."""
        if not self.watching:
            return
        began, self._began = self._began, None
        if taken_over:
            self.give_up(IdentityInUse(f"broker identity {self.client_id} {TAKEN}"))
            return
        if began is None:
            return
        self._short = self._short + 1 if time.monotonic() - began < self.keepalive else 0
        if self._short >= FIGHT_LIMIT:
            self.give_up(
                IdentityInUse(
                    f"broker identity {self.client_id} {TAKEN}: the broker closed its "
                    f"session {FIGHT_LIMIT} times in a row within {self.keepalive} s of "
                    "accepting it, as it does when another connection uses the same identity"
                )
            )

    def unreachable(self) -> None:
        """A connection attempt failed: whatever ended the last sessions, it was not a
        process taking them over."""
        self._short = 0

    def give_up(self, error: BusError) -> None:
        """Stop for good, once: log why and tell the node."""
        if self.failure is not None:
            return
        self.failure = error
        self._released.set()
        log.error("%s", error)
        if self._on_failure is not None:
            try:
                self._on_failure(error)
            except Exception:
                log.exception("%s: error in the failure handler", self.client_id)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
