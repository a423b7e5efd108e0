"""`python -m bench [compare|scale|dispatch|binding|analytics|functions|workers|all] [--runs N]`.

With no argument: `compare` (flotta_mqtt next to the raw MQTT floor, Dask, Celery and Ray
on fan-out, chain and fan-in) and then `scale` (100,000 jobs bound and scheduled).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import _report

CHOICES = [
    "default",
    "compare",
    "scale",
    "dispatch",
    "binding",
    "analytics",
    "functions",
    "workers",
    "all",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="?", choices=CHOICES, default="default")
    parser.add_argument("--runs", type=int, default=3, help="report the median of N runs")
    parser.add_argument(
        "--systems",
        default="floor,flotta_mqtt,dask,celery,ray",
        help="compare: which systems, comma-separated (peers not installed are skipped)",
    )
    parser.add_argument("--fan-out", type=int, default=10_000, help="compare: fan-out tasks")
    parser.add_argument("--fan-in", type=int, default=1_000, help="compare: fan-in width")
    parser.add_argument("--chain", type=int, default=300, help="links in the chain")
    parser.add_argument(
        "--database",
        type=Path,
        default=None,
        help="compare: the scheduler's SQLite file (e.g. /dev/shm/flotta-bench.db for a RAM "
        "disk); a temporary directory on disk by default",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="compare: the folder under which workers store products (e.g. /dev/shm); a "
        "temporary directory on disk by default",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="compare: py-spy the scheduler process during the first fan-out; folded stacks "
        "to this file, top functions printed",
    )
    parser.add_argument("--scale-jobs", type=int, default=100_000, help="scale: jobs to run")
    parser.add_argument(
        "--artifacts", type=int, default=500, help="dispatch: fan-out artifacts (4 jobs each)"
    )
    parser.add_argument("--floor", type=int, default=500, help="dispatch: floor round trips")
    parser.add_argument("--size-mb", type=int, default=1024, help="analytics: the CSV's size")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="analytics: keep the files in this folder and reuse them in later runs of the "
        "same --size-mb (a temporary folder, removed afterwards, by default)",
    )
    parser.add_argument(
        "--cap-mb",
        type=int,
        default=None,
        help="analytics: run flotta_mqtt's processes in a memory cgroup of this size "
        "(cgroup v1, as root); the CSV only",
    )
    parser.add_argument(
        "--sources",
        default="csv,parquet,sqlite",
        help="analytics: the sources to time, comma-separated (csv, parquet, sqlite)",
    )
    parser.add_argument(
        "--fleet-sizes",
        default="10,100,1000",
        help="workers: how many simulated workers, comma-separated (one column each)",
    )
    parser.add_argument(
        "--fleet-jobs", type=int, default=10_000, help="workers: jobs of the big artifact"
    )
    parser.add_argument(
        "--fleet-stream", type=float, default=10.0, help="workers: small workflows per second"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    start = time.perf_counter()
    which = args.which
    if which in ("default", "compare", "all"):
        from bench import compare

        compare.run(
            runs=args.runs,
            shapes=compare.Shapes(args.fan_out, args.chain, args.fan_in),
            systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
            database=args.database,
            profile=args.profile,
            store=args.store,
        )
    if which in ("default", "scale", "all"):
        from bench import scale

        scale.run(runs=args.runs, jobs=args.scale_jobs)
    if which in ("dispatch", "all"):
        from bench import dispatch

        dispatch.run(runs=args.runs, artifacts=args.artifacts, rounds=args.chain, count=args.floor)
    if which in ("binding", "all"):
        from bench import binding

        binding.run(runs=args.runs)
    if which in ("analytics", "all"):
        from bench import analytics

        analytics.run(
            size_mb=args.size_mb,
            runs=args.runs,
            cap_mb=args.cap_mb,
            sources=args.sources.split(","),
            data=args.data,
        )
    if which in ("functions", "all"):
        from bench import functions

        functions.run()
    if which in ("workers", "all"):
        from bench import workers

        workers.run(
            runs=args.runs,
            sizes=tuple(int(n) for n in args.fleet_sizes.split(",") if n.strip()),
            jobs=args.fleet_jobs,
            stream_rate=args.fleet_stream,
        )
        from bench import per_worker

        per_worker.run()
    _report.console.print(f"bench finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
