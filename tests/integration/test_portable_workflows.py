"""One workflow file, three sites: it names no executor, and runs unchanged on a worker
whose site runs tasks as processes (shell), in containers (podman, through the docker
executor) and as Kubernetes Jobs (kmock's emulated API server), with identical outputs.

Each run goes through `flotta-mqtt submit --wait` to an in-process scheduler on a real
mosquitto. On the Kubernetes site the test plays the cluster: for each Job the executor
creates it resolves the Secret as a kubelet would and runs the pod spec with
`podman kube play` (ConfigMaps included, the shared volume bound to the run's folder),
then reports the pod's status and log through the API.

Then the attacks, through the CLI on a shell site: a mount outside the site's folders, a
writable mount where the site allows reading only, a secret the site does not define, a
requirement no worker meets, and STDIN over its limit.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from podman_fixtures import Podman, podman  # noqa: F401  (the fixture)
from test_executor_kube import Cluster, play_pod, pod_yaml
from test_workflows import (  # noqa: F401
    REPO,
    TIMEOUT,
    Flotta,
    by_name,
    flat,
    flotta,
    invoke,
    write_workflow,
)

from flotta_mqtt.model import ArtifactState
from flotta_mqtt.model.run import MAX_STDIN_BYTES
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.workflows.executors import SitePolicy
from flotta_mqtt.workflows.executors.policy import HostMount, KubeSite

pytestmark = pytest.mark.integration

# What runs, and nothing of how: args, STDIN, env, a secret by name, a mount of the site's
# data, job files in and out. No image: a container site runs it in its default image.
WORKFLOW: dict[str, Any] = {
    "name": "portable",
    "tasks": [
        {
            "name": "numbers",
            "params": {"shell": 'seq 1 "$1" > numbers.txt', "args": ["10"]},
            "outputs": ["numbers.txt"],
        },
        {
            "name": "sum",
            "depends": ["numbers"],
            "params": {
                "shell": "awk '{s+=$1} END {print s}' numbers.txt > sum.txt; tr a-z A-Z",
                "stdin": "read from stdin\n",
            },
            "inputs": ["numbers.txt"],
            "outputs": ["sum.txt"],
        },
        {
            "name": "report",
            "depends": ["sum"],
            "params": {
                "shell": 'echo "$GREETING sum=$(cat sum.txt) rows=$(wc -l < site/rows.csv) '
                'token=${#TOKEN}" | tee report.txt',
                "mounts": [{"source": "SITE_DATA", "target": "site"}],
            },
            "env": {"GREETING": "hello"},
            "secrets": ["TOKEN"],
            "inputs": ["sum.txt"],
            "outputs": ["report.txt"],
        },
    ],
}
TOKEN = f"t-{uuid.uuid4().hex}"
LISTS = {
    "jobs": "list_namespaced_job",
    "configmaps": "list_namespaced_config_map",
    "secrets": "list_namespaced_secret",
}
EXPECTED = {
    "numbers": {"stdout": b"", "numbers.txt": "".join(f"{n}\n" for n in range(1, 11)).encode()},
    "sum": {"stdout": b"READ FROM STDIN\n", "sum.txt": b"55\n"},
    "report": {
        "stdout": f"hello sum=55 rows=3 token={len(TOKEN)}\n".encode(),
        "report.txt": f"hello sum=55 rows=3 token={len(TOKEN)}\n".encode(),
    },
}


def workflow_file(folder: Path, data: Path) -> Path:
    """The workflow, its mount naming the site's data folder, written once."""
    workflow = copy.deepcopy(WORKFLOW)
    workflow["tasks"][2]["params"]["mounts"][0]["source"] = str(data)
    return write_workflow(folder, workflow, "portable.yaml")


def site_data(folder: Path) -> Path:
    data = folder / "site-data"
    data.mkdir()
    (data / "rows.csv").write_text("x\n1\n2\n")
    return data


def outputs(flotta: Flotta, artifact_id: str) -> dict[str, dict[str, bytes]]:  # noqa: F811
    """Per task: its stdout, and each output job file it stored."""
    store = ResourceStore(flotta.storage.url)
    assert flotta.client is not None
    status = flotta.client.handle(artifact_id).wait(timeout=TIMEOUT)
    assert status.state is ArtifactState.COMPLETED, status.error
    found: dict[str, dict[str, bytes]] = {}
    for name, job in by_name(status).items():
        stdout = store.log_url(artifact_id, name, job.attempt, "stdout")
        found[name] = {"stdout": store.get_bytes(stdout) if store.exists(stdout) else b""}
        for task in WORKFLOW["tasks"]:
            if task["name"] == name:
                for path in task.get("outputs", []):
                    url = store.job_file_url(artifact_id, str(job.id), job.attempt, path)
                    found[name][path] = store.get_bytes(url)
    return found


