"""make_app: the admin's aiohttp application. The daemon builds it with the stores it already
has (and, where present, the operations layer and the HTTP API), on the relay's own loop."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp_jinja2
import jinja2
from aiohttp import web

from ..config import Config
from . import proxies, security
from .accounts import AdminAccounts
from .ratelimit import LoginLimiter
from .sessions import COOKIE, SessionStore
from .views import auth, base, settings
from .views import sessions as sessions_view

log = logging.getLogger("relay.admin")
STATIC_DIR = Path(__file__).parent / "static"
DEPS: web.AppKey["AdminDeps"] = web.AppKey("relay_admin_deps")


@dataclass
class AdminDeps:
    cfg: Config
    accounts: AdminAccounts
    sessions: SessionStore
    limiter: LoginLimiter
    # (port, tls mode) of each bound SMTP listener, for the settings panel.
    listeners: list[tuple[int, str]] = field(default_factory=list)
    ops: Any = None  # relay.operations.Operations, once that layer exists
    extra: dict[str, Any] = field(default_factory=dict)


def _filters(env: jinja2.Environment) -> None:
    def when(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "never"

    def ago(ts: float | None) -> str:
        if not ts:
            return "never"
        s = max(0, int(time.time() - ts))
        for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
            if s >= n:
                return f"{s // n} {unit} ago"
        return f"{s} s ago"

    def trunc(text: Any, n: int = 200) -> str:
        # Remote replies and subjects are hostile and unbounded: cut, never marked safe.
        t = "" if text is None else str(text)
        return t if len(t) <= n else t[: n - 1] + "…"

    env.filters.update(when=when, ago=ago, trunc=trunc)


def make_app(deps: AdminDeps, *, api_app: web.Application | None = None) -> web.Application:
    a = deps.cfg.admin
    app = web.Application(client_max_size=64 * 1024, middlewares=[
        proxies.middleware(proxies.parse_networks(a.trusted_proxies)),
        security.headers_middleware(hsts=a.tls),
        security.csrf_middleware(a.public_origin),
        base.session_middleware,
    ])
    app[DEPS] = deps
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("relay.admin", "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined)
    _filters(env)
    app.router.add_static("/static/", STATIC_DIR, append_version=True, name="static")
    app.router.add_get("/", base.home)
    auth.routes(app)
    settings.routes(app)
    sessions_view.routes(app)
    _add_operation_pages(app, deps)
    if api_app is not None:
        # Bearer auth of its own: the session and form-token middleware skip /api/.
        app.add_subapp("/api/v1/", api_app)
    return app


def _add_operation_pages(app: web.Application, deps: AdminDeps) -> None:
    if deps.ops is None:
        return
    from .views import audit, domains, queue
    domains.routes(app)
    queue.routes(app)
    audit.routes(app)


__all__ = ["AdminDeps", "COOKIE", "DEPS", "make_app"]
