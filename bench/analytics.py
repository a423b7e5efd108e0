"""Federated analytics on large files: count and mean with a filter, beside Polars and DuckDB.

The same rows (columns x, y, site; 64 MB of random CSV rows written as many times as
needed, which the readers cannot tell) are written under /tmp as a CSV of about
`size_mb` MB, a Parquet file and a SQLite table, and removed afterwards. For each source
the same two answers, the rows where x > 0.5 and the mean of their y, are timed:

- flotta_mqtt: end to end, from submit to result, one `summary` artifact (count and mean
  computed by the worker's engine in one scan) on a fresh LocalBroker, with a scheduler
  and one worker in one process (started before the clock starts). On a file, twice: as
  a site's worker answers, from its columnar copy of the files (copies.py; the worker's
  state is kept beside the files, so the first run makes the copy, before the clock, and
  says how long it took; later runs reuse it), and "in place", scanning the files
  (`columnar_copy: false`);
- Polars: `scan_*(...).filter(...).select(len, mean).collect(engine="streaming")`; on
  SQLite, `read_database_uri` of the same statement as sqlite3's (ADBC's driver);
- DuckDB: one `SELECT count(*), avg(y) ... WHERE x > 0.5` on the file (on SQLite, through
  its sqlite extension where it is installed);
- sqlite3: the same statement run by SQLite itself (the floor for a table).

Each figure is taken in a fresh process (spawned), so its memory peak (the process's
peak RSS, VmHWM) is its own; the page cache is warm for all (the files were just written).
`data` keeps the files in a folder of one's own and reuses them in a later run (the 1 GB
SQLite table takes minutes to write); `sources` times only some of them.
`cap_mb` runs flotta_mqtt's processes (worker, scheduler, mosquitto) in a memory cgroup
of that size (cgroup v1, as root), on the CSV alone. (RLIMIT_AS is no such cap: the
libraries' address space reservations alone pass 1 GB, and the worker failed to start.)
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench._report import console, machine_load, print_table

BLOCK_MB = 64
SITES = np.array(["north", "south", "east", "west"])
Answer = tuple[float, int, float, float]  # seconds, count, mean, peak RSS in MB
STATEMENT = "SELECT count(*), avg(y) FROM t WHERE x > 0.5"  # a table's peers run it
OURS = "flotta_mqtt"  # a file source answered from the worker's columnar copy
IN_PLACE = "flotta_mqtt, in place"  # the files scanned in place (columnar_copy: false)


def write_sources(folder: Path, size_mb: int, copies_too: bool) -> tuple[int, float, int]:
    """The CSV (and its Parquet and SQLite copies) of the rows; the rows with x > 0.5: their
    count and their sum of y (expected), and the number of rows."""
    rng = np.random.default_rng(7)
    rows = BLOCK_MB * (1 << 20) // 26  # about 26 bytes a row
    x, y = rng.random(rows).round(6), rng.normal(10.0, 3.0, rows).round(6)
    site = SITES[rng.integers(0, 4, rows)]
    text = (
        "\n".join(f"{a:.6f},{b:.6f},{s}" for a, b, s in zip(x, y, site, strict=True)).encode()
        + b"\n"
    )
    copies = max(1, round(size_mb / (len(text) / (1 << 20))))
    with (folder / "big.csv").open("wb") as f:
        f.write(b"x,y,site\n")
        for _ in range(copies):
            f.write(text)
    if copies_too:
        table = pa.table({"x": x, "y": y, "site": site})
        with pq.ParquetWriter(folder / "big.parquet", table.schema) as writer:
            for _ in range(copies):
                writer.write_table(table, row_group_size=1 << 20)
        with sqlite3.connect(folder / "big.db") as con:
            con.execute("CREATE TABLE t (x REAL, y REAL, site TEXT)")
            con.executemany(
                "INSERT INTO t VALUES (?, ?, ?)",
                zip(x.tolist(), y.tolist(), site.tolist(), strict=True),
            )
            for _ in range(copies - 1):
                con.execute("INSERT INTO t SELECT * FROM t WHERE rowid <= ?", (rows,))
    over = x > 0.5
    return int(over.sum()) * copies, float(y[over].sum()) * copies, rows * copies


def _peak_mb() -> float:
    """The process's peak RSS (VmHWM: getrusage's maximum survives exec, so a spawned
    child would report its parent's)."""
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _polars(source: str, path: str) -> tuple[int, float]:
    import polars as pl

    if source == "sqlite":  # the filter and aggregate pushed down, as a user would
        found = pl.read_database_uri(STATEMENT, f"sqlite:///{path}", engine="adbc")
        count, mean = found.row(0)
        return int(count), float(mean)
    frame = pl.scan_csv(path) if source == "csv" else pl.scan_parquet(path)
    found = frame.filter(pl.col("x") > 0.5).select(pl.len(), pl.col("y").mean())
    count, mean = found.collect(engine="streaming").row(0)
    return int(count), float(mean)


