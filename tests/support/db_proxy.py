"""A TCP forwarder between one relay node and PostgreSQL that a test can cut (scale-out.md
section 4: no iptables on this box, so a partition is a proxy that stops forwarding).

    proxy = DBProxy(upstream_port).start()      # listens on 127.0.0.1:proxy.port
    proxy.blackhole()   # open connections stall (bytes swallowed, nothing answered), new ones
                        # are accepted and hang: what a dead network link looks like to the node
    proxy.drop()        # open connections reset, new ones refused (closed at once)
    proxy.restore()     # forward again (connections open across the cut are reset)
    proxy.retarget(port)  # new connections go to another server (a promoted standby)

It runs on its own event loop in a daemon thread; stop() closes everything within seconds.
"""
from __future__ import annotations

import asyncio
import socket
import threading

MODES = ("forward", "blackhole", "drop")


class DBProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode = "forward"
        self.accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()

    # ------------------------------------------------------------ control (from the test thread)

    def start(self) -> "DBProxy":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"dbproxy-{self.upstream[1]}")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("db proxy did not start")
        return self

    def _call(self, fn, *args) -> None:
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()
        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def blackhole(self) -> None:
        self._call(self._set_mode, "blackhole")

    def drop(self) -> None:
        self._call(self._set_mode, "drop")

    def restore(self) -> None:
        """Forward again. Connections open across the cut lost bytes: they are reset (as a TCP
        connection that timed out would be), so the node reconnects."""
        def go() -> None:
            self._reset_all()
            self.mode = "forward"
        self._call(go)

    def retarget(self, port: int, host: str = "127.0.0.1") -> None:
        """New connections go to host:port; open ones are reset (the old server is gone)."""
        def go() -> None:
            self.upstream = (host, port)
            self._reset_all()
        self._call(go)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        def shut() -> None:
            self._reset_all()
            if self._server is not None:
                self._server.close()
            loop.stop()
        loop.call_soon_threadsafe(shut)
        self._thread.join(10)
        self._loop = None

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, self.host, 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _set_mode(self, mode: str) -> None:
        assert mode in MODES
        self.mode = mode
        if mode == "drop":
            self._reset_all()

    def _reset_all(self) -> None:
        for w in list(self._writers):
            sock = w.get_extra_info("socket")
            try:
                if sock is not None:  # RST, not FIN: the node sees a broken link at once
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            w.transport.abort()
        self._writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "drop":
            writer.transport.abort()
            return
        self._writers.add(writer)
        if self.mode == "blackhole":
            await self._swallow(reader, writer)
            return
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, asyncio.TimeoutError):
            self._writers.discard(writer)
            writer.transport.abort()
            return
        self._writers.add(up_w)
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)
        for w in (writer, up_w):
            self._writers.discard(w)
            w.transport.abort()

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        except (OSError, ConnectionError):
            pass
        self._writers.discard(writer)
        writer.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.mode != "forward":
                    continue  # the link is down: what either side sends is lost, nothing arrives
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            try:
                dst.transport.abort()
            except Exception:  # noqa: BLE001
                pass
