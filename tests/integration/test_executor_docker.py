"""The docker executor for real: containers run by podman, through its Docker Engine API.

The `podman` fixture (podman_fixtures.py) serves the API on a private socket with a busybox
image built from Debian's busybox-static; nothing is pulled. The executor is given that
socket explicitly, so `DOCKER_HOST` stays untouched for other tests.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
from helpers import task_job
from podman_fixtures import Podman, podman  # noqa: F401  (the fixture)
from pydantic import ValidationError

from flotta_mqtt.model import Task
from flotta_mqtt.protocol import JobReady, Resource
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.workflows.executors import (
    EXECUTORS,
    PolicyError,
    SitePolicy,
    TaskError,
    TaskResult,
    TaskRun,
    TaskRunner,
)
from flotta_mqtt.workflows.executors.docker import (
    INSTALL_HINT,
    DockerExecutor,
    container_name,
)
from flotta_mqtt.workflows.executors.policy import HostMount

pytestmark = pytest.mark.integration


def run_task(
    podman: Podman,  # noqa: F811
    workdir: Path,
    params: dict[str, Any],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cancelled: threading.Event | None = None,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    policy: SitePolicy | None = None,
) -> TaskResult:
    """Run a docker task on a site whose policy (by default) allows the test image only."""
    task = Task(
        name="t",
        params={"image": podman.image, **params},
        env=env or {},
        timeout=timeout,
        inputs=inputs or [],
        outputs=outputs or [],
    )
    run = TaskRun(
        task,
        workdir,
        task.env,
        cancelled or threading.Event(),
        "a1b2c3d4e5f6-0-1",
        policy=policy or SitePolicy(images=[podman.image]),
    )
    return DockerExecutor(docker_host=podman.docker_host).run(run)


def leftover_containers(podman: Podman) -> list[Any]:  # noqa: F811
    client = docker.DockerClient(base_url=podman.docker_host)
    try:
        return list(client.containers.list(all=True, filters={"label": "flotta-mqtt.task"}))
    finally:
        client.close()


def test_docker_is_registered() -> None:
    assert "docker" in EXECUTORS


def test_a_task_naming_no_image_runs_in_the_sites_default(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    policy = SitePolicy(images=[podman.image], default_image=podman.image)
    result = run_task(podman, tmp_path, {"image": None, "shell": "echo in a box"}, policy=policy)
    assert (result.exit_code, result.stdout) == (0, b"in a box\n")
    with pytest.raises(PolicyError, match="names no image, and this site has no policy"):
        run_task(podman, tmp_path, {"image": None, "shell": ":"})
    with pytest.raises(ValidationError, match="network: where and how tasks run is the site"):
        run_task(podman, tmp_path, {"shell": ":", "network": "host"})


def test_container_names_are_docker_names_and_unique() -> None:
    first, second = container_name("a/b c:1"), container_name("a/b c:1")
    assert first != second
    assert first.startswith("flotta-a-b-c-1-")
    assert all(ch.isalnum() or ch in "_.-" for ch in first)


def test_stdout_and_stderr_come_back_apart(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    result = run_task(podman, tmp_path, {"shell": "echo to-out; echo to-err >&2; echo more-out"})
    assert result.exit_code == 0
    assert result.stdout == b"to-out\nmore-out\n"
    assert result.stderr == b"to-err\n"
    assert not result.timed_out
    assert leftover_containers(podman) == [], "the container is removed afterwards"


def test_a_failing_container_reports_its_own_status(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    # The trap: through podman's API an auto-removed container (`--rm`) reported 0 here.
    result = run_task(podman, tmp_path, {"shell": "echo failing >&2; exit 7"})
    assert result.exit_code == 7
    assert result.stderr == b"failing\n"
    assert leftover_containers(podman) == []


def test_argv_runs_without_a_shell(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    result = run_task(podman, tmp_path, {"command": ["printf", "%s|", "two words", "$HOME", "*"]})
    assert result.exit_code == 0
    assert result.stdout == b"two words|$HOME|*|"


def test_job_files_in_and_out_through_the_mounted_workdir(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("three\nlines\nhere\n")
    result = run_task(
        podman,
        tmp_path,
        {"shell": "pwd; mkdir -p out && wc -l < data/in.txt > out/count.txt"},
        inputs=["data/in.txt"],
        outputs=["out/count.txt"],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"/work\n", "the workdir is the container's working directory"
    assert (tmp_path / "out" / "count.txt").read_text().strip() == "3"


def test_args_follow_the_command(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    result = run_task(podman, tmp_path, {"shell": 'echo "$# $1|$2"', "args": ["a b", "c"]})
    assert result.stdout == b"2 a b|c\n"


def test_env_reaches_the_container(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    result = run_task(
        podman,
        tmp_path,
        {"shell": 'echo "$GREETING|$SPACED"'},
        env={"GREETING": "hello", "SPACED": "a b  c"},
    )
    assert result.stdout == b"hello|a b  c\n"


def test_stdin_is_fed(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    result = run_task(podman, tmp_path, {"command": ["tr", "a-z", "A-Z"], "stdin": "quiet\n"})
    assert result.exit_code == 0
    assert result.stdout == b"QUIET\n"


def test_no_network_by_default(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    result = run_task(podman, tmp_path, {"shell": "ls /sys/class/net"})
    assert result.stdout.split() == [b"lo"]


def test_timeout_kills_the_container(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    started = time.monotonic()
    result = run_task(podman, tmp_path, {"shell": "echo started; sleep 60"}, timeout=1.5)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert result.exit_code == 137, "killed (128 + SIGKILL)"
    assert result.stdout == b"started\n", "what it wrote before the kill is kept"
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert leftover_containers(podman) == []


def test_cancel_kills_the_container(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    cancelled = threading.Event()
    threading.Timer(1.0, cancelled.set).start()
    started = time.monotonic()
    result = run_task(podman, tmp_path, {"shell": "sleep 60"}, cancelled=cancelled)
    assert time.monotonic() - started < 15
    assert result.exit_code == 137
    assert not result.timed_out
    assert leftover_containers(podman) == []


def test_the_task_runner_moves_job_files_around_a_container(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Job files from the store into the container and back, logs stored, via TaskRunner."""
    store = ResourceStore(str(tmp_path / "store"))
    numbers = store.put(store.job_file_url("art1", "9", 1, "numbers.txt"), b"1\n2\n3\n")
    outputs = {"numbers.txt": numbers.model_dump(mode="json")}  # as a task before it stored
    made = store.put_product(
        "art1", "9", 1, json.dumps({"task": "make", "outputs": outputs}).encode()
    )
    runner = TaskRunner(store, [], SitePolicy(images=[podman.image]))
    runner.executors["docker"] = DockerExecutor(docker_host=podman.docker_host)

    def job(shell: str) -> JobReady:
        task = Task(
            name="sum",
            params={"image": podman.image, "shell": shell},
            inputs=["numbers.txt"],
            outputs=["total.txt"],
        )
        return task_job(task, inputs=[made])

    summing = "s=0; while read n; do s=$((s+n)); done < numbers.txt; echo $s > total.txt; echo ok"
    product = runner.run(job(summing), "node-1", threading.Event())
    assert product["exit_code"] == 0
    assert store.get(Resource.model_validate(product["outputs"]["total.txt"])) == b"6\n"
    assert store.get_bytes(store.log_url("art1", "sum", 1, "stdout")) == b"ok\n"

    with pytest.raises(TaskError, match="exited with status 7") as failed:
        runner.run(job("echo no >&2; exit 7"), "node-1", threading.Event())
    assert failed.value.exit_code == 7


