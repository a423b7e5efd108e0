"""A latency injector: a TCP proxy delaying every chunk by a fixed time, order preserved.

There is no netem on this kernel. `DelayProxy(listen=(host, port), upstream=(host, port),
delay=0.1)` accepts connections on `listen`, opens one to `upstream` for each, and
forwards bytes both ways; each chunk read is written `delay` seconds after it was read
(one-way, in each direction: a round trip through the proxy gains 2 * delay). Chunks of
one direction leave in the order they arrived, and reading goes on while earlier chunks
wait, so the delay does not throttle throughput.

It runs an asyncio loop on a daemon thread of the test process: `start()`, `stop()`, or
use it as a context manager. `stop()` closes the listener and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass


@dataclass
class ProxyStats:
    connections: int = 0
    chunks: int = 0
    bytes: int = 0


class DelayProxy:
    def __init__(
        self, listen: tuple[str, int], upstream: tuple[str, int], delay: float = 0.1
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.delay = delay
        self.stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port is the real one when `listen` asked for port 0)."""
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def start(self) -> DelayProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        future.result(timeout=10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop thread ----------------------------------------------------------------

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            self._writers.add(up_writer)
            self.stats.connections += 1
            pipes = [
                asyncio.ensure_future(self._pipe(reader, up_writer)),
                asyncio.ensure_future(self._pipe(up_reader, writer)),
            ]
            try:
                # Either side gone: the whole connection goes, as a real link would take it.
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                up_writer.close()
                self._writers.discard(up_writer)
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction: read at once, write each chunk `delay` after its read."""
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await chunks.get()
                if not data:
                    break  # end of stream, delayed like the data before it
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.stats.chunks += 1
                self.stats.bytes += len(data)
            with contextlib.suppress(OSError):
                writer.write_eof()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except OSError:
                    data = b""
                chunks.put_nowait((time.monotonic() + self.delay, data))
                if not data or sender.done():
                    break  # end of stream, or the other side is gone
            await sender
        finally:
            sender.cancel()
