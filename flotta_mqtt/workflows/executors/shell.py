"""The shell executor: a `run` task as a subprocess in its own process group, killed whole
on timeout.

Its environment is the site's clean one (SitePolicy.host_env) with the task's env and
secrets: none of the worker's own variables, which hold the worker's credentials.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading

from flotta_mqtt.model.run import RunParams
from flotta_mqtt.workflows.executors.base import (
    Executor,
    TaskError,
    TaskResult,
    TaskRun,
    register_executor,
)
from flotta_mqtt.workflows.executors.policy import SitePolicy


class ShellExecutor(Executor):
    """Runs a task as a process on the worker's host: its command (the image is a
    container's business), its mounts as links in its folder, no resource limits."""

    name = "shell"

    def provides(self, policy: SitePolicy) -> frozenset[str]:
        return frozenset({"network", *(["gpu"] if policy.gpu else [])})  # the host's own

    def run(self, run: TaskRun) -> TaskResult:
        params = RunParams.model_validate(run.task.params)
        argv = params.argv()
        if argv is None:  # check_task refuses it; a job forged on the worker's topic not
            raise TaskError(f"task {run.task.name}: a process needs a command or shell", None)
        for mount, source in run.policy.host_mounts(run.task.name, params.mounts):
            link = run.workdir / mount.target
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
        process = subprocess.Popen(
            argv,
            cwd=run.workdir,
            env=run.policy.host_env(run.workdir, {**run.env, **run.secrets}),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
        stopped = threading.Event()
        watcher = threading.Thread(target=_stop_on, args=(run, process, stopped), daemon=True)
        watcher.start()
        try:
            stdout, stderr = process.communicate(
                input=(params.stdin or "").encode(), timeout=run.task.timeout
            )
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            timed_out = True
        finally:
            stopped.set()
        return TaskResult(process.returncode, stdout, stderr, timed_out)


def _stop_on(run: TaskRun, process: subprocess.Popen[bytes], stopped: threading.Event) -> None:
    """Kill the task's process group if the scheduler cancels it while it runs."""
    while not stopped.is_set():
        if run.cancelled.wait(0.1):
            _kill_group(process)
            return


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(process.pid, signal.SIGKILL)


register_executor("shell", ShellExecutor)
