"""A task's working folder is used again by a later task only if it is still the empty,
private folder it was given: a task that swapped it for a link, opened it to others or
gave it away leaves it to be removed, and the next task gets a new one."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from helpers import task_job

from flotta_mqtt.model import Task
from flotta_mqtt.protocol import Resource
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.workflows.executors import TaskRunner


def folder_of(runner: TaskRunner, store: ResourceStore, shell: str, artifact_id: str) -> Path:
    """Run a shell task that prints its folder first; the folder it ran in."""
    job = task_job(Task(name="t", params={"shell": f"pwd; {shell}"}), artifact_id=artifact_id)
    result = runner.run(job, "w0", threading.Event())
    logs = result["logs"]
    assert isinstance(logs, dict)
    stdout = Resource.model_validate(logs["stdout"])
    return Path(store.get(stdout, store.artifact_root(artifact_id)).decode().splitlines()[0])


def test_an_empty_private_folder_serves_the_next_task(tmp_path: Path) -> None:
    store = ResourceStore((tmp_path / "store").as_uri())
    runner = TaskRunner(store, ["shell"])
    try:
        first = folder_of(runner, store, "true", "a1")
        assert folder_of(runner, store, "true", "a2") == first
    finally:
        runner.close()


@pytest.mark.parametrize(
    "change",
    [
        "chmod 777 .",
        "chmod 711 .",
        "chown 4242 .",
        'd="$PWD"; cd /; rmdir "$d"; ln -s {elsewhere} "$d"',
    ],
)
def test_a_folder_its_task_changed_is_not_handed_to_the_next(tmp_path: Path, change: str) -> None:
    if change.startswith("chown") and os.getuid() != 0:
        pytest.skip("only root may give a folder away")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    store = ResourceStore((tmp_path / "store").as_uri())
    runner = TaskRunner(store, ["shell"])
    try:
        changed = folder_of(runner, store, change.format(elsewhere=elsewhere), "a1")
        assert not os.path.lexists(changed), "removed (a link: the link, not what it names)"
        assert elsewhere.is_dir()
        after = folder_of(runner, store, "true", "a2")
        assert after != changed and after != elsewhere
        info = after.lstat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    finally:
        runner.close()
