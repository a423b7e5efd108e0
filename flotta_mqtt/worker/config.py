"""A worker's settings: its name, broker, store, datasets, executors, site policy and limits."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flotta_mqtt import analytics as operations
from flotta_mqtt.analytics.categories import within_total
from flotta_mqtt.model import SafeId
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.workflows.executors.policy import SitePolicy


class WorkerConfig(BaseModel):
    """A worker's settings, from a YAML file, flags or FLOTTA_* variables."""

    model_config = ConfigDict(extra="forbid")

    name: SafeId
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    # project → its CSV/Parquet files, or {paths, min_group_size, types}
    datasets: dict[SafeId, operations.DatasetSpec] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    max_jobs: int = Field(default=2, ge=1, le=1024)
    plugins: list[str] = Field(default_factory=list)  # modules registering more operations
    # Where the worker keeps the jobs it holds and its unacknowledged results across a
    # restart; without one it remembers them only while it runs.
    state_dir: Path | None = None
    resend_interval: float = Field(default=5.0, gt=0)
    heartbeat_interval: float = Field(default=5.0, gt=0)
    # Workflow task executors this worker runs (shell, docker, kube, api). None by default:
    # a task is code sent from elsewhere, so a worker runs tasks only when told it may. A
    # task of a workflow names none of them: it runs with the first of shell, docker and
    # kube listed here that gives it what it requires (the list's order is the site's
    # preference).
    executors: list[str] = Field(default_factory=list)
    # Whether this worker runs code shipped by callers (`@distributed` functions, the
    # `python` executor). Off by default: without it the worker neither offers nor runs
    # that executor, even when `executors` names it.
    allow_code: bool = False
    # What the tasks those executors run may do here: images, networks, host mounts, kube
    # settings, secrets, their environment. Its defaults allow none of it.
    policy: SitePolicy = Field(default_factory=SitePolicy)
    initiator: bool = False  # the scheduler's own runner: holds no data

    @field_validator("datasets")
    @classmethod
    def _announceable(
        cls, datasets: dict[str, operations.DatasetSpec]
    ) -> dict[str, operations.DatasetSpec]:
        """The worker's presence carries every dataset's categories: their total is capped."""
        within_total(spec.categories for spec in datasets.values())
        return datasets