def test_a_clear_error_without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_docker(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "docker":
            raise ImportError("No module named 'docker'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_docker)
    with pytest.raises(RuntimeError, match=r"flotta_mqtt\[docker\]") as error:
        DockerExecutor()
    assert str(error.value) == INSTALL_HINT


# --- the site's policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"image": "localhost/absent:1"}, "image 'localhost/absent:1' is not allowed"),
        ({"mounts": [{"source": "/etc", "target": "host-etc"}]}, "/etc is not under a folder"),
        ({"mounts": [{"source": "/", "target": "host"}]}, "host path / is not under a folder"),
    ],
)
def test_the_site_refuses_a_container_it_did_not_allow_before_anything_runs(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
    params: dict[str, Any],
    reason: str,
) -> None:
    with pytest.raises(PolicyError, match=reason):
        run_task(podman, tmp_path, {"shell": "cat host-etc/hostname", **params})
    assert leftover_containers(podman) == []
    client = docker.DockerClient(base_url=podman.docker_host)
    try:
        assert [tag for image in client.images.list() for tag in image.tags] == [podman.image]
    finally:
        client.close()


def test_an_allowed_host_folder_is_mounted_read_only_unless_the_site_says_writable(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    work.mkdir()
    (data / "in.txt").write_text("site data\n")
    mount = {"source": str(data), "target": "data"}
    write = "cat data/in.txt; echo changed > data/in.txt"
    read_only = SitePolicy(images=[podman.image], mounts=[HostMount(path=data)])
    result = run_task(podman, work, {"shell": write, "mounts": [mount]}, policy=read_only)
    assert result.stdout == b"site data\n"
    assert result.exit_code != 0 and b"Read-only file system" in result.stderr
    with pytest.raises(PolicyError, match="may be mounted read-only only"):
        run_task(
            podman,
            tmp_path,
            {"shell": write, "mounts": [{**mount, "writable": True}]},
            policy=read_only,
        )
    assert (data / "in.txt").read_text() == "site data\n"
    writable = SitePolicy(images=[podman.image], mounts=[HostMount(path=data, writable=True)])
    result = run_task(
        podman,
        work,
        {"shell": write, "mounts": [{**mount, "writable": True}]},
        policy=writable,
    )
    assert result.exit_code == 0, result.stderr
    assert (data / "in.txt").read_text() == "changed\n"


def test_a_container_gets_its_secrets_and_never_the_workers_environment(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value, password = f"s-{uuid.uuid4().hex}", uuid.uuid4().hex
    monkeypatch.setenv("SITE_TOKEN", value)
    monkeypatch.setenv("FLOTTA_PASSWORD", password)
    store = ResourceStore(str(tmp_path / "store"))
    policy = SitePolicy.model_validate(
        {"images": [podman.image], "secrets": {"TOKEN": {"env": "SITE_TOKEN"}}}
    )
    runner = TaskRunner(store, [], policy)
    runner.executors["docker"] = DockerExecutor(docker_host=podman.docker_host)
    task = Task(
        name="uses",
        params={"image": podman.image, "shell": 'env; printf %s "$TOKEN" > token.txt'},
        secrets=["TOKEN"],
        outputs=["token.txt"],
    )
    runner.run(task_job(task), "node-1", threading.Event())
    assert store.get_bytes(store.job_file_url("art1", "0", 1, "token.txt")) == value.encode()
    printed = store.get_bytes(store.log_url("art1", "uses", 1, "stdout"))
    assert b"TOKEN=***\n" in printed and value.encode() not in printed
    assert password.encode() not in printed and b"FLOTTA_" not in printed


def test_a_containers_link_to_a_host_file_is_never_collected(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Inside the container the link dangles; read on the worker, it would name the
    worker's own file: the runner refuses it rather than copy the host file out."""
    host = tmp_path / "host"
    host.mkdir()
    known = f"the worker's own file {uuid.uuid4().hex}"
    (host / "secret.txt").write_text(known)
    store = ResourceStore(str(tmp_path / "store"))
    runner = TaskRunner(store, [], SitePolicy(images=[podman.image]))
    runner.executors["docker"] = DockerExecutor(docker_host=podman.docker_host)
    for name, shell, output, link in [
        ("file-link", f"ln -s {host}/secret.txt out.txt", "out.txt", "out.txt"),
        ("dir-link", f"ln -s {host} d", "d/secret.txt", "d"),
    ]:
        task = Task(
            name=name,
            params={"image": podman.image, "shell": shell},
            outputs=[output],
        )
        with pytest.raises(
            TaskError, match=rf"output {output} is, or is inside, a symbolic link \({link}\)"
        ):
            runner.run(task_job(task), "node-1", threading.Event())
        assert not store.exists(store.job_file_url("art1", "0", 1, output))
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert known.encode() not in stored


def test_a_task_requiring_network_gets_the_sites_first_network(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    policy = SitePolicy(images=[podman.image], networks=["host"])
    task = Task(
        name="t", requires=["network"], params={"image": podman.image, "shell": "ls /sys/class/net"}
    )
    run = TaskRun(task, tmp_path, {}, threading.Event(), "a1b2c3d4e5f6-0-2", policy=policy)
    interfaces = DockerExecutor(docker_host=podman.docker_host).run(run).stdout.split()
    assert b"lo" in interfaces and len(interfaces) > 1, "the host's interfaces, as the site said"


def test_resources_limit_the_container(podman: Podman, tmp_path: Path) -> None:  # noqa: F811
    result = run_task(
        podman,
        tmp_path,
        {
            "shell": "cat /sys/fs/cgroup/memory.max 2>/dev/null || "
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
            "resources": {"memory_mb": 64},
        },
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(64 * 1024 * 1024).encode()
