"""The admin's listener: built by the daemon on its own loop (web.AppRunner, which leaves the
signals to the daemon), stopped in the SIGTERM drain, reconfigured (timeouts, login limits) on
SIGHUP. Its reads use a connection of its own, so a queue page never waits behind an AUTH lookup."""
from __future__ import annotations

import logging
import ssl
from concurrent.futures import Executor
from typing import Any, Awaitable, Callable

import aiosqlite
from aiohttp import web

from .. import config as config_mod
from ..config import Config
from ..logs import event
from ..store.writer import GroupWriter
from .accounts import AdminAccounts
from .app import AdminDeps, make_app
from .ratelimit import LoginLimiter
from .sessions import SessionStore

log = logging.getLogger("relay.admin")


class ReloadableTLS:
    """The admin listener's SSLContext: asyncio keeps the one it was given for the server's
    life, so that context's SNI callback (run at every ClientHello, with or without SNI) hands
    each handshake the daemon's current context; SIGHUP swaps `current`, as for SMTP."""

    def __init__(self, cfg: Config, current: ssl.SSLContext):
        from .. import tls
        self.current = current
        self.context = tls.server_context(cfg.tls.cert, cfg.tls.key)
        self.context.sni_callback = self._pick

    def _pick(self, sslobj: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
        if self.current is not ctx:
            sslobj.context = self.current


class AdminServer:
    def __init__(self, runner: web.AppRunner, close: Callable[[], Awaitable[None]], deps: AdminDeps, host: str,
                 port: int, tls: ReloadableTLS | None = None):
        self._runner = runner
        self._close = close  # the admin's own reading connection, if it has one
        self.deps = deps
        self.host, self.port = host, port
        self.tls = tls

    def set_tls_context(self, context: ssl.SSLContext) -> None:
        if self.tls is not None:
            self.tls.current = context

    def configure(self, cfg: Config) -> None:
        a = cfg.admin
        self.deps.sessions.configure(a.session_idle_timeout, a.session_absolute_timeout)
        self.deps.limiter.configure(a.login_failures, a.login_failure_window, a.login_lockout)
        self.deps.cfg = cfg
        if self.deps.ops is not None:
            self.deps.ops.configure(cfg)

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._close()


def build_deps(cfg: Config, conn: aiosqlite.Connection, writer: GroupWriter, executor: Executor | None,
               listeners: list[tuple[int, str]] | None = None, ops: Any = None) -> AdminDeps:
    """The admin's parts over a SQLite reading connection and the process's writer."""
    a = cfg.admin
    return assemble(cfg, AdminAccounts(conn, writer, cfg.credentials, executor),
                    SessionStore(conn, writer, idle_timeout=a.session_idle_timeout,
                                 absolute_timeout=a.session_absolute_timeout), listeners, ops)


def assemble(cfg: Config, accounts: Any, sessions: Any, listeners: list[tuple[int, str]] | None = None,
             ops: Any = None) -> AdminDeps:
    a = cfg.admin
    return AdminDeps(cfg=cfg, accounts=accounts, sessions=sessions,
                     limiter=LoginLimiter(a.login_failures, a.login_failure_window, a.login_lockout),
                     listeners=list(listeners or []), ops=ops)


async def start(cfg: Config, stores: Any, executor: Executor | None, tls_context: ssl.SSLContext | None,
                listeners: list[tuple[int, str]], ops: Any = None, api_app: web.Application | None = None
                ) -> AdminServer:
    """stores: the process's `store.factory.Stores` (SQLite: a reading connection of the admin's
    own; PostgreSQL: the shared pool, so every node sees the same accounts and sessions)."""
    host, port = config_mod.parse_hostport(cfg.admin.listen, 8025)
    accounts, sessions, close = await stores.admin_stores(executor)
    reloadable = ReloadableTLS(cfg, tls_context) if cfg.admin.tls and tls_context is not None else None
    try:
        deps = assemble(cfg, accounts, sessions, listeners, ops)
        runner = web.AppRunner(make_app(deps, api_app=api_app), handle_signals=False, access_log=None,
                               shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=reloadable.context if reloadable else None)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            from ..server.listeners import bind_error
            raise bind_error("admin listener", host, port, exc) from None
    except BaseException:
        await close()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    event(log, "listening", address=host, port=bound, tls="tls" if cfg.admin.tls else "none", admin="/")
    return AdminServer(runner, close, deps, host, bound, reloadable)
