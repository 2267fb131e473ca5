"""Login and logout. One argon2 verification per attempt (accounts.verify), the rate limit
before it, and the stable fail2ban line `event=admin_auth_failed ip=... user=...` after it."""
from __future__ import annotations

import logging
import math

from aiohttp import web

from ...logs import event
from ..sessions import COOKIE, token_hash
from .base import deps, render, session_of

log = logging.getLogger("relay.admin")


async def login_page(request: web.Request) -> web.StreamResponse:
    if session_of(request) is not None:
        raise web.HTTPSeeOther("/")
    return render(request, "login.html", title="Log in", error=None, username="")


async def login(request: web.Request) -> web.StreamResponse:
    d = deps(request)
    form = await request.post()
    username = str(form.get("username", ""))[:64].strip()
    password = str(form.get("password", ""))[:1024]
    ip = request.remote or "-"
    wait = d.limiter.locked(ip, username)
    if wait:
        event(log, "admin_auth_locked", logging.WARNING, ip=ip, user=username)
        minutes = max(1, math.ceil(wait / 60))
        return render(request, "login.html", status=429, title="Log in", username=username,
                      error=f"Too many failed logins. Try again in {minutes} minute{'s' if minutes > 1 else ''}.")
    if not username or not await d.accounts.verify(username, password):
        d.limiter.failed(ip, username)
        event(log, "admin_auth_failed", logging.WARNING, ip=ip, user=username)
        return render(request, "login.html", status=401, title="Log in", username=username,
                      error="Wrong admin name or password.")
    d.limiter.succeeded(ip, username)
    old = request.cookies.get(COOKIE)
    if old:
        await d.sessions.delete_hash(token_hash(old))
    token = await d.sessions.create(username, ip, request.headers.get("User-Agent"))
    await d.accounts.record_login(username)
    event(log, "admin_login", ip=ip, user=username)
    resp = web.HTTPSeeOther("/")
    resp.set_cookie(COOKIE, token, secure=True, httponly=True, samesite="Strict", path="/")
    raise resp


async def logout(request: web.Request) -> web.StreamResponse:
    d = deps(request)
    s = session_of(request)
    await d.sessions.delete_hash(s.token_hash)
    event(log, "admin_logout", ip=request.remote or "-", user=s.username)
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    raise resp


def routes(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
