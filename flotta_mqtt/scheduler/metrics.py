"""The scheduler's metrics in Prometheus' text format, served on an optional HTTP port.

Counters and histograms are updated by the scheduler's core where things happen (a
dispatch, a start, a completion, a failure, a retry, an artifact changing state). Gauges
that describe the present are the core's `snapshot()`, which the service takes on its
own thread at scrape time.

Exposition format: https://prometheus.io/docs/instrumenting/exposition_formats/ (0.0.4).
Only the standard library: a scrape is a few hundred bytes of text.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.scheduler.records import ArtifactRecord

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Dispatch latency: from publishing a job to its worker's "started" (queueing included).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Job run time, as its worker measured it.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        # Per bucket, the values whose smallest bound it is (the last: above them all);
        # `lines` adds them up. Two per job: one bisect, not a pass over every bucket.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        cumulative = itertools.accumulate(self.counts[:-1])
        out = [
            f'{name}_bucket{{le="{_number(bound)}"}} {n}'
            for bound, n in zip(self.bounds, cumulative, strict=True)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


@dataclass
class Gauges:
    """The present, as the scheduler thread sees it at one moment."""

    queue_depth: Counter[str] = field(default_factory=Counter)  # worker → dispatched + running
    artifacts: Counter[str] = field(default_factory=Counter)  # state → unfinished artifacts
    jobs: Counter[str] = field(default_factory=Counter)  # state → jobs of unfinished artifacts
    retry_pending: int = 0  # jobs waiting out a retry backoff

    @classmethod
    def of(cls, artifacts: Iterable[ArtifactRecord]) -> Gauges:
        """Unfinished artifacts and their jobs by state, jobs waiting out a retry backoff,
        jobs dispatched to or running on each worker."""
        gauges = cls()
        for record in artifacts:
            gauges.artifacts[str(record.state)] += 1
            for state, n in record.counts.items():
                gauges.jobs[str(state)] += n
            gauges.retry_pending += len(record.attempts.retry_at)
            if record.graph is None:
                continue
            for job_id in record.attempts.dispatched_at:
                if record.jobs[job_id].state in (JobState.DISPATCHED, JobState.RUNNING):
                    gauges.queue_depth[record.worker(job_id)] += 1
        return gauges


class SchedulerMetrics:
    """What the scheduler counts. Every method is cheap and thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.dispatched_total = 0
        self.started_total = 0
        self.completed_total = 0
        self.failed_total = 0
        self.retried_total = 0
        self.artifacts_total: Counter[str] = Counter()  # state → artifacts that entered it
        self.dispatch_latency = Histogram(LATENCY_BUCKETS)
        self.job_duration = Histogram(DURATION_BUCKETS)

    # --- hooks, called by the scheduler thread -------------------------------------------

    def dispatched(self) -> None:
        """A job attempt was published to its worker (a new attempt, not a re-send)."""
        with self._lock:
            self.dispatched_total += 1

    def started(self, latency: float | None) -> None:
        """A worker started an attempt `latency` seconds after it was dispatched."""
        with self._lock:
            self.started_total += 1
            if latency is not None:
                self.dispatch_latency.observe(latency)

    def completed(self, duration: float | None = None) -> None:
        with self._lock:
            self.completed_total += 1
            if duration is not None and math.isfinite(duration):
                self.job_duration.observe(duration)

    def failed(self) -> None:
        """A job failed for good (no attempt left)."""
        with self._lock:
            self.failed_total += 1

    def retried(self) -> None:
        """A job goes back to ready for another attempt (it failed, or its node was lost)."""
        with self._lock:
            self.retried_total += 1

    def artifact(self, state: ArtifactState) -> None:
        """An artifact entered `state`."""
        with self._lock:
            self.artifacts_total[str(state)] += 1

    # --- exposition ----------------------------------------------------------------------

    def render(self, gauges: Gauges | None = None) -> str:
        """The Prometheus text exposition of everything counted, and of `gauges` if given."""
        with self._lock:
            lines: list[str] = []
            for name, value, text in (
                ("flotta_jobs_dispatched_total", self.dispatched_total, "Job attempts sent."),
                ("flotta_jobs_started_total", self.started_total, "Job attempts started."),
                ("flotta_jobs_completed_total", self.completed_total, "Jobs completed."),
                ("flotta_jobs_failed_total", self.failed_total, "Jobs failed for good."),
                ("flotta_jobs_retried_total", self.retried_total, "Job attempts retried."),
            ):
                lines += [*_header(name, "counter", text), f"{name} {value}"]
            name = "flotta_artifacts_total"
            lines += _header(name, "counter", "Artifacts that entered each state.")
            lines += [
                f'{name}{{state="{state}"}} {self.artifacts_total.get(str(state), 0)}'
                for state in ArtifactState
            ]
            name = "flotta_dispatch_latency_seconds"
            lines += _header(name, "histogram", "From sending a job to its worker starting it.")
            lines += self.dispatch_latency.lines(name)
            name = "flotta_job_duration_seconds"
            lines += _header(name, "histogram", "Run time of completed jobs, as workers measured.")
            lines += self.job_duration.lines(name)
        if gauges is not None:
            lines += _gauge_lines(gauges)
        return "\n".join(lines) + "\n"


def _gauge_lines(gauges: Gauges) -> list[str]:
    lines: list[str] = []
    name = "flotta_worker_queue_depth"
    lines += _header(name, "gauge", "Jobs dispatched to or running on each worker.")
    lines += [
        f'{name}{{worker="{_label(worker)}"}} {n}'
        for worker, n in sorted(gauges.queue_depth.items())
    ]
    name = "flotta_artifacts"
    lines += _header(name, "gauge", "Unfinished artifacts by state.")
    lines += [
        f'{name}{{state="{state}"}} {gauges.artifacts.get(str(state), 0)}'
        for state in (ArtifactState.SUBMITTED, ArtifactState.RUNNING)
    ]
    name = "flotta_jobs"
    lines += _header(name, "gauge", "Jobs of unfinished artifacts by state.")
    lines += [f'{name}{{state="{state}"}} {gauges.jobs.get(str(state), 0)}' for state in JobState]
    name = "flotta_jobs_retry_pending"
    lines += _header(name, "gauge", "Jobs waiting out a retry backoff.")
    lines.append(f"{name} {gauges.retry_pending}")
    return lines


def _header(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """`GET /metrics` (or `/`) on a small stdlib HTTP server, in a daemon thread."""

    def __init__(
        self,
        metrics: SchedulerMetrics,
        port: int,
        host: str = "127.0.0.1",
        sample: Callable[[], Gauges | None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.sample = sample
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404, "metrics are at /metrics")
                    return
                body = server.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: " + format, *args)

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="scheduler-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose, when asked for port 0)."""
        port: int = self._http.server_address[1]
        return port

    def render(self) -> str:
        gauges = None
        if self.sample is not None:
            try:
                gauges = self.sample()
            except Exception:
                log.exception("metrics: could not sample the scheduler's gauges")
        return self.metrics.render(gauges)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self._http.server_address[:2])
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)
