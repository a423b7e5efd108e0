"""Handles on calls: what a `@distributed` function returns at once, and ways to wait on many.

A handle is settled by its session's resolver thread when the artifact status listing its
job says the job is final (statuses are retained MQTT messages pushed by the scheduler:
nothing polls). Its outcome is fetched from the resource store only when asked for, once.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from flotta_mqtt.functions import calls
from flotta_mqtt.protocol.messages import JobSummary, Resource

if TYPE_CHECKING:
    from flotta_mqtt.functions.session import Session

log = logging.getLogger(__name__)

T = TypeVar("T")


class RemoteError(Exception):
    """An exception raised by a call that cannot be rebuilt here as itself.

    Its class may not exist on this side, or it may not survive pickling; the type's
    qualified name, the message and the remote traceback text are kept, and the traceback
    is shown under the exception (as a note) when it is printed.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "", worker: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = traceback
        self.worker = worker
        if traceback:
            self.add_note(_note(traceback, worker))


class CallFailed(RuntimeError):
    """The call produced no outcome: not run, timed out, lost, cancelled, or unreadable.

    (A call whose function raised did produce one: `unwrap()` raises that exception.)
    `error_type` is the scheduler's or worker's name for the failure, e.g. `BindingError`,
    `TaskError`, `WorkerLost`, `Cancelled`.
    """

    def __init__(self, message: str, error_type: str = "", traceback: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.remote_traceback = traceback
        if traceback:
            self.add_note(_note(traceback, ""))


def _note(traceback: str, worker: str) -> str:
    where = f" on worker {worker}" if worker else ""
    return f"--- remote traceback{where} ---\n{traceback.rstrip()}"


class CallHandle(Generic[T]):
    """One call of a distributed function; returned at once, settled when its job is final."""

    def __init__(self, session: Session, function: str) -> None:
        self.function = function  # module.qualname
        self.artifact_id: str | None = None  # the batch it was submitted in
        self.task: str | None = None  # its task (job) name in that batch
        self._session = session
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._summary: JobSummary | None = None
        self._failure: CallFailed | None = None
        self._loaded: tuple[bool, Any] | None = None  # (raised?, value or exception)
        self._callbacks: list[Callable[[CallHandle[T]], None]] = []

    def __repr__(self) -> str:
        state = "done" if self.done() else (self._summary.state if self._summary else "pending")
        return f"<CallHandle {self.function} {self.artifact_id}/{self.task} {state}>"

    def done(self) -> bool:
        """Whether the call has finished (with a value, an exception, or a failure)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or `timeout` seconds pass; whether it is done."""
        return self._done.wait(timeout)

    def unwrap(self, timeout: float | None = None) -> T:
        """The call's return value; re-raises what it raised (see RemoteError, CallFailed).

        TimeoutError if it is not done within `timeout` seconds (the call goes on).
        """
        raised, value = self._outcome(timeout)
        if raised:
            raise value
        result: T = value
        return result

    result = unwrap  # the name concurrent.futures and arq use

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """What `unwrap()` would raise, or None if the call returned a value."""
        raised, value = self._outcome(timeout)
        return value if raised else None

    def job(self) -> JobSummary | None:
        """The call's job as the latest status lists it (worker, state, attempt...)."""
        return self._summary

    def logs(self, timeout: float | None = None) -> tuple[str, str]:
        """What the call printed on the worker: (stdout, stderr) of its last attempt.

        A stream the call wrote nothing to is "" (the worker stores only non-empty ones).
        """
        self._outcome(timeout)
        product = self._product()
        if product is None:
            return "", ""
        store = self._session.store
        logs = product.get("logs", {})
        stdout, stderr = (
            store.get(Resource.model_validate(logs[name]), self._folder()).decode(errors="replace")
            if name in logs
            else ""
            for name in ("stdout", "stderr")
        )
        return stdout, stderr

    def add_done_callback(self, callback: Callable[[CallHandle[T]], None]) -> None:
        """Call `callback(handle)` once done (at once if it is); it runs on a session thread."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    # --- settled by the session that made the call ------------------------------------

    def record_job(self, summary: JobSummary) -> None:
        """The call's job as a newer status lists it (the session's resolver calls this)."""
        self._summary = summary

    def settle(self, summary: JobSummary | None, failure: CallFailed | None) -> None:
        """Mark the call done, with its final job or a failure (its session calls this)."""
        with self._lock:
            if self._done.is_set():
                return
            if summary is not None:
                self._summary = summary
            self._failure = failure
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a done-callback of %r failed", self)

    # --- the outcome, fetched once ------------------------------------------------------

    def _outcome(self, timeout: float | None) -> tuple[bool, Any]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.function} call not done after {timeout} s")
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _product(self) -> dict[str, Any] | None:
        summary = self._summary
        if self._failure is not None or summary is None or summary.product is None:
            return None
        store = self._session.store
        product: dict[str, Any] = json.loads(store.get(summary.product, self._folder()))
        return product

    def _folder(self) -> str:
        """Where everything of the call's artifact is stored: no read of it goes elsewhere."""
        assert self.artifact_id is not None  # set when its batch was made
        return self._session.store.artifact_root(self.artifact_id)

    def _load(self) -> tuple[bool, Any]:
        if self._failure is not None:
            return True, self._failure
        try:
            product = self._product()
            if product is None:
                raise ValueError("its status lists no product (is the scheduler older?)")
            resource = Resource.model_validate(product["outputs"][calls.result_file(self.task)])
            outcome = calls.unseal(self._session.store.get(resource, self._folder()))
        except Exception as exc:
            return True, CallFailed(f"the outcome of {self.function} could not be read: {exc}")
        worker = outcome.worker or (self._summary.worker if self._summary else "")
        if outcome.kind == "value":
            import cloudpickle

            try:
                return False, cloudpickle.loads(outcome.value)
            except Exception as exc:
                return True, CallFailed(
                    f"the value {self.function} returned on {worker} cannot be unpickled "
                    f"here: {type(exc).__name__}: {exc}"
                )
        return True, _rebuild(outcome, worker)


