"""Running mosquitto for development, tests and the demo: config rendering and a local broker."""

from flotta_mqtt.mosquitto.local import BrokerSettings, LocalBroker, render_config

__all__ = ["BrokerSettings", "LocalBroker", "render_config"]
