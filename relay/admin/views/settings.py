"""The provider's "SMTP Settings" panel: what a user copies into a mail client."""
from __future__ import annotations

from aiohttp import web

from ...replies import NOT_A_MAILBOX
from .base import deps, render

MODES = {"starttls": "STARTTLS", "implicit": "Implicit TLS (SSL/TLS)"}


def listener_rows(listeners: list[tuple[int, str]]) -> list[dict]:
    return [{"port": port, "mode": MODES.get(tls, tls),
             "note": "TLS from the first byte" if tls == "implicit" else "TLS required before AUTH"}
            for port, tls in sorted(set(listeners))]


async def settings_page(request: web.Request) -> web.StreamResponse:
    d = deps(request)
    listeners = d.listeners or [(lst.port, lst.tls) for lst in d.cfg.listeners]
    return render(request, "settings.html", title="SMTP settings", server=d.cfg.server.hostname,
                  listeners=listener_rows(listeners), pop_imap=NOT_A_MAILBOX.text)


def routes(app: web.Application) -> None:
    app.router.add_get("/settings", settings_page)
