"""The Bus's publishes in flight: at most `size` unacknowledged at once, each slot freed
by the broker's PUBACK, which paho may deliver before publish() has returned its id."""

from __future__ import annotations

import threading


class Window:
    """Slots for QoS 1 publishes, taken before publishing and freed by their PUBACK."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._pending: dict[int, str] = {}  # mid → topic, awaiting PUBACK
        self._acked_early: set[int] = set()  # PUBACKed before publish() returned
        self._settled = threading.Condition()

    def take(self, timeout: float) -> bool:
        """Take a slot, waiting up to `timeout` s for one (0: only if one is free now)."""
        return self._slots.acquire(timeout=timeout)

    def give_back(self) -> None:
        """Free the slot of a publish that was never sent."""
        self._slots.release()

    def sent(self, mid: int, topic: str) -> None:
        """A publish went out as `mid`; whichever of this and its PUBACK comes second
        frees its slot."""
        with self._settled:
            if mid in self._acked_early:
                self._acked_early.discard(mid)
                self._slots.release()
            else:
                self._pending[mid] = topic

    def acknowledged(self, mid: int) -> str | None:
        """The broker acknowledged `mid`: the topic it was sent to (None when its publish
        has not returned yet, which then frees the slot)."""
        with self._settled:
            topic = self._pending.pop(mid, None)
            if topic is None:
                self._acked_early.add(mid)
                return None
            self._settled.notify_all()
        self._slots.release()
        return topic

    @property
    def unacknowledged(self) -> int:
        with self._settled:
            return len(self._pending)

    def settled(self, timeout: float) -> bool:
        """Wait until every publish so far is acknowledged; False at `timeout`."""
        with self._settled:
            return self._settled.wait_for(lambda: not self._pending, timeout)
