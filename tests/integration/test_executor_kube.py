"""The kube executor: its Job manifest, its API conversation, and its Pod spec run for real.

No Kubernetes API server can run here, so the conversation is held with kmock's emulated
one on loopback (it stores objects, serves them back, and runs nothing); the test plays
the Job controller and the kubelet through that API: it creates the Job's pod, sets the
pod's and the Job's status, and serves the pod's log. What the emulator cannot show —
that the generated pod spec runs — is shown by `podman kube play` on the same spec.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from helpers import task_job
from kubernetes import client as kube
from podman_fixtures import Podman, podman  # noqa: F401  (the fixture)
from pydantic import ValidationError

from flotta_mqtt.model import Task
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
from flotta_mqtt.workflows.executors.kube import (
    INSTALL_HINT,
    KubeExecutor,
    configmap_manifest,
    job_manifest,
    job_name,
)
from flotta_mqtt.workflows.executors.policy import HostMount, KubeSite
from flotta_mqtt.workflows.executors.runner import read_output

pytestmark = pytest.mark.integration

LABEL = "a1b2c3d4e5f6-4-2"
FAST = 0.05  # the site's poll interval here, in seconds
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def make_run(
    workdir: Path,
    params: dict[str, Any],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    cancelled: threading.Event | None = None,
    site: KubeSite | None = None,
    secrets: dict[str, str] | None = None,
) -> TaskRun:
    """A kube task's run on a site that allows busybox and the test image, with `site`'s
    kube settings (`execute` points them at the emulator)."""
    task = Task(
        name="count-words",
        params={"image": "busybox:1.36", **params},
        env=env or {},
        timeout=timeout,
        inputs=inputs or [],
        outputs=outputs or [],
    )
    kube = (site or KubeSite()).model_copy(update={"poll_interval": FAST})
    policy = SitePolicy(images=["busybox:*", "localhost/*"], kube=kube)
    run = TaskRun(task, workdir, task.env, cancelled or threading.Event(), LABEL, policy=policy)
    return dataclasses.replace(run, secrets=secrets or {})


# ---------------------------------------------------------------- the manifest, pure


def test_kube_is_registered() -> None:
    assert "kube" in EXECUTORS


def test_job_manifest_runs_the_task_once_with_its_env(tmp_path: Path) -> None:
    run = make_run(
        tmp_path, {"command": ["wc", "-w", "in.txt"]}, env={"B": "2", "A": "1"}, timeout=9.2
    )
    job = job_manifest(run)
    name = job["metadata"]["name"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert name == job_name(LABEL) and DNS_1123.match(name) and len(name) <= 63
    assert job["metadata"]["namespace"] == "default"
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "flotta-mqtt",
        "flotta-mqtt/task": "count-words",
    }
    assert job["metadata"]["annotations"] == {"flotta-mqtt/run": LABEL}
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 10, "the timeout, rounded up"
    assert spec["template"]["metadata"]["labels"] == job["metadata"]["labels"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert "serviceAccountName" not in pod
    [container] = pod["containers"]
    assert container["name"] == "task"
    assert container["image"] == "busybox:1.36"
    assert container["command"] == ["wc", "-w", "in.txt"]
    assert container["workingDir"] == "/work"
    assert container["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert "resources" not in container
    assert container["volumeMounts"] == [{"name": "work", "mountPath": "/work"}]
    assert pod["volumes"] == [{"name": "work", "emptyDir": {}}]
    assert job_manifest(run) == job, "pure: the same run gives the same manifest"


def test_job_manifest_shell_account_resources_namespace(tmp_path: Path) -> None:
    run = make_run(
        tmp_path,
        {"shell": "echo $A | wc -c", "args": ["x y"], "resources": {"cpus": 0.5, "memory_mb": 64}},
        site=KubeSite(namespace="jobs", service_account="runner"),
    )
    job = job_manifest(run, name="explicit")
    assert job["metadata"] == {**job["metadata"], "name": "explicit", "namespace": "jobs"}
    assert "activeDeadlineSeconds" not in job["spec"], "no timeout, no deadline"
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "runner"
    [container] = pod["containers"]
    assert container["command"] == ["sh", "-c", "echo $A | wc -c", "sh", "x y"]
    limits = {"cpu": "500m", "memory": "64Mi"}
    assert container["resources"] == {"limits": limits, "requests": limits}
    assert container["workingDir"] == "/work"


def test_a_gpu_task_asks_the_cluster_for_gpus(tmp_path: Path) -> None:
    task = Task(name="g", requires=["gpu"], params={"image": "busybox:1", "shell": ":"})
    run = TaskRun(task, tmp_path, {}, threading.Event(), LABEL, policy=SitePolicy(images=["*"]))
    [container] = job_manifest(run)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}


def test_args_alone_go_to_the_images_entrypoint(tmp_path: Path) -> None:
    [container] = job_manifest(make_run(tmp_path, {"args": ["--fast"]}))["spec"]["template"][
        "spec"
    ]["containers"]
    assert "command" not in container and container["args"] == ["--fast"]


def test_stdin_comes_from_the_runs_configmap_through_sh(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"command": ["tr", "a-z", "A-Z"], "stdin": "quiet\n"})
    job = job_manifest(run, name="j3")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == [
        "sh",
        "-c",
        'exec "$@" < /flotta-stdin/stdin',
        "sh",
        "tr",
        "a-z",
        "A-Z",
    ]
    assert {"name": "stdin", "mountPath": "/flotta-stdin", "readOnly": True} in (
        container["volumeMounts"]
    )
    items = [{"key": "stdin", "path": "stdin"}]
    assert {"name": "stdin", "configMap": {"name": "j3", "items": items}} in pod["volumes"]
    configmap = configmap_manifest(run, "j3")
    assert configmap is not None and configmap["data"] == {"stdin": "quiet\n"}
    with pytest.raises(ValueError, match="on kube, `stdin` goes with a `command` or `shell`"):
        job_manifest(make_run(tmp_path, {"stdin": "x"}))


def test_mounts_are_host_paths_the_site_allows_read_only_unless_writable(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    mount = {"source": str(tmp_path / "data"), "target": "in/data"}
    run = make_run(tmp_path, {"shell": ":", "mounts": [mount]})
    with pytest.raises(PolicyError, match=r"is not under a folder policy\.mounts allows"):
        job_manifest(run)
    policy = run.policy.model_copy(update={"mounts": [HostMount(path=tmp_path / "data")]})
    pod = job_manifest(dataclasses.replace(run, policy=policy))["spec"]["template"]["spec"]
    assert {"name": "mount-0", "hostPath": {"path": str(tmp_path / "data")}} in pod["volumes"]
    assert {"name": "mount-0", "mountPath": "/work/in/data", "readOnly": True} in pod["containers"][
        0
    ]["volumeMounts"]
    writable = make_run(tmp_path, {"shell": ":", "mounts": [{**mount, "writable": True}]})
    with pytest.raises(PolicyError, match="may be mounted read-only only"):
        job_manifest(dataclasses.replace(writable, policy=policy))


def test_job_manifest_with_neither_form_runs_the_image_entrypoint(tmp_path: Path) -> None:
    [container] = job_manifest(make_run(tmp_path, {}))["spec"]["template"]["spec"]["containers"]
    assert "command" not in container


def test_inputs_go_in_a_configmap_mounted_read_only(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("some words here\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\xff\x00\xfe")
    run = make_run(tmp_path, {"shell": "wc -w in.txt"}, inputs=["in.txt", "sub/blob.bin"])
    job = job_manifest(run, name="j1")
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {
            "name": "work",
            "configMap": {
                "name": "j1",
                "items": [
                    {"key": "input-0", "path": "in.txt"},
                    {"key": "input-1", "path": "sub/blob.bin"},
                ],
            },
        }
    ]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": "work", "mountPath": "/work", "readOnly": True}
    ]
    configmap = configmap_manifest(run, "j1")
    assert configmap is not None and configmap["metadata"]["name"] == "j1"
    assert configmap["data"] == {"input-0": "some words here\n"}
    assert configmap["binaryData"] == {"input-1": "/wD+"}, "non-UTF-8 files travel as base64"


def test_inputs_too_large_for_a_configmap_are_refused(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_bytes(b"x" * 1_100_000)
    run = make_run(tmp_path, {"shell": ":"}, inputs=["big.txt"])
    with pytest.raises(ValueError, match=r"too large for a ConfigMap.*volume_claim"):
        configmap_manifest(run, "j1")


def test_a_shared_volume_is_mounted_at_the_runs_own_folder(tmp_path: Path) -> None:
    site = KubeSite(volume_claim="jobfiles", volume_path=tmp_path)
    run = make_run(tmp_path, {"shell": ":"}, inputs=["in.txt"], site=site)
    pod = job_manifest(run, name="j2")["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "work", "persistentVolumeClaim": {"claimName": "jobfiles"}}]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": "work", "mountPath": "/work", "subPath": "j2"}
    ]


def test_site_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="go together"):
        KubeSite(volume_claim="pvc")


@pytest.mark.parametrize(
    "label", [LABEL, "UPPER_case.dots", "-" * 80, "x" * 200, "ünïcødé/and spaces"]
)
def test_job_names_are_dns_labels(label: str) -> None:
    name = job_name(label)
    assert DNS_1123.match(name) and len(name) <= 63
    assert job_name(label, nonce="1") != job_name(label, nonce="2")


# ---------------------------------------------------------------- the API conversation


class Cluster:
    """kmock's Kubernetes emulator on loopback, served from a thread of its own.

    `play(script)` runs a script in another thread that plays the Job controller and the
    kubelet through the API: it is given the created Job (as the executor sent it).
    """

    def __init__(self) -> None:
        # aiohttp logs each request from the server's thread, also after a test's log
        # capture has closed: "Logging error" noise, and nothing any test reads.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        self.logs: dict[str, bytes] = {}  # pod name → its log, served at .../pods/NAME/log
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.emulator: kmock.KubernetesEmulator | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the emulator did not start"
        configuration = kube.Configuration()
        configuration.host = self.url
        self.api = kube.ApiClient(configuration)
        self.batch = kube.BatchV1Api(self.api)
        self.core = kube.CoreV1Api(self.api)

    async def _serve(self) -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for resource in ("v1/pods", "v1/configmaps", "v1/secrets", "batch/v1/jobs"):
                emulator.resources[resource] = {}
            emulator[kmock.method.GET, kmock.subresource("log")] << (
                lambda request: self.logs.get(request.name, b"")
            )
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self.api.close()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def requests(self) -> list[tuple[str, str, str, str | None, str | None, dict[str, str]]]:
        """What the API server was asked: (method, kind, namespace, name, subresource, query)."""
        assert self.emulator is not None
        return [
            (
                str(request.method.value),
                str(request.resource.plural if request.resource else request.url.path),
                str(request.namespace),
                request.name,
                request.subresource,
                dict(request.params),
            )
            for request in list(self.emulator)
        ]

    def created(self, plural: str) -> list[dict[str, Any]]:
        assert self.emulator is not None
        return [
            request.data
            for request in list(self.emulator)
            if request.method.value == "POST"
            and request.resource is not None
            and request.resource.plural == plural
        ]

    def wait_for_job(self, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.created("jobs")
            if jobs:
                return jobs[0]
            time.sleep(0.02)
        raise AssertionError("the executor never created a Job")

    # The Job controller and the kubelet, through the API.

    def run_pod(self, job: dict[str, Any], exit_code: int | None, log: bytes) -> str:
        name = job["metadata"]["name"]
        namespace = job["metadata"]["namespace"]
        pod_name = f"{name}-x7k2p"
        template = job["spec"]["template"]
        state: dict[str, Any] = (
            {"waiting": {"reason": "ContainerCreating"}}
            if exit_code is None
            else {"terminated": {"exitCode": exit_code, "reason": "Completed"}}
        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": {**template["metadata"]["labels"], "job-name": name},
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": template["spec"],
            "status": {
                "phase": "Pending"
                if exit_code is None
                else "Succeeded"
                if exit_code == 0
                else "Failed",
                "containerStatuses": [{"name": "task", "state": state}],
            },
        }
        self.core.create_namespaced_pod(namespace, pod, _preload_content=False)
        self.logs[pod_name] = log
        return pod_name

    def set_job_status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job_status(
            job["metadata"]["name"],
            job["metadata"]["namespace"],
            {"status": status},
            _preload_content=False,
        )

    def job_exists(self, name: str, namespace: str = "default") -> bool:
        try:
            self.batch.read_namespaced_job(name, namespace, _preload_content=False)
        except kube.exceptions.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    emulated = Cluster()
    try:
        yield emulated
    finally:
        emulated.close()


def execute(
    cluster: Cluster, run: TaskRun, play: Callable[[dict[str, Any]], None] | None = None
) -> TaskResult:
    """Run the executor against the emulator while `play` acts as the cluster."""
    player_error: list[BaseException] = []

    def player() -> None:
        try:
            job = cluster.wait_for_job()
            if play is not None:
                play(job)
        except BaseException as exc:
            player_error.append(exc)

    thread = threading.Thread(target=player, daemon=True)
    thread.start()
    kube = run.policy.kube.model_copy(update={"host": cluster.url})
    run = dataclasses.replace(run, policy=run.policy.model_copy(update={"kube": kube}))
    try:
        return KubeExecutor().run(run)
    finally:
        thread.join(10)
        assert not player_error, player_error


def test_a_job_that_succeeds(cluster: Cluster, tmp_path: Path) -> None:
    run = make_run(tmp_path, {"shell": "echo hi"}, env={"K": "v"}, timeout=30)

    def play(job: dict[str, Any]) -> None:
        time.sleep(0.3)  # the executor polls a running Job a few times
        cluster.run_pod(job, 0, b"hello from the pod\n")
        cluster.set_job_status(
            job, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        )

    started = time.monotonic()
    result = execute(cluster, run, play)
    assert time.monotonic() - started < 10
    assert result == TaskResult(0, b"hello from the pod\n", b"", False)

    [job] = cluster.created("jobs")
    name = job["metadata"]["name"]
    assert job == job_manifest(run, name), "the Job sent is the manifest"
    assert cluster.created("configmaps") == [], "no inputs, no ConfigMap"
    calls = cluster.requests()
    ours = [
        call
        for call in calls
        if call[0] != "PATCH" and not (call[0] == "POST" and call[1] == "pods")
    ]  # the player's own requests left out
    assert ours[0] == ("POST", "jobs", "default", None, None, {})
    polls = [call for call in ours if call[:5] == ("GET", "jobs", "default", name, "status")]
    assert len(polls) >= 3, "the executor watched the Job's status"
    assert ("GET", "pods", "default", None, None, {"labelSelector": f"job-name={name}"}) in ours
    assert ("GET", "pods", "default", f"{name}-x7k2p", "log", {"container": "task"}) in ours
    assert ours[-1] == (
        "DELETE",
        "jobs",
        "default",
        name,
        None,
        {"propagationPolicy": "Background"},
    )
    assert not cluster.job_exists(name)


def test_a_job_that_fails_reports_the_pods_exit_code(cluster: Cluster, tmp_path: Path) -> None:
    run = make_run(tmp_path, {"command": ["false"]}, site=KubeSite(namespace="jobs"))

    def play(job: dict[str, Any]) -> None:
        cluster.run_pod(job, 3, b"something went wrong\n")
        cluster.set_job_status(
            job,
            {
                "failed": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                    }
                ],
            },
        )

    result = execute(cluster, run, play)
    assert result.exit_code == 3
    assert result.stdout == b"something went wrong\n"
    assert b"failed: BackoffLimitExceeded: Job has reached the specified backoff limit" in (
        result.stderr
    )
    assert not result.timed_out
    [job] = cluster.created("jobs")
    assert job["metadata"]["namespace"] == "jobs"
    assert not cluster.job_exists(job["metadata"]["name"], "jobs")


def test_a_failed_job_without_a_pod_exits_1(cluster: Cluster, tmp_path: Path) -> None:
    run = make_run(tmp_path, {"shell": "exit 0"})

    def play(job: dict[str, Any]) -> None:
        cluster.set_job_status(
            job, {"conditions": [{"type": "Failed", "status": "True", "reason": "Evicted"}]}
        )

    result = execute(cluster, run, play)
    assert (result.exit_code, result.stdout, result.timed_out) == (1, b"", False)
    assert b"Evicted" in result.stderr


def test_the_clusters_deadline_counts_as_a_timeout(cluster: Cluster, tmp_path: Path) -> None:
    run = make_run(tmp_path, {"shell": "sleep 100"}, timeout=30)

    def play(job: dict[str, Any]) -> None:
        cluster.set_job_status(
            job,
            {
                "failed": 1,
                "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
            },
        )

    result = execute(cluster, run, play)
    assert result.timed_out


def test_a_timeout_deletes_the_job(cluster: Cluster, tmp_path: Path) -> None:
    run = make_run(tmp_path, {"shell": "sleep 100"}, timeout=1.0)

    def play(job: dict[str, Any]) -> None:
        cluster.run_pod(job, None, b"started\n")  # it runs and never ends

    started = time.monotonic()
    result = execute(cluster, run, play)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert result.exit_code == 137
    assert result.stdout == b"started\n", "the log so far is kept"
    assert b"timed out" in result.stderr
    assert 0.9 < elapsed < 5, f"took {elapsed:.2f} s"
    [job] = cluster.created("jobs")
    assert not cluster.job_exists(job["metadata"]["name"])


def test_a_cancel_deletes_the_job(cluster: Cluster, tmp_path: Path) -> None:
    cancelled = threading.Event()
    run = make_run(tmp_path, {"shell": "sleep 100"}, cancelled=cancelled)

    started = time.monotonic()
    result = execute(cluster, run, lambda job: cancelled.set())
    assert time.monotonic() - started < 5
    assert (result.exit_code, result.timed_out) == (137, False)
    assert b"cancelled" in result.stderr
    [job] = cluster.created("jobs")
    assert not cluster.job_exists(job["metadata"]["name"])


def test_inputs_travel_in_a_configmap_deleted_afterwards(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("one two three\n")
    run = make_run(tmp_path, {"shell": "wc -w < in.txt"}, inputs=["in.txt"])

    def play(job: dict[str, Any]) -> None:
        [configmap] = cluster.created("configmaps")
        assert configmap["data"] == {"input-0": "one two three\n"}
        cluster.run_pod(job, 0, b"3\n")
        cluster.set_job_status(job, {"succeeded": 1})

    result = execute(cluster, run, play)
    assert result.exit_code == 0 and result.stdout == b"3\n"
    [job] = cluster.created("jobs")
    name = job["metadata"]["name"]
    assert cluster.created("configmaps")[0]["metadata"]["name"] == name
    calls = cluster.requests()
    assert calls[0][:2] == ("POST", "configmaps"), "the ConfigMap exists before the Job"
    assert ("DELETE", "configmaps", "default", name, None, {"propagationPolicy": "Background"}) in (
        calls
    )


def test_outputs_need_a_shared_volume(cluster: Cluster, tmp_path: Path) -> None:
    run = make_run(
        tmp_path,
        {"shell": "echo x > out.txt"},
        outputs=["out.txt"],
        site=KubeSite(host=cluster.url),
    )
    with pytest.raises(ValueError, match="volume_claim"):
        KubeExecutor().run(run)
    assert cluster.requests() == [], "refused before anything was created"


def test_a_shared_volume_carries_inputs_and_outputs(cluster: Cluster, tmp_path: Path) -> None:
    workdir, shared = tmp_path / "work", tmp_path / "shared"
    workdir.mkdir()
    shared.mkdir()
    (workdir / "in.txt").write_text("a b c d\n")
    params = {"shell": "wc -w < in.txt > out/n.txt"}
    site = KubeSite(volume_claim="jobfiles", volume_path=shared)
    run = make_run(workdir, params, inputs=["in.txt"], outputs=["out/n.txt"], site=site)

    def play(job: dict[str, Any]) -> None:
        # The pod's view: the PVC's subPath, i.e. the run's own folder on the shared volume.
        [mount] = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        folder = shared / mount["subPath"]
        words = len((folder / "in.txt").read_text().split())
        (folder / "out").mkdir()
        (folder / "out" / "n.txt").write_text(f"{words}\n")
        cluster.run_pod(job, 0, b"")
        cluster.set_job_status(job, {"succeeded": 1})

    result = execute(cluster, run, play)
    assert result.exit_code == 0
    assert (workdir / "out" / "n.txt").read_text() == "4\n"
    assert list(shared.iterdir()) == [], "the run's folder on the shared volume is removed"
    assert cluster.created("configmaps") == []


def test_a_clear_error_without_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_kubernetes(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "kubernetes":
            raise ImportError("No module named 'kubernetes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kubernetes)
    with pytest.raises(RuntimeError, match=r"flotta_mqtt\[kube\]") as error:
        KubeExecutor()
    assert str(error.value) == INSTALL_HINT


def test_a_kubeconfig_file_points_at_the_server(cluster: Cluster, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": cluster.url}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "me"}}],
                "current-context": "emu",
            }
        )
    )
    run = make_run(tmp_path, {"shell": ":"}, site=KubeSite(kubeconfig=kubeconfig))
    thread = threading.Thread(
        target=lambda: cluster.set_job_status(cluster.wait_for_job(), {"succeeded": 1}),
        daemon=True,
    )
    thread.start()
    result = KubeExecutor().run(run)
    thread.join(10)
    assert result.exit_code == 0
    assert sent_the_token(cluster)


def sent_the_token(cluster: Cluster) -> bool:
    """Whether the executor's requests carried the kubeconfig's credentials."""
    assert cluster.emulator is not None
    posts = [request for request in list(cluster.emulator) if request.method.value == "POST"]
    return bool(posts) and posts[0].headers.get("Authorization") == "Bearer t0ken"


# ---------------------------------------------------------------- the site's policy


def test_secrets_travel_in_a_secret_of_the_run_deleted_with_its_job(
    cluster: Cluster, tmp_path: Path
) -> None:
    value = f"s-{uuid.uuid4().hex}"
    run = make_run(tmp_path, {"shell": "echo $TOKEN"}, secrets={"TOKEN": value})

    def play(job: dict[str, Any]) -> None:
        [secret] = cluster.created("secrets")
        assert secret["metadata"]["name"] == job["metadata"]["name"]
        assert secret["data"] == {"TOKEN": base64.b64encode(value.encode()).decode()}
        cluster.run_pod(job, 0, b"")
        cluster.set_job_status(job, {"succeeded": 1})

    assert execute(cluster, run, play).exit_code == 0
    [job] = cluster.created("jobs")
    name = job["metadata"]["name"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": "TOKEN"}}}
    ]
    assert value not in json.dumps(job), "the Job names the Secret, never the value"
    calls = cluster.requests()
    assert calls.index(("POST", "secrets", "default", None, None, {})) < calls.index(
        ("POST", "jobs", "default", None, None, {})
    )
    assert ("DELETE", "secrets", "default", name, None, {"propagationPolicy": "Background"}) in (
        calls
    )


def test_an_image_the_site_does_not_allow_creates_nothing(cluster: Cluster, tmp_path: Path) -> None:
    # No player: one waiting for a Job that never comes raced the executor's refusal.
    site = KubeSite(host=cluster.url)
    run = make_run(tmp_path, {"image": "attacker.example/miner:1", "shell": ":"}, site=site)
    with pytest.raises(PolicyError, match=r"image 'attacker\.example/miner:1' is not allowed"):
        KubeExecutor().run(run)
    assert cluster.requests() == []


def test_a_task_choosing_where_it_runs_is_refused_before_anything_is_created(
    cluster: Cluster, tmp_path: Path
) -> None:
    runner = TaskRunner(ResourceStore(str(tmp_path / "store")), ["kube"])
    for setting, value in [("namespace", "kube-system"), ("kubeconfig", "/root/.kube/config")]:
        task = Task(name="k", params={"image": "busybox:1.36", "shell": ":", setting: value})
        with pytest.raises(ValueError, match=rf"{setting}: where and how tasks run is the site"):
            runner.run(task_job(task), "node-1", threading.Event())
    assert cluster.requests() == []


def test_a_link_left_on_the_shared_volume_is_copied_back_as_a_link(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The worker reads the shared volume: a link the pod leaves there names the worker's
    own files. It comes back as a link, which the outputs refuse."""
    workdir, shared, host = tmp_path / "work", tmp_path / "shared", tmp_path / "host"
    for folder in (workdir, shared, host):
        folder.mkdir()
    (host / "secret.txt").write_text("the worker's own file")
    site = KubeSite(volume_claim="jobfiles", volume_path=shared)
    run = make_run(workdir, {"shell": ":"}, outputs=["out.txt"], site=site)

    def play(job: dict[str, Any]) -> None:
        [mount] = job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        (shared / mount["subPath"] / "out.txt").symlink_to(host / "secret.txt")
        cluster.run_pod(job, 0, b"")
        cluster.set_job_status(job, {"succeeded": 1})

    assert execute(cluster, run, play).exit_code == 0
    assert (workdir / "out.txt").is_symlink()
    with pytest.raises(TaskError, match=r"output out.txt is, or is inside, a symbolic link"):
        read_output(run.task.name, workdir, "out.txt")


