"""`@distributed` functions end to end: a real mosquitto, an in-process scheduler and
workers running the `python` executor, the caller's workspace written by each test.

Every test writes its own workspace module under a unique name (the SDK imports it the
way a caller's script would), configures the SDK for its cluster, and waits on handles:
they settle from retained statuses, so nothing here sleeps to synchronise.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import MessageRecorder, messages_of, task_job, wait_for

from flotta_mqtt import (
    CallFailed,
    NotConfigured,
    RemoteError,
    as_completed,
    configure,
    functions,
    gather,
)
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.functions import calls
from flotta_mqtt.functions.executor import PythonExecutor
from flotta_mqtt.model import Task
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import JobFailed, topics
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import sha256_hex
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig
from flotta_mqtt.workflows.executors import SitePolicy, TaskRun

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


@dataclass
class Cluster:
    """A scheduler and workers on one broker and store; a workspace folder for the caller."""

    broker_url: str
    folder: Path
    running: list[SchedulerNode | WorkerAgent] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    @property
    def broker(self) -> BrokerSettings:
        return BrokerSettings(url=self.broker_url)

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(url=(self.folder / "store").as_uri())

    @property
    def store(self) -> Path:
        return self.folder / "store"

    @property
    def workspace(self) -> Path:
        return self.folder / "workspace"

    def scheduler(self) -> SchedulerNode:
        config = SchedulerConfig(
            broker=self.broker,
            storage=self.storage,
            database=self.folder / "scheduler.db",
            worker_grace=0.3,
            retry_backoff=0.05,
        )
        node = SchedulerNode(config).start(wait=TIMEOUT)
        self.running.append(node)
        return node

    def worker(self, name: str, allow_code: bool = True, **settings: Any) -> WorkerAgent:
        config = WorkerConfig(
            name=name,
            broker=self.broker,
            storage=self.storage,
            executors=["python"],
            allow_code=allow_code,
            max_jobs=settings.pop("max_jobs", 4),
            state_dir=self.folder / f"{name}.state",
            **settings,
        )
        node = WorkerAgent(config).start(wait=TIMEOUT)
        self.running.append(node)
        return node

    def start(self, *names: str) -> list[WorkerAgent]:
        """A scheduler and workers that the broker holds online; the SDK configured."""
        self.scheduler()
        workers = [self.worker(name) for name in names]
        self.wait_online(*names)
        self.configure()
        return workers

    def wait_online(self, *names: str) -> None:
        with Client(self.broker) as client:
            wait_for(
                lambda: set(names) <= {p.node for p in client.workers() if p.online},
                timeout=TIMEOUT,
                message=f"workers {names} not online",
            )

    def configure(self, **options: Any) -> None:
        configure(self.broker_url, self.storage.url, workspace=self.workspace, **options)

    def module(self, source: str, name: str | None = None) -> ModuleType:
        """Write a module into the workspace and import it, as the caller's code would."""
        name = name or f"calls_{uuid.uuid4().hex[:10]}"
        self.workspace.mkdir(exist_ok=True)
        (self.workspace / f"{name}.py").write_text(textwrap.dedent(source))
        if str(self.workspace) not in sys.path:
            sys.path.insert(0, str(self.workspace))
        importlib.invalidate_caches()
        self.modules.append(name)
        return importlib.import_module(name)

    def archives(self) -> list[Path]:
        return sorted((self.store / "workspaces").glob("*.tar.gz"))

    def close(self) -> None:
        functions.shutdown()
        for node in reversed(self.running):
            node.stop()
        if str(self.workspace) in sys.path:
            sys.path.remove(str(self.workspace))
        for name in self.modules:
            sys.modules.pop(name, None)