def _duckdb(source: str, path: str) -> tuple[int, float]:
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    if source == "sqlite":
        con.execute("LOAD sqlite")  # raises where the extension is not installed
        relation = "sqlite_scan(?, 't')"
    else:
        relation = "read_csv(?)" if source == "csv" else "read_parquet(?)"
    found = con.execute(f"SELECT count(*), avg(y) FROM {relation} WHERE x > 0.5", [path])
    count, mean = found.fetchone()  # type: ignore[misc]
    return int(count), float(mean)


def _sqlite3(source: str, path: str) -> tuple[int, float]:
    with sqlite3.connect(path) as con:
        count, mean = con.execute(STATEMENT).fetchone()
    return int(count), float(mean)


PEERS: dict[str, Callable[[str, str], tuple[int, float]]] = {
    "Polars": _polars,
    "DuckDB": _duckdb,
    "sqlite3": _sqlite3,
}


def _peer(name: str, source: str, path: str, out: Any) -> None:
    try:
        start = time.perf_counter()
        count, mean = PEERS[name](source, path)
        out.send((time.perf_counter() - start, count, mean, _peak_mb()))
    except Exception as exc:
        out.send(f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")


CGROUPS = Path("/sys/fs/cgroup/memory")  # cgroup v1's memory controller


def _capped(cap_mb: int) -> Path:
    """A memory cgroup limited to `cap_mb` MB (its processes' memory, page cache included:
    the kernel reclaims the file's pages rather than fail)."""
    group = CGROUPS / f"flotta-bench-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(cap_mb << 20))
    return group


def _ours(source: str, path: str, copied: bool, group: str | None, out: Any) -> None:
    if group is not None:
        (Path(group) / "cgroup.procs").write_text(str(os.getpid()))  # and mosquitto, started here
    from flotta_mqtt import Artifact, Client, Collect, Finalize, Operation, Parallel, Query, heap
    from flotta_mqtt.broker import LocalBroker
    from flotta_mqtt.nodes import SchedulerNode
    from flotta_mqtt.scheduler.config import SchedulerConfig
    from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
    from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

    if source == "sqlite":
        data: dict[str, Any] = {"sql": {"url": f"sqlite:///{path}", "table": "t"}}
    else:
        data = {"paths": [path]}
    # A site answering exactly: the worker counts the rows at its start, before the clock.
    data["privacy"] = {"exact": True}
    if source != "sqlite":
        data["columnar_copy"] = copied
    # The worker's state (its copy of the files) is kept beside the files, as a site's
    # worker keeps it across restarts: the first run makes the copy, later ones reuse it.
    state = Path(path).parent / f"state-{source}"
    with tempfile.TemporaryDirectory(prefix="flotta-bench-", dir="/tmp") as tmp:
        folder = Path(tmp)
        storage = StorageSettings(url=(folder / "store").as_uri())
        with LocalBroker() as broker:
            settings = BrokerSettings(url=broker.url)
            scheduler = SchedulerNode(
                SchedulerConfig(broker=settings, storage=storage, database=folder / "s.db")
            ).start()
            config = WorkerConfig(
                name="w0", broker=settings, storage=storage, datasets={"big": data}, state_dir=state
            )
            started = time.perf_counter()
            worker = WorkerAgent(config).start()
            try:
                copy = getattr(worker.datasets["big"], "copy", None)
                if copy is not None and copied:
                    if not copy.wait(3600):
                        raise RuntimeError("the worker made no copy of its files (see its log)")
                    made = sorted((state / "copies" / "big").glob("*.duckdb"))
                    console.print(
                        f"{Path(path).name}: the worker's copy ready "
                        f"{time.perf_counter() - started:.1f} s after its start "
                        f"({made[0].stat().st_size >> 20} MB)"
                    )
                with Client(settings, storage=storage) as client:
                    while not any(p.node == "w0" and p.online for p in client.workers()):
                        time.sleep(0.05)
                    heap.settle()  # as the node commands' processes do (cli/serving.py)
                    q = Query()
                    over = q[q["x"] > 0.5].params()
                    both = {
                        "n": {"name": "count", "params": over},
                        "m": {"name": "mean", "params": {"column": "y", **over}},
                    }
                    operation = Operation(name="summary", params={"operations": both})
                    artifact = Artifact(
                        project="big", steps=[Parallel(operation, Collect()), Finalize(operation)]
                    )
                    start = time.perf_counter()
                    result = client.submit(artifact).result(timeout=3600)
                    seconds = time.perf_counter() - start
            finally:
                worker.stop()
                scheduler.stop()
    out.send((seconds, int(result["n"]), float(result["m"]), _peak_mb()))


def _spawned(target: Callable[..., None], *args: Any) -> Answer | str:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(*args, send))
    process.start()
    send.close()  # the child's end only: a child that dies closes the pipe
    try:
        found = receive.recv() if receive.poll(3600) else "timed out"
    except EOFError:
        found = "the process died"
    process.join()
    return found if isinstance(found, tuple | str) else "no answer"


