"""The kube executor: a task as a Kubernetes Job, watched to its end, its logs kept.

What a task gets and how it ends: KubeExecutor's docstring.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

from flotta_mqtt.model.run import WORKDIR, RunParams
from flotta_mqtt.workflows.executors.base import Executor, TaskResult, TaskRun, register_executor
from flotta_mqtt.workflows.executors.policy import KubeSite, SitePolicy

log = logging.getLogger(__name__)

INSTALL_HINT = "the kube executor needs the kubernetes client: pip install 'flotta_mqtt[kube]'"
CONTAINER = "task"
# Total size of input job files carried in a ConfigMap (the API limit is 1 MiB per object).
CONFIGMAP_LIMIT = 1_000_000
# Status reported for a pod the executor had to stop (128 + SIGKILL) when it has none.
KILLED = 137
MANAGED_BY = {"app.kubernetes.io/managed-by": "flotta-mqtt"}
STDIN_KEY = "stdin"  # the ConfigMap's key holding the task's STDIN
STDIN_FOLDER = "/flotta-stdin"  # where the pod sees it, outside its working folder
GPU_RESOURCE = "nvidia.com/gpu"


def job_name(label: str, nonce: str = "") -> str:
    """A Job name from a task's label: DNS-1123, short enough for the `job-name` label."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")[:40].strip("-") or "task"
    digest = hashlib.sha1(f"{label}/{nonce}".encode()).hexdigest()[:8]
    return f"flotta-{cleaned}-{digest}"


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def _input_key(index: int) -> str:
    return f"input-{index}"


def job_manifest(run: TaskRun, name: str | None = None) -> dict[str, Any]:
    """The `batch/v1` Job running the task: pure, from the task and the site's settings.

    Secrets come from the run's own Secret (`secret_manifest`), never written in the Job;
    inputs (without a shared volume) and STDIN from its ConfigMap (`configmap_manifest`).
    """
    params = RunParams.model_validate(run.task.params)
    site = run.policy.kube
    name = name or job_name(run.label)
    labels = {**MANAGED_BY, "flotta-mqtt/task": _label_value(run.task.name)}
    env: list[dict[str, Any]] = [
        {"name": key, "value": value} for key, value in sorted(run.env.items())
    ]
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
        for key in sorted(run.secrets)
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": run.policy.image(run.task.name, params.image),
        "workingDir": WORKDIR,
        "env": env,
    }
    container.update(_command(run, params))
    resources = _resources(run, params)
    if resources:
        container["resources"] = {"limits": resources, "requests": resources}
    mount: dict[str, Any] = {"name": "work", "mountPath": WORKDIR}
    volume: dict[str, Any] = {"name": "work"}
    if site.volume_claim is not None:
        volume["persistentVolumeClaim"] = {"claimName": site.volume_claim}
        mount["subPath"] = name  # the worker's folder for this run on the shared volume
    elif run.task.inputs:
        items = [{"key": _input_key(i), "path": path} for i, path in enumerate(run.task.inputs)]
        volume["configMap"] = {"name": name, "items": items}
        mount["readOnly"] = True
    else:
        volume["emptyDir"] = {}
    mounts, volumes = [mount], [volume]
    if params.stdin is not None:
        items = [{"key": STDIN_KEY, "path": STDIN_KEY}]
        volumes.append({"name": "stdin", "configMap": {"name": name, "items": items}})
        mounts.append({"name": "stdin", "mountPath": STDIN_FOLDER, "readOnly": True})
    for index, (host, source) in enumerate(run.policy.host_mounts(run.task.name, params.mounts)):
        volumes.append({"name": f"mount-{index}", "hostPath": {"path": str(source)}})
        mounts.append(
            {
                "name": f"mount-{index}",
                "mountPath": f"{WORKDIR}/{host.target}",
                "readOnly": not host.writable,
            }
        )
    container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
    }
    if site.service_account is not None:
        pod_spec["serviceAccountName"] = site.service_account
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # retries are the workflow's, not the cluster's
        "ttlSecondsAfterFinished": 3600,  # in case the worker dies before deleting it
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if run.task.timeout is not None:
        job_spec["activeDeadlineSeconds"] = max(1, math.ceil(run.task.timeout))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": site.namespace,
            "labels": labels,
            "annotations": {"flotta-mqtt/run": run.label},
        },
        "spec": job_spec,
    }


