"""The `flotta-mqtt` command: parses options and config files, then starts a role."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flotta_mqtt.cli.broker import broker_options, open_client
from flotta_mqtt.cli.errors import TIMED_OUT, Command, debugging, fail, set_debug
from flotta_mqtt.cli.files import load_artifact
from flotta_mqtt.cli.serving import serve
from flotta_mqtt.cli.views import holders_text, jobs_table
from flotta_mqtt.client.client import ArtifactFailed, NoSuchArtifact
from flotta_mqtt.logs import configure_logging
from flotta_mqtt.model import Tasks

app = Command(
    help="flotta_mqtt: distributed jobs over MQTT. Run a scheduler, edge workers, and submit "
    "artifacts from a workbench. Every option can also be set with its FLOTTA_* variable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar="FLOTTA_DEBUG", help="show the traceback of an error, not one line"
        ),
    ] = False,
) -> None:
    set_debug(debug)
    if not debugging():
        # A workbench command's warnings (a refused connection, say) would come before its
        # one-line error; node commands install their own handler (--log-level).
        logging.getLogger().addHandler(logging.NullHandler())


BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", envvar="FLOTTA_BROKER", help="mqtt://host:port or mqtts://"),
]
UserOpt = Annotated[
    str | None, typer.Option("--username", envvar="FLOTTA_USERNAME", help="broker identity")
]
PasswordOpt = Annotated[
    str | None, typer.Option("--password", envvar="FLOTTA_PASSWORD", help="broker password")
]
CaOpt = Annotated[
    Path | None, typer.Option("--ca-file", envvar="FLOTTA_CA_FILE", help="CA for TLS")
]
GroupOpt = Annotated[
    str | None, typer.Option(envvar="FLOTTA_GROUP", help="scheduler group [default: none]")
]
ProjectOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FLOTTA_PROJECT", help="the artifact's project: its group is the directory's"
    ),
]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", envvar="FLOTTA_STORAGE", help="resource store URL (file://, s3://, az://)"
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="FLOTTA_CONFIG", help="YAML file of node settings"),
]
TimeoutOpt = Annotated[
    float | None, typer.Option(envvar="FLOTTA_TIMEOUT", help="seconds to wait at most")
]
OutputOpt = Annotated[str, typer.Option(envvar="FLOTTA_OUTPUT", help="table or json")]
DATABASE = "SQLite file, or postgresql://... (schedulers of one name stand by for each other)"
BrokerTimeoutOpt = Annotated[
    float,
    typer.Option(envvar="FLOTTA_BROKER_TIMEOUT", help="seconds to wait for the broker"),
]
LogOpt = Annotated[str, typer.Option("--log-level", envvar="FLOTTA_LOG_LEVEL")]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        "--log-format",
        envvar="FLOTTA_LOG_FORMAT",
        help="text, or json: one object per line with artifact and job ids",
    ),
]


def _logging(level: str, fmt: str) -> None:
    if fmt not in ("text", "json"):
        raise fail(f"--log-format takes text or json, not {fmt!r}")
    configure_logging(level.upper(), "json" if fmt == "json" else "text")


@app.command()
def scheduler(
    config: ConfigOpt = None,
    name: Annotated[str | None, typer.Option(envvar="FLOTTA_NAME")] = None,
    database: Annotated[str | None, typer.Option(envvar="FLOTTA_DATABASE", help=DATABASE)] = None,
    allow_download: Annotated[bool | None, typer.Option(envvar="FLOTTA_ALLOW_DOWNLOAD")] = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    group: GroupOpt = None,
    project: Annotated[
        list[str] | None,
        typer.Option(envvar="FLOTTA_PROJECTS", help="project served in --group, repeatable"),
    ] = None,
    storage: StorageOpt = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(envvar="FLOTTA_METRICS_PORT", help="serve Prometheus metrics on this port"),
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            envvar="FLOTTA_REGISTRY",
            help="the operator's node registry (YAML): who holds which project, who may do what",
        ),
    ] = None,
    default_deadline: Annotated[
        float | None,
        typer.Option(
            envvar="FLOTTA_DEFAULT_DEADLINE",
            help="seconds an artifact giving no deadline may take [default: 7 days]",
        ),
    ] = None,
    initiator_password: Annotated[
        str | None,
        typer.Option(
            envvar="FLOTTA_INITIATOR_PASSWORD",
            help="password of the embedded initiator's own identity, NAME.initiator",
        ),
    ] = None,
    admin: Annotated[
        list[str] | None,
        typer.Option(envvar="FLOTTA_ADMINS", help="client id that may prune, repeatable"),
    ] = None,
    prune_older_than: Annotated[
        str | None,
        typer.Option(
            envvar="FLOTTA_PRUNE_OLDER_THAN",
            help="prune artifacts finished longer ago than this (90s, 15m, 12h, 7d), "
            "at start and periodically",
        ),
    ] = None,
    log_level: LogOpt = "INFO",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a scheduler node: binds submitted artifacts into jobs and dispatches them."""
    # Imported at use: a node's libraries would cost every other command 0.7 s.
    from flotta_mqtt.cli.settings import node_config
    from flotta_mqtt.nodes import SchedulerNode
    from flotta_mqtt.scheduler.config import SchedulerConfig

    _logging(log_level, log_format)
    settings = node_config(
        SchedulerConfig,
        config,
        {
            "name": name,
            "database": database,
            "allow_download": allow_download,
            "metrics_port": metrics_port,
            "registry": registry,
            "default_deadline": default_deadline,
            "admins": admin or None,
            "prune_older_than": prune_older_than,
            "projects": project or None,
            "broker": broker_options(broker, username, password, ca_file, group),
            "storage": {"url": storage} if storage else {},
        },
        initiator_password,
    )
    serve(lambda gave_up: SchedulerNode(settings, gave_up), f"scheduler {settings.name}", console)