def submit(flotta: Flotta, path: Path) -> str:  # noqa: F811
    result = flotta.cli("submit", str(path), "--wait", "--timeout", str(TIMEOUT * 3))
    assert result.exit_code == 0, result.output
    return result.output.split("submitted artifact ")[1].split()[0]


class Kubelet:
    """Plays a cluster's Job controller and kubelet for the emulator: runs each Job's pod
    spec in podman, one at a time, and reports its status and log through the API."""

    def __init__(self, cluster: Cluster, podman: Podman, folder: Path, shared: Path) -> None:  # noqa: F811
        self.cluster, self.podman, self.folder, self.shared = cluster, podman, folder, shared
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self.errors, self.errors

    def _serve(self) -> None:
        done = 0
        while not self._stop.wait(0.05):
            jobs = self.cluster.created("jobs")
            for job in jobs[done:]:
                try:
                    self._run(job)
                except BaseException as exc:
                    self.errors.append(exc)
                    self.cluster.set_job_status(job, {"failed": 1})
            done = len(jobs)

    def _run(self, job: dict[str, Any]) -> None:
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        job = copy.deepcopy(job)
        spec = job["spec"]["template"]["spec"]
        for variable in spec["containers"][0]["env"]:  # the kubelet reads the Secret
            ref = variable.pop("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                secret = self.cluster.core.read_namespaced_secret(ref["name"], namespace)
                variable["value"] = base64.b64decode(secret.data[ref["key"]]).decode()
        extra = []
        for volume in spec["volumes"]:
            if "configMap" in volume:
                configmap = self.cluster.core.read_namespaced_config_map(
                    volume["configMap"]["name"], namespace
                )
                extra.append(
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": configmap.metadata.name},
                        "data": configmap.data,
                    }
                )
        # podman ignores `subPath` on a claim: the claim's volume is the run's folder.
        [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "work"]
        claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
        device = self.shared / mount["subPath"]
        self.podman.run(
            *("volume", "create", "--opt", "type=none", "--opt", "o=bind"),
            *("--opt", f"device={device}", claim),
        )
        try:
            status, log = play_pod(self.podman, self.folder, pod_yaml(job, *extra), name)
        finally:
            self.podman.run("volume", "rm", "--force", claim, check=False)
        self.cluster.run_pod(job, status, log.encode())
        condition = "Complete" if status == 0 else "Failed"
        self.cluster.set_job_status(
            job,
            {
                ("succeeded" if status == 0 else "failed"): 1,
                "conditions": [{"type": condition, "status": "True"}],
            },
        )


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    emulated = Cluster()
    try:
        yield emulated
    finally:
        emulated.close()


