"""The README's demo: a broker, a scheduler and three worker processes, the count checked."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from flotta_mqtt.cli.demo import count_directly, run_demo, write_data

pytestmark = pytest.mark.integration


def test_demo_counts_across_three_worker_processes_and_matches_the_data() -> None:
    output = io.StringIO()
    code = run_demo(rows=300, seed=7, console=Console(file=output, width=200))
    text = output.getvalue()
    assert code == 0, text
    assert "match" in text
    assert "node-1 → node-2 → node-3" in text


def test_demo_data_differs_per_worker_and_the_direct_count_is_exact(tmp_path: Path) -> None:
    files = write_data(tmp_path, rows=50, seed=3)
    sizes = [len(p.read_text().splitlines()) - 1 for p in files.values()]
    assert sizes == [50, 147, 244]
    rows = [line for p in files.values() for line in p.read_text().splitlines()[1:]]
    assert count_directly(files) == sum(1 for r in rows if float(r.split(",")[0]) > 0.5)
