"""A node's process does its one-time collection once its node has started: what the
start built is frozen out of the cyclic collector's scans, so the first artifact does not
pay for a full collection of the start-up heap that every later one is spared. Only the
node commands' processes do it: a library embedding a node keeps its collector as it is."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

from flotta_mqtt import heap
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.memory import fresh_memory_broker
from flotta_mqtt.transport.settings import StorageSettings

TIMEOUT = 20.0


def _scanned(thing: object) -> bool:
    """Whether the cyclic collector still scans `thing` (frozen objects it never lists)."""
    return any(found is thing for found in gc.get_objects())


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settle_collects_the_garbage_before_freezing_what_lives_on() -> None:
    garbage, kept = _Cycle(), _Cycle()
    gone = weakref.ref(garbage)
    del garbage  # a cycle: only the collector frees it, and never once frozen
    try:
        heap.settle()
        assert gone() is None
        assert not _scanned(kept)
    finally:
        gc.unfreeze()


def test_an_embedded_node_leaves_its_processs_collector_as_it_is(tmp_path: Path) -> None:
    broker = fresh_memory_broker("heap").broker_settings()
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    scheduler = SchedulerNode(
        SchedulerConfig(broker=broker, storage=storage, database=tmp_path / "s.db")
    )
    scheduler.start(wait=TIMEOUT)
    try:
        assert gc.get_freeze_count() == 0
    finally:
        scheduler.stop()


SERVED = textwrap.dedent(
    """
    import gc, os, signal
    from rich.console import Console
    from flotta_mqtt.cli.serving import serve

    class Node:
        def start(self, wait=None):
            self.built = object()
            os.kill(os.getpid(), signal.SIGTERM)  # read by serve once the node has started
            return self

        def stop(self):
            print(gc.get_freeze_count() > 0, any(o is self for o in gc.get_objects()))

    serve(lambda gave_up: Node(), "node", Console(stderr=True))
    """
)


def test_a_node_command_freezes_its_start_up_heap_once_the_node_has_started() -> None:
    found = subprocess.run(
        [sys.executable, "-c", SERVED], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["True", "False"]  # frozen, the node among what was