@pytest.mark.parametrize("site", ["shell", "podman", "kube"])
def test_the_same_file_runs_unchanged_on_each_site_with_the_same_outputs(
    site: str,
    flotta: Flotta,  # noqa: F811
    podman: Podman,  # noqa: F811
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("SITE_TOKEN", TOKEN)
    data = site_data(tmp_path)
    path = workflow_file(tmp_path, data)
    policy: dict[str, Any] = {
        "mounts": [HostMount(path=data)],
        "secrets": {"TOKEN": {"env": "SITE_TOKEN"}},
        "images": [podman.image],
        "default_image": podman.image,
    }
    kubelet = None
    if site == "podman":
        monkeypatch.setenv("DOCKER_HOST", podman.docker_host)  # the worker's docker executor
        executors = ["docker"]
    elif site == "kube":
        cluster: Cluster = request.getfixturevalue("cluster")
        shared = tmp_path / "shared"
        shared.mkdir()
        policy["kube"] = KubeSite(
            host=cluster.url, volume_claim="jobfiles", volume_path=shared, poll_interval=0.05
        )
        kubelet = Kubelet(cluster, podman, tmp_path, shared)
        executors = ["kube"]
    else:
        executors = ["shell"]
    flotta.start({f"{site}-site": executors}, policy=SitePolicy.model_validate(policy))
    try:
        artifact_id = submit(flotta, path)
    finally:
        if kubelet is not None:
            kubelet.close()
    assert outputs(flotta, artifact_id) == EXPECTED
    assert TOKEN.encode() not in b"".join(
        p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()
    )
    if site == "kube":  # what the executor made for its runs is gone
        for kind in ("jobs", "configmaps", "secrets"):
            assert cluster.created(kind), f"the runs made {kind}"
            listed = getattr(cluster.core if kind != "jobs" else cluster.batch, LISTS[kind])(
                "default", _preload_content=False
            )
            assert json.loads(listed.data)["items"] == [], f"{kind} left behind"


# --- attacks, on a shell site ---------------------------------------------------------------


def refused(flotta: Flotta, tmp_path: Path, task: dict[str, Any]) -> tuple[str, str]:  # noqa: F811
    """Submit one task with the CLI; its failure's type and message, and that it never ran."""
    witness = tmp_path / f"ran-{uuid.uuid4().hex[:6]}"
    task = {**task, "env": {**task.get("env", {}), "RAN": str(witness)}}
    task["params"] = {"shell": 'touch "$RAN"', **task["params"]}
    path = write_workflow(tmp_path, {"tasks": [task]}, f"{task['name']}.yaml")
    result = flotta.cli("submit", str(path), "--wait", "--timeout", str(TIMEOUT))
    assert result.exit_code != 0, result.output
    assert not witness.exists(), "the task never ran"
    return flat(result.output), task["name"]


def test_a_site_refuses_mounts_secrets_and_requirements_it_does_not_give(
    flotta: Flotta,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = site_data(tmp_path)
    private = tmp_path / "private"
    private.mkdir()
    policy = SitePolicy(mounts=[HostMount(path=data)])
    flotta.start({"laptop": ["shell"]}, policy=policy)
    attacks = [
        (
            {"name": "outside", "params": {"mounts": [{"source": "/etc", "target": "etc"}]}},
            "task outside: host path /etc is not under a folder policy.mounts allows",
        ),
        (
            {
                "name": "escape",
                "params": {"mounts": [{"source": f"{data}/../private", "target": "p"}]},
            },
            f"task escape: host path {data}/../private is not under a folder",
        ),
        (
            {
                "name": "writes",
                "params": {"mounts": [{"source": str(data), "target": "d", "writable": True}]},
            },
            f"task writes: host path {data} may be mounted read-only only",
        ),
        (
            {"name": "steals", "params": {}, "secrets": ["PROD_DB_PASSWORD"]},
            "task steals: this site defines no secret named 'PROD_DB_PASSWORD'",
        ),
        (
            {"name": "trains", "params": {}, "requires": ["gpu"]},
            "task trains (step 0): no worker runs tasks that require gpu",
        ),
        (
            {"name": "boxed", "params": {"image": "bb:1"}, "requires": ["container"]},
            "task boxed (step 0): no worker runs tasks that require container",
        ),
    ]
    for task, reason in attacks:
        said, _ = refused(flotta, tmp_path, task)
        assert reason in said, said
    assert (data / "rows.csv").read_text() == "x\n1\n2\n"


def test_the_portable_example_runs_on_a_shell_site(
    flotta: Flotta,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SITE_API_TOKEN", "abc")
    policy = SitePolicy.model_validate({"secrets": {"API_TOKEN": {"env": "SITE_API_TOKEN"}}})
    flotta.start({"laptop": ["shell"]}, policy=policy)
    artifact_id = submit(flotta, REPO / "examples" / "portable.yaml")
    store = ResourceStore(flotta.storage.url)
    said = {
        task: store.get_bytes(store.log_url(artifact_id, task, 1, "stdout"))
        for task in ("stats", "shout", "upload")
    }
    assert said == {
        "stats": b"sum 5050\nmean 50.5\n",
        "shout": b"READ FROM STDIN\n",
        "upload": b"would send to https://example.invalid/upload with a token of 3 characters\n",
    }


def test_a_workflow_naming_an_executor_is_told_how_to_migrate(tmp_path: Path) -> None:
    task = {"name": "old", "executor": "docker", "params": {"image": "bb:1", "shell": ":"}}
    result = invoke("validate", str(write_workflow(tmp_path, {"tasks": [task]})))
    assert result.exit_code == 2
    assert "task old: `executor: docker` is no longer a task's to choose: drop it" in flat(
        result.output
    )


def test_stdin_over_its_limit_is_refused_before_submission(
    flotta: Flotta,  # noqa: F811
    tmp_path: Path,
) -> None:
    task = {"name": "flood", "params": {"shell": "wc -c", "stdin": "x" * (MAX_STDIN_BYTES + 1)}}
    path = write_workflow(tmp_path, {"tasks": [task]})
    for result in (invoke("validate", str(path)), flotta.cli("submit", str(path))):
        assert result.exit_code == 2, result.output
        said = flat(result.output)
        assert f"`stdin` is {MAX_STDIN_BYTES + 1} bytes, more than {MAX_STDIN_BYTES}" in said
