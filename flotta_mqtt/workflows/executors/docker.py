"""The docker executor: a task in a container, through the Docker Engine API.

What a task gets and how it ends: DockerExecutor's docstring.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.workflows.executors.base import Executor, TaskResult, TaskRun, register_executor
from flotta_mqtt.workflows.executors.policy import SitePolicy

INSTALL_HINT = "the docker executor needs the docker SDK: pip install 'flotta_mqtt[docker]'"

# Status reported for a container the executor killed (128 + SIGKILL), when the engine
# gives none.
KILLED = 137


class HostPathMount(BaseModel):
    """A host path bind-mounted into the container, if the site's policy.mounts allow it."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(pattern=r"^/")  # on the worker's host
    target: str = Field(pattern=r"^/.")  # in the container
    writable: bool = False


class DockerParams(BaseModel):
    """A container to run: `image`, and at most one of `command` (argv) or `shell`.

    `command` is the whole argv and replaces the image's entrypoint; `shell` runs as
    `sh -c SHELL` (the image needs a `sh`); with neither, the image's own entrypoint and
    command run. The image, `network` and `mounts` must be allowed by the site's policy.
    """

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1)
    command: list[str] | None = Field(default=None, min_length=1)
    shell: str | None = None
    stdin: str | None = None
    workdir_mount: str = Field(default="/work", pattern=r"^/.")
    network: str = "none"  # a Docker network mode: none, bridge, host, or a network's name
    mounts: list[HostPathMount] = Field(default_factory=list)
    user: str | None = None  # `uid[:gid]` or a user name known to the image
    pull: Literal["missing", "never", "always"] = "missing"

    @model_validator(mode="after")
    def _one_form(self) -> DockerParams:
        if self.command is not None and self.shell is not None:
            raise ValueError("give at most one of `command` (argv list) or `shell` (a string)")
        targets = [self.workdir_mount, *(mount.target for mount in self.mounts)]
        if len(set(targets)) < len(targets):
            raise ValueError("each mount needs a target of its own, apart from `workdir_mount`")
        return self


def check_container(task: str, params: DockerParams, policy: SitePolicy) -> dict[str, Path]:
    """PolicyError for a container the site does not allow; else each mount's target and
    the real host path it shows."""
    policy.check_image(task, params.image)
    policy.check_network(task, params.network)
    return {
        mount.target: policy.host_mount(task, mount.source, mount.writable)
        for mount in params.mounts
    }


def container_name(label: str) -> str:
    """A container name from a task's label: Docker's alphabet, short, and unique per run."""
    cleaned = re.sub(r"[^a-zA-Z0-9_.-]+", "-", label).strip("-_.")[:60] or "task"
    digest = hashlib.sha1(f"{label}{time.time_ns()}".encode()).hexdigest()[:8]
    return f"flotta-{cleaned}-{digest}"


def _import_docker() -> Any:
    try:
        import docker
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return docker


