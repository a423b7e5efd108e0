"""The `flotta-mqtt` command as users run it: real processes against a real mosquitto.

Node commands are signalled as a terminal or a service manager would; user mistakes
must end in one line on stderr and a documented exit code; paths in settings are
resolved where the command was started; every option has its FLOTTA_* variable.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from helpers import wait_for
from typer.core import TyperGroup, TyperOption

from flotta_mqtt import configure, functions
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import IdentitySpec, generate_identities
from flotta_mqtt.cli.errors import BROKER, INVALID
from flotta_mqtt.cli.main import app
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, ArtifactState, Collect, Finalize, Operation, Parallel
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "tests.plugins.test_ops"
TIMEOUT = 30.0
STOPPED_WITHIN = 10.0  # seconds a signalled node may take to exit, on a busy machine


def cli(*args: str, cwd: Path = REPO, **env: str) -> subprocess.Popen[str]:
    """`python -m flotta_mqtt.cli ARGS` with no FLOTTA_* variable but those in `env`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FLOTTA_")}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.Popen(
        [sys.executable, "-m", "flotta_mqtt.cli", *args],
        cwd=cwd,
        env={**environment, "COLUMNS": "250", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(*args: str, **env: str) -> tuple[int, str, str]:
    """Run a command to its end: its exit code, stdout and stderr."""
    process = cli(*args, **env)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def online(broker_url: str, *names: str) -> None:
    with Client(BrokerSettings(url=broker_url)) as client:
        wait_for(
            lambda: set(names) <= {p.node for p in client.workers() if p.online},
            timeout=TIMEOUT,
            message=f"{names} never came online",
        )


def stopped(process: subprocess.Popen[str]) -> int:
    """The exit code of a process that must end soon; kills it (and fails) if it hangs."""
    try:
        return process.wait(timeout=STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"still running {STOPPED_WITHIN} s after its signals")


@pytest.fixture
def scheduler(broker: LocalBroker, tmp_path: Path) -> Iterator[SchedulerNode]:
    """A scheduler (with its initiator) in this process, on the broker, store in tmp_path."""
    config = SchedulerConfig(
        broker=BrokerSettings(url=broker.url),
        storage=StorageSettings(url=(tmp_path / "store").as_uri()),
        database=tmp_path / "scheduler.db",
        initiator_plugins=[PLUGIN],
        worker_grace=10,
    )
    node = SchedulerNode(config).start(wait=TIMEOUT)
    try:
        yield node
    finally:
        node.stop()


# --- signals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGTERM], [signal.SIGINT], [signal.SIGTERM] * 2, [signal.SIGINT, signal.SIGTERM] * 5],
    ids=["term", "int", "term-twice", "a-burst"],
)
def test_a_signalled_node_stops_within_seconds(
    broker: LocalBroker, tmp_path: Path, signals: list[signal.Signals]
) -> None:
    """However often it is signalled; a signal while it stops exits at once (128 + N).

    A burst is tried a few times: a deadlock in a signal handler shows only sometimes."""
    for node in ("scheduler", "worker") * (3 if len(signals) > 2 else 1):
        process = cli(
            node,
            *(["--name", "w-signals"] if node == "worker" else []),
            "--broker",
            broker.url,
            "--storage",
            (tmp_path / "store").as_uri(),
            "--database" if node == "scheduler" else "--state-dir",
            str(tmp_path / f"{node}-state"),
        )
        online(broker.url, "w-signals" if node == "worker" else "scheduler.initiator")
        for sent in signals:
            process.send_signal(sent)
        code = stopped(process)
        assert code in {0, *(128 + s for s in signals[1:])}, (node, process.communicate())


def test_a_worker_forced_to_exit_loses_no_journaled_job(
    broker: LocalBroker, tmp_path: Path, scheduler: SchedulerNode
) -> None:
    """A burst of signals while a job runs; started again, the worker finishes the job."""
    data = tmp_path / "w.csv"
    data.write_text("x\n0.7\n0.2\n0.9\n")
    args = ["worker", "--name", "w-journal", "--data", f"demo={data}", "--plugin", PLUGIN]
    args += ["--broker", broker.url, "--storage", (tmp_path / "store").as_uri()]
    args += ["--state-dir", str(tmp_path / "w-state")]
    flag = tmp_path / "go"
    slow = Operation(name="slow", params={"flag": str(flag)})
    artifact = Artifact(project="demo", steps=[Parallel(slow, Collect()), Finalize(slow)])
    process = cli(*args)
    online(broker.url, "w-journal")
    with Client(BrokerSettings(url=broker.url)) as client:
        handle = client.submit(artifact)
        wait_for(
            lambda: (s := handle.status()) is not None and s.counts.get("running", 0) >= 1,
            timeout=TIMEOUT,
            message="the job never ran",
        )
        for _ in range(5):
            process.send_signal(signal.SIGTERM)
        stopped(process)
        process = cli(*args)
        try:
            flag.touch()
            assert handle.wait(timeout=TIMEOUT).state is ArtifactState.COMPLETED
        finally:
            process.send_signal(signal.SIGTERM)
            stopped(process)


