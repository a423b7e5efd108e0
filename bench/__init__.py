"""Benchmarks of flotta_mqtt: they print figures, they assert nothing.

`python -m bench dispatch` measures the broker's floor and the scheduler's dispatch on a
real mosquitto; `python -m bench binding` measures binding large artifacts. See README.md.
"""
