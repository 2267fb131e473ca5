"""The HTTP API on a real socket (127.0.0.1, port 0) over real stores, in a thread of its own.

The API app is mounted as the web admin mounts it (`/api/v1/` on a parent app), on its own
event loop in a thread, so sync tests (requests, smtplib, schemathesis) can call it, and it can
share a database file with a running relay process:

    with ApiServer(cfg) as api:
        token = api.add_key("write")
        requests.get(api.url + "/domains", headers={"Authorization": f"Bearer {token}"})
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from relay.api import AuthFailures, make_api_app
from relay.config import Config
from relay.operations import Actor, Operations
from relay.store.factory import open_stores


class ApiServer:
    def __init__(self, cfg: Config, *, auth_failures: AuthFailures | None = None, max_body: int | None = None):
        self.cfg = cfg
        self.auth_failures = auth_failures or AuthFailures(limit=1000)
        self.max_body = max_body
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="api-server", daemon=True)
        self.port = 0
        self.ops: Operations | None = None
        self._runner: web.AppRunner | None = None
        self._stores = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def run(self, coro, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self._stores = await open_stores(self.cfg, role="cli")
        self.ops = Operations(self._stores, self.cfg)
        root = web.Application()
        kwargs = {"auth_failures": self.auth_failures}
        if self.max_body is not None:
            kwargs["max_body"] = self.max_body
        root.add_subapp("/api/v1/", make_api_app(self.ops, **kwargs))
        self._runner = web.AppRunner(root, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._stores is not None:
            await self._stores.close()

    def start(self) -> "ApiServer":
        self._thread.start()
        self.run(self._start())
        return self

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def add_key(self, scope: str = "write", name: str = "test") -> str:
        _, token = self.run(self.ops.add_api_key(Actor("tests", "cli"), name, scope))
        return token
