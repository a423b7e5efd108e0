"""The rendered mosquitto config avoids the traps measured in MQTT-NOTES."""

from __future__ import annotations

from pathlib import Path

import pytest

from flotta_mqtt.broker import MosquittoSettings, render_config
from flotta_mqtt.protocol import MAX_MESSAGE_BYTES


def lines(settings: MosquittoSettings) -> list[str]:
    """The config's directives, without comments and blank lines."""
    text = render_config(settings)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def directives(settings: MosquittoSettings) -> dict[str, str]:
    """Directive → its value (the last one wins, as in mosquitto)."""
    pairs = (ln.partition(" ") for ln in lines(settings))
    return {name: value for name, _, value in pairs}


def test_defaults_avoid_the_measured_traps(tmp_path: Path) -> None:
    config = lines(MosquittoSettings(port=1884, data_dir=tmp_path))
    assert "set_tcp_nodelay true" in config  # Nagle: up to 88 ms per QoS 1 hop
    assert "max_queued_messages 0" in config  # default 1000 silently drops for offline nodes
    assert "persistence true" in config
    assert f"persistence_location {tmp_path}/" in config
    assert "listener 1884 127.0.0.1" in config
    assert "allow_anonymous true" in config


def test_queues_are_bounded_by_bytes_and_messages_by_size(tmp_path: Path) -> None:
    settings = MosquittoSettings(port=1884, data_dir=tmp_path, max_queued_bytes=1000)
    values = directives(settings)
    assert values["max_queued_bytes"] == "1000"
    # The codec refuses oversize messages first: the broker's PUBACK 0x95 breaks paho.
    assert int(values["message_size_limit"]) > MAX_MESSAGE_BYTES
    assert int(values["autosave_interval"]) > 0


def test_no_setting_is_given_twice(tmp_path: Path) -> None:
    """A repeated directive would silently override the first (log_type is additive)."""
    settings = MosquittoSettings(
        port=1884, data_dir=tmp_path, password_file=tmp_path / "p", acl_file=tmp_path / "a"
    )
    names = [ln.split(" ", 1)[0] for ln in lines(settings) if not ln.startswith("log_type")]
    assert len(names) == len(set(names)), names


def test_no_password_or_acl_lines_unless_given(tmp_path: Path) -> None:
    text = render_config(MosquittoSettings(port=1884, data_dir=tmp_path))
    assert "password_file" not in text
    assert "acl_file" not in text
    assert "allow_anonymous false" not in text


def test_a_password_file_turns_anonymous_access_off(tmp_path: Path) -> None:
    password_file = tmp_path / "passwd"
    config = lines(MosquittoSettings(port=1884, data_dir=tmp_path, password_file=password_file))
    assert f"password_file {password_file}" in config
    assert "allow_anonymous false" in config
    assert "allow_anonymous true" not in config
    assert not any(ln.startswith("acl_file") for ln in config)


def test_an_acl_file_is_rendered_when_given(tmp_path: Path) -> None:
    acl_file = tmp_path / "acl"
    config = lines(MosquittoSettings(port=1884, data_dir=tmp_path, acl_file=acl_file))
    assert f"acl_file {acl_file}" in config
    assert not any(ln.startswith("password_file") for ln in config)


def test_persistence_can_be_turned_off_and_extra_lines_come_last(tmp_path: Path) -> None:
    settings = MosquittoSettings(
        port=1884,
        data_dir=tmp_path,
        persistence=False,
        bind_address="0.0.0.0",
        extra=["log_type all", "sys_interval 1"],
    )
    config = lines(settings)
    assert "persistence false" in config
    assert "listener 1884 0.0.0.0" in config
    assert config[-2:] == ["log_type all", "sys_interval 1"]


def test_the_websockets_listener_stays_on_loopback_unless_told(tmp_path: Path) -> None:
    exposed = MosquittoSettings(
        port=8883, data_dir=tmp_path, bind_address="0.0.0.0", websockets_port=9001
    )
    config = lines(exposed)
    assert "listener 8883 0.0.0.0" in config
    assert config[config.index("listener 9001 127.0.0.1") + 1] == "protocol websockets"
    exposed.websockets_bind_address = "192.0.2.7"
    assert "listener 9001 192.0.2.7" in lines(exposed)


def test_the_websockets_listener_never_takes_the_mqtt_listeners_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port of its own: 1883"):
        render_config(MosquittoSettings(port=1883, data_dir=tmp_path, websockets_port=1883))