# ---------------------------------------------------------------- the pod spec, for real


def pod_yaml(job: dict[str, Any], *extra: dict[str, Any]) -> str:
    """The Job's pod template as the `v1 Pod` the Job controller would make of it."""
    name = job["metadata"]["name"]
    template = job["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {**template["metadata"]["labels"], "job-name": name}},
        "spec": template["spec"],
    }
    return yaml.safe_dump_all([*extra, pod], sort_keys=False)


def play_pod(podman: Podman, tmp_path: Path, text: str, name: str) -> tuple[int, str]:  # noqa: F811
    """`podman kube play` the pod, wait for its task container; its status and log."""
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(text)
    container = f"{name}-task"
    try:
        podman.run("kube", "play", "--network", "none", str(spec))
        waited = podman.run("wait", container, timeout=60)
        log = podman.run("logs", container)
        inspected = json.loads(podman.run("inspect", container).stdout)[0]
        assert inspected["State"]["ExitCode"] == int(waited.stdout.strip())
        assert inspected["Config"]["WorkingDir"] == "/work"
        return int(waited.stdout.strip()), log.stdout + log.stderr
    finally:
        podman.run("kube", "down", str(spec), check=False)
        podman.run("volume", "rm", "--force", name, check=False)


def test_the_pod_spec_runs_in_podman_with_configmap_inputs(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    # podman 4.3 cannot place ConfigMap items in subfolders: the input here is flat.
    (tmp_path / "in.txt").write_text("one two three four five\n")
    run = make_run(
        tmp_path,
        {"image": podman.image, "shell": 'echo "$GREETING"; wc -w < in.txt; pwd; exit 4'},
        env={"GREETING": "hello pod"},
        inputs=["in.txt"],
        timeout=60,
    )
    name = job_name(run.label, nonce="play-1")
    job = job_manifest(run, name)
    configmap = configmap_manifest(run, name)
    assert configmap is not None
    status, log = play_pod(podman, tmp_path, pod_yaml(job, configmap), name)
    assert status == 4
    assert log.split() == ["hello", "pod", "5", "/work"]


def test_the_pod_spec_runs_in_podman_reading_stdin_from_its_configmap(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    (tmp_path / "in.txt").write_text("ab\n")
    run = make_run(
        tmp_path,
        {"image": podman.image, "command": ["sh", "-c", 'cat in.txt -; echo "$1"', "sh"]},
        inputs=["in.txt"],
    )
    run = dataclasses.replace(
        run,
        task=run.task.model_copy(
            update={"params": {**run.task.params, "stdin": "from stdin\n", "args": ["arg"]}}
        ),
    )
    name = job_name(run.label, nonce="play-3")
    configmap = configmap_manifest(run, name)
    assert configmap is not None
    status, log = play_pod(podman, tmp_path, pod_yaml(job_manifest(run, name), configmap), name)
    assert status == 0, log
    assert log.splitlines() == ["ab", "from stdin", "arg"]


def test_the_pod_spec_runs_in_podman_with_a_shared_volume(
    podman: Podman,  # noqa: F811
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    run = make_run(
        tmp_path,
        {
            "image": podman.image,
            "command": ["sh", "-c", "mkdir -p out && tr a-z A-Z < in.txt > out/up.txt && ls"],
        },
        inputs=["in.txt"],
        outputs=["out/up.txt"],
        site=KubeSite(volume_claim="jobfiles", volume_path=shared),
    )
    name = job_name(run.label, nonce="play-2")
    job = job_manifest(run, name)
    # What the executor does before creating the Job: the run's folder on the shared volume.
    folder = shared / name
    folder.mkdir(parents=True)
    (folder / "in.txt").write_text("shout\n")
    # podman 4.3 ignores `subPath` on a claim: its volume is bound to the run's folder
    # itself, which is what the subPath mount shows the pod in a cluster.
    podman.run(
        "volume",
        "create",
        "--opt",
        "type=none",
        "--opt",
        "o=bind",
        "--opt",
        f"device={folder}",
        "jobfiles",
    )
    try:
        status, log = play_pod(podman, tmp_path, pod_yaml(job), name)
    finally:
        podman.run("volume", "rm", "--force", "jobfiles", check=False)
    assert status == 0, log
    assert log.split() == ["in.txt", "out"]
    assert (folder / "out" / "up.txt").read_text() == "SHOUT\n"
