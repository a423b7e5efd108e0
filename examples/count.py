"""The federated count from a Python workbench.

Start a broker, a scheduler and workers holding project "demo" (or run
`python3 -m flotta_mqtt.cli demo`, which does all of it), then:

    python3 examples/count.py --broker mqtt://127.0.0.1:1883 --storage file://./flotta-store
"""

import argparse

from flotta_mqtt import (
    Artifact,
    Client,
    Collect,
    Compare,
    Finalize,
    Operation,
    Parallel,
    Sequential,
    StorageSettings,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
parser.add_argument("--storage", default="file://./flotta-store")
args = parser.parse_args()

over_half = Compare(column="x", op=">", value=0.5)
count = Artifact(
    project="demo",
    steps=[
        Parallel(Operation(name="count", params={"where": over_half.model_dump()}), Collect()),
        Finalize(Operation(name="count")),
    ],
)
# The same count, passed from worker to worker: no worker sees another's rows.
chained = Artifact(
    project="demo",
    steps=[Sequential(Operation(name="count", params={"where": over_half.model_dump()}))],
)

with Client(args.broker, storage=StorageSettings(url=args.storage)) as client:
    print("workers:", [w.node for w in client.workers() if not w.initiator])
    print("count (parallel):  ", client.submit(count).result(timeout=60))
    print("count (sequential):", client.submit(chained).result(timeout=60))
