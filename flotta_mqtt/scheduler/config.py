"""A scheduler node's settings, and the pace its service and core keep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from flotta_mqtt.model import SafeId
from flotta_mqtt.model.durations import MAX_DURATION, Duration
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

BURST = 500  # the most messages handled in one transaction
TICK = 0.25  # seconds between checks of timers: retries, timeouts, deadlines, re-sends
# A running artifact's progress goes out at most once per STATUS_INTERVAL seconds (what
# changed meanwhile is folded into the next status); a change of its state goes out at once.
STATUS_INTERVAL = 0.05
# Results are acknowledged within ACK_DELAY seconds, many per message, or at once when
# ACK_BATCH wait for one worker: an acknowledgement only stops re-sends, never urgent.
ACK_DELAY = 0.05
ACK_BATCH = 500
LISTED_JOBS = 300  # artifacts with at most this many jobs list each one in their status

# A PostgreSQL database (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB): a string, as a Path
# would fold its `//`.
PostgresUrl = Annotated[str, StringConstraints(pattern=r"^postgres(ql)?://")]


class SchedulerConfig(BaseModel):
    """A scheduler node's settings, from a YAML file, flags or FLOTTA_* variables."""

    model_config = ConfigDict(extra="forbid")

    name: SafeId = "scheduler"
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    # The SQLite file (the embedded default), or a PostgreSQL URL: then schedulers of one
    # name on that database stand by for one another, one leading (scheduler/lease.py).
    database: Annotated[PostgresUrl | Path, Field(union_mode="left_to_right")] = Path(
        "flotta-scheduler.db"
    )
    # Whether workbenches may fetch final products. On by default, as in the embedded demo;
    # turn it off on a node whose results must stay where they are.
    allow_download: bool = True
    resend_interval: float = Field(default=5.0, gt=0)
    # A running job whose worker sent no heartbeat for this long is treated as lost.
    heartbeat_grace: float = Field(default=30.0, gt=0)
    # Retries wait base * 2**(attempt - 1) seconds, at most `max`, with jitter.
    retry_backoff: float = Field(default=1.0, ge=0)
    retry_backoff_max: float = Field(default=60.0, ge=0)
    # Attempts an initiator job gets when its node is lost (it holds no data, so it moves).
    max_lost_attempts: int = Field(default=3, ge=1)
    # A scheduler just started waits this long for workers' retained presence before
    # failing an artifact whose project nobody seems to hold.
    worker_grace: float = Field(default=5.0, ge=0)
    # The operator's node registry (YAML): who holds which project's data and what each
    # node may do. Without one, nodes are believed as they announce themselves.
    registry: Path | None = None
    # Seconds an artifact that gives no deadline may take (a holder that never answers
    # fails it then, named); None: such artifacts may wait for ever.
    default_deadline: float | None = Field(default=7 * 24 * 3600.0, gt=0)
    # Quotas, checked at submission (a refused one is answered with the limit named).
    max_jobs_per_artifact: int = Field(default=1_000_000, ge=1)
    max_artifacts_in_flight: int = Field(default=10_000, ge=1)  # per workbench identity
    max_jobs_in_flight: int = Field(default=2_000_000, ge=1)  # per workbench identity
    run_initiator: bool = True  # run the initiator's jobs in this node (see flotta_mqtt.nodes)
    # The initiator's own broker identity (it reads its job topic like any worker); by
    # default the scheduler's settings under the initiator's name.
    initiator_broker: BrokerSettings | None = None
    initiator_plugins: list[str] = Field(default_factory=list)
    # Serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port); None: off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Client ids that may prune (requests/{client}/prune): the topic names the sender
    # only where broker identities make every client write under its own name.
    admins: list[SafeId] = Field(default_factory=list)
    # Prune artifacts finished longer ago than this (seconds, or `7d`), at start and then
    # periodically (see scheduler/retention.py); None: keep them until a prune request.
    prune_older_than: Annotated[Duration, Field(gt=0, le=MAX_DURATION)] | None = None
    # The projects this scheduler serves in its group (broker.group), named in the
    # directory for workbenches; empty: any project submitted to it (scheduler/groups.py).
    projects: list[SafeId] = Field(default_factory=list)

    @property
    def initiator(self) -> str:
        return f"{self.name}.initiator"

    @property
    def folder(self) -> Path:
        """Where the node keeps local state (the embedded initiator's): beside a SQLite
        database, else in the working directory's flotta-state."""
        if isinstance(self.database, Path):
            return self.database.parent
        return Path("flotta-state").absolute()

    @model_validator(mode="after")
    def _initiator_identity(self) -> Self:
        """The initiator never borrows the scheduler's identity: a broker naming sessions
        by user (use_username_as_clientid) would make the two take one session from each
        other for ever."""
        borrowed = self.initiator_broker is None and self.broker.username is not None
        if self.run_initiator and borrowed:
            raise ValueError(
                f"the embedded initiator needs its own broker identity ({self.initiator}): "
                "give initiator_broker (or the CLI's --initiator-password), "
                "or run_initiator: false"
            )
        return self
