"""What every page shares: the session middleware (who is logged in, the form token on every
state change), the setup page shown while no admin exists, and `render`."""
from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .. import security
from ..sessions import COOKIE

PUBLIC = ("/login",)
# Per-request state (aiohttp >= 3.13 wants typed keys; plain strings before that).
_Key = getattr(web, "RequestKey", None)
SESSION = _Key("relay_admin_session", object) if _Key else "relay_admin_session"
CSRF = _Key("relay_admin_csrf", str) if _Key else "relay_admin_csrf"


def session_of(request: web.Request):
    return request.get(SESSION)


def deps(request: web.Request):
    from ..app import DEPS
    return request.config_dict[DEPS]


@web.middleware
async def session_middleware(request: web.Request, handler):
    path = request.path
    if path.startswith(security.STATIC_PREFIX) or security.is_api(path):
        return await handler(request)
    d = deps(request)
    if await d.accounts.count() == 0:
        # No admin yet: accounts come from the CLI only, so there is nothing to log in to.
        return render(request, "setup.html", status=503)
    token = request.cookies.get(COOKIE)
    session = await d.sessions.lookup(token)
    request[SESSION] = session
    request[CSRF] = security.form_token(token) if session and token else ""
    if path in PUBLIC:
        # Login checks no session (and may replace one): the cross-site check covers it.
        return await handler(request)
    if session is None:
        if request.method in security.SAFE_METHODS:
            raise web.HTTPSeeOther("/login")
        raise web.HTTPForbidden(text="not logged in (or the session expired)\n")
    if request.method not in security.SAFE_METHODS:
        form = await request.post()
        if not security.form_token_ok(token, form.get("csrf") if isinstance(form.get("csrf"), str) else None):
            raise web.HTTPForbidden(text="form token missing or stale: reload the page and try again\n")
    return await handler(request)


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    d = deps(request)
    ctx.setdefault("title", "")
    base_ctx = {"session": request.get(SESSION), "csrf": request.get(CSRF, ""), "ops": d.ops is not None,
                "hostname": d.cfg.server.hostname, "path": request.path}
    return aiohttp_jinja2.render_template(template, request, {**base_ctx, **ctx}, status=status)


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/domains" if deps(request).ops is not None else "/settings")
