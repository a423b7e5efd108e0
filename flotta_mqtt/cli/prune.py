"""`flotta-mqtt prune`: an administrator has the scheduler remove finished artifacts.

Registered on the `app` of cli/main.py, which imports this module last.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flotta_mqtt.cli.broker import open_client
from flotta_mqtt.cli.errors import TIMED_OUT, fail
from flotta_mqtt.cli.main import (
    BrokerOpt,
    CaOpt,
    OutputOpt,
    PasswordOpt,
    UserOpt,
    app,
    console,
)
from flotta_mqtt.model.durations import parse_duration


@app.command()
def prune(
    older_than: Annotated[
        str,
        typer.Option(
            envvar="FLOTTA_OLDER_THAN",
            help="prune the artifacts finished longer ago than this: 90s, 15m, 12h, 7d, or seconds",
        ),
    ],
    output: OutputOpt = "table",
    timeout: Annotated[
        float,
        typer.Option(envvar="FLOTTA_TIMEOUT", help="seconds to wait for the answer (exit code 3)"),
    ] = 10.0,
    broker: BrokerOpt = None,
    username: UserOpt = None,
    password: PasswordOpt = None,
    ca_file: CaOpt = None,
) -> None:
    """Remove every artifact finished longer ago than --older-than: its database rows, its
    store objects and its retained status. Running artifacts are never touched. Only the
    scheduler's admins (--admin) may; print how many artifacts went."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise fail(f"--older-than: {exc}") from None
    with open_client(broker, username, password, ca_file, None, timeout=timeout) as client:
        try:
            report = client.prune(seconds, timeout)
        except (PermissionError, ValueError) as exc:
            raise fail(str(exc)) from None
        except TimeoutError as exc:
            raise fail(f"{exc}: is a scheduler running?", TIMED_OUT) from None
    if output == "json":
        console.print_json(report.model_dump_json())
        return
    noun = "artifact" if report.pruned == 1 else "artifacts"
    console.print(f"pruned {report.pruned} {noun} finished over {older_than} ago")
    for artifact_id in report.artifact_ids:
        console.print(f"  {artifact_id}", highlight=False)
    if report.pruned > len(report.artifact_ids):
        console.print(f"  and {report.pruned - len(report.artifact_ids)} more")
