"""What the pages on the operations layer share: the actor of a request, and an
OperationError turned into a page with its status (never a traceback)."""
from __future__ import annotations

import functools
import logging
import time

from aiohttp import web

from ...operations import Actor, OperationError
from .base import deps, render, session_of

log = logging.getLogger("relay.admin")


def actor(request: web.Request) -> Actor:
    return Actor(session_of(request).username, "web", request.remote)


def ops(request: web.Request):
    return deps(request).ops


def handles_errors(handler):
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OperationError as exc:
            return render(request, "error.html", status=exc.status, title="Refused", code=exc.code,
                          message=exc.message)
    return wrapped


class CheckCache:
    """The last DNS check of each domain, in memory: the list page shows its chips without a
    lookup per domain per view; "Check now" refreshes one. Bounded by the number of domains."""

    def __init__(self) -> None:
        self._by_domain: dict[str, tuple[float, list]] = {}

    def put(self, domain: str, checks: list) -> None:
        self._by_domain[domain] = (time.time(), checks)

    def get(self, domain: str) -> tuple[float, list] | tuple[None, None]:
        return self._by_domain.get(domain, (None, None))

    def chips(self, domain: str) -> list[dict]:
        """SPF, DKIM, DMARC: ok / bad / unknown (not checked since start)."""
        _ts, checks = self.get(domain)
        out = []
        for kind in ("SPF", "DKIM", "DMARC"):
            mine = [c for c in (checks or []) if c.purpose.upper().startswith(kind)]
            if not mine:
                out.append({"kind": kind, "state": "unknown", "text": "not checked"})
            elif all(c.status == "ok" for c in mine):
                out.append({"kind": kind, "state": "ok", "text": "ok"})
            elif all(c.status in ("ok", "optional") for c in mine):
                out.append({"kind": kind, "state": "unknown", "text": "not published (optional)"})
            else:
                out.append({"kind": kind, "state": "bad", "text": ", ".join(sorted({c.status for c in mine}))})
        return out


def check_cache(request: web.Request) -> CheckCache:
    extra = deps(request).extra
    return extra.setdefault("dns_checks", CheckCache())
