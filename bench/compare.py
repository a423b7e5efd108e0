"""flotta_mqtt next to the raw MQTT floor, Dask, Celery and Ray, on three shapes of no-op tasks.

Every system runs 4 worker processes on this machine, over loopback; each figure is the
median of `--runs` runs with the spread (min-max). The shapes:

- **fan-out**: 10,000 independent no-op tasks, from submit to the last result; tasks/s.
- **chain**: 300 tasks, each depending on the one before; ms per link (wall / 300).
- **fan-in**: 1,000 independent no-op tasks and one aggregate depending on all of them;
  seconds from submit to the aggregate's result.

How each system expresses them:

- **floor** (raw paho + mosquitto, QoS 1, TCP_NODELAY on broker and clients): 4 echo
  processes; a job is a message to one of them (round robin) and its reply. Fan-out: 10,000
  round trips with at most 100 in flight; chain: 300 sequential round trips to one echo;
  fan-in: 1,000 pipelined round trips, then one more.
- **flotta_mqtt**: a scheduler process (SQLite WAL, `--database`), 4 worker processes
  (`WorkerAgent`, `max_jobs=4`, each with its own name and state directory, journal on
  disk), the driver in this process publishing submissions and following statuses.
  Fan-out: one workflow (`Tasks`) of one task `t` with `replicas=10,000`, run by a `noop`
  executor (bench/_noop.py): one submission of 10,000 independent jobs, spread over the
  4 workers, like `client.map`; chain: `Iterate(300, [Parallel(noop)])` in a project only
  one worker holds, so each job is locked behind the one before; fan-in: the task `t`
  with `replicas=1,000` and an `agg` task depending on `t`, so on all 1,000 replicas: the
  aggregate's JobReady lists all 1,000 products, like Dask's aggregate receives 1,000
  results.
- **Dask** distributed `LocalCluster(n_workers=4, threads_per_worker=1)`: `client.map`,
  a chain of `client.submit(inc, previous)`, `client.submit(agg, futures)`.
- **Celery** with Redis as broker and result backend (Debian's `redis-server`, started here
  on a free port, no persistence), one worker with `--concurrency 4` (prefork: 4 processes):
  a `group`, a `chain`, a `chord`.
- **Ray** `ray.init(num_cpus=4)`: remote functions, object refs passed along.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench._report import console, cpu_ticks, machine_load, print_table, stolen
from bench.dispatch import FLOOR_WINDOW, PING, PONG, _raw_client
from flotta_mqtt import heap
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.model import Artifact, ArtifactState, Iterate, Operation, Parallel, Tasks
from flotta_mqtt.model.workflow import Task
from flotta_mqtt.protocol import ArtifactStatus, decode, topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings

log = logging.getLogger("bench.compare")

SPAWN = mp.get_context("spawn")  # children start clean: no inherited threads
WORKERS = 4
MAX_JOBS = 4
FAN_PROJECT = "bench"
CHAIN_PROJECT = "chain"  # held by the first worker only
NOOP = Operation(name="noop")
FINAL = (ArtifactState.COMPLETED, ArtifactState.FAILED, ArtifactState.CANCELLED)
FINAL_VALUES = {state.value.encode() for state in FINAL}
SYSTEMS = ("floor", "flotta_mqtt", "dask", "celery", "ray")


class Shapes:
    """The sizes of the three shapes (the defaults are the issue's)."""

    def __init__(self, fan_out: int = 10_000, chain: int = 300, fan_in: int = 1_000) -> None:
        self.fan_out, self.chain, self.fan_in = fan_out, chain, fan_in


Figures = dict[str, float]  # fan_out_s (wall), chain_s (wall), fan_in_s (wall)


# --- the floor ---------------------------------------------------------------------------------


def _echo_main(host: str, port: int, index: int, ready: Any, stop: Any) -> None:
    def echo(client: mqtt.Client, payload: bytes) -> None:
        client.publish(PONG, payload, qos=1)

    client = _raw_client(f"bench-echo-{index}", host, port, f"{PING}/{index}", echo)
    ready.set()
    stop.wait()
    client.disconnect()
    client.loop_stop()


class _FloorDriver:
    def __init__(self, host: str, port: int) -> None:
        self._window = threading.BoundedSemaphore(FLOOR_WINDOW)
        self._lock = threading.Lock()
        self._received = 0
        self._expected = 0
        self._done = threading.Event()
        self.client = _raw_client("bench-floor-driver", host, port, PONG, self._pong)

    def _pong(self, client: mqtt.Client, payload: bytes) -> None:
        self._window.release()
        with self._lock:
            self._received += 1
            if self._received >= self._expected:
                self._done.set()

    def pipelined(self, count: int) -> None:
        """`count` round trips to the echoes in turn, at most FLOOR_WINDOW outstanding."""
        with self._lock:
            self._received, self._expected = 0, count
            self._done.clear()
        for i in range(count):
            self._window.acquire()
            self.client.publish(f"{PING}/{i % WORKERS}", i.to_bytes(4, "big"), qos=1)
        if not self._done.wait(120):
            raise RuntimeError(f"floor: {self._received} of {count} replies came back")

    def sequential(self, count: int) -> None:
        for i in range(count):
            with self._lock:
                self._received, self._expected = 0, 1
                self._done.clear()
            self._window.acquire()
            self.client.publish(f"{PING}/0", i.to_bytes(4, "big"), qos=1)
            if not self._done.wait(10):
                raise RuntimeError(f"floor: round trip {i} did not come back")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_floor(broker: LocalBroker, shapes: Shapes, runs: int) -> list[Figures]:
    stop = SPAWN.Event()
    readies = [SPAWN.Event() for _ in range(WORKERS)]
    echoes = [
        SPAWN.Process(
            target=_echo_main, args=(broker.host, broker.port, i, readies[i], stop), daemon=True
        )
        for i in range(WORKERS)
    ]
    for echo in echoes:
        echo.start()
    try:
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("an echo process did not start")
        driver = _FloorDriver(broker.host, broker.port)
        try:
            driver.pipelined(1_000)  # warm-up
            results = []
            for _ in range(runs):
                results.append(
                    {
                        "fan_out_s": _timed(lambda: driver.pipelined(shapes.fan_out)),
                        "chain_s": _timed(lambda: driver.sequential(shapes.chain)),
                        "fan_in_s": _timed(
                            lambda: (driver.pipelined(shapes.fan_in), driver.sequential(1))
                        ),
                    }
                )
            return results
        finally:
            driver.close()
    finally:
        stop.set()
        for echo in echoes:
            echo.join(10)


def _timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


# --- flotta_mqtt ---------------------------------------------------------------------------------


def _scheduler_main(url: str, store_url: str, database: str, ready: Any, stop: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="[scheduler] %(levelname)s %(message)s")
    from flotta_mqtt.nodes import SchedulerNode
    from flotta_mqtt.scheduler.config import SchedulerConfig
    from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

    scheduler = SchedulerNode(
        SchedulerConfig(
            broker=BrokerSettings(url=url),
            storage=StorageSettings(url=store_url),
            database=Path(database),
            worker_grace=5.0,
            run_initiator=False,  # no shape here has initiator jobs
        )
    ).start()
    heap.settle()  # as `flotta-mqtt scheduler` does (cli/serving.py)
    ready.set()
    stop.wait()
    scheduler.stop()


def _worker_main(
    name: str,
    url: str,
    store_url: str,
    datasets: dict[str, list[str]],
    state_dir: str,
    ready: Any,
    stop: Any,
) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    import bench._noop  # noqa: F401  (registers the noop executor in this process only)
    from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
    from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

    agent = WorkerAgent(
        WorkerConfig(
            name=name,
            broker=BrokerSettings(url=url),
            storage=StorageSettings(url=store_url),
            datasets={project: [Path(p) for p in paths] for project, paths in datasets.items()},
            max_jobs=MAX_JOBS,
            executors=["noop"],
            state_dir=Path(state_dir),
        )
    ).start()
    heap.settle()  # as `flotta-mqtt worker` does (cli/serving.py)
    ready.set()
    stop.wait()
    agent.stop()


class _Driver:
    """Publishes submissions and follows every artifact's retained status on one subscription."""

    def __init__(self, url: str) -> None:
        self._lock = threading.Condition()
        self._final: dict[str, ArtifactStatus] = {}
        self._waiting: set[str] = set()
        self.workers_used: set[str] = set()  # by the last run's jobs, as its statuses list them
        self.bus = Bus(
            "bench-driver",
            BrokerSettings(url=url),
            on_message=self._message,
            subscriptions=[topics.ALL_STATUS, topics.reply("bench-driver")],
            clean=True,
        ).start()

    def _message(self, topic: str, payload: bytes) -> None:
        # Only final statuses matter here: the artifact's own state is the first "state"
        # key of the JSON (jobs listed after it have theirs). Skipping the others keeps
        # this driver's decoding (a 300-job status per chain link) off the shared CPUs.
        at = payload.find(b'"state":"') + 9
        if at >= 9 and payload[at : payload.find(b'"', at)] not in FINAL_VALUES:
            return
        _, message = decode(topic, payload)
        if not isinstance(message, ArtifactStatus):
            log.error("rejected: %s", message)
            return
        if message.state in FINAL:
            with self._lock:
                if message.artifact_id in self._waiting:
                    self._final[message.artifact_id] = message
                    self._lock.notify_all()

    def run(self, artifacts: list[Artifact], timeout: float = 300.0) -> float:
        """Submit all, wait for every final status; the wall time, checked."""
        ids = {a.id for a in artifacts}
        with self._lock:
            self._waiting |= ids
        start = time.perf_counter()
        for artifact in artifacts:
            self.bus.publish(topics.submit("bench-driver"), artifact)
        with self._lock:
            if not self._lock.wait_for(lambda: ids <= self._final.keys(), timeout):
                raise RuntimeError(f"{len(ids - self._final.keys())} artifacts not done in time")
            wall = time.perf_counter() - start
            finals = [self._final.pop(i) for i in ids]
            self._waiting -= ids
        self.workers_used = {job.worker for status in finals for job in status.jobs or []}
        states = Counter(status.state for status in finals)
        if states != Counter({ArtifactState.COMPLETED: len(ids)}):
            errors = {str(s.error) for s in finals if s.error is not None}
            raise RuntimeError(f"artifacts ended {dict(states)}: {sorted(errors)[:3]}")
        return wall

    def close(self) -> None:
        self.bus.stop()


def fan_out_artifact(jobs: int) -> Artifact:
    """One submission of `jobs` independent no-op jobs: a task with that many replicas."""
    task = Task(name="t", executor="noop", replicas=jobs)
    return Artifact(project=FAN_PROJECT, steps=[Tasks(tasks=[task])])


def chain_artifact(links: int) -> Artifact:
    return Artifact(
        project=CHAIN_PROJECT, steps=[Iterate(rounds=links, steps=[Parallel(operation=NOOP)])]
    )


def fan_in_artifact(width: int) -> Artifact:
    """`width` replicas of a no-op task, then `agg`, which waits for (and gets) them all."""
    tasks = [
        Task(name="t", executor="noop", replicas=width),
        Task(name="agg", executor="noop", depends=["t"]),
    ]
    return Artifact(project=FAN_PROJECT, steps=[Tasks(tasks=tasks)])


class FlottaCluster:
    """A scheduler process and 4 worker processes on a LocalBroker."""

    def __init__(
        self, broker: LocalBroker, scratch: Path, database: Path | None, store: Path | None = None
    ) -> None:
        self.stop = SPAWN.Event()
        store_url = f"file://{store or scratch}/s"
        csv = scratch / "bench.csv"
        csv.write_text("x\n1\n")
        self.database = database or scratch / "scheduler.db"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.database}{suffix}").unlink()
        self.workers = []
        readies = []
        for i in range(WORKERS):
            datasets = {FAN_PROJECT: [str(csv)]}
            if i == 0:
                datasets[CHAIN_PROJECT] = [str(csv)]
            ready = SPAWN.Event()
            readies.append(ready)
            name = f"bench-w{i}"
            state = str(scratch / f"{name}.state")
            args = (name, broker.url, store_url, datasets, state, ready, self.stop)
            self.workers.append(SPAWN.Process(target=_worker_main, args=args, name=name))
        scheduler_ready = SPAWN.Event()
        self.scheduler = SPAWN.Process(
            target=_scheduler_main,
            args=(broker.url, store_url, str(self.database), scheduler_ready, self.stop),
            name="scheduler",
        )
        self.driver: _Driver | None = None
        try:
            for process in self.workers:
                process.start()
            for ready in readies:
                if not ready.wait(60):
                    raise RuntimeError("a worker process did not start")
            # Workers' presence is retained before the scheduler subscribes.
            self.scheduler.start()
            if not scheduler_ready.wait(60):
                raise RuntimeError("the scheduler process did not start")
            self.driver = _Driver(broker.url)
            self._warm_up()
        except BaseException:
            self.close()
            raise

    def _warm_up(self) -> None:
        assert self.driver is not None
        # Tasks are bound to the workers the scheduler has seen online: until every
        # worker's presence has arrived, a fan-out fails (none yet) or leaves one out.
        for _ in range(40):
            try:
                self.driver.run([fan_out_artifact(WORKERS * 5)], timeout=30)
            except RuntimeError:
                time.sleep(0.25)
                continue
            if len(self.driver.workers_used) == WORKERS:
                break
            time.sleep(0.25)
        self.driver.run([fan_out_artifact(400)])
        self.driver.run([chain_artifact(20)])
        self.driver.run([fan_in_artifact(40)])

    def measure(self, shapes: Shapes, profile: Path | None = None) -> Figures:
        assert self.driver is not None
        driver = self.driver
        profiler = _Profiler(self.scheduler.pid, profile) if profile is not None else None
        fan_out = driver.run([fan_out_artifact(shapes.fan_out)])
        if profiler is not None:
            profiler.stop()
        return {
            "fan_out_s": fan_out,
            "chain_s": driver.run([chain_artifact(shapes.chain)]),
            "fan_in_s": driver.run([fan_in_artifact(shapes.fan_in)]),
        }

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.stop.set()
        for process in [self.scheduler, *self.workers]:
            if process.pid is None:
                continue
            process.join(20)
            if process.is_alive():
                process.terminate()
                process.join(5)


