"""`python -m bench [dispatch|binding|analytics|functions|all] [--runs N]`: print tables."""

from __future__ import annotations

import argparse
import time

from bench import _report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "which",
        nargs="?",
        choices=["dispatch", "binding", "analytics", "functions", "all"],
        default="all",
    )
    parser.add_argument("--runs", type=int, default=1, help="report the median of N runs")
    parser.add_argument(
        "--artifacts", type=int, default=500, help="fan-out artifacts (4 jobs each)"
    )
    parser.add_argument("--chain", type=int, default=300, help="links in the chain")
    parser.add_argument("--floor", type=int, default=500, help="sequential floor round trips")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    start = time.perf_counter()
    if args.which in ("dispatch", "all"):
        from bench import dispatch

        dispatch.run(runs=args.runs, artifacts=args.artifacts, rounds=args.chain, count=args.floor)
    if args.which in ("binding", "all"):
        from bench import binding

        binding.run(runs=args.runs)
    if args.which in ("analytics", "all"):
        from bench import analytics

        analytics.run()
    if args.which in ("functions", "all"):
        from bench import functions

        functions.run()
    _report.console.print(f"bench finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
