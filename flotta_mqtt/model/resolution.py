"""A workflow's parameters resolved at submission: the values given (`-p NAME=VALUE`) or
the defaults, handed to each task that reads them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flotta_mqtt.model.templating import (
    Parameter,
    TemplateError,
    check_value,
    condition_names,
    placeholders,
)
from flotta_mqtt.model.workflow import Task, Workflow


def assignments(texts: list[str]) -> dict[str, str]:
    """`-p NAME=VALUE` options as a mapping; a repeated or malformed one is refused."""
    given: dict[str, str] = {}
    for text in texts:
        name, equals, value = text.partition("=")
        if not equals or name in given:
            problem = "repeated" if equals else "not NAME=VALUE"
            raise TemplateError(f"-p {text[:60]}: {problem}")
        given[name] = value
    return given


def parameter_values(workflow: Workflow, given: Mapping[str, str]) -> dict[str, Any]:
    """Every parameter's value: given, else its default; TemplateError for a name the
    workflow does not declare or a required parameter not given."""
    undeclared = sorted(set(given) - set(workflow.parameters))
    if undeclared:
        known = ", ".join(sorted(workflow.parameters)) or "none"
        raise TemplateError(
            f"-p {', '.join(undeclared)}: the workflow declares no such parameter "
            f"(it declares: {known})"
        )
    missing = sorted(
        name for name, spec in workflow.parameters.items() if spec.required and name not in given
    )
    if missing:
        raise TemplateError(
            f"required parameters not given: {', '.join(missing)} (give each with -p NAME=VALUE)"
        )
    return {
        name: check_value(name, _typed(name, given[name], spec) if name in given else spec.default)
        for name, spec in workflow.parameters.items()
    }


def resolve(workflow: Workflow, given: Mapping[str, str]) -> list[Task]:
    """The tasks to submit, exit handlers included: each carries the values of the
    parameters it reads (rendered on its worker), and a for_each over a parameter binds
    one job per item of its list."""
    values = parameter_values(workflow, given)
    tasks = []
    for task in workflow.all_tasks():
        names = [*placeholders(task.params), *placeholders(task.env)]
        names += [str(ref) for ref in condition_names(task.when)]
        read = {name.split(".")[1] for name in names if name.startswith("params.")}
        data = task.model_dump(mode="json")
        data["arguments"] = {name: values[name] for name in sorted(read)}
        if task.for_each is not None and not isinstance(task.for_each.items, list):
            source = task.for_each.source
            if source.path[0] == "params":
                items = values[source.path[1]]
                if not isinstance(items, list):
                    raise TemplateError(
                        f"task {task.name}: for_each over {source}, whose value is not a list: "
                        f"{json.dumps(items)[:60]}"
                    )
                data["for_each"] = {**data["for_each"], "items": items}
                data.pop("replicas", None)  # one job per item, counted again
        try:
            tasks.append(Task.model_validate(data))
        except ValueError as exc:
            raise TemplateError(f"task {task.name}: {exc}") from None
    return tasks


def _typed(name: str, text: str, spec: Parameter) -> Any:
    """A value given as text: text, unless the default is another JSON type, which the
    text must then be (as JSON)."""
    default = spec.default
    if spec.required or default is None or isinstance(default, str):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    kinds = (bool, int | float, list, dict)
    kind = next(k for k in kinds if isinstance(default, k))
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise TemplateError(
            f"-p {name}={text[:60]}: the parameter's default is {json.dumps(default)[:60]}, "
            f"so its value must be JSON of that type"
        )
    return value