@pytest.fixture
def cluster(broker: LocalBroker, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(broker.url, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


SEED = """
from time import sleep

from flotta_mqtt import distributed


@distributed(platform="*", threads=2)
def sleep_sum(a: int, b: int) -> int:
    sleep(0.01)
    return a + b
"""


def test_seed_example_returns_every_value_in_order(cluster: Cluster) -> None:
    cluster.start("w0", "w1", "w2")
    seed = cluster.module(SEED)

    responses = [seed.sleep_sum(x, x + 1) for x in range(250)]

    assert [r.unwrap(timeout=TIMEOUT) for r in responses] == [2 * x + 1 for x in range(250)]
    # Batched: a few artifacts of at most 200 calls, not 250 submissions.
    batches: dict[str | None, int] = {}
    for r in responses:
        batches[r.artifact_id] = batches.get(r.artifact_id, 0) + 1
    assert len(batches) <= 10 and max(batches.values()) <= 200
    # Spread over every worker, each call's job listed with its worker and product.
    jobs = [r.job() for r in responses]
    assert {job.worker for job in jobs if job} == {"w0", "w1", "w2"}
    assert all(job is not None and job.product is not None for job in jobs)


def test_gather_as_completed_logs_and_missing_requirements(cluster: Cluster) -> None:
    cluster.start("w0", "w1")
    cluster.configure(requirements=["no-such-package-flotta-xyz>=1"])
    mod = cluster.module(
        """
        import os
        from flotta_mqtt import distributed

        @distributed
        def shout(word):
            print(word.upper())
            return word * 2
        """
    )
    handles = mod.shout.map(["a", "b", "c"])
    assert sorted(h.unwrap() for h in as_completed(handles, timeout=TIMEOUT)) == ["aa", "bb", "cc"]
    assert gather(handles, progress=True) == ["aa", "bb", "cc"]
    stdout, stderr = handles[1].logs()
    assert stdout == "B\n"
    # Workers report what the manifest asks for and they lack; they install nothing.
    assert "lacks requirements: no-such-package-flotta-xyz>=1 (not installed)" in stderr


def test_a_custom_exception_is_raised_locally_as_itself(cluster: Cluster) -> None:
    cluster.start("w0", "w1")
    mod = cluster.module(
        """
        from flotta_mqtt import distributed

        class Overdrawn(ValueError):
            pass

        class Stubborn(Exception):
            def __init__(self, account, amount):  # pickling cannot rebuild this one
                super().__init__(f"{account} is short of {amount}")

        @distributed
        def withdraw(amount):
            if amount > 10:
                raise Overdrawn(f"cannot withdraw {amount}")
            if amount < 0:
                raise Stubborn("acme", -amount)
            return 10 - amount
        """
    )
    ok, overdrawn, stubborn, ok_too = mod.withdraw.map([1, 50, -3, 2])

    with pytest.raises(mod.Overdrawn, match="cannot withdraw 50") as raised:
        overdrawn.unwrap(timeout=TIMEOUT)
    notes = "\n".join(raised.value.__notes__)
    assert "remote traceback on worker w" in notes
    assert 'raise Overdrawn(f"cannot withdraw {amount}")' in notes
    assert isinstance(overdrawn.exception(), mod.Overdrawn)
    # An exception that cannot be rebuilt here keeps its type name, message and traceback.
    with pytest.raises(RemoteError) as remote:
        stubborn.unwrap(timeout=TIMEOUT)
    assert remote.value.type_name == f"{mod.__name__}.Stubborn"
    assert remote.value.message == "acme is short of 3"
    assert "raise Stubborn" in remote.value.remote_traceback
    # One failing call fails nothing else of its batch.
    assert (ok.unwrap(TIMEOUT), ok_too.unwrap(TIMEOUT)) == (9, 8)
    assert ok.artifact_id == overdrawn.artifact_id


def test_changed_workspace_ships_new_code_and_unchanged_is_uploaded_once(
    cluster: Cluster,
) -> None:
    (w0,) = cluster.start("w0")
    source = """
        from flotta_mqtt import distributed

        @distributed
        def version():
            return {version}
        """
    mod = cluster.module(source.format(version=1))
    assert mod.version().unwrap(TIMEOUT) == 1
    (first,) = cluster.archives()
    before = first.stat()

    cluster.configure()  # a new session: the same files are packed again...
    assert mod.version().unwrap(TIMEOUT) == 1
    # ...to the same hash, which the store already holds: not written again.
    assert cluster.archives() == [first]
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    (cluster.workspace / f"{mod.__name__}.py").write_text(textwrap.dedent(source.format(version=2)))
    cluster.configure()
    assert mod.version().unwrap(TIMEOUT) == 2  # the worker imports the new file
    archives = cluster.archives()
    assert len(archives) == 2 and first in archives
    # Each hash unpacked once, in its own folder on the worker.
    unpacked = sorted(p.name for p in (cluster.folder / "w0.state/python/workspaces").iterdir())
    assert unpacked == sorted(p.name.removesuffix(".tar.gz") for p in archives)
    assert w0.presence(online=True).labels["allow_code"] == "yes"


def test_a_worker_without_allow_code_never_runs_shipped_code(cluster: Cluster) -> None:
    cluster.scheduler()
    careful = cluster.worker("careful", allow_code=False)
    cluster.wait_online("careful")
    cluster.configure()
    witness = cluster.folder / "ran.txt"
    mod = cluster.module(
        """
        from pathlib import Path
        from flotta_mqtt import distributed

        @distributed
        def touch(path):
            Path(path).write_text("shipped code ran")
        """
    )
    presence = careful.presence(online=True)
    assert "python" not in presence.executors and presence.labels["allow_code"] == "no"

    with pytest.raises(CallFailed, match="allow_code: true") as failed:
        mod.touch(str(witness)).unwrap(TIMEOUT)
    assert failed.value.error_type == "BindingError"

    # Even a job sent straight to it (a rogue scheduler) is refused without running.
    recorder = MessageRecorder()
    bus = Bus(
        client_id=f"rogue-{uuid.uuid4().hex[:8]}",
        settings=BrokerSettings(url=cluster.broker_url),
        on_message=recorder,
        subscriptions=[topics.events("careful")],
        clean=True,
    ).start(wait=TIMEOUT)
    try:
        task = Task(
            name="rogue",
            executor="python",
            params=_call_params(cluster, mod, witness),
            outputs=["results/rogue"],
        )
        job = task_job(task, artifact_id="rogue0artifact", project="functions")
        bus.publish(topics.jobs("careful"), job)
        messages = recorder.wait_for(
            lambda ms: messages_of(ms, JobFailed),
            timeout=TIMEOUT,
        )
    finally:
        bus.stop()
    failure = messages_of(messages, JobFailed)[0]
    assert "does not run the python executor" in failure.error.message
    assert not witness.exists()
    # And the executor itself refuses until its agent says code may run.
    refused = PythonExecutor().run(
        TaskRun(task, cluster.folder, {}, threading.Event(), "rogue-0-1")
    )
    assert refused.exit_code == 126 and b"allow_code: true" in refused.stderr
    assert not witness.exists()


def _call_params(cluster: Cluster, mod: ModuleType, witness: Path) -> dict[str, Any]:
    """A well-formed call of `touch(witness)`, as a scheduler would send it."""
    import base64

    from flotta_mqtt.functions.calls import CallParams, dumps

    session = functions.session.current("touch")
    return CallParams(
        name=mod.touch.name,
        workspace=session.workspace(),
        function=mod.touch.reference(),
        call=base64.b64encode(dumps(((str(witness),), {}))).decode(),
        result_file="results/rogue",
    ).model_dump(mode="json", exclude_none=True)


class _Planted:
    """Unpickling it makes the folder `marker`: the proof that planted bytes ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (self.marker,)


def planted(marker: Path) -> bytes:
    return pickle.dumps(_Planted(marker))


def refused_because(replaced: Path, original: bytes, planted: bytes) -> str:
    """What a reader says of `replaced` once `planted` took the place of `original`."""
    if len(planted) > len(original):
        return f"{replaced.as_uri()} holds more than its declared {len(original)} bytes"
    return f"sha256 mismatch for {replaced.as_uri()}: expected {sha256_hex(original)}"


def test_a_result_overwritten_in_the_store_is_refused_unread(cluster: Cluster) -> None:
    """Someone who may write to the store replaces a finished call's outcome with a
    well-formed one (sealed, as a worker writes it) whose value runs code when unpickled."""
    cluster.start("w0")
    mod = cluster.module(
        """
        from flotta_mqtt import distributed

        @distributed
        def double(x):
            return 2 * x
        """
    )
    handle = mod.double(21)
    wait_for(handle.done, timeout=TIMEOUT, message="the call never finished")
    [result] = cluster.store.glob(f"artifacts/{handle.artifact_id}/files/**/results/*")
    marker = cluster.folder / "planted-code-ran"
    original = result.read_bytes()
    forged = calls.seal(calls.Outcome(kind="value", value=planted(marker), worker="w0"))
    result.write_bytes(forged)

    with pytest.raises(CallFailed) as failed:
        handle.unwrap(TIMEOUT)
    assert refused_because(result, original, forged) in str(failed.value)
    assert not marker.exists()


def test_call_arguments_swapped_in_the_store_fail_the_call_unread(cluster: Cluster) -> None:
    """The arguments of a call too large to ride in its task wait in the store for a busy
    worker; someone replaces them with a pickle that runs code when loaded."""
    cluster.scheduler()
    cluster.worker("w0", max_jobs=1)
    cluster.wait_online("w0")
    cluster.configure()
    started, gate = cluster.folder / "started", cluster.folder / "gate"
    mod = cluster.module(
        """
        import time
        from pathlib import Path
        from flotta_mqtt import distributed

        @distributed
        def hold(started, gate):
            Path(started).touch()
            while not Path(gate).exists():
                time.sleep(0.01)

        @distributed
        def size(data):
            return len(data)
        """
    )
    holding = mod.hold(str(started), str(gate))
    wait_for(started.exists, timeout=TIMEOUT, message="the first call never started")
    big = mod.size(b"x" * (calls.INLINE_LIMIT + 1))  # its arguments go to the store

    def argument_files() -> list[Path]:
        if big.artifact_id is None:
            return []
        return list(cluster.store.glob(f"artifacts/{big.artifact_id}/**/calls/*"))

    wait_for(argument_files, timeout=TIMEOUT, message="the arguments were never stored")
    [arguments] = argument_files()
    marker = cluster.folder / "planted-code-ran"
    original, forged = arguments.read_bytes(), planted(marker)
    arguments.write_bytes(forged)
    gate.touch()  # w0 may take the second call now

    assert holding.unwrap(TIMEOUT) is None
    with pytest.raises(CallFailed) as failed:
        big.unwrap(TIMEOUT)
    assert failed.value.error_type == "IntegrityError"
    assert refused_because(arguments, original, forged) in str(failed.value)
    assert not marker.exists()


def test_a_call_on_a_killed_worker_completes_on_another(cluster: Cluster) -> None:
    workers = {w.name: w for w in cluster.start("w0", "w1")}
    marks = cluster.folder / "marks"
    marks.mkdir()
    mod = cluster.module(
        """
        import os, time
        from pathlib import Path
        from flotta_mqtt import distributed

        @distributed
        def slow(marks):
            node = os.environ["FLOTTA_NODE"]
            Path(marks, node).write_text("started")
            time.sleep(1.0)
            return node
        """
    )
    handle = mod.slow(str(marks))
    wait_for(lambda: any(marks.iterdir()), timeout=TIMEOUT, message="the call never started")
    (first,) = [p.name for p in marks.iterdir()]
    victim = workers[first]
    victim.bus.kill()  # its connection drops as in a crash: the broker sends its will
    executor = victim.tasks.executors["python"]
    assert isinstance(executor, PythonExecutor)
    executor.close()  # and the call's process dies with it

    survivor = handle.unwrap(TIMEOUT)
    assert survivor != first and survivor in workers
    job = handle.job()
    assert job is not None and job.worker == survivor and job.attempt == 2


def test_a_distributed_function_may_call_distributed_functions(cluster: Cluster) -> None:
    cluster.start("w0", "w1")
    mod = cluster.module(
        """
        from flotta_mqtt import distributed, gather

        @distributed
        def square(x):
            return x * x

        @distributed
        def sum_of_squares(n):
            handles = [square(i) for i in range(n)]
            return sum(gather(handles)), sorted({h.artifact_id for h in handles})
        """
    )
    outer = mod.sum_of_squares(5)
    total, inner_artifacts = outer.unwrap(TIMEOUT)
    assert total == 0 + 1 + 4 + 9 + 16
    assert inner_artifacts and outer.artifact_id not in inner_artifacts


def test_main_script_functions_large_arguments_platform_and_timeout(cluster: Cluster) -> None:
    cluster.scheduler()
    cluster.worker("w0")
    cluster.worker("gpu0", labels={"gpu": "yes"})
    cluster.wait_online("w0", "gpu0")
    cluster.configure()
    cluster.workspace.mkdir()
    from flotta_mqtt import distributed

    # Defined here, not in the workspace: pickled by value, as a main script's would be.
    def checksum(data: bytes) -> int:
        return sum(data) % 251

    blob = bytes(range(256)) * 1024  # 256 KiB: a stored file, not inline
    handle = distributed(checksum)(blob)
    assert handle.unwrap(TIMEOUT) == sum(blob) % 251
    assert list((cluster.store / "artifacts" / str(handle.artifact_id) / "calls").iterdir())
    assert list((cluster.store / "functions").glob("*.pkl"))

    on_gpu = distributed(platform="gpu=yes")(checksum)
    handles = on_gpu.map([b"a"] * 6)
    assert gather(handles, timeout=TIMEOUT) == [97] * 6
    assert {h.job().worker for h in handles if h.job()} == {"gpu0"}

    import time as _time

    def nap(seconds: float) -> str:
        _time.sleep(seconds)
        return "woke"

    hasty = distributed(timeout=0.5)(nap)
    with pytest.raises(CallFailed, match=r"timed out|timeout"):
        hasty(30).unwrap(TIMEOUT)
    assert hasty(0).unwrap(TIMEOUT) == "woke"  # a fresh process replaced the killed one


def test_a_call_without_configuration_says_how_to_configure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flotta_mqtt import distributed

    functions.shutdown()
    for name in ("FLOTTA_BROKER", "FLOTTA_STORAGE", "FLOTTA_WORKSPACE_JSON"):
        monkeypatch.delenv(name, raising=False)

    @distributed
    def idle() -> None:
        return None

    with pytest.raises(NotConfigured, match=r"configure\(broker=\.\.\., storage=\.\.\.\)"):
        idle()


def test_threads_bounds_the_calls_a_worker_runs_at_once(cluster: Cluster) -> None:
    cluster.start("w0")  # max_jobs 4
    mod = cluster.module(
        """
        import time
        from flotta_mqtt import distributed

        def span():
            start = time.monotonic()
            time.sleep(0.3)
            return start, time.monotonic()

        @distributed(threads=1)
        def alone(_):
            return span()

        @distributed(threads=4)
        def together(_):
            return span()
        """
    )

    def most_at_once(spans: list[tuple[float, float]]) -> int:
        return max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)

    assert most_at_once(gather(mod.alone.map(range(4)), timeout=TIMEOUT)) == 1
    assert most_at_once(gather(mod.together.map(range(4)), timeout=TIMEOUT)) > 1


def test_cancelling_the_artifact_kills_its_running_calls(cluster: Cluster) -> None:
    (w0,) = cluster.start("w0")
    marks = cluster.folder / "marks"
    marks.mkdir()
    mod = cluster.module(
        """
        import os, time
        from pathlib import Path
        from flotta_mqtt import distributed

        @distributed
        def stubborn(marks):
            Path(marks, "started").touch()
            time.sleep(30)
            Path(marks, "finished").touch()
        """
    )
    handle = mod.stubborn(str(marks))
    wait_for(lambda: (marks / "started").exists(), timeout=TIMEOUT, message="never started")
    functions.session.current("stubborn").client.cancel(str(handle.artifact_id))
    with pytest.raises(CallFailed, match="cancelled"):
        handle.unwrap(TIMEOUT)
    executor = w0.tasks.executors["python"]
    assert isinstance(executor, PythonExecutor)
    wait_for(lambda: not executor._busy, timeout=TIMEOUT, message="the call's process lives on")
    assert not (marks / "finished").exists()


def test_the_seed_example_script_runs_with_its_own_local_cluster(tmp_path: Path) -> None:
    """The main script's function is pickled by value; its folder is the workspace."""
    script = Path(__file__).parents[2] / "examples" / "distributed_sum.py"
    done = subprocess.run(
        [sys.executable, str(script), "--local", "--calls", "40", "--pause", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "[1, 3, 5, 7, 9] ... 79" in done.stdout


def test_call_processes_and_the_zygote_dying_between_calls_are_replaced(
    cluster: Cluster,
) -> None:
    import os
    import signal

    (w0,) = cluster.start("w0")
    mod = cluster.module(
        """
        import os
        from flotta_mqtt import distributed

        @distributed
        def pid():
            return os.getpid()
        """
    )
    first = mod.pid().unwrap(TIMEOUT)
    executor = w0.tasks.executors["python"]
    assert isinstance(executor, PythonExecutor)
    assert [p.pid for idle in executor._idle.values() for p in idle] == [first]
    os.kill(first, signal.SIGKILL)  # an idle call process dies (OOM killer, say)
    assert executor._zygote is not None
    executor._zygote.process.kill()  # and so does the zygote
    executor._zygote.process.wait()
    second = mod.pid().unwrap(TIMEOUT)
    assert second != first


def test_a_workspace_over_the_sites_limits_is_refused_naming_them(cluster: Cluster) -> None:
    """A few KiB of archive that unpack to far more (zeros compress well): the worker
    refuses it before writing anything, naming its limit; then the same for members."""
    cluster.scheduler()
    cluster.worker("small", policy=SitePolicy(max_workspace_bytes=64 * 1024))
    cluster.wait_online("small")
    cluster.configure()
    cluster.workspace.mkdir()
    (cluster.workspace / "zeros.bin").write_bytes(bytes(4 * 1024 * 1024))
    mod = cluster.module(
        """
        from flotta_mqtt import distributed

        @distributed
        def hello():
            return "ran"
        """
    )
    with pytest.raises(CallFailed, match=r"more than 65,536 bytes.*max_workspace_bytes") as big:
        mod.hello().unwrap(TIMEOUT)
    assert big.value.error_type == "UnsafeArchive"
    [archive] = cluster.archives()
    assert archive.stat().st_size < 64 * 1024, "a bomb: small packed, large unpacked"
    unpacked = cluster.folder / "small.state" / "python" / "workspaces"
    assert not unpacked.exists() or list(unpacked.iterdir()) == []

    cluster.running.pop().stop()  # the same workspace on a site allowing fewer members
    cluster.worker("few", policy=SitePolicy(max_workspace_members=2))
    cluster.wait_online("few")
    with pytest.raises(CallFailed, match=r"more than 2 members.*max_workspace_members"):
        mod.hello().unwrap(TIMEOUT)
    unpacked = cluster.folder / "few.state" / "python" / "workspaces"
    assert not unpacked.exists() or list(unpacked.iterdir()) == []
