"""Each data site decides what its worker runs, attacked end to end: workflows submitted to
an in-process scheduler whose workers run shell tasks on a real mosquitto.

A shell task sees none of the worker's environment (its broker password, cloud keys); a
secret reaches a task only by the name the site gave it, and its value never shows on the
bus, in a status or a log; a secret the site does not define fails the task before it
runs; an output that is a link to the worker's own files is never collected; a worker
refuses a task for an executor it does not run, even sent straight to it.
Containers and Kubernetes Jobs under the policy: test_executor_docker.py, test_executor_kube.py.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MessageRecorder, messages_of, task_job
from test_workflows import TIMEOUT, Flotta, by_name, flotta, invoke, write_workflow  # noqa: F401

from flotta_mqtt.model import Artifact, ArtifactState, JobState, Task, Tasks
from flotta_mqtt.protocol import ArtifactStatus, JobFailed, topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.store import ResourceNotFound, ResourceStore
from flotta_mqtt.workflows.executors import SitePolicy

pytestmark = pytest.mark.integration


def run_tasks(flotta: Flotta, *tasks: dict[str, Any]) -> ArtifactStatus:  # noqa: F811
    """Submit tasks through the workbench SDK (the CLI would read FLOTTA_PASSWORD as its
    own option); wait for the final status."""
    assert flotta.client is not None
    workflow = [Task.model_validate(task) for task in tasks]
    artifact = Artifact(project="workflows", steps=[Tasks(tasks=workflow)])
    return flotta.client.submit(artifact).wait(timeout=TIMEOUT)


def log(flotta: Flotta, status: ArtifactStatus, task: str, stream: str) -> bytes:  # noqa: F811
    store = ResourceStore(flotta.storage.url)
    return store.get_bytes(store.log_url(status.artifact_id, task, 1, stream))


def stored(flotta: Flotta, pattern: str = "*") -> bytes:  # noqa: F811
    """Every byte of the files in the store matching `pattern`: job files, logs, products."""
    files = (flotta.folder / "store").rglob(pattern)
    return b"".join(path.read_bytes() for path in files if path.is_file())


@pytest.fixture
def recorder(flotta: Flotta) -> Iterator[MessageRecorder]:  # noqa: F811
    """Every message on the broker under the protocol's root, from the start of the test."""
    messages = MessageRecorder()
    bus = Bus(
        client_id=f"spy-{uuid.uuid4().hex[:8]}",
        settings=flotta.broker,
        on_message=messages,
        subscriptions=[f"{topics.ROOT}/#"],
        clean=True,
    ).start(wait=TIMEOUT)
    try:
        yield messages
    finally:
        bus.stop()