class DockerExecutor(Executor):
    """Runs each task in a fresh container; `docker_host` overrides `DOCKER_HOST`.

    Any server of that API works: Docker itself, or podman's (`podman system service`). The
    client is the `docker` Python SDK (the `docker` extra), imported only when the executor is
    made, and it honours `DOCKER_HOST` (and `DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`) unless the
    executor is given a host.

    The contract is the shell executor's: the task's working folder (its input job files; its
    outputs are collected from it afterwards) is bind-mounted read-write at `workdir_mount`
    and is the container's working directory; ENV is the image's, with the task's env and
    secrets added; STDIN is fed through the attach stream; STDOUT and STDERR are kept apart;
    the status is the container's exit status. A timeout or a cancellation kills the
    container. An image, network or mount the site's policy does not allow fails the task
    before anything is pulled or created.

    The container is created without auto-removal and removed by the executor afterwards:
    through podman's API, `--rm` (AutoRemove) can report status 0 for a container that
    exited non-zero, so the status is always taken from the wait call of a kept container.
    """

    name = "docker"

    def __init__(self, docker_host: str | None = None) -> None:
        self._docker = _import_docker()  # fail when the worker starts, not at its first task
        self.docker_host = docker_host

    def _connect(self) -> Any:
        if self.docker_host:
            return self._docker.DockerClient(base_url=self.docker_host)
        return self._docker.from_env()

    def run(self, run: TaskRun) -> TaskResult:
        params = DockerParams.model_validate(run.task.params)
        mounts = check_container(run.task.name, params, run.policy)
        client = self._connect()
        container: Any = None
        stdin: Any = None
        stopped = threading.Event()
        try:
            self._ensure_image(client, params)
            container = self._create(client, params, run, mounts)
            if run.cancelled.is_set():  # cancelled before it started: nothing ran
                return TaskResult(KILLED, b"", b"cancelled before the container started\n")
            if params.stdin is not None:
                stdin = container.attach_socket(params={"stdin": 1, "stream": 1})
            container.start()
            watcher = threading.Thread(
                target=_kill_on_cancel, args=(run, container, stopped), daemon=True
            )
            watcher.start()
            if stdin is not None:
                feeder = threading.Thread(
                    target=_feed, args=(stdin, (params.stdin or "").encode()), daemon=True
                )
                feeder.start()
            status, error, timed_out = _wait(container, run.task.timeout)
            stdout: bytes = container.logs(stdout=True, stderr=False)
            stderr: bytes = container.logs(stdout=False, stderr=True)
            if error:
                stderr += f"\n[docker] {error}\n".encode()
            return TaskResult(status, stdout, stderr, timed_out)
        finally:
            stopped.set()
            if stdin is not None:
                with contextlib.suppress(OSError):
                    stdin.close()
            if container is not None:
                with contextlib.suppress(self._docker.errors.APIError):
                    container.remove(force=True)
            client.close()

    def _ensure_image(self, client: Any, params: DockerParams) -> None:
        errors = self._docker.errors
        if params.pull == "always":
            client.images.pull(params.image)
            return
        try:
            client.images.get(params.image)
        except errors.ImageNotFound:
            if params.pull == "never":
                raise RuntimeError(
                    f"image {params.image!r} is not on the Docker host and `pull` is never"
                ) from None
            client.images.pull(params.image)

    def _create(
        self, client: Any, params: DockerParams, run: TaskRun, mounts: dict[str, Path]
    ) -> Any:
        writable = {mount.target for mount in params.mounts if mount.writable}
        options: dict[str, Any] = {
            "name": container_name(run.label),
            "environment": {**run.env, **run.secrets},
            "working_dir": params.workdir_mount,
            "volumes": {str(run.workdir): {"bind": params.workdir_mount, "mode": "rw"}},
            "mounts": [
                self._docker.types.Mount(
                    target, str(source), type="bind", read_only=target not in writable
                )
                for target, source in mounts.items()
            ],
            "network_mode": params.network,
            "labels": {"flotta-mqtt.task": run.task.name, "flotta-mqtt.run": run.label},
            "detach": True,
            "stdin_open": params.stdin is not None,
        }
        if params.user is not None:
            options["user"] = params.user
        if params.command is not None:
            options["entrypoint"] = params.command[:1]
            options["command"] = params.command[1:]
        elif params.shell is not None:
            options["entrypoint"] = ["sh", "-c"]
            options["command"] = [params.shell]
        return client.containers.create(params.image, **options)


def _wait(container: Any, timeout: float | None) -> tuple[int, str | None, bool]:
    """The container's exit status (from the wait call), any error, and whether it timed out."""
    started = time.monotonic()
    try:
        result = container.wait(timeout=timeout)
        timed_out = False
    except Exception:
        # The SDK reports a wait past its timeout as a requests timeout or connection error
        # (depending on the transport): tell it from a real failure by the clock.
        if timeout is None or time.monotonic() - started < timeout - 0.05:
            raise
        _kill(container)
        result = container.wait(timeout=60)
        timed_out = True
    status = result.get("StatusCode")
    error = result.get("Error")
    message = error.get("Message") if isinstance(error, dict) else error
    return (KILLED if status is None else int(status)), message or None, timed_out


def _kill_on_cancel(run: TaskRun, container: Any, stopped: threading.Event) -> None:
    """Kill the container if the scheduler cancels the task while it runs."""
    while not stopped.is_set():
        if run.cancelled.wait(0.1):
            _kill(container)
            return


def _kill(container: Any) -> None:
    with contextlib.suppress(Exception):  # it ended on its own meanwhile
        container.kill()


def _feed(stream: Any, data: bytes) -> None:
    """Write STDIN through the attach stream, then close its write side (end of input)."""
    raw = getattr(stream, "_sock", stream)  # plain HTTP: a SocketIO around the socket
    with contextlib.suppress(OSError):
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)


register_executor("docker", DockerExecutor, DockerParams)
