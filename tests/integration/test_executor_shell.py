"""The shell executor on its own: real subprocesses, no broker.

A task runs in its own process group, so a timeout or a cancel kills everything it started;
the tests prove it from the PIDs the task itself writes down.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import task_job, wait_for
from pydantic import ValidationError

from flotta_mqtt.model import Task
from flotta_mqtt.protocol import Resource
from flotta_mqtt.transport.store import IntegrityError, ResourceStore
from flotta_mqtt.workflows.executors import (
    EXECUTORS,
    PolicyError,
    SitePolicy,
    TaskError,
    TaskResult,
    TaskRun,
    make_executor,
)
from flotta_mqtt.workflows.executors.policy import HostMount
from flotta_mqtt.workflows.executors.runner import TaskRunner

# Starts a child that would outlive the task, writes both PIDs, then waits for the child.
SPAWNS_A_CHILD = "sleep 300 & echo $! > pids.txt; echo $$ >> pids.txt; wait"


def run_task(
    workdir: Path,
    params: dict[str, Any],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cancelled: threading.Event | None = None,
) -> TaskResult:
    task = Task(name="t", params=params, env=env or {}, timeout=timeout)
    run = TaskRun(task, workdir, task.env, cancelled or threading.Event(), "test-t-1")
    return make_executor("shell").run(run)


def alive(pid: int) -> bool:
    """Whether a process still exists and is not a zombie.

    `os.kill(pid, 0)` says whether the PID exists; an orphan killed with its group is
    reparented to PID 1, which in a container may never reap it, leaving a zombie: a dead
    process whose exit status nobody collected. It runs nothing, so it counts as dead.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def written_pids(workdir: Path) -> list[int]:
    wait_for(
        lambda: (
            len((workdir / "pids.txt").read_text().split()) == 2
            if (workdir / "pids.txt").exists()
            else False
        ),
        timeout=10,
        message="the task never wrote its PIDs",
    )
    return [int(p) for p in (workdir / "pids.txt").read_text().split()]


def test_shell_is_registered() -> None:
    assert "shell" in EXECUTORS


def test_argv_runs_without_a_shell(tmp_path: Path) -> None:
    result = run_task(tmp_path, {"command": ["printf", "%s|", "two words", "$HOME", "*"]})
    assert result.exit_code == 0
    assert result.stdout == b"two words|$HOME|*|", "no word splitting, expansion or globbing"
    assert result.stderr == b""
    assert not result.timed_out


def test_a_shell_string_runs_through_sh(tmp_path: Path) -> None:
    result = run_task(tmp_path, {"shell": "echo $((40 + 2)) | tr 4 X; echo second"})
    assert (result.exit_code, result.stdout) == (0, b"X2\nsecond\n")


