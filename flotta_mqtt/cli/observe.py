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
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flotta_mqtt.cli.broker import open_client
from flotta_mqtt.cli.errors import TIMED_OUT, fail
from flotta_mqtt.cli.main import (
    BrokerOpt,
    BrokerTimeoutOpt,
    CaOpt,
    OutputOpt,
    PasswordOpt,
    StorageOpt,
    UserOpt,
    app,
    console,
)
from flotta_mqtt.cli.views import (
    ACTIVE,
    capabilities_text,
    datasets_text,
    state_counts,
    summary_line,
    watch_view,
)
from flotta_mqtt.client.client import NoSuchArtifact
from flotta_mqtt.client.times import ago, clock
from flotta_mqtt.model import ARTIFACT_FINAL, ArtifactState
from flotta_mqtt.model.workflow import log_name, task_of
from flotta_mqtt.protocol import ArtifactStatus
from flotta_mqtt.transport.store import ResourceStore

# --- watch ---------------------------------------------------------------------------------


@app.command()
def watch(
    artifact_id: str,
    timeout: Annotated[
        float | None,
        typer.Option(envvar="FLOTTA_TIMEOUT", help="give up after this many seconds (exit code 3)"),
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
    with open_client(broker, username, password, ca_file, None, timeout=timeout) as client:
        handle = client.handle(artifact_id)
        status = handle.fetch_status()
        if status is None:
            raise fail(f"no status for artifact {artifact_id}")
        live = Live(watch_view(status, started), console=console, auto_refresh=False)
        if console.is_terminal:
            live.start()
        else:
            console.print(summary_line(status), highlight=False)
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
                        console.print(summary_line(status), highlight=False)
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
            "--format",
            "-f",
            envvar="FLOTTA_GRAPH_FORMAT",
            help="svg, png, dot or mermaid [default: from --output, else svg]",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            envvar="FLOTTA_GRAPH_OUTPUT",
            help="file to write ('-': standard output) [default: ID.svg]",
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            envvar="FLOTTA_GRAPH_ENGINE",
            help="svg/png layout: auto (Graphviz if installed), graphviz, python",
        ),
    ] = "auto",
    timeout: BrokerTimeoutOpt = 5.0,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Draw an artifact's DAG, each job coloured by its state (svg, png, dot, mermaid).

    Artifacts of over 300 jobs are too large to draw: their counts by state are shown."""
    from flotta_mqtt.client.graph import FORMATS, GraphTooLarge, JobDag, format_of

    if format is not None and format not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if engine not in ("auto", "graphviz", "python"):
        raise fail(f"--engine must be auto, graphviz or python, not {engine!r}")
    chosen = format or (format_of(output) if output and str(output) != "-" else "svg")
    with open_client(broker, username, password, ca_file, None, timeout=timeout) as client:
        status = client.handle(artifact_id).fetch_status(timeout)
    if status is None:
        raise fail(f"no status for artifact {artifact_id}")
    try:
        dag = JobDag.from_status(status)
    except GraphTooLarge as exc:
        console.print(f"[yellow]{escape(str(exc))}[/yellow]")
        console.print(Text.assemble(f"{status.state}: ", state_counts(status.counts)))
        raise typer.Exit(code=1) from None
    try:
        data = dag.render(chosen, engine)  # type: ignore[arg-type]
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    if output is not None and str(output) == "-":
        if chosen == "png":
            raise fail("PNG is binary: write it to a file with --output")
        console.out(data.decode(), end="", highlight=False)
        return
    target = output or Path(f"{artifact_id}.{_SUFFIX[chosen]}")
    target.write_bytes(data)
    console.print(
        f"wrote {escape(str(target))} ({chosen}, {len(dag.nodes)} jobs, {len(dag.edges)} locks)"
    )


# --- workers -------------------------------------------------------------------------------


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
    output: OutputOpt = "table",
    jobs: Annotated[
        bool,
        typer.Option(
            envvar="FLOTTA_WORKERS_JOBS",
            help="count each node's running jobs (reads every retained status)",
        ),
    ] = True,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """List the nodes known to the broker: presence, datasets, capabilities, running jobs."""
    with open_client(broker, username, password, ca_file, None) as client:
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
        seen = f"{'up' if node.online else 'down'} since {clock(node.since)} ({ago(node.since)})"
        row = [
            escape(node.node),
            "[green]yes[/green]" if node.online else "[red]no[/red]",
            "initiator" if node.initiator else "worker",
            seen,
            escape(datasets_text(node)),
            escape(capabilities_text(node)),
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
        int | None,
        typer.Option(envvar="FLOTTA_ATTEMPT", help="the attempt to show [default: the latest]"),
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
    with open_client(broker, username, password, ca_file, storage) as client:
        try:
            current = client.lookup(artifact_id).status()
        except NoSuchArtifact as exc:
            raise fail(str(exc)) from None
        except TimeoutError as exc:
            raise fail(str(exc), TIMED_OUT) from None
        store_settings = client.storage
    if current is None or not current.jobs:
        raise fail(f"no job listing for artifact {artifact_id}")
    if task is None:
        chosen = [j for j in current.jobs if j.name or j.error]
    else:
        # A replicated task's name picks all its replicas, `t[i]` one of them.
        chosen = [
            j for j in current.jobs if task in (str(j.id), j.name, j.name and task_of(j.name))
        ]
    if not chosen:
        if task is None:
            raise fail(f"artifact {artifact_id} has no tasks and no failed jobs")
        raise fail(f"artifact {artifact_id} has no task {task!r} (nor a job of that id)")
    store = ResourceStore.of(store_settings)
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
        raise fail(f"--log-format must be text or json, not {log_format!r}")
    configure_logging("INFO", log_format)  # type: ignore[arg-type]
    try:
        server = DashboardServer(broker_ws, port, host, username, password)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with server:
        console.print(f"dashboard on {server.url} (broker {escape(broker_ws)}); Ctrl-C to stop")
        stop.wait()
