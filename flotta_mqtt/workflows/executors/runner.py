"""Running one workflow task on a worker: job files in, executor, logs and job files out."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flotta_mqtt.model import Task
from flotta_mqtt.model.workflow import CONTAINER_EXECUTORS, RUN_EXECUTORS, log_name
from flotta_mqtt.protocol import JobReady, Resource
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.workflows.caching import CacheIndex, TaskCache, cache_key
from flotta_mqtt.workflows.executors.base import (
    Executor,
    Site,
    TaskError,
    TaskRun,
    check_task,
    make_executor,
)
from flotta_mqtt.workflows.executors.gating import Results, prepare
from flotta_mqtt.workflows.executors.policy import SitePolicy, mask

log = logging.getLogger(__name__)


class TaskRunner:
    """The executors a worker's config allows, and the job-file plumbing around them.

    It sets up and closes its executors (`setup`, `close`), so a node knows none of them.
    Every run is given the site's `policy` (secure defaults when none is given).
    """

    def __init__(
        self,
        store: ResourceStore,
        executors: list[str],
        policy: SitePolicy | None = None,
        cache: CacheIndex | None = None,
    ) -> None:
        self.store = store
        self.executors: dict[str, Executor] = {name: make_executor(name) for name in executors}
        self.policy = policy or SitePolicy()
        # Without an index (no worker journal) tasks with `cache` simply run.
        self.cache = None if cache is None else TaskCache(store, cache)
        self._folders = _Folders()

    def setup(self, site: Site) -> None:
        for executor in self.executors.values():
            executor.setup(site)

    def close(self) -> None:
        for name, executor in self.executors.items():
            try:
                executor.close()
            except Exception:  # the others are closed all the same
                log.exception("the %s executor did not close cleanly", name)
        self._folders.close()

    def run(self, job: JobReady, node: str, cancelled: threading.Event) -> dict[str, Any]:
        """Run the task; its product lists its exit code, logs and output job files.

        Raises TaskError (with the exit code) when the task fails or times out, and
        PolicyError when it asks for what the site does not allow. Secret values are
        masked in the logs and the error.
        """
        task = Task.model_validate(job.operation.params)
        folder = self.store.artifact_root(job.artifact_id)
        ready = prepare(task, Results(self.store, folder, job.inputs))
        if isinstance(ready, str):
            return {"task": task.name, "exit_code": None, "skipped": ready}
        task = ready
        executor = self._executor(task, node)
        check_task(task)  # a task from anywhere: its params' errors in one line
        secrets = self.policy.secret_values(task.name, task.secrets)
        inputs = self._inputs(job, task, folder)
        key = None
        if self.cache is not None and task.cache and job.cache_scope is not None:
            key = cache_key(job.cache_scope, task, {p: r.sha256 for p, r in inputs.items()})
            reused = self.cache.reuse(key, job)
            if reused is not None:
                return {"task": task.name, "exit_code": 0, "logs": {}, **reused}
        with self._folders.take() as workdir:
            for path, resource in inputs.items():
                target = workdir / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.store.get(resource, folder))
            label = f"{job.artifact_id[:12]}-{job.job_id}-{job.attempt}"
            run = TaskRun(task, workdir, task_env(task), cancelled, label, secrets, self.policy)
            result = executor.run(run)
            stdout, stderr = (
                mask(data, secrets.values()) for data in (result.stdout, result.stderr)
            )
            logs = {
                stream: self.store.put(
                    self.store.log_url(job.artifact_id, log_name(task.name), job.attempt, stream),
                    data,
                    media_type="text/plain",
                ).model_dump(mode="json")
                for stream, data in (("stdout", stdout), ("stderr", stderr))
                if data  # an empty stream costs a write and shows nothing: `logs` prints ""
            }
            if result.timed_out:
                raise TaskError(
                    f"task {task.name} timed out after {task.timeout} s and was killed",
                    result.exit_code,
                )
            if result.exit_code != 0:
                tail = stderr.decode(errors="replace")[-500:]
                raise TaskError(
                    f"task {task.name} exited with status {result.exit_code}: {tail}",
                    result.exit_code,
                )
            outputs = {}
            for path in task.outputs:
                url = self.store.job_file_url(job.artifact_id, str(job.job_id), job.attempt, path)
                outputs[path] = self.store.put(url, read_output(task.name, workdir, path))
        if self.cache is not None and key is not None:
            self.cache.remember(key, job, outputs)
        stored = {path: resource.model_dump(mode="json") for path, resource in outputs.items()}
        return {"task": task.name, "exit_code": 0, "logs": logs, "outputs": stored}

    def features(self) -> list[str]:
        """What the `run` tasks here may have besides a container (gpu, network)."""
        provided = set().union(*(e.provides(self.policy) for e in self._run_executors()))
        return sorted(provided)

    def _run_executors(self) -> list[Executor]:
        """The executors of `run` tasks, in the order the site's config names them."""
        return [e for name, e in self.executors.items() if name in RUN_EXECUTORS]

    def _executor(self, task: Task, node: str) -> Executor:
        """The executor for a task: its own kind's, or for a `run` task the first the site
        configured that gives it what it requires."""
        if task.executor != "run":
            executor = self.executors.get(task.executor)
            if executor is None:
                raise TaskError(f"worker {node} does not run the {task.executor} executor", None)
            return executor
        able = [
            executor
            for executor in self._run_executors()
            if "container" not in task.requires or executor.name in CONTAINER_EXECUTORS
            if set(task.requires) - {"container"} <= executor.provides(self.policy)
        ]
        if not able:
            needs = f" that require {', '.join(task.requires)}" if task.requires else ""
            raise TaskError(f"worker {node} runs no tasks{needs}", None)
        return able[0]

    def _inputs(self, job: JobReady, task: Task, folder: str) -> dict[str, Resource]:
        """The job files a task reads, as the tasks it depends on announced them.

        Each is found in the `outputs` of exactly one product the job consumes (read and
        verified like any resource), so its sha256 came over the bus: a file replaced in
        the store fails the task instead of feeding it.
        """
        if not task.inputs:
            return {}
        offered: dict[str, list[tuple[str, Resource]]] = {}
        for product in job.inputs:
            stored = json.loads(self.store.get(product, folder))
            for path, resource in stored.get("outputs", {}).items():
                offered.setdefault(path, []).append(
                    (stored.get("task", "?"), Resource.model_validate(resource))
                )
        found = {}
        for path in task.inputs:
            producers = offered.get(path, [])
            if len(producers) != 1:
                names = ", ".join(name for name, _ in producers)
                which = (
                    f"several tasks it depends on output ({names})"
                    if producers
                    else "no task it depends on outputs"
                )
                raise TaskError(f"task {task.name} reads job file {path}, which {which}", None)
            found[path] = producers[0][1]
        return found


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


