"""A scheduler node as `flotta-mqtt scheduler` runs it: the scheduler service and, unless
turned off, the worker agent that runs its initiator's jobs in the same process.

It sits above both parts so that neither imports the other.
"""

from __future__ import annotations

from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.service import Scheduler
from flotta_mqtt.transport import FailureHandler
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig


def initiator_config(config: SchedulerConfig) -> WorkerConfig:
    """The embedded initiator's settings: a worker that holds no data, under the
    initiator's name, beating often enough that the scheduler's grace never loses it."""
    return WorkerConfig(
        name=config.initiator,
        broker=config.initiator_broker or config.broker,
        storage=config.storage,
        initiator=True,
        max_jobs=4,
        plugins=config.initiator_plugins,
        state_dir=config.database.parent / f"{config.initiator}.state",
        resend_interval=config.resend_interval,
        heartbeat_interval=min(5.0, config.heartbeat_grace / 3),
    )


class SchedulerNode:
    """A scheduler and its embedded initiator (if `config.run_initiator`), started and
    stopped together. Each has its own identity (the initiator's is NAME.initiator), so
    neither ever finds the other holding it."""

    def __init__(self, config: SchedulerConfig, on_failure: FailureHandler | None = None) -> None:
        self.config = config
        self.scheduler = Scheduler(config, on_failure)
        self.initiator = (
            WorkerAgent(initiator_config(config), on_failure) if config.run_initiator else None
        )

    def start(self, wait: float | None = 10.0) -> SchedulerNode:
        """Raises IdentityInUse, having started nothing, if another process holds the
        scheduler's identity or its initiator's."""
        self.scheduler.bus.check()
        if self.initiator is not None:
            self.initiator.bus.check()
        self.scheduler.start(wait=wait)
        if self.initiator is not None:
            self.initiator.start(wait=wait)
        return self

    def stop(self) -> None:
        if self.initiator is not None:
            self.initiator.stop()
        self.scheduler.stop()