@app.command()
def worker(
    config: ConfigOpt = None,
    name: Annotated[str | None, typer.Option(envvar="FLOTTA_NAME")] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            envvar="FLOTTA_DATA",
            help="PROJECT=FILE.csv, repeatable: local data this worker holds",
        ),
    ] = None,
    exact: Annotated[
        list[str] | None,
        typer.Option(
            envvar="FLOTTA_EXACT", help="PROJECT answered exactly, not noised, repeatable"
        ),
    ] = None,
    max_jobs: Annotated[int | None, typer.Option(envvar="FLOTTA_MAX_JOBS")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="FLOTTA_STATE_DIR",
            help="where held jobs and unacknowledged results survive a restart "
            "[default: ./flotta-state/NAME]",
        ),
    ] = None,
    plugin: Annotated[
        list[str] | None,
        typer.Option(envvar="FLOTTA_PLUGINS", help="module registering operations, repeatable"),
    ] = None,
    executor: Annotated[
        list[str] | None,
        typer.Option(
            envvar="FLOTTA_EXECUTORS",
            help="workflow task executor this worker runs (shell, docker, kube, api, python)",
        ),
    ] = None,
    allow_code: Annotated[
        bool | None,
        typer.Option(
            envvar="FLOTTA_ALLOW_CODE",
            help="run code shipped by @distributed callers (the python executor); off by default",
        ),
    ] = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    group: GroupOpt = None,
    storage: StorageOpt = None,
    log_level: LogOpt = "INFO",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run an edge worker agent next to its local data."""
    from flotta_mqtt.cli.settings import node_config  # at use, as in scheduler()
    from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

    _logging(log_level, log_format)
    datasets: dict[str, list[str]] = {}
    for item in data or []:
        project, sep, file = item.partition("=")
        if not sep or not project or not file:
            raise fail(f"--data takes PROJECT=FILE, got {item!r}")
        datasets.setdefault(project, []).append(file)
    specs = {p: {"paths": f, "privacy": {"exact": p in (exact or [])}} for p, f in datasets.items()}
    settings = node_config(
        WorkerConfig,
        config,
        {
            "name": name,
            "max_jobs": max_jobs,
            "state_dir": state_dir,
            "plugins": plugin or None,
            "executors": executor or None,
            "allow_code": allow_code,
            "datasets": specs or None,
            "broker": broker_options(broker, username, password, ca_file, group),
            "storage": {"url": storage} if storage else {},
        },
    )
    serve(lambda gave_up: WorkerAgent(settings, gave_up), f"worker {settings.name}", console)


ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        envvar="FLOTTA_PARAMS",
        help="set a workflow parameter: NAME=VALUE (repeatable; the variable: space-separated)",
    ),
]


@app.command()
def validate(file: Path, param: ParamOpt = None) -> None:
    """Check an artifact or workflow file (JSON or YAML) without submitting it."""
    artifact = load_artifact(file, param)
    step = artifact.steps[0]
    size = f"{len(step.tasks)} tasks" if isinstance(step, Tasks) else f"{len(artifact.steps)} steps"
    console.print(f"[green]valid[/green]: artifact {artifact.id}, {size}")


@app.command()
def submit(
    file: Path,
    param: ParamOpt = None,
    wait: Annotated[
        bool, typer.Option(envvar="FLOTTA_WAIT", help="wait for the result and print it")
    ] = False,
    timeout: TimeoutOpt = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Submit an artifact or workflow file (JSON or YAML); print its id, or its result
    with --wait."""
    artifact = load_artifact(file, param)
    with open_client(broker, username, password, ca_file, storage, timeout=timeout) as client:
        handle = client.submit(artifact)
        console.print(f"submitted artifact {artifact.id}")
        if wait:
            try:
                result = handle.result(timeout)
            except ArtifactFailed as exc:
                raise fail(str(exc)) from None
            finished = handle.status()
            if finished is not None and (finished.holders or finished.missing):
                console.print(holders_text(finished), highlight=False)
            console.print_json(json.dumps(result))