def read_output(task: str, workdir: Path, path: str) -> bytes:
    """The output `path` of a task: a regular file inside `workdir`, never through a link.

    Each part of the path is opened with O_NOFOLLOW relative to the folder before it, so
    no symbolic link a task (or its container) leaves, to a host file or a host folder,
    is followed out of its folder: a link fails the task. TaskError says what is wrong.
    """
    parts = path.split("/")
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                opened = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise _output_error(task, path, fd, part, exc) from None
            os.close(fd)
            fd = opened
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TaskError(f"task {task}: its output {path} is not a regular file", 0)
        with os.fdopen(fd, "rb") as file:
            fd = -1  # closed with the file
            return file.read()
    finally:
        if fd >= 0:
            os.close(fd)


def _output_error(task: str, path: str, folder: int, part: str, exc: OSError) -> TaskError:
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.stat(part, dir_fd=folder, follow_symlinks=False).st_mode):
            return TaskError(
                f"task {task}: its output {path} is, or is inside, a symbolic link ({part}); "
                "outputs are regular files in the task's folder, and links are not followed",
                0,
            )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return TaskError(f"task {task} did not produce its output {path}", 0)
    return TaskError(f"task {task}: its output {path} cannot be read: {exc.strerror}", 0)


class _Folders:
    """Private working folders for tasks, made once and used again.

    A task gets an empty folder of its own. One its task left empty (most tasks write
    nothing there) serves a later task; one with anything left in it is removed. Making
    and removing a folder per task cost more than running a no-op task.
    """

    def __init__(self) -> None:
        self._free: list[Path] = []
        self._closed = False  # a folder given back after close() is removed
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self) -> Iterator[Path]:
        with self._lock:
            folder = self._free.pop() if self._free else None
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="flotta-task-"))
        try:
            yield folder
        finally:
            with self._lock:
                kept = not self._closed and _empty_folder(folder)
                if kept:
                    self._free.append(folder)
            if not kept:
                _remove(folder)

    def close(self) -> None:
        with self._lock:
            free, self._free, self._closed = self._free, [], True
        for folder in free:
            shutil.rmtree(folder, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Remove a task's folder, or the link its task left in its place (not what it names)."""
    if folder.is_symlink():
        with contextlib.suppress(OSError):
            folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _empty_folder(path: Path) -> bool:
    """Whether `path` is still a real, empty, private folder, as mkdtemp made it: not
    replaced by a link, nor opened to others (chmod) or given away (chown) by its task,
    which would hand the next task, maybe another tenant's, a folder others can reach."""
    try:
        info = os.lstat(path)  # one call: not a link, a folder, ours, private
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        if stat.S_IMODE(info.st_mode) != 0o700:
            return False
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False
