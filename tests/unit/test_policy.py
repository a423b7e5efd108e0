"""The site policy on its own, no broker: what a site allows, what a task may name, how
secrets are read and masked, and how outputs are read without following a link.

The runs through a worker, on a real mosquitto and real containers, are in
tests/integration/test_site_policy.py and the executors' own integration tests.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import typer
import yaml
from helpers import task_job
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flotta_mqtt.cli.settings import node_config
from flotta_mqtt.model import Task
from flotta_mqtt.model.run import SITE_SETTINGS, RunParams
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.config import WorkerConfig
from flotta_mqtt.workflows.executors import (
    PolicyError,
    SitePolicy,
    TaskError,
    TaskRunner,
    check_task,
)
from flotta_mqtt.workflows.executors.policy import BASE_ENV, HostMount, KubeSite, mask
from flotta_mqtt.workflows.executors.runner import read_output

# --- what a site allows ---------------------------------------------------------------------


def test_the_default_policy_allows_no_image_network_mount_or_secret(tmp_path: Path) -> None:
    policy = SitePolicy()
    with pytest.raises(PolicyError, match=r"image 'busybox' is not allowed.*policy.images: none"):
        policy.check_image("t", "busybox")
    with pytest.raises(PolicyError, match=r"task t names no image, and this site has no policy"):
        policy.image("t", None)
    assert not policy.networks and not policy.gpu
    with pytest.raises(PolicyError, match=r"not under a folder policy\.mounts allows"):
        policy.host_mount("t", str(tmp_path), writable=False)
    with pytest.raises(PolicyError, match="defines no secret named 'TOKEN'"):
        policy.secret_values("t", ["TOKEN"])
    assert policy.kube == KubeSite()  # the cluster's defaults: namespace default, no volume


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example/team/app:1", True),
        ("registry.example/team/sub/app@sha256:ab", True),  # `*` crosses `/` and `:`
        ("registry.example.evil/team/app:1", False),
        ("registry.example/other/app:1", False),
        ("python:3.12-slim", True),
        ("python:latest", False),
        ("docker.io/library/python:3.12", False),  # as written: no registry filled in
        ("localhost/flotta-bb:test", True),
        ("localhost/flotta-bb:test2", False),
    ],
)
def test_images_match_exactly_or_by_glob_as_written(image: str, allowed: bool) -> None:
    policy = SitePolicy(
        images=["registry.example/team/*", "python:3.1?-slim", "localhost/flotta-bb:test"]
    )
    if allowed:
        policy.check_image("t", image)
    else:
        with pytest.raises(PolicyError, match="is not allowed on this site"):
            policy.check_image("t", image)


def test_a_task_without_an_image_runs_in_the_sites_default_if_allowed() -> None:
    policy = SitePolicy(images=["bb:*"], default_image="bb:1")
    assert policy.image("t", None) == "bb:1"
    assert policy.image("t", "bb:2") == "bb:2"
    with pytest.raises(PolicyError, match="image 'evil:1' is not allowed"):
        policy.image("t", "evil:1")
    with pytest.raises(PolicyError, match="image 'other:1' is not allowed"):
        SitePolicy(images=["bb:*"], default_image="other:1").image("t", None)


def test_host_mounts_only_under_allowed_folders_links_resolved(tmp_path: Path) -> None:
    data, shared, private = tmp_path / "data", tmp_path / "shared", tmp_path / "private"
    for folder in (data / "set", shared, private):
        folder.mkdir(parents=True)
    (data / "escape").symlink_to(private)  # a link inside an allowed folder, to outside
    (data / "inside").symlink_to(data / "set")
    policy = SitePolicy(mounts=[HostMount(path=data), HostMount(path=shared, writable=True)])
    assert policy.host_mount("t", str(data / "set"), writable=False) == data / "set"
    assert policy.host_mount("t", str(data / "inside"), writable=False) == data / "set"
    assert policy.host_mount("t", str(shared), writable=True) == shared
    with pytest.raises(PolicyError, match="may be mounted read-only only"):
        policy.host_mount("t", str(data / "set"), writable=True)
    for refused in (data / "escape", private, tmp_path, data / ".." / "private"):
        with pytest.raises(PolicyError, match=r"not under a folder policy\.mounts allows"):
            policy.host_mount("t", str(refused), writable=False)
    with pytest.raises(PolicyError, match="does not exist"):
        policy.host_mount("t", str(data / "absent"), writable=False)


def test_a_tasks_mounts_are_checked_against_the_policy_before_anything_runs(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").mkdir()
    policy = SitePolicy(mounts=[HostMount(path=tmp_path / "data")])
    mount = {"source": str(tmp_path / "data"), "target": "data"}
    params = RunParams.model_validate({"shell": ":", "mounts": [mount]})
    assert policy.host_mounts("t", params.mounts) == [(params.mounts[0], tmp_path / "data")]
    for refused, reason in [
        ({"source": "/etc", "target": "etc"}, "host path /etc is not under a folder"),
        ({**mount, "writable": True}, "may be mounted read-only only"),
    ]:
        refusing = RunParams.model_validate({"shell": ":", "mounts": [refused]})
        with pytest.raises(PolicyError, match=reason):
            policy.host_mounts("t", refusing.mounts)
    with pytest.raises(ValidationError, match="a `target` of its own"):
        RunParams.model_validate({"shell": ":", "mounts": [mount, {**mount, "source": "/srv"}]})


@pytest.mark.parametrize(
    "setting",
    ["kubeconfig", "namespace", "context", "host", "service_account", "volume_claim", "network"],
)
def test_a_task_setting_where_it_runs_is_refused_by_name(setting: str) -> None:
    assert set(KubeSite.model_fields) <= set(SITE_SETTINGS), "each of the site's named"
    task = Task(name="k", params={"image": "bb:1", "shell": ":", setting: "attacker"})
    with pytest.raises(ValueError, match=rf"{setting}: where and how tasks run is the site's"):
        check_task(task)


# --- the site's config ----------------------------------------------------------------------


def test_the_policy_comes_from_the_workers_yaml_with_paths_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "worker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "w0",
                "executors": ["docker", "kube"],
                "policy": {
                    "images": ["registry.example/*"],
                    "networks": ["bridge"],
                    "mounts": [{"path": "data", "writable": True}],
                    "kube": {"kubeconfig": "kube/config", "namespace": "tasks"},
                    "secrets": {"DB_PASSWORD": {"env": "SITE_DB"}, "TOKEN": {"file": "token"}},
                    "max_workspace_bytes": 1000,
                },
            }
        )
    )
    policy = node_config(WorkerConfig, config, {}).policy
    assert policy.images == ["registry.example/*"]
    assert policy.mounts == [HostMount(path=tmp_path / "data", writable=True)]
    assert policy.kube.kubeconfig == tmp_path / "kube" / "config"
    assert policy.kube.namespace == "tasks"
    assert policy.secrets["TOKEN"].file == tmp_path / "token"
    assert (policy.max_workspace_bytes, policy.base_env) == (1000, BASE_ENV)
    config.write_text(yaml.safe_dump({"name": "w0", "policy": {"secrets": {"X": {}}}}))
    with pytest.raises(typer.Exit):
        node_config(WorkerConfig, config, {})
    assert "exactly one of `env` or `file`" in capsys.readouterr().err
    assert WorkerConfig(name="w0").policy == SitePolicy()


# --- secrets --------------------------------------------------------------------------------


def test_secrets_come_from_the_workers_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SITE_DB", "s3cr3t-env")
    (tmp_path / "token").write_text("s3cr3t-file\n")
    policy = SitePolicy.model_validate(
        {
            "secrets": {
                "DB": {"env": "SITE_DB"},
                "TOKEN": {"file": str(tmp_path / "token")},
                "UNSET": {"env": "SITE_ABSENT"},
                "LOST": {"file": str(tmp_path / "absent")},
            }
        }
    )
    assert policy.secret_values("t", ["DB", "TOKEN"]) == {
        "DB": "s3cr3t-env",
        "TOKEN": "s3cr3t-file",  # without the file's trailing newline
    }
    assert policy.secret_values("t", []) == {}
    monkeypatch.delenv("SITE_ABSENT", raising=False)
    with pytest.raises(PolicyError, match=r"secret 'UNSET' is not set \(the worker has no \$SITE"):
        policy.secret_values("t", ["UNSET"])
    with pytest.raises(PolicyError, match="secret 'LOST' is unreadable"):
        policy.secret_values("t", ["LOST"])
    with pytest.raises(PolicyError, match="defines no secret named 'OTHER'"):
        policy.secret_values("t", ["DB", "OTHER"])


def test_a_task_names_secrets_never_their_values() -> None:
    task = Task(name="t", params={"shell": "true"}, secrets=["DB_PASSWORD"])
    assert task.model_dump()["secrets"] == ["DB_PASSWORD"]
    assert "secrets" not in Task(name="t", params={"shell": "true"}).model_dump()
    with pytest.raises(ValidationError, match="named both in `env` and in `secrets`"):
        Task(name="t", params={"shell": "true"}, env={"DB": "x"}, secrets=["DB"])
    for bad in ("1ABC", "A-B", "A B", "A=B", ""):
        with pytest.raises(ValidationError, match="secrets"):
            Task(name="t", params={"shell": "true"}, secrets=[bad])


SECRET_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="*", blacklist_categories=("Cs",)), min_size=1
)


@settings(max_examples=200)
@given(
    secrets=st.lists(SECRET_TEXT, max_size=4),
    pieces=st.lists(st.one_of(st.text(max_size=8), SECRET_TEXT), max_size=8),
)
def test_masking_leaves_no_secret_value(secrets: list[str], pieces: list[str]) -> None:
    """Whatever a task prints, around and across its secrets, none survives masking."""
    data = "".join(pieces + secrets).encode()
    masked = mask(data, secrets)
    for secret in secrets:
        assert secret.encode() not in masked


def test_masking_keeps_what_is_not_a_secret() -> None:
    assert mask(b"user=ann pw=hunter2 pw2=hunter22", ["hunter2", "hunter22", ""]) == (
        b"user=ann pw=*** pw2=***"
    )


# --- a task's environment -------------------------------------------------------------------


def test_a_host_task_starts_from_the_sites_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOTTA_PASSWORD", "worker-password")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-key")
    env = SitePolicy().host_env(tmp_path, {"GREETING": "hi", "LANG": "fr_FR.UTF-8"})
    assert env == {
        "PATH": BASE_ENV["PATH"],
        "LANG": "fr_FR.UTF-8",  # the task's own env comes last
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "GREETING": "hi",
    }
    assert SitePolicy(base_env={}).host_env(tmp_path, {}) == {
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
    }


# --- outputs ----------------------------------------------------------------------------------


def test_an_output_is_read_only_as_a_regular_file_inside_the_folder(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.txt").write_text("the worker's own file")
    work = tmp_path / "work"
    (work / "real").mkdir(parents=True)
    (work / "real" / "ok.txt").write_text("produced")
    (work / "link.txt").symlink_to(host / "secret.txt")
    (work / "hostdir").symlink_to(host)
    (work / "inner.txt").symlink_to(work / "real" / "ok.txt")  # even a link inside
    (work / "real" / "deeper").symlink_to(host)
    os.mkfifo(work / "pipe")
    assert read_output("t", work, "real/ok.txt") == b"produced"
    for path, part in [
        ("link.txt", "link.txt"),
        ("hostdir/secret.txt", "hostdir"),
        ("inner.txt", "inner.txt"),
        ("real/deeper/secret.txt", "deeper"),
    ]:
        with pytest.raises(TaskError, match=rf"output {path} is, or is inside, .*link \({part}\)"):
            read_output("t", work, path)
    with pytest.raises(TaskError, match="output pipe is not a regular file"):
        read_output("t", work, "pipe")  # and reading it does not hang: no writer ever comes
    with pytest.raises(TaskError, match="did not produce its output real/absent"):
        read_output("t", work, "real/absent")
    with pytest.raises(TaskError, match="output real is not a regular file"):
        read_output("t", work, "real")


# --- what a worker offers `run` tasks, and which executor runs one ---------------------------


def test_a_workers_features_are_what_its_executors_give_on_its_site(tmp_path: Path) -> None:
    store = ResourceStore(str(tmp_path / "store"))
    assert TaskRunner(store, ["shell"]).features() == ["network"], "the host's own network"
    assert TaskRunner(store, ["docker"]).features() == [], "no network unless the site names one"
    site = SitePolicy(networks=["bridge"], gpu=True)
    assert TaskRunner(store, ["docker"], site).features() == ["gpu", "network"]
    assert TaskRunner(store, ["api"], site).features() == [], "api runs no `run` tasks"


def test_a_worker_runs_a_task_only_with_an_executor_meeting_its_requirements(
    tmp_path: Path,
) -> None:
    """A job forged on a worker's topic, past the scheduler's routing: refused, not run."""
    witness = tmp_path / "ran"
    store = ResourceStore(str(tmp_path / "store"))
    task = Task(
        name="boxed",
        requires=["container"],
        params={"image": "bb:1", "shell": f"touch {witness}"},
    )
    with pytest.raises(TaskError, match="worker n runs no tasks that require container"):
        TaskRunner(store, ["shell"]).run(task_job(task), "n", threading.Event())
    assert not witness.exists()
