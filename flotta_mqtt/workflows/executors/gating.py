"""Before a task runs: its `for_each` item, its `when`, and its placeholders rendered.

What a condition reads of an earlier task comes from that task's product, which the job
consumes with a sha256 that came over the bus (its stdout through the log the product
names, with its own sha256): a file changed in the store fails the task, never steers it.
"""

from __future__ import annotations

import json
from typing import Any

from flotta_mqtt.model import Task
from flotta_mqtt.model.expressions import ExpressionError, Reference, evaluate, parse
from flotta_mqtt.model.templating import MAX_ITEMS, WORKFLOW_STATUS, render
from flotta_mqtt.model.workflow import task_of
from flotta_mqtt.protocol import Resource
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.workflows.executors.base import TaskError

MAX_RESULT_BYTES = 256 * 1024  # of a task's stdout that a condition or for_each reads


class Results:
    """The products of the tasks a job depends on, read when a reference needs them."""

    def __init__(self, store: ResourceStore, folder: str, products: list[Resource]) -> None:
        self.store = store
        self.folder = folder
        self.products = products
        self._read: dict[str, dict[str, Any]] | None = None

    def value(self, ref: Reference) -> Any:
        """The value of `tasks.NAME.FIELD` (see model/templating.TASK_FIELDS)."""
        name, field = ref.path[1], ".".join(ref.path[2:])
        if self._read is None:
            stored = (json.loads(self.store.get(p, self.folder)) for p in self.products)
            self._read = {task_of(str(product.get("task"))): product for product in stored}
        product = self._read.get(name)
        if product is None:
            raise TaskError(f"{ref}: no product of task {name} among the job's inputs", None)
        if field == "status":
            return "Skipped" if product.get("skipped") else "Succeeded"
        if field == "exit_code":
            return product.get("exit_code")
        log = product.get("logs", {}).get("stdout")
        resource = None if log is None else Resource.model_validate(log)
        if resource is not None and resource.size > MAX_RESULT_BYTES:
            raise TaskError(
                f"{ref}: task {name} printed {resource.size:,} bytes, more than the "
                f"{MAX_RESULT_BYTES:,} a condition or for_each reads",
                None,
            )
        text = "" if resource is None else self.store.get(resource, self.folder).decode()
        if field == "outputs.result":
            return text.strip()
        try:
            return json.loads(text)
        except ValueError:
            raise TaskError(f"{ref}: task {name} did not print JSON: {text[:60]!r}", None) from None


def prepare(task: Task, results: Results) -> Task | str:
    """The task to run, its placeholders rendered; or why it is skipped. TaskError when
    its condition or items cannot be read."""
    item: Any = None
    if task.for_each is not None:
        source = task.for_each.items
        items = source if isinstance(source, list) else results.value(task.for_each.source)
        if not isinstance(items, list):
            raise TaskError(
                f"task {task.name}: for_each over {source}: not a list but "
                f"{json.dumps(items)[:60]}",
                None,
            )
        bound = task.for_each.max or MAX_ITEMS
        if len(items) > bound:
            raise TaskError(
                f"task {task.name}: for_each over {source}: {len(items):,} items, more "
                f"than its max of {bound:,} jobs",
                None,
            )
        index = task.replica or 0
        position = index - task.for_each.first  # binding gives a job its own item only
        if position < 0:
            raise TaskError(f"task {task.name}: for_each slot {index} holds no item", None)
        if position >= len(items):
            return f"for_each slot {index} is past the list's {len(items)} items"
        item = items[position]

    def lookup(ref: Reference) -> Any:
        head, path = ref.path[0], ref.path[1:]
        if head == "tasks":
            return results.value(ref)
        if head == "params" and len(path) == 1 and path[0] in task.arguments:
            return task.arguments[path[0]]
        if str(ref) == WORKFLOW_STATUS and task.workflow_status is not None:
            return task.workflow_status
        if head == "item":
            value = item
            for key in path:
                if not isinstance(value, dict) or key not in value:
                    raise ExpressionError(f"{ref}: the item {json.dumps(item)[:60]} has no {key}")
                value = value[key]
            return value
        raise ExpressionError(f"{ref} has no value in task {task.name}")

    try:
        if task.when is not None:
            verdict = evaluate(parse(task.when), lookup)
            if not isinstance(verdict, bool):
                raise ExpressionError(f"it gives {json.dumps(verdict)[:60]}, not true or false")
            if not verdict:
                return f"when: {task.when} is false"

        def named(name: str) -> Any:
            return lookup(Reference(tuple(name.split("."))))

        params, env = render(task.params, named), render(task.env, named)
    except ExpressionError as exc:
        raise TaskError(f"task {task.name}: {exc}", None) from None
    if params == task.params and env == task.env:  # no placeholder: no copy (most tasks)
        return task
    return task.model_copy(update={"params": params, "env": env})
