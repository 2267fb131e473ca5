"""A TCP forwarder on 127.0.0.1 that a test can cut and restore: `cut()` resets every forwarded
connection and stops listening (new connections are refused), `restore()` listens again on the
same port. Runs on the test's own event loop (async with CuttableProxy(host, port) as p)."""
from __future__ import annotations

import asyncio
import socket
import struct


class CuttableProxy:
    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "CuttableProxy":
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            sock = w.get_extra_info("socket")
            if sock is not None:  # a reset, not a polite FIN: like a link that dropped
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        t = asyncio.get_running_loop().create_task(self._listen())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def restored(self) -> None:
        while self._server is None:
            await asyncio.sleep(0.01)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.transport.abort()
        tasks = [asyncio.create_task(pipe(reader, up_w)), asyncio.create_task(pipe(up_r, writer))]
        self._tasks.update(tasks)
        for t in tasks:
            t.add_done_callback(self._tasks.discard)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writers.discard(writer)
        self._writers.discard(up_w)
