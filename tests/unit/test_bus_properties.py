"""paho's MQTT v5 Properties with the lookup tables the bus makes them share: they must
still pack, unpack and clear exactly as paho's own, and keep their values apart."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

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
