"""The shell executor: a subprocess in its own process group, killed whole on timeout.

Its environment is the site's clean one (SitePolicy.host_env) with the task's env and
secrets: none of the worker's own variables, which hold the worker's credentials.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.workflows.executors.base import Executor, TaskResult, TaskRun, register_executor


class ShellParams(BaseModel):
    """Either an argv list (`command`) or a shell string (`shell`), said explicitly."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] | None = Field(default=None, min_length=1)
    shell: str | None = None
    stdin: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ShellParams:
        if (self.command is None) == (self.shell is None):
            raise ValueError("give exactly one of `command` (argv list) or `shell` (a string)")
        return self


class ShellExecutor(Executor):
    name = "shell"

    def run(self, run: TaskRun) -> TaskResult:
        params = ShellParams.model_validate(run.task.params)
        argv = params.command or ["/bin/sh", "-c", params.shell or ""]
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


register_executor("shell", ShellExecutor, ShellParams)
