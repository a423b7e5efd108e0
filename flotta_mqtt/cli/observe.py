"""Commands that show the work: `watch`, `graph`, `workers`, `logs` and `dashboard`.

Everything here reads what the SDK reads, the retained status and presence topics (and
the resource store, for a task's captured output): no second source of truth. Registered
on the `app` of cli/main.py, which imports this module last.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flotta_mqtt.cli.main import (
    BrokerOpt,
    CaOpt,
    PasswordOpt,
    StorageOpt,
    UserOpt,
    _client,
    _fail,
    app,
    console,
)
from flotta_mqtt.model import ARTIFACT_FINAL, ArtifactState, JobState
from flotta_mqtt.model.workflow import log_name, task_of
from flotta_mqtt.protocol import ArtifactStatus, JobSummary, NodePresence
from flotta_mqtt.transport.store import ResourceStore

ACTIVE = (JobState.DISPATCHED, JobState.RUNNING)
STATE_STYLE = {
    JobState.WAITING: "grey62",
    JobState.READY: "cyan",
    JobState.DISPATCHED: "blue",
    JobState.RUNNING: "yellow",
    JobState.COMPLETED: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "grey50",
}
ARTIFACT_STYLE = {
    ArtifactState.SUBMITTED: "cyan",
    ArtifactState.RUNNING: "yellow",
    ArtifactState.COMPLETED: "bold green",
    ArtifactState.FAILED: "bold red",
    ArtifactState.CANCELLED: "grey50",
}


def _clock(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds).strftime("%H:%M:%S") if seconds else ""


def _ago(seconds: float) -> str:
    elapsed = max(0.0, time.time() - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if elapsed >= size:
            return f"{elapsed / size:.0f} {unit} ago"
    return f"{elapsed:.0f} s ago"


def _step_key(step: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in step.split("."))
    except ValueError:
        return (1 << 30,)


def _states(counts: Counter[JobState] | dict[JobState, int]) -> Text:
    text = Text()
    for state in JobState:
        n = counts.get(state, 0)
        if n:
            if text:
                text.append("  ")
            text.append(f"{state} {n}", style=STATE_STYLE[state])
    return text


# --- watch ---------------------------------------------------------------------------------


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
        ProgressBar(total=max(status.total, 1), completed=done, width=50), _states(status.counts)
    )
    parts: list[RenderableType] = [head, progress]
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
    parts += [_steps_table(status.jobs), _workers_table(status.jobs)]
    return Group(*parts)


def _steps_table(jobs: list[JobSummary]) -> Table:
    by_step: dict[str, list[JobSummary]] = defaultdict(list)
    for job in jobs:
        by_step[job.step].append(job)
    table = Table(title="by step", title_justify="left", expand=False)
    for column in ("step", "jobs", "progress", "done", "states", "longest"):
        table.add_column(column, no_wrap=column != "states")
    for step in sorted(by_step, key=_step_key):
        listed = by_step[step]
        counts = Counter(job.state for job in listed)
        done = counts[JobState.COMPLETED]
        durations = [j.finished_at - j.started_at for j in listed if j.started_at and j.finished_at]
        table.add_row(
            step,
            str(len(listed)),
            ProgressBar(total=len(listed), completed=done, width=20),
            f"{done}/{len(listed)}",
            _states(counts),
            f"{max(durations):.2f} s" if durations else "",
        )
    return table


def _workers_table(jobs: list[JobSummary]) -> Table:
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
            _states(counts),
        )
    return table


def _summary_line(status: ArtifactStatus) -> str:
    done = status.counts.get(JobState.COMPLETED, 0)
    line = f"{_clock(status.updated_at)} {status.state} {done}/{status.total} completed"
    if status.jobs is not None:
        steps: dict[str, Counter[JobState]] = defaultdict(Counter)
        for job in status.jobs:
            steps[job.step][job.state] += 1
        line += " | " + " ".join(
            f"step {step}: {c[JobState.COMPLETED]}/{sum(c.values())}"
            for step, c in sorted(steps.items(), key=lambda item: _step_key(item[0]))
        )
    counts = ", ".join(f"{state} {n}" for state, n in status.counts.items() if n)
    return f"{line} ({counts})" if counts else line


@app.command()
def watch(
    artifact_id: str,
    timeout: Annotated[
        float | None, typer.Option(help="give up after this many seconds (exit code 3)")
    ] = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Watch an artifact live until it ends: progress per step and per worker.

    In a terminal the view redraws in place; otherwise (piped, in CI) one line is printed
    per change. Exits 0 when the artifact completes, 1 when it fails or is cancelled."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    with _client(broker, username, password, ca_file, None) as client:
        handle = client.handle(artifact_id)
        status = handle.fetch_status()
        if status is None:
            raise _fail(f"no status for artifact {artifact_id}")
        live = Live(watch_view(status, started), console=console, auto_refresh=False)
        if console.is_terminal:
            live.start()
        else:
            console.print(_summary_line(status), highlight=False)
        try:
            while status.state not in ARTIFACT_FINAL:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                # Wake once a second even without news, so the elapsed time stays current.
                newer = handle.next_status(
                    status.seq, timeout=1.0 if left is None else min(left, 1)
                )
                if newer is not None:
                    status = newer
                    if not console.is_terminal:
                        console.print(_summary_line(status), highlight=False)
                if console.is_terminal:
                    live.update(watch_view(status, started), refresh=True)
        finally:
            if console.is_terminal:
                live.stop()
    if not console.is_terminal:
        console.print(watch_view(status, started))
    if status.state not in ARTIFACT_FINAL:
        console.print(f"[yellow]still {status.state} after {timeout} s[/yellow]")
        raise typer.Exit(code=3)
    if status.state is not ArtifactState.COMPLETED:
        raise typer.Exit(code=1)


# --- graph ---------------------------------------------------------------------------------

_SUFFIX = {"svg": "svg", "png": "png", "dot": "dot", "mermaid": "mmd"}


@app.command()
def graph(
    artifact_id: str,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="svg, png, dot or mermaid [default: from --output, else svg]"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="file to write ('-': standard output) [default: ID.svg]"
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="svg/png layout: auto (Graphviz if installed), graphviz, python")
    ] = "auto",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the broker")] = 5.0,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Draw an artifact's DAG, each job coloured by its state (svg, png, dot, mermaid).

    Artifacts of over 300 jobs are too large to draw: their counts by state are shown."""
    from flotta_mqtt.client.graph import FORMATS, GraphTooLarge, JobDag, format_of

    if format is not None and format not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if engine not in ("auto", "graphviz", "python"):
        raise _fail(f"--engine must be auto, graphviz or python, not {engine!r}")
    chosen = format or (format_of(output) if output and str(output) != "-" else "svg")
    with _client(broker, username, password, ca_file, None) as client:
        status = client.handle(artifact_id).fetch_status(timeout)
    if status is None:
        raise _fail(f"no status for artifact {artifact_id}")
    try:
        dag = JobDag.from_status(status)
    except GraphTooLarge as exc:
        console.print(f"[yellow]{escape(str(exc))}[/yellow]")
        console.print(Text.assemble(f"{status.state}: ", _states(status.counts)))
        raise typer.Exit(code=1) from None
    try:
        data = dag.render(chosen, engine)  # type: ignore[arg-type]
    except RuntimeError as exc:
        raise _fail(str(exc)) from None
    if output is not None and str(output) == "-":
        if chosen == "png":
            raise _fail("PNG is binary: write it to a file with --output")
        console.out(data.decode(), end="", highlight=False)
        return
    target = output or Path(f"{artifact_id}.{_SUFFIX[chosen]}")
    target.write_bytes(data)
    console.print(
        f"wrote {escape(str(target))} ({chosen}, {len(dag.nodes)} jobs, {len(dag.edges)} locks)"
    )


