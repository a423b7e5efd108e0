"""A scheduler node as `flotta-mqtt scheduler` runs it: the scheduler service and, unless
turned off, the worker agent that runs its initiator's jobs in the same process.

It sits above both parts so that neither imports the other.
"""

from __future__ import annotations

import logging
import threading

from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.lease import take_identity
from flotta_mqtt.scheduler.service import Scheduler
from flotta_mqtt.transport import BusError, FailureHandler
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

log = logging.getLogger(__name__)


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
        state_dir=config.folder / f"{config.initiator}.state",
        resend_interval=config.resend_interval,
        heartbeat_interval=min(5.0, config.heartbeat_grace / 3),
    )


class SchedulerNode:
    """A scheduler and its embedded initiator (if `config.run_initiator`), started and
    stopped together. Each has its own identity (the initiator's is NAME.initiator), so
    neither ever finds the other holding it.

    On PostgreSQL, where schedulers of one name stand by for one another, `start()` returns
    at once and a thread waits to lead, then starts both (a standby touches neither
    identity before: the leader holds them). Their identities may still be held by the
    leader just gone for a moment (a cut-off one stopping): see take_identity.
    """

    def __init__(self, config: SchedulerConfig, on_failure: FailureHandler | None = None) -> None:
        self.config = config
        self.scheduler = Scheduler(config, on_failure)
        self.initiator = (
            WorkerAgent(initiator_config(config), on_failure) if config.run_initiator else None
        )
        self._on_failure = on_failure
        self._stopping = threading.Event()
        self._standby: threading.Thread | None = None
        self._started = False

    def start(self, wait: float | None = 10.0) -> SchedulerNode:
        """Raises IdentityInUse, having started nothing, if another process holds the
        scheduler's identity or its initiator's (on PostgreSQL, once it leads: to
        `on_failure`)."""
        if self.scheduler.lease is None:
            self._start_parts(wait)
        else:
            self._standby = threading.Thread(
                target=self._lead, args=(wait,), name="standby", daemon=True
            )
            self._standby.start()
        return self

    def _check(self) -> None:
        self.scheduler.bus.check()
        if self.initiator is not None:
            self.initiator.bus.check()

    def _start_parts(self, wait: float | None) -> None:
        self._check()
        self._started = True
        self.scheduler.start(wait=wait)
        if self.initiator is not None:
            self.initiator.start(wait=wait)

    def _lead(self, wait: float | None) -> None:
        """The standby's thread: wait to lead, then for the identities, then start."""
        if not self.scheduler.lead(self._stopping):
            return
        try:
            take_identity(self._check, self.config.broker.keepalive)
            self._start_parts(wait)
        except BusError as exc:
            self._fail(exc)
        except Exception as exc:  # it leads, but cannot serve: say so, as a bus giving up
            log.exception("scheduler: leads, but could not start")
            self._fail(BusError(f"leads, but could not start: {exc}"))

    def _fail(self, error: BusError) -> None:
        if self._on_failure is not None:
            self._on_failure(error)

    def stop(self) -> None:
        self._stopping.set()
        if self._standby is not None:
            self._standby.join()
        if self.initiator is not None and self._started:
            self.initiator.stop()
        self.scheduler.stop()
