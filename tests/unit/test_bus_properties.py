"""paho's MQTT v5 Properties and ReasonCodes with the lookup tables the opt-in speed-ups
make them share: they must still pack, unpack, clear and name exactly as paho's own, and
keep their values apart. Nothing is shared unless asked, nor on another paho version."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import paho.mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties
from paho.mqtt.reasoncodes import ReasonCode

from flotta_mqtt.transport import paho_speedups
from flotta_mqtt.transport.paho_speedups import (
    TESTED_PAHO_VERSION,
    disable_paho_speedups,
    enable_paho_speedups,
)


@pytest.fixture(autouse=True, scope="module")
def speedups() -> Iterator[None]:
    """The speed-ups on for this module's tests, and off again after them."""
    assert enable_paho_speedups(), f"paho {paho.mqtt.__version__} is not {TESTED_PAHO_VERSION}"
    yield
    disable_paho_speedups()


# MQTT strings: UTF-8 without surrogates, U+0000 or U+FEFF (paho refuses those on receipt).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff"))
PUBLISH_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "ContentType": TEXT,
        "ResponseTopic": TEXT,
        "CorrelationData": st.binary(max_size=64),
        "UserProperty": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4),
    },
)
TABLES = {"packetType", "types", "names", "properties"}  # the rest of vars() are values


def values(properties: Properties) -> dict[str, Any]:
    return {k: v for k, v in vars(properties).items() if k not in TABLES}


def test_every_properties_object_shares_one_set_of_tables() -> None:
    publish, puback = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBACK)
    assert publish.names is puback.names and publish.properties is puback.properties
    assert (publish.packetType, puback.packetType) == (PacketTypes.PUBLISH, PacketTypes.PUBACK)


@given(PUBLISH_PROPERTIES)
def test_properties_pack_and_unpack_to_what_was_set(wanted: dict[str, Any]) -> None:
    sent = Properties(PacketTypes.PUBLISH)
    for name, value in wanted.items():
        setattr(sent, name, value)
    received = Properties(PacketTypes.PUBLISH)
    received.unpack(sent.pack())
    assert values(received) == values(sent) == wanted
    assert values(Properties(PacketTypes.PUBLISH)) == {}  # nothing leaks into a new one

    received.clear()
    assert values(received) == {} and received.isEmpty()
    assert received.pack() == b"\x00"


def test_properties_still_refuse_what_does_not_apply_to_their_packet() -> None:
    connect = Properties(PacketTypes.CONNECT)
    connect.SessionExpiryInterval = 60
    assert values(connect) == {"SessionExpiryInterval": 60}
    with pytest.raises(MQTTException, match="does not apply to packet type"):
        Properties(PacketTypes.PUBLISH).SessionExpiryInterval = 60


# Every (packet type, code, name) paho's table lists: the MQTT v5 specification's.
REASONS = [
    (packet_type, code, name)
    for code, names in ReasonCode.names.items()
    for name, packet_types in names.items()
    for packet_type in packet_types
]


def test_every_reason_code_reads_the_one_table_of_names() -> None:
    reason = ReasonCode(PacketTypes.PUBACK)
    assert "names" not in vars(reason) and reason.names is ReasonCode.names
    assert (reason.value, reason.getName(), reason.is_failure) == (0, "Success", False)
    assert ReasonCode(PacketTypes.DISCONNECT).getName() == "Normal disconnection"


@given(st.sampled_from(REASONS))
def test_reason_codes_are_made_named_and_unpacked_as_the_table_says(
    reason: tuple[int, int, str],
) -> None:
    packet_type, code, name = reason
    by_code, by_name = ReasonCode(packet_type, identifier=code), ReasonCode(packet_type, name)
    received = ReasonCode(packet_type, next(n for t, _, n in REASONS if t == packet_type))
    assert received.unpack(bytes([code])) == 1
    for made in (by_code, by_name, received):
        assert (made.value, str(made), made.is_failure) == (code, name, code >= 0x80)
        assert made == code and made.pack() == bytearray([code])


