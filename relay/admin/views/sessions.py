"""The admin's own sessions (list, revoke) and password change (which ends every other one)."""
from __future__ import annotations

import logging
import math

from aiohttp import web

from ...credentials import password_problem
from ...logs import event
from .base import deps, render, session_of

log = logging.getLogger("relay.admin")


async def sessions_page(request: web.Request, message: str | None = None, error: str | None = None,
                        status: int = 200) -> web.StreamResponse:
    d = deps(request)
    me = session_of(request)
    rows = await d.sessions.list(me.username)
    return render(request, "sessions.html", status=status, title="Admin sessions", sessions=rows,
                  current=me.token_hash, message=message, error=error,
                  min_length=d.cfg.credentials.min_password_length)


async def revoke(request: web.Request) -> web.StreamResponse:
    d = deps(request)
    me = session_of(request)
    form = await request.post()
    th = str(form.get("session", ""))
    await d.sessions.delete_hash(th, username=me.username)
    event(log, "admin_session_revoked", ip=request.remote or "-", user=me.username)
    raise web.HTTPSeeOther("/login" if th == me.token_hash else "/sessions")


async def change_password(request: web.Request) -> web.StreamResponse:
    d = deps(request)
    me = session_of(request)
    form = await request.post()
    current, new, again = (str(form.get(k, ""))[:1024] for k in ("current", "new", "again"))
    ip = request.remote or "-"
    # The current password is a login: the same budget, or an open session guesses it freely.
    wait = d.limiter.locked(ip, me.username)
    if wait:
        event(log, "admin_auth_locked", logging.WARNING, ip=ip, user=me.username)
        minutes = max(1, math.ceil(wait / 60))
        return await sessions_page(request, status=429, error=(
            f"Too many wrong passwords. Try again in {minutes} minute{'s' if minutes > 1 else ''}."))
    if not await d.accounts.verify(me.username, current):
        d.limiter.failed(ip, me.username)
        event(log, "admin_auth_failed", logging.WARNING, ip=ip, user=me.username)
        return await sessions_page(request, error="The current password is wrong.", status=400)
    problem = password_problem(me.username, new, d.cfg.credentials.min_password_length)
    if problem or new != again:
        return await sessions_page(request, error=problem or "The new passwords do not match.", status=400)
    revoked = await d.accounts.set_password(me.username, new, keep_session=me.token_hash)
    event(log, "admin_password_changed", ip=request.remote or "-", user=me.username, sessions_revoked=revoked)
    return await sessions_page(request, message=f"Password changed; {revoked} other session(s) ended.")


def routes(app: web.Application) -> None:
    app.router.add_get("/sessions", sessions_page)
    app.router.add_post("/sessions/revoke", revoke)
    app.router.add_post("/sessions/password", change_password)
