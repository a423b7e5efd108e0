"""A node does its one-time collection at its start: what the start built is frozen out of
the cyclic collector's scans, so the first artifact does not pay for a full collection of
the start-up heap (imports, opened datasets) that every later one is spared."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from flotta_mqtt import heap
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.memory import fresh_memory_broker
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

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
    heap.settle()
    assert gone() is None
    assert not _scanned(kept)


def test_started_nodes_leave_their_start_up_heap_out_of_the_collectors_scans(
    tmp_path: Path,
) -> None:
    broker = fresh_memory_broker("heap").broker_settings()
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    data = tmp_path / "w0.csv"
    data.write_text("x\n" + "".join(f"{i}\n" for i in range(10)))
    scheduler = SchedulerNode(
        SchedulerConfig(broker=broker, storage=storage, database=tmp_path / "s.db")
    )
    worker = WorkerAgent(
        WorkerConfig(
            name="w0",
            broker=broker,
            storage=storage,
            datasets={"demo": {"paths": [data]}},
            state_dir=tmp_path / "w0.state",
        )
    )
    built = [scheduler.scheduler.repository, worker.journal, worker.tasks, worker.store]
    assert all(_scanned(thing) for thing in built)  # before its start, as any new object
    scheduler.start(wait=TIMEOUT)
    worker.start(wait=TIMEOUT)
    try:
        assert not any(_scanned(thing) for thing in built)
    finally:
        worker.stop()
        scheduler.stop()
    # Stopped, they are scanned again: their cycles, garbage now, are freed.
    assert all(_scanned(thing) for thing in built)