# --- workers -------------------------------------------------------------------------------


def _datasets(node: NodePresence) -> str:
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


def _capabilities(node: NodePresence) -> str:
    parts = []
    if node.executors:
        parts.append("executors: " + ", ".join(node.executors))
    if node.labels:
        parts.append(", ".join(f"{k}={v}" for k, v in node.labels.items()))
    if node.operations:
        parts.append(f"{len(node.operations)} operations")
    return "\n".join(parts)


def running_jobs(statuses: dict[str, ArtifactStatus]) -> Counter[str]:
    """Jobs dispatched to or running on each node, over unfinished artifacts that list jobs."""
    busy: Counter[str] = Counter()
    for status in statuses.values():
        if status.state in ARTIFACT_FINAL or status.jobs is None:
            continue
        for job in status.jobs:
            if job.state in ACTIVE:
                busy[job.worker] += 1
    return busy


@app.command()
def workers(
    output: Annotated[str, typer.Option(help="table or json")] = "table",
    jobs: Annotated[
        bool, typer.Option(help="count each node's running jobs (reads every retained status)")
    ] = True,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """List the nodes known to the broker: presence, datasets, capabilities, running jobs."""
    with _client(broker, username, password, ca_file, None) as client:
        nodes = client.workers()
        busy = running_jobs(client.statuses()) if jobs else Counter[str]()
    if output == "json":
        listed = [
            {**n.model_dump(mode="json"), **({"running_jobs": busy[n.node]} if jobs else {})}
            for n in nodes
        ]
        console.print_json(json.dumps(listed))
        return
    table = Table(title="nodes")
    for column in ("node", "online", "role", "last seen", "projects", "capabilities", "max jobs"):
        table.add_column(column)
    if jobs:
        table.add_column("running")
    for node in nodes:
        seen = f"{'up' if node.online else 'down'} since {_clock(node.since)} ({_ago(node.since)})"
        row = [
            escape(node.node),
            "[green]yes[/green]" if node.online else "[red]no[/red]",
            "initiator" if node.initiator else "worker",
            seen,
            escape(_datasets(node)),
            escape(_capabilities(node)),
            str(node.max_jobs),
        ]
        if jobs:
            row.append(str(busy[node.node]))
        table.add_row(*row)
    console.print(table)


# --- logs ----------------------------------------------------------------------------------


@app.command()
def logs(
    artifact_id: str,
    task: Annotated[
        str | None,
        typer.Argument(
            help="task name (a replicated task's: all its replicas; name[i]: one) or job id; "
            "all tasks and failed jobs if omitted"
        ),
    ] = None,
    attempt: Annotated[
        int | None, typer.Option(help="the attempt to show [default: the latest]")
    ] = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Print a job's captured stdout and stderr, and its error text.

    Workflow tasks capture their output in the resource store; any job's error comes from
    the artifact's status."""
    with _client(broker, username, password, ca_file, storage) as client:
        current = client.handle(artifact_id).fetch_status()
        store_settings = client.storage
    if current is None or not current.jobs:
        raise _fail(f"no job listing for artifact {artifact_id}")
    if task is None:
        chosen = [j for j in current.jobs if j.name or j.error]
    else:
        # A replicated task's name picks all its replicas, `t[i]` one of them.
        chosen = [
            j for j in current.jobs if task in (str(j.id), j.name, j.name and task_of(j.name))
        ]
    if not chosen:
        if task is None:
            raise _fail(f"artifact {artifact_id} has no tasks and no failed jobs")
        raise _fail(f"artifact {artifact_id} has no task {task!r} (nor a job of that id)")
    store = ResourceStore(store_settings.url, store_settings.options)
    for job in chosen:
        which = attempt or max(job.attempt, 1)
        label = job.name or f"job {job.id} (step {job.step} on {job.worker})"
        if job.name:
            for stream in ("stdout", "stderr"):
                url = store.log_url(artifact_id, log_name(job.name), which, stream)
                text = store.get_bytes(url).decode(errors="replace") if store.exists(url) else ""
                console.rule(f"{escape(job.name)} {stream} (attempt {which})")
                console.out(text, end="" if text.endswith("\n") else "\n", highlight=False)
        if job.error:
            console.rule(f"{escape(label)} error (attempt {job.attempt})")
            console.out(job.error, highlight=False)
        elif not job.name:
            console.rule(f"{escape(label)}: {job.state}")
            console.out("no captured output: only workflow tasks capture stdout and stderr")


# --- dashboard -----------------------------------------------------------------------------


@app.command()
def dashboard(
    broker_ws: Annotated[
        str,
        typer.Option(
            "--broker-ws",
            envvar="FLOTTA_BROKER_WS",
            help="the broker's MQTT-over-WebSockets URL, as the browser reaches it",
        ),
    ] = "ws://127.0.0.1:9001",
    port: Annotated[int, typer.Option(envvar="FLOTTA_DASHBOARD_PORT")] = 8080,
    host: Annotated[
        str, typer.Option(envvar="FLOTTA_DASHBOARD_HOST", help="address to serve the page on")
    ] = "127.0.0.1",
    username: Annotated[
        str | None,
        typer.Option(envvar="FLOTTA_DASHBOARD_USERNAME", help="a dashboard identity (read-only)"),
    ] = None,
    password: Annotated[
        str | None, typer.Option(envvar="FLOTTA_DASHBOARD_PASSWORD", help="its password")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(envvar="FLOTTA_LOG_FORMAT", help="text or json")
    ] = None,
) -> None:
    """Serve the web dashboard: workers, artifacts and their DAGs, live over WebSockets.

    The page connects to the broker's MQTT-over-WebSockets listener and only reads
    statuses and presence: give it a dashboard identity (broker/README.md)."""
    from flotta_mqtt.dashboard.server import DashboardServer
    from flotta_mqtt.logs import configure_logging

    if log_format not in (None, "text", "json"):
        raise _fail(f"--log-format must be text or json, not {log_format!r}")
    configure_logging("INFO", log_format)  # type: ignore[arg-type]
    try:
        server = DashboardServer(broker_ws, port, host, username, password)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with server:
        console.print(f"dashboard on {server.url} (broker {escape(broker_ws)}); Ctrl-C to stop")
        stop.wait()
