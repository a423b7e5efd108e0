"""The python executor: runs `@distributed` calls in per-workspace processes on a worker.

What a task gets and how it ends: PythonExecutor's docstring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flotta_mqtt.functions import workspace as workspaces
from flotta_mqtt.functions._child import recv_frame, send_frame
from flotta_mqtt.functions.calls import CallParams
from flotta_mqtt.protocol.messages import Resource
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.workflows.executors.base import (
    Executor,
    Site,
    TaskResult,
    TaskRun,
    register_executor,
)
from flotta_mqtt.workflows.executors.policy import SitePolicy

log = logging.getLogger(__name__)

_ZYGOTE = "from flotta_mqtt.functions._child import zygote; zygote()"
KEPT_WORKSPACES = 4  # workspaces whose idle call processes are kept, most recent first
NOT_ALLOWED = b"this worker does not run shipped code: set allow_code: true in its config to let it"


class _Stopped(Exception):
    """The call was cancelled or ran out of time before it finished."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("timed out" if timed_out else "cancelled")
        self.timed_out = timed_out


class _Zygote:
    """The warm interpreter call processes are forked from; restarted if it dies."""

    def __init__(self, folder: Path) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_root = str(Path(__file__).resolve().parents[3])
        python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            pass_fds=[theirs.fileno()],
            env={
                **os.environ,
                "FLOTTA_ZYGOTE_FD": str(theirs.fileno()),
                "PYTHONPATH": python_path,
            },
            cwd=folder,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for its imports to finish (it says so once, first thing on its socket)."""
        self.sock.settimeout(timeout)
        try:
            said = self.sock.recv(64)
        finally:
            self.sock.settimeout(None)
        if said != b"ready":
            raise RuntimeError("the call-process zygote did not start")

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self, spec: dict[str, Any]) -> tuple[int, socket.socket]:
        """A new call process for `spec`: its pid and the socket to talk to it."""
        import json

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self.lock:
                socket.send_fds(self.sock, [json.dumps(spec).encode()], [theirs.fileno()])
                reply = self.sock.recv(4096)
        finally:
            theirs.close()
        if not reply:
            ours.close()
            raise RuntimeError("the call-process zygote exited")
        return int(json.loads(reply)["pid"]), ours

    def close(self) -> None:
        self.sock.close()  # it exits when its socket closes
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(eq=False)  # compared and hashed by identity: kept in sets
class _Process:
    """One call process: serves one workspace, one call at a time."""

    pid: int
    sock: socket.socket
    workspace: str

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # it leads its own process group
        self.sock.close()

    def send(self, request: dict[str, Any]) -> None:
        send_frame(self.sock, request)

    def wait(self, cancelled: threading.Event, deadline: float | None) -> dict[str, Any] | None:
        """The reply to the call sent; None if the process died meanwhile."""
        while True:
            if cancelled.is_set():
                raise _Stopped(timed_out=False)
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise _Stopped(timed_out=True)
            readable, _, _ = select.select([self.sock], [], [], wait)
            if readable:
                return recv_frame(self.sock)


class PythonExecutor(Executor):
    """Runs one call per task in a kept call process of the call's workspace.

    Shipped code runs only on a worker whose config says `allow_code: true`: the agent does
    not even create this executor otherwise, and the executor refuses every call until the
    agent has set it up with that permission. Call processes run as the worker's own user,
    with its store and broker settings for nested calls: allowing code means trusting the
    callers with whatever the worker itself may do.

    A call process serves one workspace (fetched from the store once per hash, unpacked into
    `{state_dir or a private temporary folder}/workspaces/{sha256}/`, first on its
    `sys.path`) and runs one call at a time; processes are forked from a warm zygote
    (see `flotta_mqtt.functions._child`) and kept between calls, so the interpreter's
    start-up is paid once per process, not per call. How many calls of one function run at
    once on this worker is its `threads` parameter, bounded by the worker's `max_jobs`
    (the agent never runs more jobs than that, whatever the task asks).

    A call's timeout counts from when this worker starts the job, waiting for a `threads`
    slot included; on timeout or cancel the call's process (and whatever it started) is
    killed and never reused. A call that raises is a successful task: its outcome carries
    the exception. A failed task is a call that could not run or finish (killed, timed out,
    its process died, its workspace unreadable), which the scheduler retries per the task's
    `retries`; a worker lost mid-call is the scheduler's to move (the task is relocatable).

    Declared requirements are checked against the worker's installed packages and reported
    (in the worker's log and at the top of each call's stderr); the worker does not install
    them: what a worker's interpreter holds is its operator's choice, not a caller's.
    """

    name = "python"

    def __init__(self) -> None:
        self.allow_code = False
        self.node = ""
        self._env: dict[str, str] = {}
        self._store: ResourceStore | None = None
        self._folder: Path | None = None
        self._temporary: Path | None = None
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        self._zygote_lock = threading.Lock()
        self._idle: OrderedDict[str, list[_Process]] = OrderedDict()  # workspace → idle
        self._busy: set[_Process] = set()
        self._slots: dict[tuple[str, str, int], threading.BoundedSemaphore] = {}
        self._unpacking: dict[str, threading.Lock] = {}
        self._reports: dict[str, str] = {}
        self._closed = False
        self.warm = threading.Event()  # set once the zygote has imported what calls need

    def setup(self, site: Site) -> None:
        """Who the worker is, where things are, whether code may run.

        The zygote starts in the background now, so the first call does not wait for an
        interpreter to import flotta_mqtt.
        """
        node, broker, storage = site.node, site.broker, site.storage
        self.allow_code = site.allow_code
        self.node = node
        self._store = ResourceStore.of(storage, broker.group)
        if site.state_dir is not None:
            self._folder = Path(site.state_dir) / "python"
        else:
            # Private (mode 0700): a shared temporary folder would let another local user
            # plant code under a hash this worker is about to run.
            self._temporary = self._folder = Path(tempfile.mkdtemp(prefix=f"flotta-{node}-"))
        self._folder.mkdir(parents=True, exist_ok=True)
        # What a call needs to make calls of its own (nested calls): this worker's broker
        # (or FLOTTA_NESTED_BROKER_JSON's, e.g. a workbench identity where the broker's
        # ACL lets a worker's identity submit nothing) and store, a name for logs, and
        # the workspace it runs in (set per process).
        self._env = {
            "FLOTTA_NODE": node,
            "FLOTTA_BROKER_JSON": os.environ.get("FLOTTA_NESTED_BROKER_JSON")
            or broker.model_dump_json(),
            "FLOTTA_STORAGE_JSON": storage.model_dump_json(),
        }
        if site.allow_code:
            threading.Thread(target=self._warm, name=f"zygote-{node}", daemon=True).start()

    def _warm(self) -> None:
        try:
            self._get_zygote()
        except Exception:
            log.exception("worker %s: the call-process zygote did not start", self.node)

    def close(self) -> None:
        """Kill every call process and the zygote; remove a temporary folder."""
        with self._lock:
            self._closed = True
            processes = [p for idle in self._idle.values() for p in idle] + list(self._busy)
            self._idle.clear()
        for process in processes:
            process.kill()
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    # --- a call ---------------------------------------------------------------------------

    def run(self, run: TaskRun) -> TaskResult:
        if not self.allow_code or self._store is None:
            return TaskResult(126, b"", NOT_ALLOWED)
        started = time.monotonic()
        params = CallParams.model_validate(run.task.params)
        deadline = None if params.timeout is None else started + params.timeout
        logs = self._logs()
        try:
            folder = self._workspace(params.workspace, run.policy)
            request = {
                "name": params.name,
                "function": params.function.model_dump() if params.function else None,
                "pickled": self._get(params.pickled) if params.pickled else None,
                "call": params.call,
                "call_path": self._get(params.call_file, run.workdir) if params.call_file else None,
                "result": str(run.workdir / params.result_file),
                "cwd": str(run.workdir),
                "stdout": str(logs[0]),
                "stderr": str(logs[1]),
                "notes": self._report(params.workspace.sha256, folder),
            }
            slot = self._slot(params)
            _acquire(slot, run.cancelled, deadline)
            try:
                reply = self._call(params.workspace, folder, request, run, deadline)
            finally:
                slot.release()
            stdout, stderr = (path.read_bytes() if path.exists() else b"" for path in logs)
            if reply is None:
                return TaskResult(1, stdout, stderr + b"\nthe process running the call died")
            if not reply.get("ok"):
                return TaskResult(1, stdout, stderr + str(reply.get("error")).encode())
            return TaskResult(0, stdout, stderr)
        except _Stopped as stop:
            stdout, stderr = (path.read_bytes() if path.exists() else b"" for path in logs)
            return TaskResult(-int(signal.SIGKILL), stdout, stderr, timed_out=stop.timed_out)
        finally:
            for path in logs:
                path.unlink(missing_ok=True)

    def _logs(self) -> tuple[Path, Path]:
        assert self._folder is not None
        folder = self._folder / "logs"
        folder.mkdir(exist_ok=True)
        token = uuid.uuid4().hex
        return folder / f"{token}.stdout", folder / f"{token}.stderr"

    def _call(
        self,
        archive: Resource,
        folder: Path,
        request: dict[str, Any],
        run: TaskRun,
        deadline: float | None,
    ) -> dict[str, Any] | None:
        sha = archive.sha256
        process = self._checkout(archive, folder)
        try:
            try:
                process.send(request)
            except OSError:
                # It died while idle (the call never reached it): a fresh one takes it.
                with self._lock:
                    self._busy.discard(process)
                process.kill()
                process = self._checkout(archive, folder)
                process.send(request)
            reply = process.wait(run.cancelled, deadline)
        except BaseException:
            with self._lock:
                self._busy.discard(process)
            process.kill()  # stopped mid-call: its state is unknown, never reuse it
            raise
        with self._lock:
            self._busy.discard(process)
            if reply is not None and not self._closed:
                self._idle.setdefault(sha, []).append(process)
                return reply
        process.kill()
        return reply

    def _checkout(self, archive: Resource, folder: Path) -> _Process:
        sha = archive.sha256
        with self._lock:
            if self._closed:
                raise _Stopped(timed_out=False)
            idle = self._idle.get(sha)
            if idle:
                self._idle.move_to_end(sha)
                process = idle.pop()
                self._busy.add(process)
                return process
            evicted = []
            self._idle.setdefault(sha, [])
            self._idle.move_to_end(sha)
            while len(self._idle) > KEPT_WORKSPACES:
                _, old = self._idle.popitem(last=False)
                evicted += old
        for old_process in evicted:
            old_process.kill()
        env = {
            **self._env,
            # The workspace a nested call ships: this one, already in the store.
            "FLOTTA_WORKSPACE_DIR": str(folder),
            "FLOTTA_WORKSPACE_JSON": archive.model_dump_json(),
        }
        spec = {"workspace": str(folder), "env": env}
        try:
            pid, sock = self._get_zygote().fork(spec)
        except (OSError, RuntimeError):
            log.warning("worker %s: the call-process zygote failed; starting another", self.node)
            self._restart_zygote()
            pid, sock = self._get_zygote().fork(spec)
        process = _Process(pid, sock, sha)
        with self._lock:
            self._busy.add(process)
        return process

    def _restart_zygote(self) -> None:
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    def _get_zygote(self) -> _Zygote:
        with self._zygote_lock:
            if self._closed:
                raise _Stopped(timed_out=False)
            if self._zygote is None or not self._zygote.alive():
                assert self._folder is not None
                self.warm.clear()
                zygote = _Zygote(self._folder)
                try:
                    zygote.wait_ready()
                except BaseException:
                    zygote.close()
                    raise
                self._zygote = zygote
                self.warm.set()
            return self._zygote

    def _slot(self, params: CallParams) -> threading.BoundedSemaphore:
        key = (params.workspace.sha256, params.name, params.threads)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = threading.BoundedSemaphore(params.threads)
            return slot

    # --- workspaces and functions -------------------------------------------------------------

    def _workspace(self, archive: Resource, policy: SitePolicy) -> Path:
        """A workspace's folder, fetched and unpacked (within the site's limits) once."""
        assert self._folder is not None and self._store is not None
        target = self._folder / "workspaces" / archive.sha256
        if target.is_dir():
            return target
        with self._lock:
            lock = self._unpacking.setdefault(archive.sha256, threading.Lock())
        with lock:
            if not target.is_dir():
                limits = policy.max_workspace_bytes, policy.max_workspace_members
                workspaces.unpack(self._store.get(archive), target, *limits)
        return target

    def _report(self, sha: str, folder: Path) -> str:
        """What this worker lacks of the workspace's requirements ("" if nothing), once."""
        report = self._reports.get(sha)
        if report is None:
            manifest = workspaces.read_manifest(folder)
            missing = workspaces.missing_requirements(manifest.get("requirements", []))
            report = ""
            if missing:
                report = f"flotta: worker {self.node} lacks requirements: {', '.join(missing)}"
                log.warning("%s (workspace %s)", report, sha[:12])
            self._reports[sha] = report
        return report

    def _get(self, resource: Resource, folder: Path | None = None) -> str:
        """Pickled bytes, verified, kept by sha256 in `folder` (default: the worker's functions)."""
        assert self._folder is not None and self._store is not None
        target = (folder or self._folder / "functions") / f"{resource.sha256}.pkl"
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            scratch = target.with_suffix(f".{uuid.uuid4().hex}")
            scratch.write_bytes(self._store.get(resource))
            os.replace(scratch, target)
        return str(target)


def _acquire(
    slot: threading.BoundedSemaphore, cancelled: threading.Event, deadline: float | None
) -> None:
    """Wait for a `threads` slot, giving up on cancel or timeout."""
    while not slot.acquire(timeout=0.2):
        if cancelled.is_set():
            raise _Stopped(timed_out=False)
        if deadline is not None and time.monotonic() >= deadline:
            raise _Stopped(timed_out=True)


register_executor("python", PythonExecutor, CallParams)