def _sources(folder: Path, size_mb: int, copies_too: bool) -> tuple[int, float, int]:
    """`write_sources` in `folder`, or what an earlier run wrote there for the same sizes
    (its answers kept beside the files)."""
    kept = folder / "expected.json"
    if kept.exists():
        found = json.loads(kept.read_text())
        if found["size_mb"] == size_mb and (found["copies"] or not copies_too):
            console.print(f"reusing the files in {folder}")
            return found["count"], found["sum"], found["rows"]
    console.print(f"writing a {size_mb} MB CSV{', its Parquet and SQLite copies' * copies_too}")
    kept.unlink(missing_ok=True)
    for name in ("big.csv", "big.parquet", "big.db"):
        (folder / name).unlink(missing_ok=True)
    count, sum_, rows = write_sources(folder, size_mb, copies_too)
    made = {"size_mb": size_mb, "copies": copies_too, "count": count, "sum": sum_, "rows": rows}
    kept.write_text(json.dumps(made))
    return count, sum_, rows


def run(
    size_mb: int = 1024,
    runs: int = 1,
    cap_mb: int | None = None,
    sources: Sequence[str] = ("csv", "parquet", "sqlite"),
    data: Path | None = None,
) -> None:
    paths = {"csv": "big.csv", "parquet": "big.parquet", "sqlite": "big.db"}
    unknown = set(sources) - set(paths)
    if unknown:
        raise ValueError(f"no such source: {', '.join(sorted(unknown))} (of {', '.join(paths)})")
    with contextlib.ExitStack() as stack:
        if data is None:
            folder = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="flotta-bench-", dir="/tmp"))
            )
        else:
            folder = data
            folder.mkdir(parents=True, exist_ok=True)
        expected_count, expected_sum, rows = _sources(folder, size_mb, cap_mb is None)
        expected = (expected_count, expected_sum / expected_count)
        sources = ["csv"] if cap_mb is not None else [s for s in paths if s in sources]
        table = []
        group = _capped(cap_mb) if cap_mb is not None else None
        for source in sources:
            path = str(folder / paths[source])
            peers = ["sqlite3", "Polars", "DuckDB"] if source == "sqlite" else ["Polars", "DuckDB"]
            ours = [OURS] if source == "sqlite" else [OURS, IN_PLACE]
            times: dict[str, list[Answer]] = {}
            failed: dict[str, str] = {}
            for _ in range(runs):  # alternated, so that a busy moment hits every one
                for name in [*ours, *peers]:
                    found = (
                        _spawned(_ours, source, path, name == OURS, str(group) if group else None)
                        if name in ours
                        else _spawned(_peer, name, source, path)
                    )
                    if isinstance(found, str):
                        failed[name] = found
                    else:
                        times.setdefault(name, []).append(found)
            table += _rows(source, times, failed, expected, Path(path).stat().st_size / 1e6)
        if group is not None:
            group.rmdir()
    cap = f"; flotta_mqtt in a memory cgroup of {cap_mb} MB" if cap_mb is not None else ""
    print_table(
        f"count and mean of y where x > 0.5, {rows:,} rows: seconds (best of {runs}), "
        "flotta_mqtt end to end",
        [
            "source",
            "system",
            "seconds",
            "MB/s",
            "flotta_mqtt's speed / it",
            "in place's speed / it",
            "peak RSS MB",
            "ok",
        ],
        table,
        note=f"{machine_load()}{cap}",
    )


def _rows(
    source: str,
    times: dict[str, list[Answer]],
    failed: dict[str, str],
    expected: tuple[int, float],
    megabytes: float,
) -> list[list[str]]:
    best = {name: min(answers) for name, answers in times.items()}
    rows = []
    for name, (seconds, count, mean, peak) in best.items():
        ok = count == expected[0] and math.isclose(mean, expected[1], rel_tol=1e-9)
        ratios = [
            f"{seconds / best[ours][0]:.2f}" if ours in best and name != ours else ""
            for ours in (OURS, IN_PLACE)
        ]
        rows.append(
            [
                f"{source} ({megabytes:,.0f} MB)",
                name,
                f"{seconds:.2f}",
                f"{megabytes / seconds:,.0f}",
                *ratios,
                f"{peak:,.0f}",
                "yes" if ok else "[red]NO[/red]",
            ]
        )
    rows += [[source, name, why, "", "", "", "", ""] for name, why in failed.items()]
    return rows