def _command(run: TaskRun, params: RunParams) -> dict[str, list[str]]:
    """The container's `command` (replacing the entrypoint) or its entrypoint's `args`.

    A pod has no STDIN here: the command reads it from the ConfigMap's file, through `sh`.
    """
    argv = params.argv()
    if params.stdin is not None:
        if argv is None:
            raise ValueError(
                f"task {run.task.name}: on kube, `stdin` goes with a `command` or `shell` "
                "(it is redirected from a file, through the image's sh)"
            )
        argv = ["sh", "-c", f'exec "$@" < {STDIN_FOLDER}/{STDIN_KEY}', "sh", *argv]
    if argv is not None:
        return {"command": argv}
    return {"args": list(params.args)} if params.args else {}


def _resources(run: TaskRun, params: RunParams) -> dict[str, str | int]:
    """The container's limits (and requests): CPUs, memory, GPUs if it requires them."""
    resources: dict[str, str | int] = {}
    if params.resources.cpus is not None:
        resources["cpu"] = f"{round(params.resources.cpus * 1000)}m"
    if params.resources.memory_mb is not None:
        resources["memory"] = f"{params.resources.memory_mb}Mi"
    if "gpu" in run.task.requires:
        resources[GPU_RESOURCE] = params.resources.gpus or 1
    return resources


def configmap_manifest(run: TaskRun, name: str) -> dict[str, Any] | None:
    """The ConfigMap carrying the task's STDIN, and its input job files (read from its
    working folder) unless a shared volume carries them; None when it carries neither."""
    params = RunParams.model_validate(run.task.params)
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    total = 0
    inputs = run.task.inputs if run.policy.kube.volume_claim is None else []
    for index, path in enumerate(inputs):
        content = (run.workdir / path).read_bytes()
        total += len(content)
        try:
            data[_input_key(index)] = content.decode("utf-8")
        except UnicodeDecodeError:
            binary[_input_key(index)] = base64.b64encode(content).decode()
    if total > CONFIGMAP_LIMIT:
        raise ValueError(
            f"task {run.task.name}: its inputs ({total} bytes) are too large for a ConfigMap; "
            "the site needs a shared volume (policy.kube.volume_claim and volume_path)"
        )
    if params.stdin is not None:
        data[STDIN_KEY] = params.stdin
    if not data and not binary:
        return None
    manifest = _object("ConfigMap", run, name)
    manifest["data"] = data
    if binary:
        manifest["binaryData"] = binary
    return manifest


def secret_manifest(run: TaskRun, name: str) -> dict[str, Any]:
    """The Secret holding the values of the secrets the task names, for this run only."""
    manifest = _object("Secret", run, name)
    manifest["type"] = "Opaque"
    manifest["data"] = {
        key: base64.b64encode(value.encode()).decode() for key, value in run.secrets.items()
    }
    return manifest


def _object(kind: str, run: TaskRun, name: str) -> dict[str, Any]:
    """A `v1` object of the run, in the site's namespace, labelled as ours."""
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": run.policy.kube.namespace,
            "labels": {**MANAGED_BY, "flotta-mqtt/task": _label_value(run.task.name)},
        },
    }


def _import_kubernetes() -> Any:
    try:
        import kubernetes
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return kubernetes