def test_a_shell_task_sees_none_of_the_workers_environment(
    flotta: Flotta,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password, key = uuid.uuid4().hex, uuid.uuid4().hex
    monkeypatch.setenv("FLOTTA_PASSWORD", password)  # the worker's own, as its CLI reads it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key)
    flotta.start({"w0": ["shell"]})
    status = run_tasks(
        flotta,
        {"name": "env", "params": {"command": ["env"]}, "env": {"GREETING": "hi"}},
        {"name": "looks", "params": {"shell": 'cat /proc/$$/environ | tr "\\0" "\\n"'}},
    )
    assert status.state is ArtifactState.COMPLETED, status.error
    seen = dict(
        line.split("=", 1) for line in log(flotta, status, "env", "stdout").decode().split()
    )
    assert sorted(seen) == ["GREETING", "HOME", "LANG", "PATH", "TMPDIR"]
    assert seen["HOME"] == seen["TMPDIR"] and Path(seen["HOME"]).name.startswith("flotta-task-")
    assert seen["GREETING"] == "hi"
    for name in ("env", "looks"):
        printed = log(flotta, status, name, "stdout")
        assert password.encode() not in printed and key.encode() not in printed
        assert b"FLOTTA_PASSWORD" not in printed and b"AWS_" not in printed


def test_a_secret_reaches_its_task_by_name_and_never_the_bus_a_status_or_a_log(
    flotta: Flotta,  # noqa: F811
    recorder: MessageRecorder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    db_password, token = f"db-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("SITE_DB_PASSWORD", db_password)
    (tmp_path / "token").write_text(f"{token}\n")
    policy = SitePolicy.model_validate(
        {
            "secrets": {
                "DB_PASSWORD": {"env": "SITE_DB_PASSWORD"},
                "API_TOKEN": {"file": str(tmp_path / "token")},
            }
        }
    )
    flotta.start({"w0": ["shell"]}, policy=policy)
    status = run_tasks(
        flotta,
        {
            "name": "uses",
            "secrets": ["DB_PASSWORD", "API_TOKEN"],
            "params": {
                "shell": 'printf %s "$DB_PASSWORD" > db.txt; printf %s "$API_TOKEN" > token.txt; '
                'echo "db=$DB_PASSWORD"; echo "token=$API_TOKEN" >&2; '
                'test -z "$SITE_DB_PASSWORD"'
            },
            "outputs": ["db.txt", "token.txt"],
        },
        {
            "name": "leaks",
            "secrets": ["DB_PASSWORD"],
            "params": {"shell": 'echo "failing with $DB_PASSWORD" >&2; exit 3'},
        },
    )
    jobs = by_name(status)
    assert jobs["uses"].state is JobState.COMPLETED, jobs["uses"].error
    # The task got the values (it wrote them into its own outputs, which are its business).
    store = ResourceStore(flotta.storage.url)
    uses = jobs["uses"]
    for path, value in (("db.txt", db_password), ("token.txt", token)):
        url = store.job_file_url(status.artifact_id, str(uses.id), uses.attempt, path)
        assert store.get_bytes(url) == value.encode()
    # What it printed is masked in its logs; the failing task's error too.
    assert log(flotta, status, "uses", "stdout") == b"db=***\n"
    assert log(flotta, status, "uses", "stderr") == b"token=***\n"
    assert log(flotta, status, "leaks", "stderr") == b"failing with ***\n"
    assert jobs["leaks"].state is JobState.FAILED
    assert jobs["leaks"].error is not None and "failing with ***" in jobs["leaks"].error
    assert status.error is not None and "failing with ***" in status.error.message
    # The jobs carried the names; no message on the broker ever carried a value.
    payloads = recorder.wait_for(
        lambda ms: any(b'"DB_PASSWORD"' in payload for _, payload in ms), timeout=TIMEOUT
    )
    logs, products = stored(flotta, "logs/*/*"), stored(flotta, "jobs/*")
    assert b"***" in logs and products
    for secret in (db_password, token):
        assert not [topic for topic, payload in payloads if secret.encode() in payload]
        assert secret not in caplog.text
        assert secret.encode() not in logs and secret.encode() not in products


def test_a_secret_the_site_does_not_define_fails_the_task_before_it_runs(
    flotta: Flotta,  # noqa: F811
) -> None:
    ran = flotta.folder / "ran"
    flotta.start({"w0": ["shell"]}, policy=SitePolicy.model_validate({"secrets": {}}))
    status = run_tasks(
        flotta,
        {
            "name": "wants",
            "secrets": ["PROD_DB_PASSWORD"],
            "params": {"shell": 'touch "$RAN"'},
            "env": {"RAN": str(ran)},
        },
    )
    assert status.state is ArtifactState.FAILED
    assert status.error is not None and status.error.type == "PolicyError"
    assert (
        "task wants: this site defines no secret named 'PROD_DB_PASSWORD'" in status.error.message
    )
    assert not ran.exists()


def test_an_output_linking_to_the_workers_files_is_never_collected(
    flotta: Flotta,  # noqa: F811
) -> None:
    host = flotta.folder / "host"
    host.mkdir()
    known = f"the worker's own file {uuid.uuid4().hex}"
    (host / "secret.txt").write_text(known)
    flotta.start({"w0": ["shell"]})
    status = run_tasks(
        flotta,
        {
            "name": "file-link",
            "params": {"shell": 'ln -s "$HOST/secret.txt" out.txt'},
            "env": {"HOST": str(host)},
            "outputs": ["out.txt"],
        },
        {
            "name": "dir-link",
            "params": {"shell": 'ln -s "$HOST" d'},
            "env": {"HOST": str(host)},
            "outputs": ["d/secret.txt"],
        },
    )
    assert status.state is ArtifactState.FAILED
    jobs = by_name(status)
    for name, path, link in (
        ("file-link", "out.txt", "out.txt"),
        ("dir-link", "d/secret.txt", "d"),
    ):
        job = jobs[name]
        assert job.state is JobState.FAILED and job.error is not None
        assert f"its output {path} is, or is inside, a symbolic link ({link})" in job.error
    assert known.encode() not in stored(flotta)
    store = ResourceStore(flotta.storage.url)
    for name, path in (("file-link", "out.txt"), ("dir-link", "d/secret.txt")):
        job = jobs[name]
        with pytest.raises(ResourceNotFound):
            store.get_bytes(store.job_file_url(status.artifact_id, str(job.id), job.attempt, path))


def test_a_worker_refuses_a_run_job_sent_straight_to_it(flotta: Flotta) -> None:  # noqa: F811
    """A scheduler places a task only on a worker running tasks; a job forged on the
    worker's own topic (no broker ACL here) is refused by the worker itself."""
    witness = flotta.folder / "ran"
    flotta.start({"api-only": ["api"]})
    events = MessageRecorder()
    bus = Bus(
        client_id=f"rogue-{uuid.uuid4().hex[:8]}",
        settings=flotta.broker,
        on_message=events,
        subscriptions=[topics.events("api-only")],
        clean=True,
    ).start(wait=TIMEOUT)
    try:
        task = Task(name="sneaky", params={"shell": 'touch "$RAN"'}, env={"RAN": str(witness)})
        bus.publish(topics.jobs("api-only"), task_job(task, artifact_id="rogue0artifact"))
        failed = events.wait_for(lambda ms: messages_of(ms, JobFailed), timeout=TIMEOUT)
    finally:
        bus.stop()
    [failure] = messages_of(failed, JobFailed)
    assert failure.error.message == "worker api-only runs no tasks"
    assert not witness.exists()


def test_validate_refuses_a_kube_task_choosing_where_it_runs(tmp_path: Path) -> None:
    workflow = {
        "tasks": [
            {
                "name": "k",
                "params": {"image": "bb:1", "kubeconfig": "/home/admin/.kube/config"},
            }
        ]
    }
    result = invoke("validate", str(write_workflow(tmp_path, workflow)))
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "kubeconfig: where and how tasks run is the site's to set (policy in" in said
