"""The api executor: a task is a call to an HTTP service, with job files PUT and GET.

What a task gets and how it ends: ApiExecutor's docstring.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPException, HTTPMessage
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urljoin, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from flotta_mqtt.model.workflow import JobFile
from flotta_mqtt.workflows.executors.base import Executor, TaskResult, TaskRun, register_executor

EXIT_ERROR = 1  # the call failed without an HTTP status (unreachable, bad answer...)
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_CANCELLED = 130  # as a shell interrupted by SIGINT
MAX_ANSWER = 16 * 1024 * 1024  # bytes of a JSON answer kept; job files stream to disk
CHUNK = 1024 * 1024
WATCH = 0.05  # seconds between looks at the cancel flag while a request is pending
DELETE_TIMEOUT = 2.0  # seconds the best-effort DELETE of an abandoned call may take

T = TypeVar("T")


def _web_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


WebUrl = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_web_url)]


class ApiParams(BaseModel):
    """The `params` of an api task."""

    model_config = ConfigDict(extra="forbid")

    url: WebUrl  # the endpoint the body is POSTed to
    body: dict[str, JsonValue] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)  # on the POST and the polls
    poll: bool = True  # follow a 202's Location until the call is done
    interval: float = Field(default=1.0, gt=0, le=3600)  # seconds between polls
    request_timeout: float = Field(default=30.0, gt=0, le=3600)  # per request, at most
    upload: dict[JobFile, WebUrl] = Field(default_factory=dict)  # PUT before the POST
    download: dict[JobFile, WebUrl] = Field(default_factory=dict)  # GET after success


@dataclass
class _Answer:
    code: int
    headers: Message
    body: bytes

    def document(self) -> Any:
        try:
            return json.loads(self.body) if self.body.strip() else None
        except ValueError:
            return None


class _Stop(Exception):
    """The task ends now, with this exit code and error text."""

    def __init__(self, exit_code: int, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.timed_out = timed_out


class _Abandon(Exception):
    """A pending request is given up because the task was cancelled or ran out of time."""


class _Http(urllib.request.HTTPRedirectHandler):
    """Redirects only to http(s): urllib's default would also follow one to ftp://."""

    def http_error_302(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: HTTPMessage
    ) -> Any:
        target = urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urlsplit(target).scheme not in ("http", "https"):
            fp.close()
            raise urllib.error.URLError(f"refused a redirect to {target!r}: only http(s)")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener() -> urllib.request.OpenerDirector:
    """An opener that speaks http(s) only: no file://, ftp:// or data: handlers."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _Http(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class _Call:
    """One run of an api task: its deadline, its stop signal and its requests."""

    def __init__(self, run: TaskRun, params: ApiParams) -> None:
        self.run = run
        self.params = params
        self.opener = _opener()
        timeout = run.task.timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last: _Answer | None = None  # the latest answer to the POST or a poll

    # --- the task -----------------------------------------------------------------------

    def execute(self) -> None:
        """Upload, call, wait, download; raise _Stop unless it all succeeded."""
        for path, url in self.params.upload.items():
            self.upload(path, url)
        answer = self.post()
        if self.running(answer):
            if not self.params.poll:
                self.judge(answer, accepted=True)
                return
            location = self.status_url(answer)
            while self.running(answer):
                try:
                    self.pause()
                    answer = self.request("GET", location, self.params.headers)
                except _Stop:
                    self.forget(location)
                    raise
                self.last = answer
        self.judge(answer)
        for path, url in self.params.download.items():
            self.download(path, url)

    def upload(self, path: str, url: str) -> None:
        source = self.run.workdir / path
        if not source.is_file():
            raise _Stop(EXIT_ERROR, f"job file {path} to upload is not in the workdir")
        answer = self.request(
            "PUT", url, {"Content-Type": "application/octet-stream"}, source.read_bytes()
        )
        if not 200 <= answer.code < 300:
            raise _Stop(answer.code, f"upload of {path} to {url}: HTTP {answer.code}")

    def post(self) -> _Answer:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **self.params.headers,
        }
        body = json.dumps(self.params.body, allow_nan=False).encode()
        self.last = self.request("POST", self.params.url, headers, body)
        return self.last

    def download(self, path: str, url: str) -> None:
        target = self.run.workdir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        answer = self.request("GET", url, {}, sink=target)
        if not 200 <= answer.code < 300:
            target.unlink(missing_ok=True)
            detail = answer.body.decode(errors="replace")[:500]
            raise _Stop(answer.code, f"download of {path} from {url}: HTTP {answer.code} {detail}")

    # --- the contract ---------------------------------------------------------------------

    @staticmethod
    def running(answer: _Answer) -> bool:
        document = answer.document()
        said = document.get("status") if isinstance(document, dict) else None
        return answer.code == 202 or (200 <= answer.code < 300 and said == "running")

    def status_url(self, answer: _Answer) -> str:
        document = answer.document()
        location = answer.headers.get("Location") or (
            document.get("status_url") if isinstance(document, dict) else None
        )
        if not isinstance(location, str) or not location:
            raise _Stop(EXIT_ERROR, "the call was accepted, but named no status URL to poll")
        url = urljoin(self.params.url, location)
        try:
            return _web_url(url)
        except ValueError as exc:
            raise _Stop(EXIT_ERROR, f"status URL: {exc}") from None

    def judge(self, answer: _Answer, accepted: bool = False) -> None:
        """Raise _Stop unless the final answer says the call succeeded."""
        text = answer.body.decode(errors="replace")[:500]
        if not 200 <= answer.code < 300:
            raise _Stop(answer.code, f"HTTP {answer.code}: {text}")
        if accepted:
            return
        document = answer.document()
        if not isinstance(document, dict):
            return  # a 2xx that is not a JSON object: nothing says it failed
        status = document.get("status", "succeeded")
        reported = document.get("exit_code")
        code = reported if isinstance(reported, int) and not isinstance(reported, bool) else None
        if status == "failed":
            raise _Stop(code or EXIT_ERROR, f"the call failed: {text}")
        if status != "succeeded":
            raise _Stop(EXIT_ERROR, f"unknown status {status!r} in the answer: {text}")
        if code:
            raise _Stop(code, f"the call succeeded with exit code {code}: {text}")

    # --- requests ---------------------------------------------------------------------------

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        if self.run.cancelled.is_set():
            raise _Stop(EXIT_CANCELLED, "cancelled")
        left = self.remaining()
        if left is not None and left <= 0:
            raise _Stop(EXIT_TIMEOUT, f"timed out after {self.run.task.timeout} s", timed_out=True)

    def pause(self) -> None:
        """Wait one polling interval, or less when cancelled or out of time."""
        left = self.remaining()
        wait = self.params.interval if left is None else max(0.0, min(self.params.interval, left))
        self.run.cancelled.wait(wait)
        self.check()

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: bytes | None = None,
        sink: Path | None = None,
    ) -> _Answer:
        """One HTTP exchange, abandoned when the task is cancelled or out of time."""
        self.check()
        left = self.remaining()
        timeout = self.params.request_timeout
        if left is not None:
            timeout = min(left, timeout)
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        abandoned = threading.Event()
        try:
            return self.watch(
                lambda: _exchange(self.opener, request, max(timeout, 0.01), sink, abandoned)
            )
        except _Abandon:
            abandoned.set()  # its thread ends by its socket timeout; nobody reads its answer
            self.check()
            raise  # not reached: check() raises for what made watch() give up
        except (urllib.error.URLError, OSError, HTTPException, ValueError) as exc:
            self.check()  # a socket timeout at the deadline is the task's timeout
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise _Stop(EXIT_ERROR, f"{method} {url}: {reason}") from None

    def watch(self, exchange: Callable[[], T]) -> T:
        """Run a blocking exchange in a helper thread; give it up on cancel or deadline."""
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()

        def target() -> None:
            try:
                outcome.append((True, exchange()))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=target, name=f"api-{self.run.label}", daemon=True).start()
        while not done.wait(WATCH):
            left = self.remaining()
            if self.run.cancelled.is_set() or (left is not None and left <= 0):
                raise _Abandon
        ok, value = outcome[0]
        if ok:
            result: T = value
            return result
        raise value

    def forget(self, location: str) -> None:
        """Best effort: tell the service the call is no longer wanted."""
        request = urllib.request.Request(location, headers=self.params.headers, method="DELETE")

        def delete() -> None:
            with contextlib.suppress(Exception):  # whatever happens, nobody waits for it
                _exchange(self.opener, request, DELETE_TIMEOUT, None, threading.Event())

        threading.Thread(target=delete, name=f"api-{self.run.label}-delete", daemon=True).start()


def _exchange(
    opener: urllib.request.OpenerDirector,
    request: urllib.request.Request,
    timeout: float,
    sink: Path | None,
    abandoned: threading.Event,
) -> _Answer:
    """Send a request and read its answer: into memory (bounded), or into `sink` on 2xx."""
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:  # a non-2xx answer is still an answer
        with error:
            return _Answer(error.code, error.headers, error.read(MAX_ANSWER))
    with response:
        code = int(response.status)
        if sink is None or not 200 <= code < 300:
            body = response.read(MAX_ANSWER + 1)
            if len(body) > MAX_ANSWER:
                raise ValueError(f"the answer is larger than {MAX_ANSWER} bytes")
            return _Answer(code, response.headers, body)
        with sink.open("wb") as out:
            while chunk := response.read(CHUNK):
                if abandoned.is_set():
                    break
                out.write(chunk)
        if abandoned.is_set():
            sink.unlink(missing_ok=True)
        return _Answer(code, response.headers, b"")


class ApiExecutor(Executor):
    """Runs a task as a call to an HTTP service.

    Standard library only (urllib). The contract a service implements:

    1. Before the call, each job file of `upload` (it must be in the task's workdir, i.e. one
       of its `inputs`) is PUT, as raw bytes, to its URL; any non-2xx answer fails the task.
    2. `body` (a JSON object) is POSTed to `url` with `Content-Type: application/json` and the
       task's `headers`.
    3. The answer is either final or, when it is `202 Accepted` (or a 2xx whose JSON says
       `"status": "running"`), a promise: its `Location` header (or a `status_url` field of
       its JSON), resolved against `url`, is then GET every `interval` seconds (with the same
       headers) until it answers something other than 202 / `"running"`. With `poll: false`
       an accepted call counts as done.
    4. A final answer is JSON `{"status": "succeeded" | "failed", "result": ..., "exit_code": n}`
       (`status` defaults to succeeded, `result` is anything, `exit_code` is optional). The
       task succeeds when the answer is 2xx, not `failed`, and reports no non-zero exit code.
       A non-2xx answer fails it with the HTTP status as exit code; `failed` fails it with the
       reported exit code, or 1.
    5. After a success, each job file of `download` is fetched with GET from its URL and
       written into the workdir, so the runner stores it as an output (list it in `outputs`).

    The task's stdout is the body of the final answer, its stderr the error text. The task's
    `timeout` bounds everything (every socket timeout is at most `request_timeout` and the
    time left, and a request still pending at the deadline is abandoned); a cancelled task
    stops at once. Either way, a call being polled gets a best-effort DELETE of its status
    URL, so a service that supports it can stop the work. Without a timeout, a call is polled
    until the service says it is done or the task is cancelled. Only http:// and https:// URLs are
    followed, redirects included: a task cannot read the worker's own files through file://.
    Errors without an HTTP status exit with 1, a timeout with 124, a cancellation with 130.
    """

    name = "api"

    def run(self, run: TaskRun) -> TaskResult:
        params = ApiParams.model_validate(run.task.params)
        call = _Call(run, params)
        try:
            call.execute()
        except _Stop as stop:
            return TaskResult(
                stop.exit_code, _stdout(call.last), f"{stop}\n".encode(), stop.timed_out
            )
        return TaskResult(0, _stdout(call.last), b"")


def _stdout(answer: _Answer | None) -> bytes:
    if answer is None or not answer.body:
        return b""
    return answer.body if answer.body.endswith(b"\n") else answer.body + b"\n"


register_executor("api", ApiExecutor, ApiParams)