# --- user mistakes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_user_mistakes_are_one_line_and_an_exit_code(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [1\n")
    cases = [
        (["validate", str(tmp_path / "absent.yaml")], INVALID, "config file not found"),
        (["submit", str(tmp_path / "absent.yaml")], INVALID, "config file not found"),
        (["validate", str(bad_yaml)], INVALID, "is not valid YAML"),
        (["worker", "--name", "w", "--config", str(bad_yaml)], INVALID, "is not valid YAML"),
        (["status", "x", "--broker", "localhost:1883"], INVALID, "mqtt://host:port"),
    ]
    for args, code, words in cases:
        returncode, out, err = run(*args)
        assert (returncode, out) == (code, ""), (args, out, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, (args, err)


def test_an_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    broker = f"mqtt://127.0.0.1:{free_port()}"
    returncode, _, err = run("status", "x", "--timeout", "1", "--broker", broker)
    assert returncode == BROKER
    assert err.count("\n") == 1 and "no answer from the broker" in err


def test_an_unreachable_broker_is_given_up_after_the_commands_timeout() -> None:
    """--timeout bounds the wait for the broker too, not a fixed 10 s."""
    broker = f"mqtt://127.0.0.1:{free_port()}"
    for command in (["status", "x"], ["prune", "--older-than", "1d"], ["schedule", "list"]):
        started = time.monotonic()
        returncode, _, err = run(*command, "--timeout", "1", "--broker", broker)
        took = time.monotonic() - started
        assert returncode == BROKER and err.count("\n") == 1, (command, err)
        assert took < 5, f"{command} took {took:.1f} s"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    for args, env in (
        (["--debug", "status", "x", "--broker", "mqtt://h:99999"], {}),
        (["status", "x", "--broker", "mqtt://h:99999"], {"FLOTTA_DEBUG": "1"}),
    ):
        returncode, _, err = run(*args, **env)
        assert returncode != 0 and "Traceback (most recent call last)" in err, err


# --- broker URLs ---------------------------------------------------------------------------

BAD_URLS = [
    "localhost:1883",  # no scheme
    "127.0.0.1",
    "mqt://127.0.0.1:1883",  # a typo'd scheme
    "tcp://127.0.0.1:1883",
    "mqtt:/127.0.0.1:1883",
    "mqtt://127.0.0.1:99999",  # bad ports
    "mqtt://127.0.0.1:port",
    "mqtt://127.0.0.1:0",
    "mqtt://:1883",  # no host: never a silent 127.0.0.1
    "memory://bus:1",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_broker_url_is_refused_naming_the_accepted_forms(url: str) -> None:
    with pytest.raises(
        ValueError, match="expected mqtt://host:port, mqtts://host:port or memory://name"
    ):
        BrokerSettings(url=url)


def test_the_cli_refuses_bad_broker_urls_in_one_line() -> None:
    for url in ("localhost:1883", "mqt://127.0.0.1:1883", "mqtt://127.0.0.1:99999"):
        returncode, _, err = run("workers", "--broker", url)
        assert returncode == INVALID, err
        assert err.count("\n") == 1
        assert f"broker URL '{url}'" in err and "mqtt://host:port, mqtts://host:port" in err


# --- options -------------------------------------------------------------------------------

NO_VARIABLE = {"install_completion", "show_completion"}  # typer's shell-completion helpers


def test_every_option_has_a_flotta_variable() -> None:
    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)
    missing = [
        f"{name} --{param.name}"
        for name, sub in [("", command), *command.commands.items()]
        for param in sub.params
        if isinstance(param, TyperOption)
        and param.name not in NO_VARIABLE
        and not str(param.envvar or "").startswith("FLOTTA_")
    ]
    assert len(command.commands) >= 12 and missing == []


def test_the_schedulers_metrics_port_takes_effect(broker: LocalBroker, tmp_path: Path) -> None:
    port = free_port()
    process = cli(
        "scheduler",
        "--broker",
        broker.url,
        "--database",
        str(tmp_path / "s.db"),
        "--storage",
        (tmp_path / "store").as_uri(),
        "--metrics-port",
        str(port),
    )
    try:
        online(broker.url, "scheduler.initiator")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            assert b"flotta_" in page.read()
    finally:
        process.send_signal(signal.SIGTERM)
        stopped(process)


# --- paths ---------------------------------------------------------------------------------

CALLS = """
from flotta_mqtt import distributed


@distributed
def add(a: int, b: int) -> int:
    return a + b
"""


def test_a_cli_worker_with_relative_paths_runs_distributed_calls(
    broker: LocalBroker, tmp_path: Path, scheduler: SchedulerNode
) -> None:
    """Started in tmp_path with the default (relative) state_dir, a relative store and
    relative data: its call processes run in another folder, yet find all of them."""
    (tmp_path / "d.csv").write_text("x\n1\n")
    process = cli(
        "worker",
        "--name",
        "w-paths",
        "--executor",
        "python",
        "--allow-code",
        "--data",
        "demo=d.csv",
        "--broker",
        broker.url,
        cwd=tmp_path,
        FLOTTA_STORAGE="file://./store",
    )
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "relative_calls.py").write_text(textwrap.dedent(CALLS))
    sys.path.insert(0, str(workspace))
    try:
        online(broker.url, "w-paths")
        configure(broker.url, (tmp_path / "store").as_uri(), workspace=workspace)
        import relative_calls  # type: ignore[import-not-found]

        assert relative_calls.add(2, 3).unwrap(timeout=TIMEOUT) == 5
        assert (tmp_path / "flotta-state" / "w-paths").is_dir()
    finally:
        functions.shutdown()
        sys.path.remove(str(workspace))
        sys.modules.pop("relative_calls", None)
        process.send_signal(signal.SIGTERM)
        stopped(process)


