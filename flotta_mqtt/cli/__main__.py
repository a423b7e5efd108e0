"""`python -m flotta_mqtt.cli` is `flotta-mqtt`."""

from flotta_mqtt.cli.main import app

app()
