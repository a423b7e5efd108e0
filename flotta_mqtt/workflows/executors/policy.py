"""A data site's policy: what the tasks a workbench sends may do on this site's worker.

A task is code from elsewhere: the site, not the workbench, says which images run, which
networks and host folders a container gets, where Kubernetes Jobs go, and which of the
site's secrets a task may have. Every executor consults one `SitePolicy` (the worker
config's `policy`), and its defaults allow nothing a site did not ask for. Which
executors a worker runs at all is its config's `executors` (none by default).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.model.run import Mount
from flotta_mqtt.model.workflow import SecretName

# The environment a task on the worker's own host starts from, besides HOME and TMPDIR
# (its folder): nothing of the worker's, whose environment holds its own secrets.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# What a worker unpacks of one workspace archive at most: a bound on its disk.
MAX_WORKSPACE_BYTES = 4 * 1024**3
MAX_WORKSPACE_MEMBERS = 100_000
NO_NETWORK = "none"  # a container's network mode when it requires none


class PolicyError(ValueError):
    """A task asks for what its site does not allow; the message names the setting."""


class SecretSource(BaseModel):
    """Where a secret's value is on the worker: a variable of its environment, or a file
    (its content, without a trailing newline)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, min_length=1)
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret comes from exactly one of `env` or `file`")
        return self


