"""What the in-memory transport does beyond the shared contract (test_transport_contract.py):
MQTT topic matching as paho's, the ACL hook, queueing while down, the broker's life in a
test; and the one broker settings model both transports take."""

from __future__ import annotations

import logging

import pytest
from helpers import MessageRecorder
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub
from pydantic import ValidationError

from flotta_mqtt.transport import BusError, open_bus
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.memory import MemoryBus
from flotta_mqtt.transport.memory_broker import MemoryBroker, memory_broker, topic_matches
from flotta_mqtt.transport.settings import BrokerSettings

LEVEL = st.sampled_from(["a", "b", "", "$SYS"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=4).map("/".join)
FILTER = st.lists(st.sampled_from(["a", "b", "", "+", "$SYS"]), min_size=1, max_size=4).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"])])
)


@given(FILTER, TOPIC)
def test_topic_filters_match_as_paho_matches_them(pattern: str, topic: str) -> None:
    assert topic_matches(pattern, topic) == topic_matches_sub(pattern, topic)


def _noop(topic: str, payload: bytes) -> None:
    pass


def test_the_acl_hook_refuses_publishes_and_filters_deliveries(
    memory_broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    memory_broker.acl = lambda client, access, topic: (
        not ((access == "write" and topic == "secret") or (access == "read" and client == "nosy"))
    )
    settings = memory_broker.broker_settings()
    allowed, nosy = MessageRecorder(), MessageRecorder()
    MemoryBus("reader", settings, allowed, ["+"]).start()  # `#` would see claims too
    MemoryBus("nosy", settings, nosy, ["#"]).start()
    writer = MemoryBus("writer", settings, _noop, []).start()
    with caplog.at_level(logging.ERROR):
        writer.publish_raw("secret", b"no")
    writer.publish_raw("open", b"yes")
    assert allowed.wait(1) == [("open", b"yes")]
    assert nosy.messages == []
    assert "refused a message on secret" in caplog.text


def test_publishes_while_down_wait_in_a_bounded_window(memory_broker: MemoryBroker) -> None:
    received = MessageRecorder()
    MemoryBus("sub", memory_broker.broker_settings(), received, ["t"]).start()
    bus = MemoryBus("pub", memory_broker.broker_settings(window=2), _noop, [])
    bus.publish_raw("t", b"1")
    bus.publish_raw("t", b"2")
    with pytest.raises(BusError, match="2 publishes unacknowledged"):
        bus.publish_raw("t", b"3", timeout=0.01)
    assert not bus.flush(timeout=0.01)
    bus.start()
    assert bus.flush(timeout=0)
    assert received.wait(2) == [("t", b"1"), ("t", b"2")]


def test_a_closed_broker_drops_its_connections_and_frees_its_name() -> None:
    broker = memory_broker("closing")
    bus = MemoryBus("node", broker.broker_settings(), _noop, ["t"]).start()
    broker.close()
    assert not bus.connected.is_set()
    assert memory_broker("closing") is not broker
    memory_broker("closing").close()


def test_open_bus_picks_the_transport_from_the_url() -> None:
    def bus(url: str) -> object:
        return open_bus("node", BrokerSettings(url=url), _noop, [])

    assert isinstance(bus("memory://picked"), MemoryBus)
    assert isinstance(bus("mqtt://127.0.0.1:1"), Bus)  # built, not connected
    memory_broker("picked").close()


# --- the broker settings ------------------------------------------------------------------


def test_credentials_in_the_url_leave_it_for_their_own_fields() -> None:
    settings = BrokerSettings(url="mqtts://node%2D1:p%40ss@broker.example:8884")
    assert (settings.url, settings.username, settings.password) == (
        "mqtts://broker.example:8884",
        "node-1",
        "p@ss",
    )
    assert (settings.host, settings.port, settings.tls) == ("broker.example", 8884, True)
    with pytest.raises(ValidationError, match="both in the URL and apart"):
        BrokerSettings(url="mqtt://a:b@host", username="c")


def test_defaults_and_what_is_refused() -> None:
    settings = BrokerSettings()
    assert (settings.host, settings.port, settings.tls) == ("127.0.0.1", 1883, False)
    assert BrokerSettings(url="mqtts://h").port == 8883
    with pytest.raises(ValidationError, match="expected mqtt://"):
        BrokerSettings(url="tcp://127.0.0.1:1883")
    with pytest.raises(ValidationError, match="reconnect_delay_min is over"):
        BrokerSettings(reconnect_delay_min=5, reconnect_delay_max=4)
    with pytest.raises(ValidationError):
        BrokerSettings(window=70_000)  # paho's message ids wrap at 65,535
