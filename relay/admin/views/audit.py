"""The audit log: who changed what, when, from where (read-only, newest first, by id pages)."""
from __future__ import annotations

from aiohttp import web

from .base import render
from .ops_base import handles_errors, ops

PAGE = 50


@handles_errors
async def audit_page(request: web.Request) -> web.StreamResponse:
    before_s = request.query.get("before", "")
    before = int(before_s) if before_s.isdigit() else None
    entries = await ops(request).list_audit(before=before, limit=PAGE)
    older = f"/audit?before={entries[-1].id}" if len(entries) == PAGE else None
    return render(request, "audit.html", title="Audit log", entries=entries, older=older)


def routes(app: web.Application) -> None:
    app.router.add_get("/audit", audit_page)