@pytest.mark.parametrize(
    "params",
    [{}, {"command": ["true"], "shell": "true"}, {"command": []}, {"shell": "x", "bogus": 1}],
)
def test_exactly_one_form_must_be_given(tmp_path: Path, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        run_task(tmp_path, params)


def test_stdin_and_env_go_in(tmp_path: Path) -> None:
    result = run_task(
        tmp_path,
        {"shell": 'read line; echo "$GREETING, $line"; echo "$PATH" | grep -q /', "stdin": "you\n"},
        env={"GREETING": "hello"},
    )
    assert (result.exit_code, result.stdout) == (0, b"hello, you\n")
    assert run_task(tmp_path, {"command": ["cat"], "stdin": "a\nb\n"}).stdout == b"a\nb\n"
    # No stdin given: the task reads end of file at once rather than hanging.
    assert run_task(tmp_path, {"command": ["cat"]}, timeout=5).stdout == b""


def test_stdout_and_stderr_come_out_separately(tmp_path: Path) -> None:
    result = run_task(tmp_path, {"shell": "echo out1; echo err1 >&2; echo out2; echo err2 >&2"})
    assert result.stdout == b"out1\nout2\n"
    assert result.stderr == b"err1\nerr2\n"


def test_it_runs_in_its_workdir(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("3\n4\n")
    result = run_task(tmp_path, {"shell": "pwd; awk '{s+=$1} END {print s}' in.txt > out.txt"})
    assert Path(result.stdout.decode().strip()).resolve() == tmp_path.resolve()
    assert (tmp_path / "out.txt").read_text() == "7\n"


@pytest.mark.parametrize("status", [0, 1, 7, 255])
def test_the_exit_status_is_the_return_code(tmp_path: Path, status: int) -> None:
    result = run_task(tmp_path, {"shell": f"echo before; exit {status}"})
    assert result.exit_code == status
    assert result.stdout == b"before\n"


def test_a_missing_program_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_task(tmp_path, {"command": ["/nonexistent/program"]})


def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    began = time.monotonic()
    result = run_task(tmp_path, {"shell": SPAWNS_A_CHILD}, timeout=0.5)
    elapsed = time.monotonic() - began
    assert result.timed_out
    assert result.exit_code != 0
    assert elapsed < 5, f"the task was not stopped at its timeout ({elapsed:.1f} s)"
    shell_pid, child_pid = written_pids(tmp_path)[::-1]
    assert not alive(shell_pid)
    wait_for(lambda: not alive(child_pid), timeout=5, message="the task's child outlived it")


def test_output_written_before_a_timeout_is_kept(tmp_path: Path) -> None:
    result = run_task(tmp_path, {"shell": "echo started; echo oops >&2; sleep 30"}, timeout=0.5)
    assert result.timed_out
    assert (result.stdout, result.stderr) == (b"started\n", b"oops\n")


def test_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    cancelled = threading.Event()
    results: list[TaskResult] = []
    runner = threading.Thread(
        target=lambda: results.append(
            run_task(tmp_path, {"shell": SPAWNS_A_CHILD}, cancelled=cancelled)
        )
    )
    runner.start()
    try:
        child_pid, shell_pid = written_pids(tmp_path)
        assert alive(shell_pid) and alive(child_pid)
        cancelled.set()
        runner.join(timeout=5)
        assert not runner.is_alive(), "the cancelled task did not end"
    finally:
        cancelled.set()
        runner.join(timeout=10)
    assert results[0].exit_code != 0 and not results[0].timed_out
    assert not alive(shell_pid)
    wait_for(lambda: not alive(child_pid), timeout=5, message="the task's child outlived it")


def test_a_task_that_finishes_leaves_no_watcher_behind(tmp_path: Path) -> None:
    before = threading.active_count()
    for _ in range(5):
        assert run_task(tmp_path, {"command": ["true"]}).exit_code == 0
    wait_for(lambda: threading.active_count() <= before, timeout=5, message="watchers left")


def test_every_task_starts_in_an_empty_folder_of_its_own(tmp_path: Path) -> None:
    """Folders are used again only when their task left them empty."""
    runner = TaskRunner(ResourceStore(str(tmp_path / "store")), ["shell"])

    def run(shell: str) -> tuple[str, str]:
        task = Task(name="t", params={"shell": shell})
        job = task_job(task)
        product = runner.run(job, "w", threading.Event())
        out = runner.store.get_bytes(product["logs"]["stdout"]["url"]).decode().split()
        return out[0], out[1]  # the folder, and how many entries it had at the start

    try:
        first, entries = run("pwd; ls -A | wc -l")
        assert entries == "0"
        again, entries = run("pwd; ls -A | wc -l; touch left-behind")
        assert (again, entries) == (first, "0")  # left empty: used again
        after, entries = run("pwd; ls -A | wc -l")
        assert entries == "0" and after != first  # left a file: never used again
        assert not Path(first).exists()
    finally:
        runner.close()
    assert not Path(after).exists()  # closing removes the folders kept for later


def test_a_job_file_replaced_in_the_store_fails_its_reader_before_it_runs(tmp_path: Path) -> None:
    """A task's inputs are checked against the sha256s in its dependency's product."""
    store = ResourceStore(str(tmp_path / "store"))
    runner = TaskRunner(store, ["shell"])
    ran = tmp_path / "ran"
    make = Task(name="make", params={"shell": "echo 1 > n.txt"}, outputs=["n.txt"])
    use = Task(name="use", depends=["make"], params={"shell": f"cat n.txt; touch {ran}"})
    try:
        product = runner.run(task_job(make), "w", threading.Event())
        made = store.put_product("art1", "0", 1, json.dumps(product).encode())
        reading = use.model_copy(update={"inputs": ["n.txt"]})
        assert (
            runner.run(task_job(reading, inputs=[made]), "w", threading.Event())["exit_code"] == 0
        )
        assert ran.exists()
        ran.unlink()

        stored = Resource.model_validate(product["outputs"]["n.txt"])
        Path(stored.url.removeprefix("file://")).write_text("2\n")  # what someone puts there
        with pytest.raises(IntegrityError, match=re.escape(f"sha256 mismatch for {stored.url}")):
            runner.run(task_job(reading, inputs=[made]), "w", threading.Event())
        unknown = use.model_copy(update={"inputs": ["other.txt"]})
        with pytest.raises(TaskError, match=r"other\.txt, which no task it depends on outputs"):
            runner.run(task_job(unknown, inputs=[made]), "w", threading.Event())
        assert not ran.exists()
    finally:
        runner.close()


def test_args_follow_the_command_or_become_the_scripts_arguments(tmp_path: Path) -> None:
    said = run_task(tmp_path, {"command": ["echo", "a"], "args": ["b c", "$HOME"]})
    assert said.stdout == b"a b c $HOME\n", "args are argv, never expanded"
    script = run_task(tmp_path, {"shell": 'echo "$# $1|$2"', "args": ["one two", "three"]})
    assert script.stdout == b"2 one two|three\n"


def test_an_image_only_task_is_not_run_as_a_process(tmp_path: Path) -> None:
    """A forged job skipping check_task: the process executor has nothing to run."""
    with pytest.raises(TaskError, match="a process needs a command or shell"):
        run_task(tmp_path, {"image": "bb:1"})


def test_a_mount_is_a_link_in_the_tasks_folder_where_the_site_allows(tmp_path: Path) -> None:
    data, workdir = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    workdir.mkdir()
    (data / "rows.csv").write_text("x\n1\n2\n")
    policy = SitePolicy(mounts=[HostMount(path=data)])
    task = Task(
        name="t",
        params={
            "shell": "wc -l < in/d/rows.csv",
            "mounts": [{"source": str(data), "target": "in/d"}],
        },
    )
    run = TaskRun(task, workdir, {}, threading.Event(), "test-t-1", policy=policy)
    assert make_executor("shell").run(run).stdout == b"3\n"
    assert (workdir / "in" / "d").resolve() == data.resolve()
    for mount, reason in [
        ({"source": "/etc", "target": "etc"}, "host path /etc is not under a folder"),
        ({"source": str(data), "target": "d", "writable": True}, "may be mounted read-only only"),
    ]:
        refused = Task(name="t", params={"shell": "touch ran", "mounts": [mount]})
        folder = tmp_path / "refused"
        folder.mkdir()
        run = TaskRun(refused, folder, {}, threading.Event(), "test-t-2", policy=policy)
        with pytest.raises(PolicyError, match=reason):
            make_executor("shell").run(run)
        assert list(folder.iterdir()) == [], "refused before anything ran or was linked"
        folder.rmdir()
