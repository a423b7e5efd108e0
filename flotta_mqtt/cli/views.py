"""How artifacts and nodes look in a terminal: state colours, the live view of an
artifact (overall, per step, per worker), its one-line summary, and a node's description.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flotta_mqtt.client.times import clock
from flotta_mqtt.model import ARTIFACT_FINAL, ArtifactState, JobState
from flotta_mqtt.protocol import ArtifactStatus, JobSummary, NodePresence
from flotta_mqtt.workflows.caching import CACHED_PRODUCT

ACTIVE = (JobState.DISPATCHED, JobState.RUNNING)
STATE_STYLE = {
    JobState.WAITING: "grey62",
    JobState.READY: "cyan",
    JobState.DISPATCHED: "blue",
    JobState.RUNNING: "yellow",
    JobState.COMPLETED: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "grey50",
    JobState.SKIPPED: "magenta",
}
ARTIFACT_STYLE = {
    ArtifactState.SUBMITTED: "cyan",
    ArtifactState.RUNNING: "yellow",
    ArtifactState.COMPLETED: "bold green",
    ArtifactState.FAILED: "bold red",
    ArtifactState.CANCELLED: "grey50",
}


def step_key(step: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in step.split("."))
    except ValueError:
        return (1 << 30,)


def state_counts(counts: Counter[JobState] | dict[JobState, int]) -> Text:
    text = Text()
    for state in JobState:
        n = counts.get(state, 0)
        if n:
            if text:
                text.append("  ")
            text.append(f"{state} {n}", style=STATE_STYLE[state])
    return text


def watch_view(status: ArtifactStatus, started: float) -> Group:
    """The live picture of an artifact: overall progress, then per step and per worker."""
    done = status.counts.get(JobState.COMPLETED, 0)
    head = Text.assemble(
        ("artifact ", "bold"),
        (status.artifact_id, "bold"),
        "  ",
        (str(status.state), ARTIFACT_STYLE[status.state]),
        f"  {done}/{status.total} jobs completed  ·  project {status.project}",
        ""
        if status.state in ARTIFACT_FINAL
        else f"  ·  watching {time.monotonic() - started:.0f} s",
    )
    progress = Table.grid(padding=(0, 2))
    progress.add_row(
        ProgressBar(total=max(status.total, 1), completed=done, width=50),
        state_counts(status.counts),
    )
    parts: list[RenderableType] = [head, progress]
    if status.holders or status.missing:
        parts.append(Text(holders_text(status), style="grey62"))
    if status.error is not None:
        where = f" (job {status.failed_job})" if status.failed_job is not None else ""
        parts.append(
            Text(
                f"{status.error.type}: {status.error.message}{where}", style="red", overflow="fold"
            )
        )
    if status.jobs is None:
        if status.total:
            parts.append(
                Text(
                    f"{status.total} jobs: per-step and per-worker views need the job list, "
                    "which statuses carry for artifacts of at most 300 jobs",
                    style="grey62",
                )
            )
        return Group(*parts)
    parts += [steps_table(status.jobs), workers_table(status.jobs)]
    return Group(*parts)


def steps_table(jobs: list[JobSummary]) -> Table:
    by_step: dict[str, list[JobSummary]] = defaultdict(list)
    for job in jobs:
        by_step[job.step].append(job)
    table = Table(title="by step", title_justify="left", expand=False)
    for column in ("step", "jobs", "progress", "done", "states", "longest"):
        table.add_column(column, no_wrap=column != "states")
    for step in sorted(by_step, key=step_key):
        listed = by_step[step]
        counts = Counter(job.state for job in listed)
        done = counts[JobState.COMPLETED]
        durations = [j.finished_at - j.started_at for j in listed if j.started_at and j.finished_at]
        table.add_row(
            step,
            str(len(listed)),
            ProgressBar(total=len(listed), completed=done, width=20),
            f"{done}/{len(listed)}",
            state_counts(counts),
            f"{max(durations):.2f} s" if durations else "",
        )
    return table


def workers_table(jobs: list[JobSummary]) -> Table:
    by_worker: dict[str, list[JobSummary]] = defaultdict(list)
    for job in jobs:
        by_worker[job.worker].append(job)
    table = Table(title="by worker", title_justify="left", expand=False)
    for column in ("worker", "jobs", "running", "completed", "failed", "states"):
        table.add_column(column, no_wrap=column != "states")
    for worker in sorted(by_worker):
        listed = by_worker[worker]
        counts = Counter(job.state for job in listed)
        table.add_row(
            escape(worker),
            str(len(listed)),
            str(sum(counts[s] for s in ACTIVE)),
            str(counts[JobState.COMPLETED]),
            str(counts[JobState.FAILED]),
            state_counts(counts),
        )
    return table


def holders_text(status: ArtifactStatus) -> str:
    """Who takes part in an artifact, and who was left out (a quorum)."""
    text = f"holders: {', '.join(status.holders) or 'none'}"
    return text + (f"; missing: {', '.join(status.missing)}" if status.missing else "")


def summary_line(status: ArtifactStatus) -> str:
    done = status.counts.get(JobState.COMPLETED, 0)
    line = f"{clock(status.updated_at)} {status.state} {done}/{status.total} completed"
    if status.jobs is not None:
        steps: dict[str, Counter[JobState]] = defaultdict(Counter)
        for job in status.jobs:
            steps[job.step][job.state] += 1
        line += " | " + " ".join(
            f"step {step}: {c[JobState.COMPLETED]}/{sum(c.values())}"
            for step, c in sorted(steps.items(), key=lambda item: step_key(item[0]))
        )
    counts = ", ".join(f"{state} {n}" for state, n in status.counts.items() if n)
    return f"{line} ({counts})" if counts else line


def datasets_text(node: NodePresence) -> str:
    parts = []
    for project in node.projects:
        described = node.details.get(project)
        if isinstance(described, dict):
            rows, columns = described.get("rows"), described.get("columns")
            extra = []
            if isinstance(rows, int):
                extra.append(f"{rows} rows")
            if isinstance(columns, list):
                extra.append(f"{len(columns)} columns")
            parts.append(f"{project} ({', '.join(extra)})" if extra else project)
        else:
            parts.append(project)
    return "\n".join(parts)


def capabilities_text(node: NodePresence) -> str:
    parts = []
    if node.executors:
        parts.append("executors: " + ", ".join(node.executors))
    if node.features:
        parts.append("gives tasks: " + ", ".join(node.features))
    if node.labels:
        parts.append(", ".join(f"{k}={v}" for k, v in node.labels.items()))
    if node.operations:
        parts.append(f"{len(node.operations)} operations")
    return "\n".join(parts)


def cached(job: JobSummary) -> bool:
    """Whether a workflow task's job reused an earlier run's outputs instead of running."""
    return job.product is not None and job.product.media_type == CACHED_PRODUCT


def jobs_table(current: ArtifactStatus) -> Table:
    """One row per job: where it ran, how it went, how long it took."""
    table = Table(title="jobs")
    for column in (
        "job",
        "step",
        "worker",
        "state",
        "attempt",
        "started",
        "duration",
        "size",
        "exit",
        "error",
    ):
        table.add_column(column)
    for job in current.jobs or []:
        started = clock(job.started_at, millis=True)
        duration = (
            f"{job.finished_at - job.started_at:.3f} s"
            if job.started_at and job.finished_at
            else ""
        )
        table.add_row(
            escape(job.name or str(job.id)),
            job.step,
            escape(job.worker),
            f"{job.state} (cached)" if cached(job) else job.state,
            str(job.attempt),
            started,
            duration,
            "" if job.size is None else str(job.size),
            "" if job.exit_code is None else str(job.exit_code),
            escape(job.error or ""),
        )
    return table
