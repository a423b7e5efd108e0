"""Workflow parameters, `{{ ... }}` placeholders, conditions and fan-out, as data.

A placeholder names a value: `{{ params.NAME }}` a workflow parameter, `{{ item }}` (or
`{{ item.KEY }}`) the item of a `for_each` job. Rendering is one pass over the template:
a value inserted is text, never read again, so a value holding `{{` stays as it is, and
nothing in a value is evaluated. Placeholders are rendered in a task's `params` and
`env` on the worker that runs it, so a value reaches a process as one argv entry or one
variable, unless the task's own command hands it to a shell.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from flotta_mqtt.model.expressions import Reference, parse, references
from flotta_mqtt.model.operation import FiniteJson

MAX_PARAMETERS = 100
MAX_VALUE_BYTES = 64 * 1024  # one parameter's value, as JSON
MAX_ITEMS = 10_000  # jobs of one `for_each`
_NAME = r"[A-Za-z_][A-Za-z0-9_-]{0,63}"
ParameterName = Annotated[str, Field(pattern=rf"^{_NAME}$")]
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]*)\s*\}\}")
# The task fields a reference may read: tasks.NAME.FIELD, as a dependency's product says.
TASK_FIELDS = ("exit_code", "status", "outputs.result", "outputs.json")
# An exit handler's view of the other tasks: "Succeeded", or "Failed" if one failed.
WORKFLOW_STATUS = "workflow.status"


class TemplateError(ValueError):
    """A placeholder that names nothing known, or a value too large to insert."""


def _condition(text: str) -> str:
    parse(text)  # ExpressionError (a ValueError) names the problem
    return text


# A task's `when`: an expression (see model/expressions.py) that must be true for it to run.
Condition = Annotated[str, Field(min_length=1), AfterValidator(_condition)]


def check_value(name: str, value: Any) -> Any:
    """A parameter's value, refused when it is larger than a message should carry."""
    size = len(json.dumps(value))
    if size > MAX_VALUE_BYTES:
        raise TemplateError(
            f"parameter {name}: its value is {size:,} bytes as JSON, more than {MAX_VALUE_BYTES:,}"
        )
    return value


class Parameter(BaseModel):
    """A workflow parameter: required unless it has a `default`; `-p NAME=VALUE` sets it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: FiniteJson = None
    description: str | None = Field(default=None, max_length=1000)

    @property
    def required(self) -> bool:
        return "default" not in self.model_fields_set


class ForEach(BaseModel):
    """A task run once per item: of a list, of a list parameter (`params.NAME`), or of the
    JSON list a dependency printed (`tasks.NAME.outputs.json`, with a bound `max`).

    The graph is bound at submission, so a list known only at run time needs `max`: that
    many jobs are bound, and those past the list's end are skipped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    items: Annotated[list[FiniteJson], Field(max_length=MAX_ITEMS)] | str
    max: int | None = Field(default=None, ge=1, le=MAX_ITEMS)
    # The index of items[0] in the workflow's list: binding hands each job of a list only
    # its own item, so a job message does not carry the whole list; never in a file.
    first: SkipJsonSchema[int] = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _bounded(self) -> ForEach:
        if isinstance(self.items, list):
            if self.max is not None and len(self.items) > self.max:
                raise ValueError(f"for_each has {len(self.items)} items, more than its max")
            return self
        source = self.source
        if source.path[0] == "tasks" and self.max is None:
            raise ValueError(
                f"for_each over {source}: a list known only when the task runs needs `max` "
                f"(at most {MAX_ITEMS:,}), the number of jobs bound for it"
            )
        return self

    @property
    def source(self) -> Reference:
        """The reference the items come from (when they are not a list)."""
        node = parse(str(self.items))
        if not isinstance(node, Reference) or not (
            (node.path[0] == "params" and len(node.path) == 2)
            or (node.path[0] == "tasks" and node.path[2:] == ("outputs", "json"))
        ):
            raise ValueError(
                f"for_each items {self.items!r}: a list, `params.NAME` or `tasks.NAME.outputs.json`"
            )
        return node

    @property
    def slots(self) -> int | None:
        """How many jobs it binds to (at least one); None until a parameter is resolved."""
        if isinstance(self.items, list):
            return max(1, len(self.items))
        return None if self.max is None else self.max


def placeholders(value: Any) -> Iterator[str]:
    """The names of every placeholder in a JSON value's strings; TemplateError for a
    `{{` that starts no placeholder."""
    if isinstance(value, str):
        if "{{" not in value:
            return
        for match in _PLACEHOLDER.finditer(value):
            yield match.group(1)
        if value.count("{{") != len(_PLACEHOLDER.findall(value)):
            raise TemplateError(f"{value[:60]!r}: `{{{{` starts no `{{{{ name }}}}` placeholder")
    elif isinstance(value, list):
        for item in value:
            yield from placeholders(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from placeholders(item)


def render(value: Any, lookup: Callable[[str], Any]) -> Any:
    """The value with every placeholder replaced by its value (text as is, others as JSON),
    in one pass: what is inserted is never read for placeholders again."""
    if isinstance(value, str):
        if "{{" not in value:
            return value

        def insert(match: re.Match[str]) -> str:
            found = lookup(match.group(1))
            return found if isinstance(found, str) else json.dumps(found)

        return _PLACEHOLDER.sub(insert, value)
    if isinstance(value, list):
        return [render(item, lookup) for item in value]
    if isinstance(value, dict):
        return {key: render(item, lookup) for key, item in value.items()}
    return value


def check_names(
    task: str, names: Iterator[str], parameters: Mapping[str, Any], item: bool, handler: bool
) -> None:
    """Refuse a placeholder or reference naming no parameter, `item` outside a for_each,
    or `workflow.status` outside an exit handler (the only tasks that run knowing it)."""
    for name in names:
        head, _, rest = name.partition(".")
        if head == "params" and rest in parameters:
            continue
        if (head == "item" and item) or (name == WORKFLOW_STATUS and handler):
            continue
        if head == "params":
            known = ", ".join(sorted(parameters)) or "none"
            raise TemplateError(f"task {task}: {name} is no parameter of the workflow ({known})")
        if head == "item":
            raise TemplateError(f"task {task}: {name} is only known in a task with for_each")
        if name == WORKFLOW_STATUS:
            raise TemplateError(f"task {task}: {name} is only known in on_exit and on_failure")
        raise TemplateError(
            f"task {task}: {name!r} names nothing: params.NAME, item or workflow.status"
        )


def task_reference(task: str, reference: Reference, depends: list[str]) -> str:
    """The task a `tasks.NAME.FIELD` reference reads, refused unless `task` depends on it
    (its product is what the worker reads) and FIELD is one a product has."""
    path = reference.path
    if len(path) < 3 or ".".join(path[2:]) not in TASK_FIELDS:
        fields = ", ".join(TASK_FIELDS)
        raise ValueError(f"task {task}: {reference} is not tasks.NAME followed by one of {fields}")
    if path[1] not in depends:
        raise ValueError(
            f"task {task}: {reference} reads task {path[1]}, which it does not depend on "
            "(a condition reads only the tasks in its `depends`)"
        )
    return path[1]


def condition_names(when: str | None) -> Iterator[Reference]:
    """The references in a condition."""
    if when is not None:
        yield from references(parse(when))
