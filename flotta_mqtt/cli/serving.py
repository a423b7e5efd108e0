"""How a node command runs until it is told to stop: SIGTERM or SIGINT, or its bus gives up.

The signal handlers do nothing in Python: the interpreter's C handler writes each
signal's number to a pipe (`signal.set_wakeup_fd`) and the main thread reads it. So no
signal runs code inside a lock the main thread holds (an Event set from a handler could
deadlock against the wait it interrupted). The first signal stops the node cleanly (its
journal and database are closed as on any stop); a second one while it stops exits at
once with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as shells report
a process killed by it. A bus that gives up for good (another process took the node's
identity over) writes a 0 to the same pipe: the node stops and its error is raised,
which the command turns into one line and exit code 4.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Protocol

from rich.console import Console

from flotta_mqtt import heap
from flotta_mqtt.transport import BusError, FailureHandler
from flotta_mqtt.transport.paho_speedups import enable_paho_speedups

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Node(Protocol):
    def start(self, wait: float | None = ...) -> object: ...

    def stop(self) -> None: ...


def _exit_on_second_signal(signals: int) -> None:
    """Wait for a signal while the node stops; exit at once when one comes."""
    while (number := os.read(signals, 1)[0]) == GAVE_UP:
        pass  # a bus giving up while the node stops changes nothing
    os._exit(128 + number)


GAVE_UP = 0  # written to the signal pipe, which carries signal numbers (never 0)


def serve(make: Callable[[FailureHandler], Node], what: str, console: Console) -> None:
    """Make a node (given what to call when its bus gives up) and run it until SIGTERM or
    SIGINT, then stop it; a second signal forces the exit. If its bus gives up first, stop
    it and raise why (IdentityInUse)."""
    # A node's process is ours alone: it opts in to the speed-ups of paho that a library
    # importing flotta_mqtt never gets unasked (FLOTTA_PAHO_SPEEDUPS=0 keeps paho as it is).
    if os.environ.get("FLOTTA_PAHO_SPEEDUPS", "1") != "0":
        enable_paho_speedups()
    signals, wakeup = os.pipe()
    os.set_blocking(wakeup, False)
    signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
    for number in STOP_SIGNALS:
        signal.signal(number, lambda *_: None)  # the wakeup byte is all that is needed
    failures: list[BusError] = []

    def gave_up(error: BusError) -> None:  # on a bus's thread: the main thread stops the node
        failures.append(error)
        os.write(wakeup, bytes([GAVE_UP]))

    node = make(gave_up)
    node.start(wait=None)
    heap.settle()  # the process is the node's: its start-up heap, frozen before any job
    console.print(f"{what} running; Ctrl-C to stop")
    os.read(signals, 1)
    console.print(f"{what} stopping")
    threading.Thread(
        target=_exit_on_second_signal, args=(signals,), name="second-signal", daemon=True
    ).start()
    node.stop()
    if failures:
        raise failures[0]
