"""A broker for a real deployment, started as the README says: `python -m flotta_mqtt.broker
start` with identities and TLS, on Debian's mosquitto (root drops to user `mosquitto`)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flotta_mqtt.broker.identities import load_credentials
from flotta_mqtt.broker.local import free_port, wait_for_port
from flotta_mqtt.transport import BusError
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings

pytestmark = pytest.mark.integration


def _noop(topic: str, payload: bytes) -> None:
    pass


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "flotta_mqtt.broker", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder whose parents user `mosquitto` may search (a pytest tmp_path's may not)."""
    path = Path(tempfile.mkdtemp(prefix="flotta-deployment-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("exposing", [["--bind", "0.0.0.0"], ["--websockets-bind", "0.0.0.0"]])
def test_a_broker_on_another_address_than_loopback_needs_passwords_and_tls(
    folder: Path, exposing: list[str]
) -> None:
    args = ["start", str(free_port()), str(folder / "data"), "--anonymous", "--websockets", "0"]
    args += exposing
    result = broker_cli(*args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: listening on 0.0.0.0 (not loopback) needs --identities DIR (passwords) and "
        "--tls DIR (certificates): see broker/README.md"
    ]
    assert not (folder / "data").exists()


def test_a_broker_without_identities_refuses_to_start_unless_told_anonymous(
    folder: Path,
) -> None:
    result = broker_cli("start", str(free_port()), str(folder / "data"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: a broker without --identities DIR (passwords) lets any local process act as "
        "any node: give --identities DIR, or --anonymous for a development broker"
    ]
    assert not (folder / "data").exists()
    exposed = ["start", str(free_port()), str(folder / "data"), "--anonymous"]
    result = broker_cli(*exposed, "--bind", "0.0.0.0")
    assert result.returncode != 0 and "needs --identities DIR" in result.stderr


def test_a_deployment_broker_requires_passwords_and_persists_as_the_broker_user(
    folder: Path,
) -> None:
    ids, tls, data = folder / "identities", folder / "tls", folder / "data"
    made = broker_cli("identities", "--out", str(ids), "--worker", "node-1")
    assert made.returncode == 0, made.stderr
    made = broker_cli("tls", "--out", str(tls))
    assert made.returncode == 0, made.stderr
    port, ws_port = free_port(), free_port()
    start = ["start", str(port), str(data), "--identities", str(ids), "--tls", str(tls)]
    process = subprocess.Popen(
        [sys.executable, "-m", "flotta_mqtt.broker", *start, "--websockets", str(ws_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port, 15)
        wait_for_port("127.0.0.1", ws_port, 15)
        config = (data / "mosquitto.conf").read_text().splitlines()
        assert f"listener {port} 127.0.0.1" in config
        assert f"listener {ws_port} 127.0.0.1" in config
        assert "allow_anonymous false" in config

        url = f"mqtts://127.0.0.1:{port}"
        credential = load_credentials(ids / "credentials.json")["node-1"]
        settings = BrokerSettings(
            url=url,
            username=credential.username,
            password=credential.password,
            ca_file=str(tls / "ca.crt"),
        )
        Bus("node-1", settings, _noop, []).start(wait=10).stop()
        with pytest.raises(BusError, match="refused"):
            anonymous = BrokerSettings(url=url, ca_file=str(tls / "ca.crt"))
            Bus("anonymous", anonymous, _noop, []).start(wait=10)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    # mosquitto saves its sessions at shutdown, as the user it dropped to.
    assert (data / "mosquitto.db").is_file(), (data / "mosquitto.log").read_text()[-2000:]
    if os.geteuid() == 0:
        assert data.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid
        assert stat.S_IMODE(data.stat().st_mode) == 0o700  # no other user may plant files