class HostMount(BaseModel):
    """A host folder whose contents container tasks may mount; read-only unless `writable`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    writable: bool = False


class KubeSite(BaseModel):
    """Where the site's Kubernetes Jobs run: its API server (`host`, else `kubeconfig` and
    `context`, else $KUBECONFIG or ~/.kube/config, else the worker pod's service account),
    namespace and service account, and the shared volume that carries job files both ways
    (`volume_claim`, mounted on the worker at `volume_path`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str | None = None  # an API server URL, no credentials (emulators, proxies)
    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str = "default"
    service_account: str | None = None
    volume_claim: str | None = None
    volume_path: Path | None = None
    poll_interval: float = Field(default=1.0, gt=0, le=60)  # between reads of a Job's status

    @model_validator(mode="after")
    def _volume(self) -> KubeSite:
        if (self.volume_claim is None) != (self.volume_path is None):
            raise ValueError("`volume_claim` and `volume_path` go together (a shared volume)")
        return self


class SitePolicy(BaseModel):
    """What tasks may do on this site; the defaults allow no image, network, mount or secret.

    - `images`: the container images docker and kube tasks may run, as written in the task
      (no registry or tag is filled in), each exact or a glob (`registry.example/team/*`;
      `*` also matches `/` and `:`). Empty, the default: no container task runs.
    - `default_image`: the image a container executor runs a task in that names none (it
      must be allowed by `images` too); without one such a task fails on this site.
    - `networks`: the Docker network a docker task that requires `network` is given (the
      first), e.g. `bridge`; other tasks get `none`. Without one the docker executor does
      not offer `network` (shell tasks have the host's, kube pods the cluster's).
    - `gpu`: whether tasks here may use the site's GPUs (offered as `gpu` to tasks that
      require it).
    - `mounts`: the host folders under which a task may mount a path (`mounts` in its
      params), read-only unless the folder is `writable`. Symbolic links in the path asked
      for are resolved before the check. A shell task runs as the worker's user with no
      isolation: its mounts are links, and the host's permissions are what guard them.
    - `kube`: where kube tasks run (KubeSite); a task setting any of it is refused.
    - `secrets`: name → where its value is on the worker (SecretSource). A task lists the
      names it needs in `secrets` and gets each as the environment variable of that name;
      naming one the site does not define fails the task. Their values never travel: the
      worker reads them when the task starts, and masks them as *** in its logs and error.
    - `base_env`: the environment a shell task starts from, with HOME and TMPDIR set to
      its folder, then its own `env` and secrets; nothing else of the worker's. Container
      tasks start from their image's environment, then their `env` and secrets.
    - `max_workspace_bytes`, `max_workspace_members`: the most a shipped workspace archive
      (python executor) unpacks to, in bytes and in members.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: list[str] = Field(default_factory=list)
    default_image: str | None = Field(default=None, min_length=1)
    networks: list[str] = Field(default_factory=list)
    gpu: bool = False
    mounts: list[HostMount] = Field(default_factory=list)
    kube: KubeSite = Field(default_factory=KubeSite)
    secrets: dict[SecretName, SecretSource] = Field(default_factory=dict)
    base_env: dict[str, str] = Field(default_factory=lambda: dict(BASE_ENV))
    max_workspace_bytes: int = Field(default=MAX_WORKSPACE_BYTES, gt=0)
    max_workspace_members: int = Field(default=MAX_WORKSPACE_MEMBERS, gt=0)

    def absolute(self) -> SitePolicy:
        """The policy with its host paths made absolute (against the working folder)."""
        kube = self.kube.model_copy(
            update={
                "kubeconfig": _absolute(self.kube.kubeconfig),
                "volume_path": _absolute(self.kube.volume_path),
            }
        )
        return self.model_copy(
            update={
                "mounts": [m.model_copy(update={"path": m.path.absolute()}) for m in self.mounts],
                "kube": kube,
                "secrets": {
                    name: source.model_copy(update={"file": _absolute(source.file)})
                    for name, source in self.secrets.items()
                },
            }
        )

    def check_image(self, task: str, image: str) -> None:
        if not any(fnmatch.fnmatchcase(image, pattern) for pattern in self.images):
            allowed = ", ".join(self.images) or "none"
            raise PolicyError(
                f"task {task}: image {image!r} is not allowed on this site "
                f"(policy.images: {allowed})"
            )

    def image(self, task: str, image: str | None) -> str:
        """The image a container runs the task in: its own or the site's default, allowed."""
        chosen = image or self.default_image
        if chosen is None:
            raise PolicyError(
                f"task {task} names no image, and this site has no policy.default_image"
            )
        self.check_image(task, chosen)
        return chosen

    def host_mount(self, task: str, source: str, writable: bool) -> Path:
        """The real host path to bind-mount for `source`, if a site folder allows it."""
        try:
            real = Path(source).resolve(strict=True)
        except OSError:
            raise PolicyError(f"task {task}: host path {source} to mount does not exist") from None
        inside = [m for m in self.mounts if real.is_relative_to(m.path.resolve())]
        if not inside:
            raise PolicyError(
                f"task {task}: host path {source} is not under a folder policy.mounts allows"
            )
        if writable and not any(m.writable for m in inside):
            raise PolicyError(
                f"task {task}: host path {source} may be mounted read-only only "
                "(no policy.mounts folder holding it is writable)"
            )
        return real

    def host_mounts(self, task: str, mounts: Iterable[Mount]) -> list[tuple[Mount, Path]]:
        """Each of a task's mounts with the real host path it shows, all checked first."""
        return [(mount, self.host_mount(task, mount.source, mount.writable)) for mount in mounts]

    def secret_values(self, task: str, names: Iterable[str]) -> dict[str, str]:
        """The values of the secrets a task names, read now; PolicyError for one unknown."""
        values = {}
        for name in names:
            source = self.secrets.get(name)
            if source is None:
                raise PolicyError(f"task {task}: this site defines no secret named {name!r}")
            values[name] = _read_secret(task, name, source)
        return values

    def host_env(self, workdir: Path, env: Mapping[str, str]) -> dict[str, str]:
        """The whole environment of a task run on the worker's host, in `workdir`."""
        return {**self.base_env, "HOME": str(workdir), "TMPDIR": str(workdir), **env}


def _read_secret(task: str, name: str, source: SecretSource) -> str:
    if source.env is not None:
        value = os.environ.get(source.env)
        if value is None:
            raise PolicyError(
                f"task {task}: secret {name!r} is not set (the worker has no ${source.env})"
            )
        return value
    assert source.file is not None  # one source or the other: the model's validator
    try:
        return source.file.read_text().rstrip("\r\n")
    except OSError as exc:
        raise PolicyError(
            f"task {task}: secret {name!r} is unreadable ({source.file}: {exc.strerror})"
        ) from None


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.absolute()


def mask(data: bytes, secrets: Iterable[str]) -> bytes:
    """`data` with every secret value in it replaced by ***, the longest values first."""
    for value in sorted({s for s in secrets if s}, key=len, reverse=True):
        data = data.replace(value.encode(), b"***")
    return data
