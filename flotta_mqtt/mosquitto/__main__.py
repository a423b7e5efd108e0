"""`python -m flotta_mqtt.mosquitto [PORT] [DIR]`: run a development broker until Ctrl-C."""

import signal
import sys
import threading
from pathlib import Path

from flotta_mqtt.mosquitto.local import LocalBroker

port = int(sys.argv[1]) if len(sys.argv) > 1 else 1883
data = Path(sys.argv[2] if len(sys.argv) > 2 else "broker-data").resolve()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
broker = LocalBroker(port=port, data_dir=data).start()
print(f"mosquitto on {broker.url}, data in {data}, log in {broker.log_path}; Ctrl-C to stop")
stop.wait()
broker.stop()