def test_reason_codes_still_refuse_a_code_or_name_their_packet_does_not_have() -> None:
    with pytest.raises(KeyError):
        ReasonCode(PacketTypes.PUBACK, identifier=3)  # no such code at all
    with pytest.raises(ValueError, match="exactly one name"):
        ReasonCode(PacketTypes.PUBACK, identifier=1)  # a SUBACK's code
    with pytest.raises(KeyError, match="not found"):
        ReasonCode(PacketTypes.PUBACK, "Granted QoS 1")


def _packed_and_named() -> list[Any]:
    """What paho makes of every reason code and of a PUBLISH's properties."""
    reasons = [ReasonCode(packet_type, identifier=code) for packet_type, code, _ in REASONS]
    properties = Properties(PacketTypes.PUBLISH)
    properties.MessageExpiryInterval = 60
    properties.UserProperty = [("a", "b")]
    return [(r.value, str(r), r.is_failure, r.pack()) for r in reasons] + [properties.pack()]


def test_shared_tables_give_what_paho_own_methods_give() -> None:
    shared = _packed_and_named()
    disable_paho_speedups()
    try:
        assert _packed_and_named() == shared
    finally:
        assert enable_paho_speedups()


# --- nothing is patched unless asked, and only on the paho version tested -----------------


def test_importing_flotta_mqtt_leaves_paho_as_it_is() -> None:
    script = textwrap.dedent(
        """
        from paho.mqtt.properties import Properties
        from paho.mqtt.reasoncodes import ReasonCode
        before = (Properties.__init__, Properties.clear, ReasonCode.__init__)
        import flotta_mqtt, flotta_mqtt.transport.bus, flotta_mqtt.transport.memory
        import flotta_mqtt.transport.paho_speedups
        assert (Properties.__init__, Properties.clear, ReasonCode.__init__) == before
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_another_paho_version_gets_no_speedups(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disable_paho_speedups()
    original = (Properties.__init__, Properties.clear, ReasonCode.__init__)
    monkeypatch.setattr(paho.mqtt, "__version__", "2.3.0")
    with caplog.at_level(logging.DEBUG, logger="flotta_mqtt.transport.paho_speedups"):
        assert not enable_paho_speedups()
    assert (Properties.__init__, Properties.clear, ReasonCode.__init__) == original
    assert "paho 2.3.0" in caplog.text
    assert "names" in vars(ReasonCode(PacketTypes.PUBACK))  # paho's own copy, as before
    monkeypatch.undo()
    assert enable_paho_speedups()


def test_a_layout_guard_that_fails_leaves_all_of_paho_as_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disable_paho_speedups()
    original = (Properties.__init__, Properties.clear, ReasonCode.__init__)
    monkeypatch.setattr(paho_speedups, "_reason_code_patches", list)  # laid out otherwise
    with caplog.at_level(logging.DEBUG, logger="flotta_mqtt.transport.paho_speedups"):
        assert not enable_paho_speedups()
    assert (Properties.__init__, Properties.clear, ReasonCode.__init__) == original
    assert "laid out otherwise" in caplog.text
    monkeypatch.undo()
    assert enable_paho_speedups()


@pytest.mark.parametrize("setting", ["", "0"], ids=["default", "turned-off"])
def test_the_cli_nodes_opt_in_unless_told_not_to(setting: str) -> None:
    """A node the CLI serves owns its process: it turns the speed-ups on, unless
    FLOTTA_PAHO_SPEEDUPS=0; the node here stops as soon as it is started (SIGTERM)."""
    script = textwrap.dedent(
        """
        import os, signal
        from paho.mqtt.properties import Properties
        from rich.console import Console
        from flotta_mqtt.cli import serving
        before = Properties.__init__

        class Node:
            def start(self, wait):
                signal.raise_signal(signal.SIGTERM)
                return self
            def stop(self):
                pass

        serving.serve(lambda gave_up: Node(), "test node", Console(stderr=True))
        print("patched" if Properties.__init__ is not before else "untouched")
        """
    )
    env = {**os.environ, "FLOTTA_PAHO_SPEEDUPS": setting}
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, timeout=60, capture_output=True, env=env
    )
    assert done.stdout.decode().split()[-1] == ("untouched" if setting == "0" else "patched")