def test_a_wrong_broker_password_is_one_line() -> None:
    # Not under tmp_path: mosquitto runs as its own user, who cannot enter pytest's folders.
    data_dir = Path(tempfile.mkdtemp(prefix="flotta-cli-broker-"))
    try:
        spec = IdentitySpec(scheduler=None, workbenches=["alice"])
        identities = generate_identities(spec, data_dir / "identities")
        with LocalBroker(
            data_dir=data_dir,
            password_file=identities.password_file,
            acl_file=identities.acl_file,
        ) as secured:
            returncode, _, err = run(
                "workers", "--broker", secured.url, "--username", "alice", "--password", "wrong"
            )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert returncode == BROKER
    assert err.count("\n") == 1 and "refused alice" in err, err


# --- identities ----------------------------------------------------------------------------


def test_the_embedded_initiator_never_borrows_the_schedulers_identity(tmp_path: Path) -> None:
    """With broker identities, the scheduler refuses to start its initiator under its own
    name (the two would take one session from each other); given the initiator's
    password, the initiator connects as itself."""
    data_dir = Path(tempfile.mkdtemp(prefix="flotta-cli-broker-"))
    try:
        spec = IdentitySpec(scheduler="scheduler", workbenches=["alice"])
        identities = generate_identities(spec, data_dir / "identities")
        with LocalBroker(
            data_dir=data_dir,
            password_file=identities.password_file,
            acl_file=identities.acl_file,
        ) as secured:
            own = identities.credentials["scheduler"].password
            args = ["scheduler", "--broker", secured.url, "--username", "scheduler"]
            args += ["--password", own, "--database", str(tmp_path / "s.db")]
            args += ["--storage", (tmp_path / "store").as_uri()]
            borrowing = cli(*args)
            assert stopped(borrowing) == INVALID
            err = borrowing.communicate()[1]
            assert err.count("\n") == 1 and "its own broker identity" in err, err

            initiator = identities.credentials["scheduler.initiator"].password
            process = cli(*args, FLOTTA_INITIATOR_PASSWORD=initiator)
            try:
                with Client(identities.broker_settings("alice", secured.url)) as alice:
                    wait_for(
                        lambda: any(p.online and p.initiator for p in alice.workers()),
                        timeout=TIMEOUT,
                        message="the initiator never came online as itself",
                    )
            finally:
                process.send_signal(signal.SIGTERM)
                assert stopped(process) == 0
            assert "disconnected" not in process.communicate()[1]
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
