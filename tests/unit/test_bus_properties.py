"""paho's MQTT v5 Properties and ReasonCodes with the lookup tables the bus makes them
share: they must still pack, unpack, clear and name exactly as paho's own, and keep their
values apart."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties
from paho.mqtt.reasoncodes import ReasonCode

import flotta_mqtt.transport.bus  # noqa: F401  (shares the tables on import)

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