def run_flotta(
    broker: LocalBroker,
    shapes: Shapes,
    runs: int,
    database: Path | None,
    profile: Path | None,
    store: Path | None = None,
) -> list[Figures]:
    with (
        tempfile.TemporaryDirectory(prefix="fb-") as scratch,
        tempfile.TemporaryDirectory(prefix="fb-", dir=store) as products,
    ):
        cluster = FlottaCluster(broker, Path(scratch), database, Path(products))
        try:
            return [cluster.measure(shapes, profile if i == 0 else None) for i in range(runs)]
        finally:
            cluster.close()


PYSPY_EXTRA = [a for a in os.environ.get("BENCH_PYSPY", "").split() if a]  # e.g. "--gil"


class _Profiler:
    """py-spy sampling a process until stopped; its folded stacks land in `path`."""

    def __init__(self, pid: int | None, path: Path) -> None:
        self.path = path
        exe = shutil.which("py-spy")
        if exe is None or pid is None:
            console.print("py-spy is not installed (pip install -e '.[bench]'): no profile")
            self.process: subprocess.Popen[bytes] | None = None
            return
        self.process = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(path),
                "--nonblocking",
                *PYSPY_EXTRA,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def report_profile(path: Path, top: int = 15) -> None:
    """The functions most often on top of the stack (self) and anywhere on it (total)."""
    if not path.exists():
        return
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            anywhere[frame] += n
    if not samples:
        return
    rows = []
    for (name, n), (total_name, total) in zip(
        own.most_common(top), anywhere.most_common(top), strict=False
    ):
        rows.append([name, f"{n / samples:.1%}", total_name, f"{total / samples:.1%}"])
    print_table(
        f"scheduler process under the fan-out, py-spy: {samples:,} samples (all threads)",
        ["self", "%", "total (on the stack)", "%"],
        rows,
        note=f"folded stacks: {path}",
    )


