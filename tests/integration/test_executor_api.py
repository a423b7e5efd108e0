"""The api executor against a real HTTP service the test runs on loopback (http.server).

The service implements the contract of `flotta_mqtt.workflows.executors.api`: a POST answered
at once (200) or accepted (202 + Location) and polled until it succeeds or fails, job files
PUT before the call and fetched with GET after it. The last test runs an api task inside a
workflow on a real mosquitto, between two shell tasks that make and read its job files.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import wait_for
from pydantic import ValidationError

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, ArtifactState, JobState, Task, Tasks
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig
from flotta_mqtt.workflows.executors import EXECUTORS, TaskResult, TaskRun, make_executor

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
FAST = 0.05  # seconds between polls in these tests


# --- the service ------------------------------------------------------------------------------


@dataclass
class Call:
    """One asynchronous call: running for `polls` more GETs, then its final answer."""

    polls: int
    final: dict[str, Any]
    deleted: bool = False


@dataclass
class Service:
    """What the test service holds and saw. Its handler runs on the server's threads."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    calls: dict[str, Call] = field(default_factory=dict)
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)

    def requests(self, method: str | None = None, prefix: str = "") -> list[str]:
        with self.lock:
            return [
                path
                for verb, path, _, _ in self.seen
                if method in (None, verb) and path.startswith(prefix)
            ]

    def accept(self, polls: int, final: dict[str, Any]) -> str:
        call_id = uuid.uuid4().hex[:8]
        with self.lock:
            self.calls[call_id] = Call(polls, final)
        return f"/calls/{call_id}"


