"""`flotta-mqtt demo`: the federated count on a local broker, three workers, real processes."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, Collect, Compare, Finalize, Operation, Parallel, Sequential
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

WORKERS = ("node-1", "node-2", "node-3")


def write_data(folder: Path, rows: int, seed: int) -> dict[str, Path]:
    """Each worker's own CSV of x, y; sizes differ so the sum is not a lucky multiple."""
    rng = random.Random(seed)
    files = {}
    for i, name in enumerate(WORKERS):
        path = folder / f"{name}.csv"
        lines = ["x,y"] + [
            f"{rng.random():.6f},{rng.gauss(0, 1):.6f}" for _ in range(rows + 97 * i)
        ]
        path.write_text("\n".join(lines) + "\n")
        files[name] = path
    return files


def count_directly(files: dict[str, Path]) -> int:
    total = 0
    for path in files.values():
        total += sum(
            1 for line in path.read_text().splitlines()[1:] if float(line.split(",")[0]) > 0.5
        )
    return total


# The demo's workers answer with differential privacy (the default): each adds Laplace
# noise of scale 1 / EPSILON to its count, so the sum of three is off by more than
# NOISE_BOUND once in a million runs (P(|Laplace(1)| > t) = exp(-t), for each of three).
EPSILON = 1.0
NOISE_BOUND = 3 * math.log(3e6) / EPSILON


def count_artifact(epsilon: float | None = None) -> Artifact:
    """filter x > 0.5 → count on every worker → sum on the initiator; noised with epsilon."""
    params: dict[str, object] = {"where": Compare(column="x", op=">", value=0.5).model_dump()}
    noise = {} if epsilon is None else {"epsilon": epsilon}
    return Artifact(
        project="demo",
        steps=[
            Parallel(
                operation=Operation(name="count", params=params | noise), distribution=Collect()
            ),
            Finalize(operation=Operation(name="count", params=noise)),
        ],
    )


def run_demo(rows: int, seed: int, console: Console) -> int:
    folder = Path(tempfile.mkdtemp(prefix="flotta-demo-"))
    files = write_data(folder, rows, seed)
    storage = f"file://{folder}/store"
    command = [sys.executable, "-m", "flotta_mqtt.cli"]
    # The registry names the three holders: the count binds to all of them, however fast
    # each starts (without one, it would bind to those heard from at submission).
    registry = folder / "registry.yaml"
    registry.write_text(
        "workers:\n" + "".join(f"  {name}: {{projects: [demo]}}\n" for name in files)
    )
    with LocalBroker() as broker:
        common = ["--broker", broker.url, "--storage", storage, "--log-level", "WARNING"]
        database = ["--database", str(folder / "scheduler.db"), "--registry", str(registry)]
        nodes = [subprocess.Popen([*command, "scheduler", *database, *common])]
        nodes += [
            subprocess.Popen(
                [
                    *command,
                    "worker",
                    "--name",
                    name,
                    "--data",
                    f"demo={path}",
                    *common,
                    "--state-dir",
                    str(folder / "state" / name),
                ]
            )
            for name, path in files.items()
        ]
        try:
            with Client(BrokerSettings(url=broker.url), storage=StorageSettings(url=storage)) as c:
                console.print(f"broker {broker.url}; data and store in {folder}")
                released = c.submit(count_artifact(EPSILON)).result(timeout=60)
                counted, expected = released["value"], count_directly(files)
                console.print(
                    f"federated count of x > 0.5 over {len(files)} workers: {counted} "
                    f"({released['mechanism']} noise, epsilon {released['epsilon']} per worker)"
                )
                console.print(f"the same count computed directly on the data:     {expected}")
                trail = c.submit(
                    Artifact(project="demo", steps=[Sequential(operation=Operation(name="trail"))])
                ).result(timeout=60)
                console.print("a Sequential step visited: " + " → ".join(trail["trail"]))
        finally:
            for node in nodes:
                node.terminate()
            for node in nodes:
                node.wait(timeout=15)
    ok = abs(counted - expected) <= NOISE_BOUND
    console.print(
        f"[green]match[/green] within the noise (±{NOISE_BOUND:.0f})"
        if ok
        else "[red]MISMATCH[/red]"
    )
    return 0 if ok else 1
