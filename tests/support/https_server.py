"""A real HTTPS server for tests (aiohttp on its own loop thread): serves MTA-STS policy files
by Host header, scriptable per host (status, media type, body, redirect, size), counting requests.

    with PolicyServer(ssl_context) as web:
        web.policies["mta-sts.a.test"] = "version: STSv1\\n..."
        web.responses["mta-sts.b.test"] = (302, "text/plain", b"", {"Location": "https://x/"})
"""
from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter

from aiohttp import web


class PolicyServer:
    def __init__(self, ssl_context: ssl.SSLContext, host: str = "127.0.0.1"):
        self.ssl_context = ssl_context
        self.host = host
        self.port = 0
        self.policies: dict[str, str] = {}                       # host -> body served as text/plain
        self.responses: dict[str, tuple[int, str, bytes, dict]] = {}  # host -> scripted (status, type, body, headers)
        self.requests: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        host = (request.host or "").split(":")[0].lower()
        self.requests[host] += 1
        if request.path != "/.well-known/mta-sts.txt":
            return web.Response(status=404)
        if host in self.responses:
            status, ctype, body, headers = self.responses[host]
            return web.Response(status=status, body=body, headers={"Content-Type": ctype, **headers})
        if host in self.policies:
            return web.Response(body=self.policies[host].encode(), headers={"Content-Type": "text/plain"})
        return web.Response(status=404)

    def start(self) -> "PolicyServer":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="policy-https", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the HTTPS policy server did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._open())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
