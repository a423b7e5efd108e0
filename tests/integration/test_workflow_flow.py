"""What Argo users expect of a workflow, end to end: parameters set with `flotta-mqtt
submit -p`, conditions (`when`), fan-out over a list a task printed (`for_each`), and exit
handlers (`on_exit`, `on_failure`), submitted by the CLI as a process to an in-process
scheduler whose workers run shell tasks on a real mosquitto.

Attacked too: a parameter value holding a shell command substitution and a placeholder
reaches the task as text, neither run nor expanded; bad parameters, conditions and fan-outs
are refused in one line before anything is submitted; a list longer than its bound, or no
list at all, fails the fan-out with a message naming the bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cli_processes import run
from test_workflows import TIMEOUT, Flotta, by_name, flotta, invoke, write_workflow  # noqa: F401

from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.protocol import ArtifactStatus
from flotta_mqtt.transport.store import ResourceStore

pytestmark = pytest.mark.integration

RELEASE: dict[str, Any] = {
    "name": "release",
    "parameters": {
        "greeting": {"default": "hello"},
        "target": {"description": "where to release"},  # required
        "regions": {"default": ["eu", "us"]},
    },
    "tasks": [
        {"name": "gen", "params": {"shell": """echo '["a", "b", "c"]'"""}},
        {
            "name": "fan",
            "depends": ["gen"],
            "for_each": {"items": "tasks.gen.outputs.json", "max": 5},
            "params": {"command": ["echo", "{{ params.greeting }}|{{ item }}"]},
        },
        {
            "name": "per-region",
            "for_each": {"items": "params.regions"},
            "params": {"command": ["echo", "{{ item }}"]},
            "env": {"REGION": "{{ item }}"},
        },
        {
            "name": "prod-only",
            "when": "params.target == 'prod'",
            "params": {"command": ["echo", "deploying"]},
        },
        {
            "name": "after-skip",
            "depends": ["prod-only", "gen"],
            "when": "tasks.prod-only.status == 'Skipped' and tasks.gen.outputs.result != ''",
            "params": {"shell": 'echo "$WHERE"'},
            "env": {"WHERE": "not {{ params.target }}"},
        },
    ],
    "on_exit": [{"name": "cleanup", "params": {"command": ["echo", "{{ workflow.status }}"]}}],
    "on_failure": [{"name": "alarm", "params": {"command": ["echo", "alarm"]}}],
}


def submit(flotta: Flotta, workflow: dict[str, Any], *params: str) -> ArtifactStatus:  # noqa: F811
    """`flotta-mqtt submit FILE -p ...` as a process; the workflow's final status."""
    path = write_workflow(flotta.folder, workflow)
    options = [arg for param in params for arg in ("-p", param)]
    code, out, err = run(
        "submit",
        str(path),
        *options,
        "--broker",
        flotta.broker_url,
        "--storage",
        flotta.storage.url,
    )
    assert code == 0, err
    artifact_id = out.split("submitted artifact ")[1].split()[0]
    assert flotta.client is not None
    return flotta.client.handle(artifact_id).wait(timeout=TIMEOUT)


def stdout(flotta: Flotta, status: ArtifactStatus, log: str) -> str:  # noqa: F811
    store = ResourceStore(flotta.storage.url)
    return store.get_bytes(store.log_url(status.artifact_id, log, 1, "stdout")).decode()


def test_parameters_conditions_fan_out_and_exit_handlers_through_the_cli(flotta: Flotta) -> None:  # noqa: F811
    flotta.start({"w0": ["shell"], "w1": ["shell"]})
    # A value that a shell would run, holding a placeholder that must not be expanded.
    greeting = "$(touch pwned) {{ params.target }}"
    status = submit(flotta, RELEASE, "target=dev", f"greeting={greeting}")
    assert status.state is ArtifactState.COMPLETED, status.error
    jobs = by_name(status)
    states = {name: job.state for name, job in jobs.items()}
    S, C = JobState.SKIPPED, JobState.COMPLETED
    assert states == {
        "gen": C,
        **{f"fan[{i}]": C for i in range(3)},
        "fan[3]": S,  # the list had 3 items: the bound's last slots are skipped
        "fan[4]": S,
        "per-region[0]": C,
        "per-region[1]": C,
        "prod-only": S,  # target is dev
        "after-skip": C,  # its dependency skipped counts as done
        "cleanup": C,
        "alarm": S,  # nothing failed
    }
    for i, item in enumerate("abc"):
        assert stdout(flotta, status, f"_fan.{i}") == f"{greeting}|{item}\n"
    assert [stdout(flotta, status, f"_per-region.{i}") for i in (0, 1)] == ["eu\n", "us\n"]
    assert stdout(flotta, status, "after-skip") == "not dev\n"
    assert stdout(flotta, status, "cleanup") == "Succeeded\n"
    assert jobs["prod-only"].error is not None and "is false" in jobs["prod-only"].error
    # The exit handler ran after every other task had finished.
    cleanup = jobs["cleanup"]
    assert cleanup.started_at is not None
    others = [job for name, job in jobs.items() if name not in ("cleanup", "alarm")]
    assert all(job.finished_at and job.finished_at <= cleanup.started_at for job in others)
    # `validate` and `status` show the skipped state by its name.
    shown = flotta.cli("status", status.artifact_id)
    assert "skipped" in shown.output, shown.output