def _rebuild(outcome: calls.Outcome, worker: str) -> BaseException:
    """The remote exception as itself when it unpickles here, else a RemoteError."""
    if outcome.exception is not None:
        import cloudpickle

        try:
            exc = cloudpickle.loads(outcome.exception)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.add_note(_note(outcome.traceback, worker))
            return exc
    return RemoteError(outcome.type, outcome.message, outcome.traceback, worker)


# --- many handles ------------------------------------------------------------------------


def as_completed(
    handles: Iterable[CallHandle[T]], timeout: float | None = None, progress: bool = False
) -> Iterator[CallHandle[T]]:
    """Yield the handles as their calls finish; TimeoutError if not all do within `timeout`."""
    pending = list(handles)
    finished: queue.SimpleQueue[CallHandle[T]] = queue.SimpleQueue()
    for handle in pending:
        handle.add_done_callback(finished.put)
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = _Progress(len(pending)) if progress else None
    try:
        for _ in range(len(pending)):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                handle = finished.get(timeout=remaining)
            except queue.Empty:
                left = sum(1 for h in pending if not h.done())
                message = f"{left} of {len(pending)} calls not done after {timeout} s"
                raise TimeoutError(message) from None
            if bar is not None:
                bar.advance()
            yield handle
    finally:
        if bar is not None:
            bar.close()


def gather(
    handles: Iterable[CallHandle[T]],
    timeout: float | None = None,
    progress: bool = False,
    return_exceptions: bool = False,
) -> list[Any]:
    """The values of all calls, in the order given.

    Raises the first (in that order) exception a call raised, unless `return_exceptions`,
    which puts exceptions in the list in their place. Outcomes are fetched from the store
    while other calls still run, a few at a time.
    """
    ordered = list(handles)
    with ThreadPoolExecutor(8, thread_name_prefix="flotta-gather") as fetch:
        loading = [
            fetch.submit(handle._outcome, 0)
            for handle in as_completed(ordered, timeout=timeout, progress=progress)
        ]
        for future in loading:
            future.result()
    results: list[Any] = []
    for handle in ordered:
        raised, value = handle._outcome(0)
        if raised and not return_exceptions:
            raise value
        results.append(value)
    return results


class _Progress:
    """A live rich progress bar of calls done out of the total."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("calls", total=total)
        self._progress.start()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()
