"""The seed's example: `sleep_sum` calls run on workers; the script only unwraps them.

    python examples/distributed_sum.py --local              # broker, scheduler, 3 workers here
    python examples/distributed_sum.py --broker mqtt://host:1883 --storage s3://bucket/store

Without `--local` it needs a scheduler and workers that run shipped code: a worker's
config must say `executors: [python]` and `allow_code: true` (see the README's
"Distributed functions"). The workspace shipped to them is this script's folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from time import sleep

from flotta_mqtt import configure, distributed, gather
from flotta_mqtt.functions import shutdown

PAUSE = 0.01  # seconds each call sleeps (the seed sleeps 1 s; --pause changes it)


@distributed(platform="*", threads=4)
def sleep_sum(a: int, b: int) -> int:
    sleep(PAUSE)
    return a + b


@contextlib.contextmanager
def local_cluster(workers: int = 3) -> Iterator[tuple[str, str]]:
    """A mosquitto, a scheduler and workers allowed to run shipped code, in this process."""
    from flotta_mqtt import Client
    from flotta_mqtt.broker import LocalBroker
    from flotta_mqtt.nodes import SchedulerNode
    from flotta_mqtt.scheduler.config import SchedulerConfig
    from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
    from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

    with tempfile.TemporaryDirectory(prefix="flotta-sum-") as tmp, LocalBroker() as broker:
        folder = Path(tmp)
        settings = BrokerSettings(url=broker.url)
        storage = StorageSettings(url=(folder / "store").as_uri())
        nodes: list[SchedulerNode | WorkerAgent] = []
        try:
            config = SchedulerConfig(broker=settings, storage=storage, database=folder / "s.db")
            nodes.append(SchedulerNode(config).start())
            names = [f"node-{i + 1}" for i in range(workers)]
            for name in names:
                worker = WorkerConfig(
                    name=name,
                    broker=settings,
                    storage=storage,
                    executors=["python"],
                    allow_code=True,
                    max_jobs=4,
                )
                nodes.append(WorkerAgent(worker).start())
            with Client(settings) as client:
                while {w.node for w in client.workers() if w.online} < set(names):
                    time.sleep(0.05)
            yield broker.url, storage.url
        finally:
            for node in reversed(nodes):
                node.stop()


def main() -> None:
    global PAUSE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("FLOTTA_BROKER", "mqtt://127.0.0.1:1883")
    )
    parser.add_argument(
        "--storage", default=os.environ.get("FLOTTA_STORAGE", "file://./flotta-store")
    )
    parser.add_argument("--local", action="store_true", help="start local nodes in-process")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=PAUSE)
    args = parser.parse_args()
    PAUSE = args.pause  # read when sleep_sum is first pickled, at its first call

    with contextlib.ExitStack() as stack:
        broker, storage = (
            stack.enter_context(local_cluster()) if args.local else (args.broker, args.storage)
        )
        configure(broker=broker, storage=storage)  # workspace: this script's folder
        stack.callback(shutdown)  # disconnect before the local broker goes
        start = time.perf_counter()
        responses = [sleep_sum(x, x + 1) for x in range(args.calls)]
        values = gather(responses, progress=True)
        wall = time.perf_counter() - start
        assert values == [2 * x + 1 for x in range(args.calls)]
        print(values[:5], "...", values[-1])
        print(
            f"{args.calls} calls in {wall:.2f} s "
            f"(serially {args.calls * args.pause:.1f} s of sleeping)"
        )


if __name__ == "__main__":
    main()