class KubeExecutor(Executor):
    """Runs each task as a Kubernetes Job.

    Where Jobs run is the site's (policy.kube, KubeSite): the API server is its `host` (a
    URL, no credentials), else a kubeconfig (`kubeconfig`, else `$KUBECONFIG`, else
    `~/.kube/config`), else the in-cluster service account when the worker runs in a pod;
    its `namespace` and `service_account` are the Job's. A task can set none of them, and
    runs only an image the site's policy allows.

    It uses the official `kubernetes` client (the `kube` extra), imported only when the
    executor is made. Per task it creates a `batch/v1` Job (one pod, never restarted, no
    retries: retries are the workflow's), polls the Job's status until it succeeds or fails,
    reads the pod's exit code and log, then deletes the Job (propagation Background) and what
    it created for it, whatever happened. A timeout or a cancellation deletes the Job early;
    the Job also carries `activeDeadlineSeconds` so the cluster stops it if the worker dies.

    Job files. A pod runs on a cluster node, not on the worker, so the task's working folder
    cannot be bind-mounted as the docker executor does:

    - by default the task's input job files travel in a ConfigMap made for the task (at most
      ~1 MiB in all) mounted read-only at /work (the pod's working directory), and the task
      may declare no outputs: nothing comes back from the pod but its log;
    - with the site's `volume_claim` (a PersistentVolumeClaim of a volume the worker also
      mounts, at `volume_path`, e.g. NFS), the worker copies the inputs into a folder of its
      own on that volume, the pod mounts that folder (subPath) read-write at /work, and the
      worker copies the folder back after the Job (links as links, never followed), so
      declared outputs are collected.

    The secrets a task names travel in a Secret made for the run, its STDIN in the run's
    ConfigMap (read by the command through `sh`), both deleted with its Job. Its mounts are
    `hostPath` volumes (paths on the cluster's node, checked against policy.mounts).

    Kubernetes merges a container's STDOUT and STDERR in one log: it is returned as STDOUT;
    STDERR carries only the executor's notes (why a Job failed).
    """

    name = "kube"

    def provides(self, policy: SitePolicy) -> frozenset[str]:
        return frozenset({"network", *(["gpu"] if policy.gpu else [])})  # the cluster's

    def __init__(self) -> None:
        self._kube = _import_kubernetes()  # fail when the worker starts, not at its first task

    def _api_client(self, site: KubeSite) -> Any:
        client, config = self._kube.client, self._kube.config
        if site.host:
            configuration = client.Configuration()
            configuration.host = site.host
            return client.ApiClient(configuration)
        in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ
        if site.kubeconfig is None and "KUBECONFIG" not in os.environ and in_cluster:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        kubeconfig = site.kubeconfig or os.environ.get("KUBECONFIG")
        return config.new_client_from_config(
            config_file=str(kubeconfig) if kubeconfig else None,
            context=site.context,
            persist_config=False,
        )

    def run(self, run: TaskRun) -> TaskResult:
        site = run.policy.kube
        if run.task.outputs and site.volume_claim is None:
            raise ValueError(
                f"task {run.task.name} declares outputs, but a kube task's files come back "
                "only through a shared volume, which this site has not set up "
                "(policy.kube.volume_claim and volume_path)"
            )
        name = job_name(run.label, nonce=str(time.time_ns()))
        job = job_manifest(run, name)  # the image and mounts checked before anything is made
        configmap = configmap_manifest(run, name)
        namespace = site.namespace
        api_client = self._api_client(site)
        batch = self._kube.client.BatchV1Api(api_client)
        core = self._kube.client.CoreV1Api(api_client)
        shared = site.volume_path / name if site.volume_path is not None else None
        made_configmap = made_secret = made_job = False
        try:
            if shared is not None:
                shutil.copytree(run.workdir, shared, symlinks=True)
                shared.chmod(0o777)  # the pod may run as any user
            if configmap is not None:
                core.create_namespaced_config_map(namespace, configmap)
                made_configmap = True
            if run.secrets:
                core.create_namespaced_secret(namespace, secret_manifest(run, name))
                made_secret = True
            batch.create_namespaced_job(namespace, job)
            made_job = True
            outcome = _watch(batch, site.poll_interval, namespace, name, run)
            pod = _job_pod(core, namespace, name)
            stdout = _pod_log(core, namespace, pod) if pod is not None else b""
            exit_code = _exit_code(pod)
            notes: list[str] = []
            timed_out = outcome.reason == "DeadlineExceeded"
            if outcome.state == "timeout":
                timed_out = True
                notes.append(f"[kube] job {name} timed out after {run.task.timeout} s")
            elif outcome.state == "cancelled":
                notes.append(f"[kube] job {name} cancelled")
            elif outcome.state == "failed":
                notes.append(f"[kube] job {name} failed: {outcome.reason}: {outcome.message}")
            if exit_code is None:
                exit_code = {"succeeded": 0, "failed": 1}.get(outcome.state, KILLED)
            if shared is not None and outcome.state == "succeeded":
                # A link the pod left (to /etc/passwd, say) would name the worker's own
                # file: it is copied as a link, which the outputs then refuse.
                shutil.copytree(shared, run.workdir, symlinks=True, dirs_exist_ok=True)
            stderr = "".join(f"{note}\n" for note in notes).encode()
            return TaskResult(exit_code, stdout, stderr, timed_out)
        finally:
            if made_job:
                self._delete(batch.delete_namespaced_job, name, namespace)
            if made_configmap:
                self._delete(core.delete_namespaced_config_map, name, namespace)
            if made_secret:
                self._delete(core.delete_namespaced_secret, name, namespace)
            if shared is not None:
                shutil.rmtree(shared, ignore_errors=True)
            api_client.close()

    def _delete(self, delete: Any, name: str, namespace: str) -> None:
        """Delete what the task made, dependents in the background; gone already is fine."""
        try:
            delete(name, namespace, propagation_policy="Background")
        except self._kube.client.exceptions.ApiException as exc:
            if exc.status != 404:
                log.warning("kube: could not delete %s/%s: %s", namespace, name, exc)


