"""Small helpers shared by the benchmarks: percentiles, medians over runs, tables."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

console = Console(width=120, highlight=False)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median_of_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the runs (each run a dict of named figures)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def machine_load() -> str:
    """The load average and core count, so a reader can tell a busy machine's figures."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return f"{os.cpu_count()} cores"
    return f"{os.cpu_count()} cores, load average {load:.1f}"


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat), read before and after a run."""
    try:
        with open("/proc/stat") as stat:
            return [int(field) for field in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def stolen(before: list[int] | None, after: list[int] | None) -> str:
    """The share of CPU time the hypervisor gave to other machines between two readings:
    on a virtual machine, what makes one run slower than the next without any load here."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return ""
    delta = [a - b for a, b in zip(after[:8], before[:8], strict=True)]  # user … steal
    total = sum(delta)
    return f"; {100 * delta[7] / total:.0f}% of the CPU time stolen by the host" if total else ""


def print_table(title: str, columns: list[str], rows: list[list[str]], note: str = "") -> None:
    console.print(f"[bold]{title}[/bold]")
    table = Table(box=box.MARKDOWN)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if note:
        console.print(note)
    console.print()
