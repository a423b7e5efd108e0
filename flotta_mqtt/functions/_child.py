"""The processes that run calls on a worker, outside the agent's interpreter.

A worker's `python` executor starts one *zygote* that imports flotta_mqtt and cloudpickle
once and then only forks, as forking a warm interpreter is far cheaper than starting one
(bench/README.md). Each fork is a call process for one workspace, which runs calls one at a
time; the zygote never imports a workspace, so workspaces never mix.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_LENGTH = struct.Struct(">I")


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """One length-prefixed JSON frame: a request or a reply between executor and call process."""
    data = json.dumps(message).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None when the other side has closed the socket."""
    header = _recv_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    body = _recv_exactly(sock, _LENGTH.unpack(header)[0])
    if body is None:
        return None
    frame: dict[str, Any] = json.loads(body)
    return frame


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        try:
            chunk = sock.recv(min(size, 1 << 20))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# --- the zygote ------------------------------------------------------------------------


def zygote() -> None:
    """Serve fork requests on the socket named by FLOTTA_ZYGOTE_FD until it closes.

    A request is one JSON datagram carrying the call process's Unix socket (SCM_RIGHTS);
    the answer, the forked process's pid.
    """
    control = socket.socket(fileno=int(os.environ.pop("FLOTTA_ZYGOTE_FD")))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it stops when its executor goes
    # Everything a call process needs before its workspace: imported once, here.
    import cloudpickle  # noqa: F401

    import flotta_mqtt  # noqa: F401
    from flotta_mqtt.functions import calls  # noqa: F401

    # `python -c` put the working folder first on the path: a workspace must not see it.
    while "" in sys.path:
        sys.path.remove("")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the call processes
    control.send(b"ready")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 1)
        except OSError:
            break
        if not message:
            break
        if not fds:
            continue
        spec = json.loads(message)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                control.close()
                serve(socket.socket(fileno=fds[0]), spec)
            except BaseException:
                traceback.print_exc()
                status = 1
            finally:
                os._exit(status)
        os.close(fds[0])
        control.send(json.dumps({"pid": pid}).encode())


# --- a call process ---------------------------------------------------------------------


def serve(sock: socket.socket, spec: dict[str, Any]) -> None:
    """Run calls for one workspace until the executor closes the socket."""
    os.setsid()  # its own process group: killing it kills what the call started
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocess.wait() must work in calls
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(spec["env"])
    workspace = spec["workspace"]
    sys.path[:0] = [workspace, *spec.get("paths", [])]
    os.chdir(workspace)
    functions: dict[str, Callable[..., Any]] = {}
    while True:
        request = recv_frame(sock)
        if request is None:
            return
        try:
            run_call(request, functions, spec["env"].get("FLOTTA_NODE", ""))
            reply: dict[str, Any] = {"ok": True}
        except Exception as exc:  # the outcome could not be written: the task fails
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.chdir(workspace)
        send_frame(sock, reply)


def run_call(request: dict[str, Any], functions: dict[str, Callable[..., Any]], node: str) -> None:
    """Run one call with its output captured; write its sealed outcome."""
    from flotta_mqtt.functions import calls

    with _captured(request["stdout"], request["stderr"]):
        if request.get("notes"):
            print(request["notes"], file=sys.stderr)
        os.chdir(request["cwd"])
        try:
            function = _function(request, functions)
            if request.get("call") is not None:
                payload = base64.b64decode(request["call"])
            else:
                payload = Path(request["call_path"]).read_bytes()
            import cloudpickle

            args, kwargs = cloudpickle.loads(payload)
        except BaseException as exc:
            outcome = calls.raised(exc, node)
        else:
            try:
                value = function(*args, **kwargs)
            except BaseException as exc:
                # Drop this frame from the traceback: the caller's starts in their function.
                tb = exc.__traceback__
                outcome = calls.raised(exc.with_traceback(tb.tb_next if tb else None), node)
            else:
                try:
                    outcome = calls.Outcome(kind="value", value=calls.dumps(value), worker=node)
                except Exception as exc:
                    error = TypeError(
                        f"the value {request['name']} returned could not be pickled: {exc}"
                    )
                    outcome = calls.raised(error, node)
    target = Path(request["result"])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(calls.seal(outcome))


def _function(request: dict[str, Any], functions: dict[str, Callable[..., Any]]) -> Any:
    """The function to call: imported from the workspace, or unpickled by value (cached)."""
    key = request.get("pickled") or request["name"]  # a pickled function's file: its sha256
    if key in functions:
        return functions[key]
    if request.get("pickled"):
        import cloudpickle

        function = cloudpickle.loads(Path(request["pickled"]).read_bytes())
    else:
        module_name, qualname = request["function"]["module"], request["function"]["qualname"]
        try:
            target: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name.split(".")[0] and exc.name != module_name:
                raise
            raise ModuleNotFoundError(
                f"{module_name} is not in the workspace shipped with this call (nor installed "
                "on the worker): a distributed function must live in the workspace folder "
                "or in the main script",
                name=module_name,
            ) from None
        for part in qualname.split("."):
            target = getattr(target, part)
        function = target
    # The decorated object stands for remote calls; the worker runs what it wraps.
    function = getattr(function, "__flotta_local__", function)
    functions[key] = function
    return function


@contextlib.contextmanager
def _captured(stdout: str, stderr: str) -> Iterator[None]:
    """Point file descriptors 1 and 2 at the call's log files, children's output included."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    opened = [
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for path in (stdout, stderr)
    ]
    os.dup2(opened[0], 1)
    os.dup2(opened[1], 2)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, *opened):
            os.close(fd)
