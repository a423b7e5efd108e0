"""Workflow parameters and placeholders, and what a worker decides before a task runs.

Rendering is one pass: a value is inserted as text and never read again, so no value can
expand another placeholder (no recursion, no injection through `{{`). Resolution refuses
an undeclared, missing, mistyped or oversized parameter; a task carries only the values
it reads. On the worker, a for_each slot past its list is skipped, a list over its bound
fails naming it, and a false condition skips the task."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt.model import Artifact, NodeRef, SchedulerContext, Task, Tasks, Workflow, bind
from flotta_mqtt.model.expressions import Reference
from flotta_mqtt.model.resolution import assignments, resolve
from flotta_mqtt.model.templating import MAX_VALUE_BYTES, TemplateError, placeholders, render
from flotta_mqtt.protocol import Resource
from flotta_mqtt.transport.store import IntegrityError, ResourceStore
from flotta_mqtt.workflows.executors import TaskError
from flotta_mqtt.workflows.executors.gating import MAX_RESULT_BYTES, Results, prepare


@settings(max_examples=300)
@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
def test_a_value_is_inserted_once_as_text_never_expanded(
    before: str, value: str, after: str
) -> None:
    template = "{{ params.a }}"
    rendered = render(f"{template}|{template}", lambda name: {"params.a": value}[name])
    assert rendered == f"{value}|{value}"
    # Whatever the value holds ({{ params.a }} itself, say), it is not read again.
    assert render(["{{params.a}}"], lambda name: before + template + after) == [
        before + template + after
    ]


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("{} params.a_1-x")), max_size=30))
def test_any_text_has_placeholders_or_is_refused_with_a_template_error(text: str) -> None:
    try:
        found = list(placeholders(text))
    except TemplateError:
        return
    assert render(text, lambda name: "") is not None
    assert all(name.strip() == name for name in found)


def release(**task: Any) -> Workflow:
    return Workflow.model_validate(
        {
            "parameters": {
                "target": {},
                "n": {"default": 2},
                "regions": {"default": ["eu", "us"]},
                "unused": {"default": "x"},
            },
            "tasks": [
                {"name": "t", "params": {"command": ["echo", "{{ params.target }}"]}, **task}
            ],
        }
    )


def test_a_task_carries_only_the_values_it_reads() -> None:
    [task] = resolve(release(when="params.n > 1"), {"target": "dev"})
    assert task.arguments == {"target": "dev", "n": 2}
    [task] = resolve(release(), {"target": "dev", "n": "5"})
    assert task.arguments == {"target": "dev"}


def test_a_for_each_over_a_parameter_binds_one_job_per_item() -> None:
    [task] = resolve(release(for_each={"items": "params.regions"}), {"target": "dev"})
    assert (task.replicas, task.for_each and task.for_each.items) == (2, ["eu", "us"])
    given = {"target": "dev", "regions": '["a", "b", "c"]'}
    [task] = resolve(release(for_each={"items": "params.regions"}), given)
    assert task.replicas == 3


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ({}, "required parameters not given: target"),
        ({"target": "x", "other": "1"}, "-p other: the workflow declares no such parameter"),
        ({"target": "x", "n": "two"}, "-p n=two: the parameter's default is 2"),
        ({"target": "x", "n": "true"}, "-p n=true: the parameter's default is 2"),
        ({"target": "x" * (MAX_VALUE_BYTES + 1)}, "more than 65,536"),
    ],
)
def test_bad_parameters_are_refused_naming_them(given: dict[str, str], why: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(why)):
        resolve(release(), given)


def test_a_for_each_over_a_parameter_that_is_no_list_is_refused() -> None:
    workflow = Workflow.model_validate(
        {
            "parameters": {"one": {"default": "x"}},
            "tasks": [{"name": "t", "for_each": {"items": "params.one"}}],
        }
    )
    with pytest.raises(
        TemplateError, match=re.escape("for_each over params.one, whose value is not a list")
    ):
        resolve(workflow, {})


def test_repeated_or_malformed_assignments_are_refused() -> None:
    assert assignments(["a=1", "b==2", "c="]) == {"a": "1", "b": "=2", "c": ""}
    with pytest.raises(TemplateError, match="repeated"):
        assignments(["a=1", "a=2"])
    with pytest.raises(TemplateError, match="not NAME=VALUE"):
        assignments(["a"])


@pytest.mark.parametrize(
    ("task", "why"),
    [
        ({"when": "tasks.t.status == 'x'"}, "which it does not depend on"),  # itself
        ({"params": {"shell": "{{ params.nope }}"}}, "params.nope is no parameter"),
        ({"env": {"A": "{{ item }}"}}, "item is only known in a task with for_each"),
        ({"env": {"A": "{{ os.environ }}"}}, "names nothing: params.NAME, item or workflow.status"),
        ({"for_each": {"items": "tasks.t.outputs.json"}}, "needs `max`"),
        ({"for_each": {"items": "params.x.y"}}, "a list, `params.NAME` or"),
        ({"for_each": {"items": "params.nope", "max": 3}}, "params.nope is no parameter"),
        ({"for_each": {"items": [1, 2], "max": 1}}, "2 items, more than its max"),
        ({"for_each": {"items": [1, 2]}, "replicas": 3}, "it sets `replicas` itself"),
    ],
)
def test_bad_references_are_refused_when_the_file_is_read(task: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        release(**task)


def test_a_condition_reads_only_a_single_job_it_depends_on() -> None:
    tasks = [
        {"name": "many", "replicas": 2},
        {"name": "t", "depends": ["many"], "when": "tasks.many.exit_code == 0"},
    ]
    with pytest.raises(ValueError, match="which runs as 2 jobs"):
        Workflow.model_validate({"tasks": tasks})


def test_a_condition_reads_no_output_of_a_cached_task() -> None:
    """A cached run is reused with its job files but not its stdout, which `outputs.result`
    and `outputs.json` read: refused when the file is read, not answered with nothing."""
    tasks = [
        {"name": "build", "cache": True},
        {"name": "t", "depends": ["build"], "when": "tasks.build.outputs.result == 'ok'"},
    ]
    with pytest.raises(ValueError, match="it is cached"):
        Workflow.model_validate({"tasks": tasks})
    tasks[1]["when"] = "tasks.build.exit_code == 0"
    Workflow.model_validate({"tasks": tasks})


class Printed(Results):
    """Results as if each dependency printed the given value."""

    def __init__(self, **values: Any) -> None:
        self.values = values

    def value(self, ref: Reference) -> Any:
        return self.values[ref.path[1]]


def slot(replica: int, **task: Any) -> Task:
    base = {"name": f"t[{replica}]", "replica": replica, "depends": ["gen"]}
    return Task.model_validate({**base, **task})


def test_a_slot_past_the_list_is_skipped_and_the_others_get_their_item() -> None:
    fan = {"for_each": {"items": "tasks.gen.outputs.json", "max": 3}}
    params = {"command": ["echo", "{{ item.name }}", "{{ params.p }}"]}
    first = slot(0, **fan, params=params, arguments={"p": "{{ item }}"})
    items = [{"name": "{{ params.p }}"}]
    ready = prepare(first, Printed(gen=items))
    assert isinstance(ready, Task)
    assert ready.params == {"command": ["echo", "{{ params.p }}", "{{ item }}"]}
    assert (
        prepare(slot(1, **fan), Printed(gen=items)) == "for_each slot 1 is past the list's 1 items"
    )


@pytest.mark.parametrize(
    ("printed", "why"),
    [
        (list(range(4)), "4 items, more than its max of 3 jobs"),
        ({"a": 1}, 'not a list but {"a": 1}'),
        ([1], "the item 1 has no name"),
    ],
)
def test_a_fan_out_that_cannot_be_done_fails_naming_why(printed: Any, why: str) -> None:
    task = slot(
        0, for_each={"items": "tasks.gen.outputs.json", "max": 3}, env={"A": "{{ item.name }}"}
    )
    with pytest.raises(TaskError, match=re.escape(why)):
        prepare(task, Printed(gen=printed))


def test_a_false_condition_skips_and_a_non_boolean_one_fails() -> None:
    task = Task.model_validate(
        {"name": "t", "depends": ["gen"], "when": "tasks.gen.outputs.result == 'go'"}
    )
    assert isinstance(prepare(task, Printed(gen="go")), Task)
    assert prepare(task, Printed(gen="stop")) == "when: tasks.gen.outputs.result == 'go' is false"
    odd = Task.model_validate({"name": "t", "depends": ["gen"], "when": "tasks.gen.exit_code"})
    with pytest.raises(TaskError, match="it gives 0, not true or false"):
        prepare(odd, Printed(gen=0))


def test_each_job_of_a_list_carries_its_own_item_not_the_whole_list() -> None:
    items = [{"n": i, "pad": "x" * 100} for i in range(50)]
    task = Task.model_validate(
        {"name": "t", "for_each": {"items": items}, "env": {"N": "{{ item.n }}"}}
    )
    context = SchedulerContext(
        initiator=NodeRef(id="init"), workers=[], pool=[NodeRef(id="w", executors=["shell"])]
    )
    graph = bind(Artifact(project="p", steps=[Tasks(tasks=[task])]), context)
    assert len(graph) == 50
    for job in graph:
        bound = Task.model_validate(job.operation.params)
        assert bound.for_each is not None and bound.for_each.items == [items[job.id]]
        assert len(json.dumps(job.operation.params)) < 500, "not the whole list"
        ready = prepare(bound, Printed())
        assert isinstance(ready, Task) and ready.env == {"N": str(job.id)}


def test_a_file_cannot_set_what_binding_sets() -> None:
    with pytest.raises(ValueError, match="`first` is set by binding"):
        Task.model_validate({"name": "t", "for_each": {"items": [1], "first": 3}})


def stored_run(store: ResourceStore, printed: bytes) -> Resource:
    """A dependency's product as a worker stores it: its stdout a log it names."""
    log = store.put(store.log_url("a1", "gen", 1, "stdout"), printed, media_type="text/plain")
    product = {"task": "gen", "exit_code": 0, "logs": {"stdout": log.model_dump(mode="json")}}
    return store.put_product("a1", "0", 1, json.dumps(product).encode())


