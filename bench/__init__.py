"""Benchmarks of flotta_mqtt: they print figures, they assert nothing.

`python -m bench dispatch` measures the broker's floor and the scheduler's dispatch on a
real mosquitto; `python -m bench binding` measures binding large artifacts. See README.md.
"""

from flotta_mqtt.transport.paho_speedups import enable_paho_speedups

# Every process of a run (each imports this package, spawned ones included) opts in to
# the speed-ups the CLI's nodes use, the floor's paho clients too: like is measured with like.
enable_paho_speedups()
