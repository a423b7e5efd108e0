"""`flotta-mqtt schedule add|list|remove`: runs of a workflow (or artifact) file that the
scheduler submits at each time a cron expression names.

Registered on the `app` of cli/main.py, which imports this module last.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ValidationError
from rich.markup import escape
from rich.table import Table

from flotta_mqtt.cli.broker import open_client
from flotta_mqtt.cli.errors import TIMED_OUT, describe, fail
from flotta_mqtt.cli.files import load_artifact
from flotta_mqtt.cli.main import (
    BrokerOpt,
    CaOpt,
    OutputOpt,
    ParamOpt,
    PasswordOpt,
    UserOpt,
    app,
    console,
)
from flotta_mqtt.protocol import topics
from flotta_mqtt.protocol.schedules import (
    ScheduleAdd,
    ScheduleList,
    ScheduleRemove,
    ScheduleReport,
)

schedules = typer.Typer(
    help="Runs the scheduler submits at the times a cron expression names (UTC); each run "
    "is an artifact of its own, ID-YYYYMMDDHHMM. Only their owner (or an admin) sees them.",
    no_args_is_help=True,
)
app.add_typer(schedules, name="schedule")

TimeoutOpt = Annotated[
    float, typer.Option(envvar="FLOTTA_TIMEOUT", help="seconds to wait for the answer (exit 3)")
]


@schedules.command("add")
def add(
    file: Path,
    cron: Annotated[
        str,
        typer.Option(help="when to run: minute hour day-of-month month day-of-week, in UTC"),
    ],
    schedule_id: Annotated[
        str | None, typer.Option("--id", help="the schedule's ID (default: a new one)")
    ] = None,
    param: ParamOpt = None,
    timeout: TimeoutOpt = 10.0,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Have the scheduler submit FILE (as `submit` reads it, with its -p parameters) at
    each time --cron names."""
    artifact = load_artifact(file, param)
    fields = {"cron": cron, "artifact": artifact}
    try:
        request = ScheduleAdd.model_validate(
            fields if schedule_id is None else {**fields, "schedule_id": schedule_id}
        )
    except ValidationError as exc:
        raise fail(f"cannot schedule {file}: {describe(exc)}") from None
    report = _ask(request, timeout, broker, username, password, ca_file)
    (added,) = report.schedules
    console.print(
        f"schedule {added.schedule_id}: {added.cron} (UTC), next run at {_time(added.next_run)}",
        highlight=False,
    )


@schedules.command("list")
def list_(
    output: OutputOpt = "table",
    timeout: TimeoutOpt = 10.0,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """List the schedules this workbench owns (every one, for an admin)."""
    report = _ask(ScheduleList(), timeout, broker, username, password, ca_file)
    if output == "json":
        console.print_json(report.model_dump_json())
        return
    table = Table(title=f"schedules ({report.total})")
    for column in ("id", "owner", "cron (UTC)", "project", "next run", "runs"):
        table.add_column(column)
    for s in report.schedules:
        table.add_row(
            s.schedule_id,
            escape(s.owner),
            s.cron,
            escape(s.project),
            _time(s.next_run),
            str(s.runs),
        )
    console.print(table)


@schedules.command("remove")
def remove(
    schedule_id: str,
    timeout: TimeoutOpt = 10.0,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Stop a schedule: no run of it starts from then on (runs started go on)."""
    try:
        request = ScheduleRemove(schedule_id=schedule_id)
    except ValidationError as exc:
        raise fail(f"no such schedule ID {schedule_id}: {describe(exc)}") from None
    _ask(request, timeout, broker, username, password, ca_file)
    console.print(f"removed schedule {schedule_id}", highlight=False)


def _ask(
    request: BaseModel,
    timeout: float,
    broker: str | None,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
) -> ScheduleReport:
    """The scheduler's report on `request`; one line and an exit code if it refused it."""
    with open_client(broker, username, password, ca_file, None, timeout=timeout) as client:
        try:
            report = client.ask(topics.schedule(client.client_id), request, timeout)
        except (PermissionError, ValueError) as exc:
            raise fail(str(exc)) from None
        except TimeoutError as exc:
            raise fail(f"{exc}: is a scheduler running?", TIMED_OUT) from None
    assert isinstance(report, ScheduleReport)  # the answer to a schedule request
    return report


def _time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M UTC")