def test_a_failure_runs_both_handlers_and_the_workflow_still_fails(flotta: Flotta) -> None:  # noqa: F811
    flotta.start({"w0": ["shell"]})
    workflow = {
        "tasks": [
            {"name": "boom", "params": {"shell": "echo broken >&2; exit 4"}},
            {"name": "never", "depends": ["boom"], "params": {"command": ["true"]}},
        ],
        "on_exit": [
            {
                "name": "cleanup",
                "when": "workflow.status == 'Failed'",
                "params": {"command": ["echo", "{{ workflow.status }}"]},
            }
        ],
        "on_failure": [
            {"name": "alarm", "params": {"command": ["echo", "alarm"]}},
            {"name": "page", "depends": ["alarm"], "params": {"command": ["echo", "page"]}},
        ],
    }
    status = submit(flotta, workflow)
    assert status.state is ArtifactState.FAILED
    assert status.error is not None and "task boom exited with status 4" in status.error.message
    jobs = by_name(status)
    assert {name: job.state for name, job in jobs.items()} == {
        "boom": JobState.FAILED,
        "never": JobState.CANCELLED,
        "cleanup": JobState.COMPLETED,
        "alarm": JobState.COMPLETED,
        "page": JobState.COMPLETED,
    }
    assert status.failed_job == jobs["boom"].id
    assert stdout(flotta, status, "page") == "page\n"
    assert stdout(flotta, status, "cleanup") == "Failed\n"


def test_a_fan_out_over_too_long_a_list_or_no_list_fails_naming_why(flotta: Flotta) -> None:  # noqa: F811
    flotta.start({"w0": ["shell"]})
    for printed, why in (
        ("[1, 2, 3, 4]", "4 items, more than its max of 2 jobs"),
        ('{"a": 1}', 'not a list but {"a": 1}'),
        ("not json", "did not print JSON"),
    ):
        workflow = {
            "tasks": [
                {"name": "gen", "params": {"command": ["echo", printed]}},
                {
                    "name": "fan",
                    "depends": ["gen"],
                    "for_each": {"items": "tasks.gen.outputs.json", "max": 2},
                    "params": {"command": ["echo", "{{ item }}"]},
                },
            ]
        }
        status = submit(flotta, workflow)
        assert status.state is ArtifactState.FAILED, printed
        assert status.error is not None and why in status.error.message, status.error


BIG = "x" * 70_000


@pytest.mark.parametrize(
    ("change", "params", "why"),
    [
        ({}, [], "required parameters not given: target"),
        ({}, ["target=dev", "nope=1"], "-p nope: the workflow declares no such parameter"),
        ({}, ["target=dev", "target=prod"], "-p target=prod: repeated"),
        ({}, ["target=dev", "regions=eu"], "its value must be JSON of that type"),
        ({}, ["target=dev", "regions=1"], "its value must be JSON of that type"),
        ({}, ["target=dev", f"greeting={BIG}"], "more than 65,536"),
        ({"when": "tasks.fan.status == 'x'"}, ["target=dev"], "which it does not depend on"),
        ({"when": "tasks.gen.status == "}, ["target=dev"], "expected a value"),
        ({"when": "params.nope == 1"}, ["target=dev"], "params.nope is no parameter"),
        ({"when": "item == 1"}, ["target=dev"], "only known in a task with for_each"),
        ({"env": {"S": "{{ workflow.status }}"}}, ["target=dev"], "only known in on_exit"),
        ({"when": "tasks.gen.stdout == 1"}, ["target=dev"], "is not tasks.NAME followed by"),
        ({"for_each": {"items": "tasks.gen.outputs.json"}}, ["target=dev"], "needs `max`"),
        (
            {"for_each": {"items": "tasks.gen.outputs.json", "max": 1_000_000}},
            ["target=dev"],
            "less than or equal to 10000",
        ),
        ({"for_each": {"items": list(range(10_001))}}, ["target=dev"], "at most 10000 items"),
        ({"env": {"X": "{{ params.greeting"}}, ["target=dev"], "starts no"),
        ({"env": {"X": "{{ params.{{ params.x }} }}"}}, ["target=dev"], "starts no"),
    ],
)
def test_bad_parameters_conditions_and_fan_outs_are_refused_before_submission(
    flotta: Flotta,  # noqa: F811
    change: dict[str, Any],
    params: list[str],
    why: str,
) -> None:
    task = {"name": "t", "depends": ["gen"], "params": {"command": ["true"]}, **change}
    workflow = {**RELEASE, "tasks": [RELEASE["tasks"][0], task]}
    path = write_workflow(flotta.folder, workflow)
    options = [arg for param in params for arg in ("-p", param)]
    result = invoke("submit", str(path), *options, "--broker", "mqtt://127.0.0.1:1")
    assert result.exit_code != 0
    assert why in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_the_example_runs_as_its_comments_say(flotta: Flotta) -> None:  # noqa: F811
    flotta.start({"w0": ["shell"]})
    example = Path(__file__).resolve().parents[2] / "examples" / "release.yaml"
    workflow = yaml.safe_load(example.read_text())
    status = submit(flotta, workflow, "target=prod", "version=1.2")
    assert status.state is ArtifactState.COMPLETED, status.error
    states = {name: job.state for name, job in by_name(status).items()}
    assert [states[f"package[{i}]"] for i in range(8)] == [JobState.COMPLETED] * 3 + [
        JobState.SKIPPED
    ] * 5
    assert (states["deploy[0]"], states["deploy[1]"]) == (JobState.COMPLETED,) * 2
    assert (states["announce"], states["cleanup"], states["alarm"]) == (
        JobState.COMPLETED,
        JobState.COMPLETED,
        JobState.SKIPPED,
    )
    assert stdout(flotta, status, "_package.2") == "package 1.2 for windows\n"
    assert stdout(flotta, status, "_deploy.1") == "deploy 1.2 to us\n"
    assert stdout(flotta, status, "announce") == "1.2 released to prod\n"
    assert stdout(flotta, status, "cleanup") == "release Succeeded\n"
