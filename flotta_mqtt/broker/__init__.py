"""Running mosquitto for development, tests and the demo: config rendering and a local broker."""

from flotta_mqtt.broker.local import LocalBroker, MosquittoSettings, render_config

__all__ = ["LocalBroker", "MosquittoSettings", "render_config"]