class Handler(BaseHTTPRequestHandler):
    service: Service  # set on a subclass per server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _record(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.service.lock:
            self.service.seen.append((self.command, self.path, dict(self.headers), body))
        return body

    def _answer(self, code: int, document: Any = None, headers: dict[str, str] | None = None):
        data = b"" if document is None else json.dumps(document).encode()
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if document is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _raw(self, code: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        raw = self._record()
        body = json.loads(raw) if raw else {}
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        service = self.service
        route = parts.path
        if route == "/sync":
            result = {"echo": body, "auth": self.headers.get("Authorization")}
            self._answer(200, {"status": "succeeded", "result": result})
        elif route == "/plain":
            self._raw(200, b"fine, not json")
        elif route == "/async":
            polls = int(query.get("polls", "2"))
            final: dict[str, Any] = {
                "status": "succeeded",
                "result": {"sum": sum(body.get("n", []))},
            }
            if body.get("fail"):
                final = {"status": "failed", "exit_code": 5, "result": "no luck"}
            self._answer(202, {"status": "running"}, {"Location": service.accept(polls, final)})
        elif route == "/async-in-body":
            location = service.accept(1, {"status": "succeeded", "result": 42})
            self._answer(200, {"status": "running", "status_url": f"{service.url}{location}"})
        elif route == "/never":
            self._answer(202, None, {"Location": service.accept(10**9, {})})
        elif route == "/accepted-nowhere":
            self._answer(202, {"status": "running"})
        elif route == "/fail":
            self._answer(200, {"status": "failed", "exit_code": 7, "result": "boom"})
        elif route == "/fail-no-code":
            self._answer(200, {"status": "failed"})
        elif route == "/odd-status":
            self._answer(200, {"status": "maybe"})
        elif route == "/nonzero":
            self._answer(200, {"status": "succeeded", "exit_code": 3})
        elif route == "/error":
            self._raw(503, b"service unavailable for now")
        elif route == "/slow":
            service.closing.wait(10)
            self._answer(200, {"status": "succeeded"})
        elif route == "/garbage":  # not HTTP at all
            self.wfile.write(b"SPEAKING SOMETHING ELSE\r\n\r\n")
            self.close_connection = True
        elif route == "/to-file":
            self._raw(302, b"", {"Location": "file:///etc/hostname"})
        elif route == "/to-ftp":
            self._raw(307, b"", {"Location": "ftp://127.0.0.1/x"})
        elif route == "/transform":  # upper-cases one job file into another, asynchronously
            with service.lock:
                source = service.files.get(body["input"])
            if source is None:
                self._answer(400, {"status": "failed", "result": f"no {body['input']}"})
                return
            with service.lock:
                service.files[body["output"]] = source.upper()
            final = {"status": "succeeded", "result": {"bytes": len(source)}}
            self._answer(202, {"status": "running"}, {"Location": service.accept(2, final)})
        else:
            self._answer(404, {"status": "failed", "result": f"no route {route}"})

    def do_GET(self) -> None:
        self._record()
        service = self.service
        if self.path.startswith("/calls/"):
            with service.lock:
                call = service.calls.get(self.path.removeprefix("/calls/"))
                if call is not None and call.polls > 0:
                    call.polls -= 1
                    running = True
                else:
                    running = False
            if call is None:
                self._answer(404, {"status": "failed"})
            elif running:
                self._answer(202 if call.polls % 2 else 200, {"status": "running"})
            else:
                self._answer(200, call.final)
        elif self.path.startswith("/files/"):
            with service.lock:
                data = service.files.get(self.path.removeprefix("/files/"))
            if data is None:
                self._raw(404, b"no such file")
            else:
                self._raw(200, data, {"Content-Type": "application/octet-stream"})
        else:
            self._answer(404, {"status": "failed"})

    def do_PUT(self) -> None:
        data = self._record()
        if not self.path.startswith("/files/"):
            self._answer(405, {"status": "failed"})
            return
        with self.service.lock:
            self.service.files[self.path.removeprefix("/files/")] = data
        self._answer(201, None)

    def do_DELETE(self) -> None:
        self._record()
        with self.service.lock:
            call = self.service.calls.get(self.path.removeprefix("/calls/"))
            if call is not None:
                call.deleted = True
        self._answer(204 if call is not None else 404, None)


@pytest.fixture
def service() -> Iterator[Service]:
    """The test service on a free loopback port, in threads of this process."""
    state = Service()
    handler = type("BoundHandler", (Handler,), {"service": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        state.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def call(
    workdir: Path,
    params: dict[str, Any],
    timeout: float | None = None,
    cancelled: threading.Event | None = None,
) -> TaskResult:
    task = Task(name="call", executor="api", params=params, timeout=timeout)
    run = TaskRun(task, workdir, {}, cancelled or threading.Event(), "test-call-1")
    return make_executor("api").run(run)


# --- the executor against the service ---------------------------------------------------------


def test_api_is_registered() -> None:
    assert "api" in EXECUTORS


def test_a_synchronous_call_succeeds_with_its_answer_as_stdout(
    tmp_path: Path, service: Service
) -> None:
    body = {"query": "select", "n": [1, 2.5, None], "nested": {"ok": True}}
    result = call(
        tmp_path,
        {"url": f"{service.url}/sync", "body": body, "headers": {"Authorization": "Bearer t0k"}},
    )
    assert (result.exit_code, result.stderr, result.timed_out) == (0, b"", False)
    answer = json.loads(result.stdout)
    assert answer == {"status": "succeeded", "result": {"echo": body, "auth": "Bearer t0k"}}
    assert result.stdout.endswith(b"\n")
    [(method, path, headers, sent)] = service.seen
    assert (method, path) == ("POST", "/sync")
    assert headers["Content-Type"] == "application/json"
    assert json.loads(sent) == body


def test_a_2xx_that_is_not_json_succeeds(tmp_path: Path, service: Service) -> None:
    result = call(tmp_path, {"url": f"{service.url}/plain"})
    assert (result.exit_code, result.stdout) == (0, b"fine, not json\n")


def test_an_accepted_call_is_polled_until_it_succeeds(tmp_path: Path, service: Service) -> None:
    began = time.monotonic()
    result = call(
        tmp_path,
        {"url": f"{service.url}/async?polls=3", "body": {"n": [1, 2, 3]}, "interval": 0.1},
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "succeeded", "result": {"sum": 6}}
    polls = service.requests("GET", "/calls/")
    assert len(polls) == 4, "three answers `running` (as 202 or 200), then the final one"
    assert len(set(polls)) == 1, "the relative Location is resolved against the endpoint"
    assert time.monotonic() - began >= 4 * 0.1, "one interval before each poll"


def test_the_status_url_may_come_in_the_json(tmp_path: Path, service: Service) -> None:
    result = call(tmp_path, {"url": f"{service.url}/async-in-body", "interval": FAST})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["result"] == 42


def test_without_poll_an_accepted_call_is_done(tmp_path: Path, service: Service) -> None:
    result = call(tmp_path, {"url": f"{service.url}/async", "body": {"n": []}, "poll": False})
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"status": "running"}
    assert service.requests("GET") == []


@pytest.mark.parametrize(
    ("route", "exit_code", "said"),
    [
        ("/fail", 7, "the call failed"),
        ("/fail-no-code", 1, "the call failed"),
        ("/nonzero", 3, "exit code 3"),
        ("/odd-status", 1, "unknown status 'maybe'"),
        ("/error", 503, "HTTP 503: service unavailable for now"),
        ("/missing", 404, "HTTP 404"),
        ("/accepted-nowhere", 1, "named no status URL"),
        ("/garbage", 1, "POST http://"),
        ("/to-file", 1, "refused a redirect to 'file:///etc/hostname'"),
        ("/to-ftp", 1, "refused a redirect to 'ftp://127.0.0.1/x'"),
    ],
)
def test_failures_exit_non_zero_with_the_error_on_stderr(
    tmp_path: Path, service: Service, route: str, exit_code: int, said: str
) -> None:
    result = call(tmp_path, {"url": f"{service.url}{route}", "interval": FAST})
    assert result.exit_code == exit_code
    assert said in result.stderr.decode()
    assert not result.timed_out


def test_a_call_that_fails_while_polled_reports_its_exit_code(
    tmp_path: Path, service: Service
) -> None:
    result = call(
        tmp_path, {"url": f"{service.url}/async", "body": {"fail": True}, "interval": FAST}
    )
    assert result.exit_code == 5
    assert json.loads(result.stdout) == {"status": "failed", "exit_code": 5, "result": "no luck"}
    assert "the call failed" in result.stderr.decode()


def test_an_unreachable_service_fails(tmp_path: Path, service: Service) -> None:
    port = service.url.rsplit(":", 1)[1]
    service_gone = f"http://127.0.0.1:{int(port) ^ 1}/nothing-here"
    result = call(tmp_path, {"url": service_gone, "request_timeout": 2})
    assert result.exit_code == 1
    assert "POST" in result.stderr.decode()


@pytest.mark.parametrize(
    "params",
    [
        {"url": "file:///etc/passwd"},
        {"url": "ftp://host/x"},
        {"url": "http://ok/", "upload": {"a.txt": "file:///tmp/a"}},
        {"url": "http://ok/", "download": {"../escape.txt": "http://ok/f"}},
        {"url": "http://ok/", "interval": 0},
        {"url": "http://ok/", "body": [1, 2]},
        {"url": "http://ok/", "surprise": True},
        {},
    ],
)
def test_bad_params_are_refused(tmp_path: Path, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        call(tmp_path, params)


def test_job_files_are_put_before_and_fetched_after(tmp_path: Path, service: Service) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_bytes(b"some \x00 bytes\n")
    result = call(
        tmp_path,
        {
            "url": f"{service.url}/transform",
            "body": {"input": "in.bin", "output": "out.bin"},
            "upload": {"data/in.txt": f"{service.url}/files/in.bin"},
            "download": {"results/out.txt": f"{service.url}/files/out.bin"},
            "interval": FAST,
        },
    )
    assert result.exit_code == 0, result.stderr
    assert service.files["in.bin"] == b"some \x00 bytes\n"
    assert (tmp_path / "results" / "out.txt").read_bytes() == b"SOME \x00 BYTES\n"
    order = [(verb, path) for verb, path, _, _ in service.seen]
    assert order[0] == ("PUT", "/files/in.bin"), "uploads come before the call"
    assert order[1] == ("POST", "/transform")
    assert order[-1] == ("GET", "/files/out.bin"), "downloads come after it completed"
    assert json.loads(result.stdout)["result"] == {"bytes": 13}, "stdout is the call's answer"


def test_a_missing_upload_or_download_fails(tmp_path: Path, service: Service) -> None:
    result = call(
        tmp_path, {"url": f"{service.url}/sync", "upload": {"nope.txt": f"{service.url}/files/x"}}
    )
    assert result.exit_code == 1 and b"nope.txt" in result.stderr
    assert service.requests("POST") == [], "nothing is called without its inputs"
    result = call(
        tmp_path,
        {"url": f"{service.url}/sync", "download": {"out.txt": f"{service.url}/files/absent"}},
    )
    assert result.exit_code == 404 and b"download of out.txt" in result.stderr
    assert not (tmp_path / "out.txt").exists()


def test_a_timeout_stops_polling_and_deletes_the_call(tmp_path: Path, service: Service) -> None:
    began = time.monotonic()
    result = call(tmp_path, {"url": f"{service.url}/never", "interval": FAST}, timeout=0.5)
    elapsed = time.monotonic() - began
    assert result.timed_out
    assert result.exit_code == 124
    assert "timed out after 0.5 s" in result.stderr.decode()
    assert 0.5 <= elapsed < 2.5
    assert len(service.requests("GET", "/calls/")) >= 3
    wait_for(
        lambda: any(c.deleted for c in service.calls.values()),
        timeout=5,
        message="the abandoned call was not DELETEd",
    )


def test_a_timeout_abandons_a_request_still_pending(tmp_path: Path, service: Service) -> None:
    began = time.monotonic()
    result = call(tmp_path, {"url": f"{service.url}/slow"}, timeout=0.4)
    assert result.timed_out and result.exit_code == 124
    assert time.monotonic() - began < 2, "the executor waited for the slow answer"


def test_cancel_stops_polling(tmp_path: Path, service: Service) -> None:
    cancelled = threading.Event()
    timer = threading.Timer(0.3, cancelled.set)
    timer.start()
    began = time.monotonic()
    try:
        result = call(
            tmp_path, {"url": f"{service.url}/never", "interval": FAST}, cancelled=cancelled
        )
    finally:
        timer.cancel()
    assert time.monotonic() - began < 2
    assert (result.exit_code, result.timed_out) == (130, False)
    assert b"cancelled" in result.stderr
    polls = len(service.requests("GET"))
    time.sleep(3 * FAST)
    assert len(service.requests("GET")) == polls, "no poll after the cancel"
    wait_for(lambda: any(c.deleted for c in service.calls.values()), timeout=5)


def test_cancel_abandons_a_request_still_pending(tmp_path: Path, service: Service) -> None:
    cancelled = threading.Event()
    timer = threading.Timer(0.3, cancelled.set)
    timer.start()
    began = time.monotonic()
    try:
        result = call(tmp_path, {"url": f"{service.url}/slow"}, cancelled=cancelled)
    finally:
        timer.cancel()
    assert result.exit_code == 130
    assert time.monotonic() - began < 2


# --- an api task inside a workflow, end to end ------------------------------------------------


def test_an_api_task_runs_inside_a_workflow(
    broker: LocalBroker, tmp_path: Path, service: Service
) -> None:
    broker_settings = BrokerSettings(url=broker.url)
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    scheduler = SchedulerNode(
        SchedulerConfig(
            broker=broker_settings, storage=storage, database=tmp_path / "s.db", worker_grace=0.5
        )
    ).start(wait=TIMEOUT)
    worker = WorkerAgent(
        WorkerConfig(name="w0", broker=broker_settings, storage=storage, executors=["shell", "api"])
    ).start(wait=TIMEOUT)
    try:
        with Client(broker_settings, storage=storage) as client:
            wait_for(
                lambda: any(p.node == "w0" and p.online for p in client.workers(TIMEOUT)),
                timeout=TIMEOUT,
            )
            tasks = [
                Task(
                    name="make", params={"shell": "echo 'hello api' > in.txt"}, outputs=["in.txt"]
                ),
                Task(
                    name="call",
                    executor="api",
                    depends=["make"],
                    inputs=["in.txt"],
                    outputs=["out.txt"],
                    timeout=15,
                    params={
                        "url": f"{service.url}/transform",
                        "body": {"input": "in", "output": "out"},
                        "upload": {"in.txt": f"{service.url}/files/in"},
                        "download": {"out.txt": f"{service.url}/files/out"},
                        "interval": FAST,
                    },
                ),
                Task(
                    name="show",
                    depends=["call"],
                    inputs=["out.txt"],
                    params={"shell": "cat out.txt"},
                ),
            ]
            handle = client.submit(Artifact(project="workflows", steps=[Tasks(tasks=tasks)]))
            status = handle.wait(timeout=TIMEOUT)
        assert status.state is ArtifactState.COMPLETED, status.error
        assert status.jobs is not None
        assert [(j.name, j.state, j.exit_code) for j in status.jobs] == [
            ("make", JobState.COMPLETED, 0),
            ("call", JobState.COMPLETED, 0),
            ("show", JobState.COMPLETED, 0),
        ]
        store = ResourceStore(storage.url)
        artifact_id = handle.artifact_id
        assert store.get_bytes(store.log_url(artifact_id, "show", 1, "stdout")) == b"HELLO API\n"
        answer = json.loads(store.get_bytes(store.log_url(artifact_id, "call", 1, "stdout")))
        assert answer == {"status": "succeeded", "result": {"bytes": 10}}
        call = status.jobs[1]
        out = store.job_file_url(artifact_id, str(call.id), call.attempt, "out.txt")
        assert store.get_bytes(out) == b"HELLO API\n"
        assert service.files["in"] == b"hello api\n"
    finally:
        worker.stop()
        scheduler.stop()
