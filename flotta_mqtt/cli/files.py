"""Artifact and workflow files as the CLI reads them: a workflow's parameters resolved,
its tasks checked, every error one message naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flotta_mqtt.cli.errors import fail
from flotta_mqtt.model import Artifact, Tasks, Workflow
from flotta_mqtt.model.resolution import assignments, resolve
from flotta_mqtt.transport.settings import load_yaml
from flotta_mqtt.workflows.executors import check_task


def load_artifact(path: Path, parameters: list[str] | None = None) -> Artifact:
    """Read an artifact or a workflow (a file with `tasks`) from JSON or YAML, a
    workflow's parameters set from `NAME=VALUE` texts (else their defaults).

    Errors name what is wrong: duplicate tasks, unknown dependencies, the cycle, a
    parameter undeclared or missing.
    """
    data: dict[str, Any] = {}  # an unreadable file fails before it is known which it is
    try:
        data = load_yaml(path)
        if "tasks" in data:
            workflow = Workflow.model_validate(data)
            tasks = resolve(workflow, assignments(parameters or []))
            for task in tasks:
                check_task(task)
            return Artifact(project=workflow.project, steps=[Tasks(tasks=tasks)])
        return Artifact.model_validate(data)
    except (ValueError, ValidationError) as exc:
        what = "workflow" if "tasks" in data else "artifact"
        raise fail(f"{path} is not a valid {what}:\n{exc}") from None
