"""Running one workflow task on a worker: job files in, executor, logs and job files out."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from flotta_mqtt.model import Task
from flotta_mqtt.model.workflow import log_name
from flotta_mqtt.protocol import JobReady
from flotta_mqtt.roles.executors.base import Executor, TaskError, TaskRun, make_executor
from flotta_mqtt.transport.store import ResourceStore


class TaskRunner:
    """The executors a worker's config allows, and the job-file plumbing around them."""

    def __init__(self, store: ResourceStore, executors: list[str]) -> None:
        self.store = store
        self.executors: dict[str, Executor] = {name: make_executor(name) for name in executors}

    def run(self, job: JobReady, node: str, cancelled: threading.Event) -> dict[str, Any]:
        """Run the task; its product lists its exit code, logs and output job files.

        Raises TaskError (with the exit code) when the task fails or times out.
        """
        task = Task.model_validate(job.operation.params)
        executor = self.executors.get(task.executor)
        if executor is None:
            raise TaskError(f"worker {node} does not run the {task.executor} executor", None)
        with tempfile.TemporaryDirectory(prefix=f"flotta-task-{task.name}-") as folder:
            workdir = Path(folder)
            for path in task.inputs:
                target = workdir / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(
                    self.store.get_bytes(self.store.job_file_url(job.artifact_id, path))
                )
            label = f"{job.artifact_id[:12]}-{job.job_id}-{job.attempt}"
            result = executor.run(TaskRun(task, workdir, task_env(task), cancelled, label))
            logs = {
                stream: self.store.put(
                    self.store.log_url(job.artifact_id, log_name(task.name), job.attempt, stream),
                    data,
                    media_type="text/plain",
                ).model_dump(mode="json")
                for stream, data in (("stdout", result.stdout), ("stderr", result.stderr))
                if data  # an empty stream costs a write and shows nothing: `logs` prints ""
            }
            if result.timed_out:
                raise TaskError(
                    f"task {task.name} timed out after {task.timeout} s and was killed",
                    result.exit_code,
                )
            if result.exit_code != 0:
                tail = result.stderr.decode(errors="replace")[-500:]
                raise TaskError(
                    f"task {task.name} exited with status {result.exit_code}: {tail}",
                    result.exit_code,
                )
            outputs = {}
            for path in task.outputs:
                produced = workdir / path
                if not produced.is_file():
                    raise TaskError(f"task {task.name} did not produce its output {path}", 0)
                url = self.store.job_file_url(job.artifact_id, path)
                outputs[path] = self.store.put(url, produced.read_bytes()).model_dump(mode="json")
        return {"task": task.name, "exit_code": 0, "logs": logs, "outputs": outputs}


def task_env(task: Task) -> dict[str, str]:
    """The task's env, and for a replica which one it is: FLOTTA_REPLICA (from 0) of
    FLOTTA_REPLICAS, as an array job's index tells it which share of the work is its own.

    The shell, docker and kube executors pass it on; the python executor has its own.
    """
    if task.replica is None:
        return task.env
    return {
        **task.env,
        "FLOTTA_REPLICA": str(task.replica),
        "FLOTTA_REPLICAS": str(task.replicas),
    }
