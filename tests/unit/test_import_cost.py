"""What importing the package costs: the workbench's entry points (the package, its
client and the `flotta-mqtt` command) load none of the nodes' heavy libraries, which
would cost every command and every process about a second before it does anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

# networkx (a tenth of a second) is the scheduler's, for binding and checking task graphs.
HEAVY = ("pyarrow", "duckdb", "psycopg", "opendp", "sklearn", "kubernetes", "docker", "networkx")


@pytest.mark.parametrize("module", ["flotta_mqtt", "flotta_mqtt.client", "flotta_mqtt.cli.main"])
def test_a_workbench_entry_point_loads_no_heavy_library(module: str) -> None:
    check = (
        f"import sys, {module}\nprint(' '.join(name for name in {HEAVY!r} if name in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert not loaded, f"importing {module} loads {', '.join(loaded)}"
