"""The no-op tasks the peers run (importable by their worker processes), and Celery's app.

Celery's broker and result backend come from BENCH_REDIS_URL, set by the harness before
it starts the Celery worker and before this module is imported in the driver.
"""

from __future__ import annotations

import os
from typing import Any


def noop(i: int = 0) -> int:
    return i


def inc(x: int) -> int:
    return x + 1


def agg(values: list[Any]) -> int:
    return len(values)


def agg_args(*values: Any) -> int:
    return len(values)


def celery_app() -> Any:
    from celery import Celery

    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    app = Celery("bench", broker=url, backend=url)
    app.conf.update(
        worker_hijack_root_logger=False,
        result_expires=600,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="bench.noop")(noop)
    app.task(name="bench.inc")(inc)
    app.task(name="bench.agg")(agg)
    return app


app = celery_app() if os.environ.get("BENCH_REDIS_URL") else None
