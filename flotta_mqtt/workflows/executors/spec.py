"""Where a `run` task's definition (model/run.py) meets the site's policy."""

from __future__ import annotations

from pathlib import Path

from flotta_mqtt.model.run import Mount, RunParams
from flotta_mqtt.workflows.executors.policy import SitePolicy


def host_mounts(task: str, params: RunParams, policy: SitePolicy) -> list[tuple[Mount, Path]]:
    """Each mount with the real host path it shows; PolicyError for one the site refuses."""
    return [
        (mount, policy.host_mount(task, mount.source, mount.writable)) for mount in params.mounts
    ]