@dataclass
class _Outcome:
    state: str  # succeeded, failed, timeout, cancelled
    reason: str = ""
    message: str = ""


def _read(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A GET through the client, as plain JSON: independent of the client's model classes."""
    response = call(*args, _preload_content=False, **kwargs)
    return json.loads(response.data)


def _watch(batch: Any, poll: float, namespace: str, name: str, run: TaskRun) -> _Outcome:
    """Poll the Job's status until it ends, the task's timeout passes, or it is cancelled."""
    deadline = None if run.task.timeout is None else time.monotonic() + run.task.timeout
    while True:
        job = _read(batch.read_namespaced_job_status, name, namespace)
        outcome = _job_outcome(job.get("status") or {})
        if outcome is not None:
            return outcome
        if run.cancelled.is_set():
            return _Outcome("cancelled")
        wait = poll
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return _Outcome("timeout")
            wait = min(wait, left)
        if run.cancelled.wait(wait):
            return _Outcome("cancelled")


def _job_outcome(status: dict[str, Any]) -> _Outcome | None:
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        reason, message = condition.get("reason") or "", condition.get("message") or ""
        # Only the final conditions: SuccessCriteriaMet / FailureTarget come while pods
        # may still be terminating.
        if condition.get("type") == "Complete":
            return _Outcome("succeeded", reason, message)
        if condition.get("type") == "Failed":
            return _Outcome("failed", reason, message)
    # Older API servers may report the counts before (or without) the conditions.
    if status.get("succeeded") and not status.get("active"):
        return _Outcome("succeeded")
    if status.get("failed") and not status.get("active"):
        return _Outcome("failed", "PodFailed", "the Job's pod failed")
    return None


def _job_pod(core: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The Job's pod (the latest, should there be more), by the label the Job controller sets."""
    listing = _read(core.list_namespaced_pod, namespace, label_selector=f"job-name={name}")
    pods = [
        pod
        for pod in listing.get("items") or []
        if (pod.get("metadata") or {}).get("labels", {}).get("job-name") == name
    ]
    pods.sort(key=lambda pod: str(pod["metadata"].get("creationTimestamp") or ""))
    return pods[-1] if pods else None


def _exit_code(pod: dict[str, Any] | None) -> int | None:
    if pod is None:
        return None
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            terminated = (status.get("state") or {}).get("terminated")
            if terminated and terminated.get("exitCode") is not None:
                return int(terminated["exitCode"])
    return None


def _pod_log(core: Any, namespace: str, pod: dict[str, Any]) -> bytes:
    """The pod's log (STDOUT and STDERR merged by Kubernetes); none if it never started."""
    try:
        response = core.read_namespaced_pod_log(
            pod["metadata"]["name"], namespace, container=CONTAINER, _preload_content=False
        )
    except Exception as exc:  # e.g. 400: the container never started
        log.info("kube: no log for pod %s: %s", pod["metadata"].get("name"), exc)
        return b""
    data: bytes = response.data
    return data


register_executor("kube", KubeExecutor)