@app.command()
def status(
    artifact_id: str,
    output: OutputOpt = "table",
    timeout: BrokerTimeoutOpt = 5.0,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    group: GroupOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Show an artifact's current status (from its retained status topic)."""
    with open_client(broker, username, password, ca_file, None, group, timeout) as client:
        try:
            handle = client.lookup(artifact_id, timeout, client.group_of(project, timeout))
            current = handle.status()
        except NoSuchArtifact as exc:
            raise fail(str(exc)) from None
        except TimeoutError as exc:
            raise fail(str(exc), TIMED_OUT) from None
    if current is None:
        raise fail(f"no status for artifact {artifact_id}")
    if output == "json":
        console.print_json(current.model_dump_json())
        return
    table = Table(title=f"artifact {artifact_id}")
    table.add_column("state")
    table.add_column("jobs")
    table.add_column("by state")
    table.add_column("error")
    table.add_row(
        current.state,
        str(current.total),
        ", ".join(f"{k}: {v}" for k, v in current.counts.items()),
        escape(f"{current.error.type}: {current.error.message}") if current.error else "",
    )
    console.print(table)
    if current.holders or current.missing:
        console.print(holders_text(current), highlight=False)
    if current.jobs:
        console.print(jobs_table(current))


@app.command()
def download(
    artifact_id: str,
    dest: Path,
    timeout: TimeoutOpt = None,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    storage: StorageOpt = None,
    group: GroupOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Write an artifact's result to DEST as a JSON document."""
    with open_client(broker, username, password, ca_file, storage, group, timeout) as client:
        try:
            handle = client.lookup(artifact_id, group=client.group_of(project))
            path = handle.download(dest, timeout)
        except (ArtifactFailed, NoSuchArtifact, PermissionError) as exc:
            raise fail(str(exc)) from None
        except TimeoutError as exc:
            raise fail(str(exc), TIMED_OUT) from None
    console.print(f"wrote {path}")


@app.command()
def cancel(
    artifact_id: str,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
    group: GroupOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Cancel an artifact: its running jobs are stopped and its locks freed."""
    with open_client(broker, username, password, ca_file, None, group) as client:
        where = client.group_of(project)
        client.cancel(artifact_id, group=where)
        try:
            final = client.handle(artifact_id, where).wait(timeout=30)
        except NoSuchArtifact as exc:
            raise fail(str(exc)) from None
    console.print(f"artifact {artifact_id}: {final.state}")


@app.command()
def demo(
    rows: Annotated[
        int, typer.Option(envvar="FLOTTA_DEMO_ROWS", help="rows of data per worker (roughly)")
    ] = 1000,
    seed: Annotated[
        int, typer.Option(envvar="FLOTTA_DEMO_SEED", help="seed of the generated data")
    ] = 42,
) -> None:
    """Run the count example on a local mosquitto: a scheduler and three workers, each
    holding its own CSV; count the rows with x > 0.5 across them and check the answer."""
    from flotta_mqtt.cli.demo import run_demo

    raise typer.Exit(code=run_demo(rows=rows, seed=seed, console=console))


from flotta_mqtt.cli import observe, prune, schedule  # noqa: E402, F401  (registers watch, …)

if __name__ == "__main__":
    app()
