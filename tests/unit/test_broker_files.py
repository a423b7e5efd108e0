"""broker/mosquitto.conf is the rendered config, so the shipped file and the code agree."""

from pathlib import Path

from flotta_mqtt.broker.local import MosquittoSettings, render_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_broker_config_is_the_rendered_one() -> None:
    rendered = render_config(
        MosquittoSettings(port=1883, data_dir=Path("/var/lib/flotta-mqtt/broker"))
    )
    assert (ROOT / "broker" / "mosquitto.conf").read_text() == rendered


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = "bash broker/install.sh test && python3 -m pytest"
    assert command in (ROOT / "README.md").read_text()
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == command
