"""broker/mosquitto.conf is the rendered config, so the shipped file and the code agree."""

import pwd
from pathlib import Path

import pytest

from flotta_mqtt.broker.local import MosquittoSettings, render_config

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_DATA_DIR = Path("/var/lib/mosquitto")  # made by Debian's package, owned by mosquitto


def test_shipped_broker_config_is_the_rendered_one() -> None:
    rendered = render_config(MosquittoSettings(port=1883, data_dir=DEBIAN_DATA_DIR))
    assert (ROOT / "broker" / "mosquitto.conf").read_text() == rendered


@pytest.mark.parametrize("name", ["mosquitto.conf", "mosquitto-websockets.conf"])
def test_shipped_configs_persist_where_debians_broker_user_may_write(name: str) -> None:
    """Started as root, mosquitto drops to user `mosquitto` before it saves anything."""
    text = (ROOT / "broker" / name).read_text()
    location = Path(text.split("persistence_location ", 1)[1].split("\n", 1)[0])
    try:
        broker = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no user mosquitto here: Debian's mosquitto package is not installed")
    assert location.is_dir(), f"{name}: persistence_location {location} does not exist"
    assert location.stat().st_uid == broker.pw_uid, f"{location} is not the broker user's"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = "bash broker/install.sh test && .venv/bin/python -m pytest"
    assert command in (ROOT / "README.md").read_text()
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == command
