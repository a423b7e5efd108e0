"""What a `run` task runs, the same for every executor that may run it.

A workflow says what to run; the worker's site says how (shell, docker or kube), and each
executor maps this one definition onto its own terms:

- `command` (an argv, replacing a container image's entrypoint) or `shell` (a script run
  as `sh -c`), or neither: the `image`'s own entrypoint, which only a container runs;
- `args`, appended to the command (to the script as $1..., to the entrypoint);
- `image`: the container image a container executor runs it in (a site may give a
  default); a process on the worker's own host runs the command there;
- `stdin`, bounded by MAX_STDIN_BYTES: larger input goes in an input job file;
- `mounts`: host folders the site allows, seen at a path inside the task's working folder,
  read-only unless the task asks otherwise and the site allows it;
- `resources`: CPUs, memory and GPUs for a container (a process on the host is not limited).

The task's `env`, `secrets`, `inputs` and `outputs` are the Task's own fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.model.workflow import JobFile, Task

# What STDIN a task may carry in its definition, which travels in every job message and
# (on kube) in a ConfigMap: more belongs in a job file.
MAX_STDIN_BYTES = 64 * 1024
WORKDIR = "/work"  # where a container sees the task's working folder, its working directory
MAX_MOUNTS = 32
# Settings that are a site's (its policy.kube, the container's network and user), and
# were a task's before tasks knew nothing of executors: named in a task, a clear refusal.
SITE_SETTINGS = (
    "host",
    "kubeconfig",
    "context",
    "namespace",
    "service_account",
    "volume_claim",
    "volume_path",
    "poll_interval",
    "network",
    "user",
    "pull",
    "workdir_mount",
    "image_pull_policy",
)


class Mount(BaseModel):
    """A host folder (or file) shown to the task at `target`, inside its working folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(pattern=r"^/", max_length=4096)  # on the worker's host
    target: JobFile  # relative to the task's working folder
    writable: bool = False


class Resources(BaseModel):
    """What a container may use: `cpus` (cores), `memory_mb`, `gpus` (requires `gpu`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float | None = Field(default=None, gt=0, le=1024)
    memory_mb: int | None = Field(default=None, gt=0, le=16 * 1024 * 1024)
    gpus: int = Field(default=0, ge=0, le=64)


class RunParams(BaseModel):
    """The params of a `run` task: what it runs, whatever runs it (this module's docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(default=None, min_length=1, max_length=512)
    command: list[str] | None = Field(default=None, min_length=1)
    shell: str | None = None
    args: list[str] = Field(default_factory=list)
    stdin: str | None = None
    mounts: list[Mount] = Field(default_factory=list, max_length=MAX_MOUNTS)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="before")
    @classmethod
    def _no_site_settings(cls, data: Any) -> Any:
        """Where and how a task runs is its site's to say: a task naming it is told so."""
        if isinstance(data, dict):
            taken = [key for key in SITE_SETTINGS if key in data]
            if taken:
                raise ValueError(
                    f"{', '.join(taken)}: where and how tasks run is the site's to set "
                    "(policy in the worker's config), not a task's"
                )
        return data

    @model_validator(mode="after")
    def _coherent(self) -> RunParams:
        if self.command is not None and self.shell is not None:
            raise ValueError("give at most one of `command` (argv list) or `shell` (a string)")
        if self.command is None and self.shell is None and self.image is None:
            raise ValueError(
                "give `command` (argv list) or `shell` (a string), or an `image` whose "
                "entrypoint runs"
            )
        size = len(self.stdin.encode()) if self.stdin is not None else 0
        if size > MAX_STDIN_BYTES:
            raise ValueError(
                f"`stdin` is {size} bytes, more than {MAX_STDIN_BYTES}: "
                "put larger input in a job file (`inputs`) and read it from there"
            )
        targets = [mount.target for mount in self.mounts]
        if len(set(targets)) < len(targets):
            raise ValueError("each mount needs a `target` of its own")
        return self

    def argv(self) -> list[str] | None:
        """What to run, with its args; None to run a container image's entrypoint (given
        `args` as its arguments)."""
        if self.command is not None:
            return [*self.command, *self.args]
        if self.shell is not None:
            return ["sh", "-c", self.shell, "sh", *self.args]
        return None


def needs(task: Task, params: RunParams) -> None:
    """Refuse a task that needs what it does not require: routing goes by `requires`."""
    if params.argv() is None and "container" not in task.requires:
        raise ValueError(
            f"task {task.name} runs its image's entrypoint (no `command` or `shell`), which "
            "only a container does: add `requires: [container]`"
        )
    if params.resources.gpus and "gpu" not in task.requires:
        raise ValueError(f"task {task.name} asks for GPUs: add `requires: [gpu]`")
    files = [*task.inputs, *task.outputs]
    clashes = sorted(
        f"{mount.target} and {path}"
        for mount in params.mounts
        for path in files
        if _overlap(mount.target, path)
    )
    if clashes:
        raise ValueError(
            f"task {task.name}: a mount would hide or hold its job files: {', '.join(clashes)}"
        )


def _overlap(a: str, b: str) -> bool:
    """Whether one relative path is the other or inside it."""
    first, second = a.split("/"), b.split("/")
    shorter = min(len(first), len(second))
    return first[:shorter] == second[:shorter]