def _short(frame: str) -> str:
    """`function (path/to/module.py:123)` → `function (module.py)`."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})" if file else name


# --- peers ---------------------------------------------------------------------------------------


def _dask_main(shapes: Shapes, runs: int, conn: Connection) -> None:
    logging.basicConfig(level=logging.ERROR)
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)

    from bench._peer_tasks import agg, inc, noop

    def fan_out() -> None:
        client.gather(client.map(noop, range(shapes.fan_out), pure=False))

    def chain() -> None:
        x = client.submit(inc, 0, pure=False)
        for _ in range(shapes.chain - 1):
            x = client.submit(inc, x, pure=False)
        assert x.result() == shapes.chain

    def fan_in() -> None:
        futures = client.map(noop, range(shapes.fan_in), pure=False)
        assert client.submit(agg, futures, pure=False).result() == shapes.fan_in

    with (
        LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # Its workers log a failed heartbeat, with a traceback, when the cluster
            # closes under them: noise in the table, not a failure of the runs.
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):
        _peer_runs(conn, runs, fan_out, chain, fan_in)


def _celery_main(shapes: Shapes, runs: int, url: str, conn: Connection) -> None:
    os.environ["BENCH_REDIS_URL"] = url
    from celery import chain as celery_chain
    from celery import chord, group

    from bench import _peer_tasks

    app = _peer_tasks.app
    assert app is not None
    noop, inc, agg = (app.tasks[f"bench.{n}"] for n in ("noop", "inc", "agg"))

    def fan_out() -> None:
        group(noop.s(i) for i in range(shapes.fan_out)).apply_async().get(timeout=600)

    def chain() -> None:
        flow = celery_chain(inc.s(0), *(inc.s() for _ in range(shapes.chain - 1)))
        assert flow.apply_async().get(timeout=600) == shapes.chain

    def fan_in() -> None:
        flow = chord((noop.s(i) for i in range(shapes.fan_in)), agg.s())
        assert flow.apply_async().get(timeout=600) == shapes.fan_in

    _peer_runs(conn, runs, fan_out, chain, fan_in)


def _ray_main(shapes: Shapes, runs: int, conn: Connection) -> None:
    import ray

    from bench import _peer_tasks

    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        noop = ray.remote(_peer_tasks.noop)
        inc = ray.remote(_peer_tasks.inc)
        agg = ray.remote(_peer_tasks.agg_args)

        def fan_out() -> None:
            ray.get([noop.remote(i) for i in range(shapes.fan_out)])

        def chain() -> None:
            x = inc.remote(0)
            for _ in range(shapes.chain - 1):
                x = inc.remote(x)
            assert ray.get(x) == shapes.chain

        def fan_in() -> None:
            refs = [noop.remote(i) for i in range(shapes.fan_in)]
            assert ray.get(agg.remote(*refs)) == shapes.fan_in

        _peer_runs(conn, runs, fan_out, chain, fan_in)
    finally:
        ray.shutdown()


def _peer_runs(
    conn: Connection,
    runs: int,
    fan_out: Callable[[], None],
    chain: Callable[[], None],
    fan_in: Callable[[], None],
) -> None:
    # Warm-up: worker processes started, functions shipped and imported.
    for shape in (fan_out, chain, fan_in):
        shape()
    results = [
        {"fan_out_s": _timed(fan_out), "chain_s": _timed(chain), "fan_in_s": _timed(fan_in)}
        for _ in range(runs)
    ]
    conn.send(results)


def _in_child(target: Callable[..., None], *args: Any, timeout: float = 900) -> list[Figures]:
    ours, theirs = SPAWN.Pipe()
    process = SPAWN.Process(target=target, args=(*args, theirs))
    process.start()
    try:
        if not ours.poll(timeout):
            raise RuntimeError(f"{target.__name__}: no result in {timeout} s")
        results: list[Figures] = ours.recv()
        return results
    finally:
        process.join(60)
        if process.is_alive():
            process.terminate()
            process.join(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_celery(shapes: Shapes, runs: int) -> list[Figures]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed (bash broker/install.sh bench)")
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory(prefix="fb-redis-") as scratch:
        redis = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                scratch,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )
        worker: subprocess.Popen[bytes] | None = None
        try:
            _wait_port(port)
            env = {**os.environ, "BENCH_REDIS_URL": url}
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench._peer_tasks",
                    "worker",
                    "--concurrency",
                    str(WORKERS),
                    "--pool",
                    "prefork",
                    "--loglevel",
                    "WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # a superuser warning on every start; failures time out
                cwd=Path(__file__).resolve().parents[1],
            )
            return _in_child(_celery_main, shapes, runs, url)
        finally:
            if worker is not None:
                worker.terminate()
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            redis.terminate()
            redis.wait(10)


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


PEERS: dict[str, Callable[[Shapes, int], list[Figures]]] = {
    "dask": lambda shapes, runs: _in_child(_dask_main, shapes, runs),
    "celery": run_celery,
    "ray": lambda shapes, runs: _in_child(_ray_main, shapes, runs),
}
PEER_MODULES = {"dask": "distributed", "celery": "celery", "ray": "ray"}


def installed(peer: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(PEER_MODULES[peer]) is not None


# --- report ------------------------------------------------------------------------------------


def _summary(results: list[Figures], key: str, per: float, scale: float) -> tuple[float, str]:
    values = [r[key] for r in results]
    if key == "fan_out_s":  # a rate: tasks per second
        rates = [per / v for v in values]
        middle = statistics.median(rates)
        return middle, f"{middle:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
    scaled = [v * scale / per for v in values]
    middle = statistics.median(scaled)
    digits = 2 if key == "chain_s" else 3
    return middle, f"{middle:,.{digits}f} ({min(scaled):,.{digits}f}-{max(scaled):,.{digits}f})"


def report(results: dict[str, list[Figures] | str], shapes: Shapes, runs: int, load: str) -> None:
    columns = [
        ("fan_out_s", f"fan-out {shapes.fan_out:,}, tasks/s", shapes.fan_out, 1.0),
        ("chain_s", f"chain {shapes.chain}, ms/link", shapes.chain, 1e3),
        ("fan_in_s", f"fan-in {shapes.fan_in:,} → 1, s", 1.0, 1.0),
    ]
    medians: dict[str, dict[str, float]] = {}
    rows = []
    for system, outcome in results.items():
        if isinstance(outcome, str):
            rows.append([system, *(outcome for _ in columns)])
            continue
        cells = []
        medians[system] = {}
        for key, _, per, scale in columns:
            middle, text = _summary(outcome, key, per, scale)
            medians[system][key] = middle
            cells.append(text)
        rows.append([system, *cells])
    ours = medians.get("flotta_mqtt")
    if ours is not None:
        for system, figures in medians.items():
            if system == "flotta_mqtt":
                continue
            cells = []
            for key, _, _, _ in columns:
                # Speed ratio: above 1, flotta_mqtt is faster than the other system.
                ratio = ours[key] / figures[key] if key == "fan_out_s" else figures[key] / ours[key]
                cells.append(f"{ratio:.2f} x")
            rows.append([f"flotta_mqtt / {system}", *cells])
    print_table(
        f"flotta_mqtt and peers, {WORKERS} worker processes, median of {runs} run(s) "
        f"(min-max); {load}",
        ["system", *(title for _, title, _, _ in columns)],
        rows,
        note=(
            "flotta_mqtt / X: how many times faster flotta_mqtt is than X (its rate over X's "
            "rate, X's time over its time); below 1, slower.\n"
            "targets: fan-out ≥ 4,000 tasks/s, chain ≤ 1.0 ms/link, fan-in ≤ 0.35 s. "
            "Shapes: see bench/README.md."
        ),
    )


def run(
    runs: int = 3,
    shapes: Shapes | None = None,
    systems: tuple[str, ...] = SYSTEMS,
    database: Path | None = None,
    profile: Path | None = None,
    store: Path | None = None,
) -> dict[str, list[Figures] | str]:
    shapes = shapes or Shapes()
    logging.basicConfig(level=logging.WARNING, format="[bench] %(levelname)s %(name)s: %(message)s")
    loads = [os.getloadavg()[0]]
    ticks = cpu_ticks()
    results: dict[str, list[Figures] | str] = {}
    with LocalBroker() as broker:
        if "floor" in systems:
            results["floor"] = run_floor(broker, shapes, runs)
        if "flotta_mqtt" in systems:
            results["flotta_mqtt"] = run_flotta(broker, shapes, runs, database, profile, store)
    loads.append(os.getloadavg()[0])
    for peer in ("dask", "celery", "ray"):
        if peer not in systems:
            continue
        if not installed(peer):
            results[peer] = "not installed"
            continue
        try:
            results[peer] = PEERS[peer](shapes, runs)
        except Exception as exc:
            log.exception("%s failed", peer)
            results[peer] = f"failed: {type(exc).__name__}"
        loads.append(os.getloadavg()[0])
    load = (
        f"{machine_load()}; load average during the runs {min(loads):.1f}-{max(loads):.1f}"
        f"{stolen(ticks, cpu_ticks())}"
    )
    report(results, shapes, runs, load)
    if profile is not None:
        report_profile(profile)
    return results
