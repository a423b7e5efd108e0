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
from typing import Any

from flotta_mqtt.model.run import WORKDIR, Mount, RunParams
from flotta_mqtt.workflows.executors.base import Executor, TaskResult, TaskRun, register_executor
from flotta_mqtt.workflows.executors.policy import NO_NETWORK, SitePolicy

INSTALL_HINT = "the docker executor needs the docker SDK: pip install 'flotta_mqtt[docker]'"

# Status reported for a container the executor killed (128 + SIGKILL), when the engine
# gives none.
KILLED = 137


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
    outputs are collected from it afterwards) is bind-mounted read-write at /work and is the
    container's working directory; its mounts are bind-mounted under it, read-only unless
    writable; ENV is the image's, with the task's env and secrets added; STDIN is fed through
    the attach stream; STDOUT and STDERR are kept apart; the status is the container's exit
    status. A timeout or a cancellation kills the container. The network is `none` unless
    the task requires `network` (then the site's first policy.networks), GPUs only if it
    requires `gpu`. An image or mount the site's policy does not allow fails the task
    before anything is pulled or created; an image missing from the host is pulled.

    The container is created without auto-removal and removed by the executor afterwards:
    through podman's API, `--rm` (AutoRemove) can report status 0 for a container that
    exited non-zero, so the status is always taken from the wait call of a kept container.
    """

    name = "docker"

    def provides(self, policy: SitePolicy) -> frozenset[str]:
        return frozenset(
            [*(["network"] if policy.networks else []), *(["gpu"] if policy.gpu else [])]
        )

    def __init__(self, docker_host: str | None = None) -> None:
        self._docker = _import_docker()  # fail when the worker starts, not at its first task
        self.docker_host = docker_host

    def _connect(self) -> Any:
        if self.docker_host:
            return self._docker.DockerClient(base_url=self.docker_host)
        return self._docker.from_env()

    def run(self, run: TaskRun) -> TaskResult:
        params = RunParams.model_validate(run.task.params)
        image = run.policy.image(run.task.name, params.image)
        mounts = run.policy.host_mounts(run.task.name, params.mounts)
        client = self._connect()
        container: Any = None
        stdin: Any = None
        stopped = threading.Event()
        try:
            self._ensure_image(client, image)
            container = self._create(client, image, params, run, mounts)
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

    def _ensure_image(self, client: Any, image: str) -> None:
        try:
            client.images.get(image)
        except self._docker.errors.ImageNotFound:
            client.images.pull(image)

    def _create(
        self,
        client: Any,
        image: str,
        params: RunParams,
        run: TaskRun,
        mounts: list[tuple[Mount, Path]],
    ) -> Any:
        requires = set(run.task.requires)
        network = run.policy.networks[0] if "network" in requires else NO_NETWORK
        options: dict[str, Any] = {
            "name": container_name(run.label),
            "environment": {**run.env, **run.secrets},
            "working_dir": WORKDIR,
            "volumes": {str(run.workdir): {"bind": WORKDIR, "mode": "rw"}},
            "mounts": [
                self._docker.types.Mount(
                    f"{WORKDIR}/{mount.target}",
                    str(source),
                    type="bind",
                    read_only=not mount.writable,
                )
                for mount, source in mounts
            ],
            "network_mode": network,
            "labels": {"flotta-mqtt.task": run.task.name, "flotta-mqtt.run": run.label},
            "detach": True,
            "stdin_open": params.stdin is not None,
        }
        resources = params.resources
        if resources.cpus is not None:
            options["nano_cpus"] = round(resources.cpus * 1e9)
        if resources.memory_mb is not None:
            options["mem_limit"] = f"{resources.memory_mb}m"
        if "gpu" in requires:
            count = resources.gpus or -1  # -1: all of the site's GPUs
            options["device_requests"] = [
                self._docker.types.DeviceRequest(count=count, capabilities=[["gpu"]])
            ]
        argv = params.argv()
        if argv is not None:
            options["entrypoint"] = argv[:1]
            options["command"] = argv[1:]
        elif params.args:
            options["command"] = params.args  # the image's entrypoint's arguments
        return client.containers.create(image, **options)


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


register_executor("docker", DockerExecutor)
