"""Opt-in speed-ups inside paho-mqtt: its v5 property and reason code tables shared.

paho 2 copies these constant tables into every Properties and ReasonCode it makes, one or
more per message and per acknowledgement. `enable_paho_speedups()` makes them share one
table each, process-wide, and only on the paho version they were tested against
(`TESTED_PAHO_VERSION`) with the object layout they expect; otherwise it logs why and
patches nothing. Nothing calls it at import: the scheduler and worker processes turn it on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["TESTED_PAHO_VERSION", "disable_paho_speedups", "enable_paho_speedups"]

log = logging.getLogger(__name__)

TESTED_PAHO_VERSION = "2.2.0"

_originals: dict[tuple[type, str], Callable[..., Any]] = {}  # what was replaced, to restore
_lock = threading.Lock()


def enable_paho_speedups() -> bool:
    """Share paho's property and reason code tables; whether they are shared now. Safe at
    any time and more than once: objects made before or after work with either methods."""
    with _lock:
        if _originals:
            return True
        if paho.mqtt.__version__ != TESTED_PAHO_VERSION:
            log.debug(
                "paho speed-ups off: paho %s, tested with %s",
                paho.mqtt.__version__,
                TESTED_PAHO_VERSION,
            )
            return False
        properties, reason_codes = _property_patches(), _reason_code_patches()
        if not properties or not reason_codes:  # all or nothing
            log.debug("paho speed-ups off: paho's Properties or ReasonCode laid out otherwise")
            return False
        for owner, name, replacement in [*properties, *reason_codes]:
            _originals[owner, name] = vars(owner)[name]
            setattr(owner, name, replacement)
        return True


def disable_paho_speedups() -> None:
    """Put paho's own methods back (tests compare both)."""
    with _lock:
        for (owner, name), original in _originals.items():
            setattr(owner, name, original)
        _originals.clear()


Patch = tuple[type, str, Callable[..., Any]]


def _property_patches() -> list[Patch]:
    """Every Properties object shares paho's tables of v5 property names and types, which
    it otherwise builds anew for each one."""
    sample = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    tables = {name: vars(sample).get(name) for name in ("types", "names", "properties")}
    if set(vars(sample)) != {"packetType", *tables} or not isinstance(tables["names"], dict):
        return []
    compressed = [name.replace(" ", "") for name in tables["names"]]  # the attribute names

    def init(self: Properties, packetType: int) -> None:
        vars(self).update(tables, packetType=packetType)

    def clear(self: Properties) -> None:
        attributes = vars(self)
        if len(attributes) > len(tables) + 1:  # some values were set (the tables, its type)
            for name in compressed:
                attributes.pop(name, None)

    return [(Properties, "__init__", init), (Properties, "clear", clear)]


def _reason_code_patches() -> list[Patch]:
    """Every ReasonCode reads the class's table of names, which paho copies into each."""
    sample = ReasonCode(PacketTypes.PUBACK)
    if set(vars(sample)) != {"names", "packetType", "value"} or sample.names != dict(
        ReasonCode.names
    ):
        return []
    disconnect = PacketTypes.DISCONNECT

    def init(
        self: ReasonCode, packetType: int, aName: str = "Success", identifier: int = -1
    ) -> None:
        self.packetType = packetType
        if identifier == -1:
            self.set(
                "Normal disconnection" if packetType == disconnect and aName == "Success" else aName
            )
        else:
            self.value = identifier
            self.getName()  # a code this packet type has, as paho checks

    return [(ReasonCode, "__init__", init)]