def test_what_a_condition_reads_is_verified_so_a_changed_log_cannot_steer_it(
    tmp_path: Path,
) -> None:
    store = ResourceStore((tmp_path / "store").as_uri())
    product = stored_run(store, b"go\n")
    task = Task.model_validate(
        {"name": "t", "depends": ["gen"], "when": "tasks.gen.outputs.result == 'stop'"}
    )
    results = Results(store, store.artifact_root("a1"), [product])
    assert prepare(task, results) == "when: tasks.gen.outputs.result == 'stop' is false"
    # Someone with write access to the store rewrites the log the product names.
    log = tmp_path / "store" / store.log_url("a1", "gen", 1, "stdout").split("/store/", 1)[1]
    log.write_bytes(b"stop\n")
    with pytest.raises(IntegrityError):
        prepare(task, Results(store, store.artifact_root("a1"), [product]))


def test_a_condition_reads_no_more_than_its_bound_of_output(tmp_path: Path) -> None:
    store = ResourceStore((tmp_path / "store").as_uri())
    product = stored_run(store, b"x" * (MAX_RESULT_BYTES + 1))
    task = Task.model_validate(
        {"name": "t", "depends": ["gen"], "when": "tasks.gen.outputs.result == ''"}
    )
    with pytest.raises(TaskError, match="printed 262,145 bytes, more than the 262,144"):
        prepare(task, Results(store, store.artifact_root("a1"), [product]))


def test_a_task_with_no_placeholder_or_condition_runs_as_it_came() -> None:
    """Most tasks: prepared for each of their jobs, with nothing to render, no copy."""
    task = Task(name="t", params={"command": ["echo", "{ not a placeholder }"]}, env={"A": "1"})
    assert prepare(task, Printed()) is task
    templated = task.model_copy(update={"arguments": {"p": "x"}, "env": {"A": "{{ params.p }}"}})
    ready = prepare(templated, Printed())
    assert isinstance(ready, Task) and ready.env == {"A": "x"} and ready.params == task.params
