"""What every admin response carries (security headers, a strict CSP with no inline script or
style) and the cross-site request checks every state change passes: the browser's
Sec-Fetch-Site, else the Origin header, against this admin's own origin; then (views.base) a
hidden form token bound to the session. The API under /api/v1/ has its own bearer auth and is
left alone here."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

from aiohttp import web

from ..logs import event

log = logging.getLogger("relay.admin")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "X-Frame-Options": "DENY",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
API_PREFIX = "/api/"
STATIC_PREFIX = "/static/"


def is_api(path: str) -> bool:
    return path.startswith(API_PREFIX)


def headers_middleware(hsts: bool = False):
    @web.middleware
    async def security_headers(request: web.Request, handler):
        try:
            resp = await handler(request)
        except web.HTTPException as exc:  # redirects and errors carry the headers too
            resp = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 with our headers, one log line
            event(log, "admin_error", logging.ERROR, path=request.path, method=request.method,
                  error=f"{type(exc).__name__}: {exc}")
            resp = web.Response(status=500, text="internal error; the relay's log has the details\n")
        for k, v in HEADERS.items():
            resp.headers.setdefault(k, v)
        resp.headers["Server"] = "relay"  # not aiohttp's name and version
        if hsts:
            resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        # Nothing of ours is worth caching but the stylesheet: pages show queue contents,
        # credentials and, once, a password.
        if not request.path.startswith(STATIC_PREFIX):
            resp.headers["Cache-Control"] = "no-store"
        if isinstance(resp, web.HTTPException):
            raise resp
        return resp
    return security_headers


def origin_allowed(method: str, headers, own_origin: str) -> bool:
    """Fetch metadata first (every current browser sends it); the Origin header when it is
    absent (older browsers, some proxies strip it); neither: refused, a state change needs one."""
    if method in SAFE_METHODS:
        return True
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = headers.get("Origin")
    return origin is not None and origin.rstrip("/").lower() == own_origin.rstrip("/").lower()


def own_origin(request: web.Request, public_origin: str) -> str:
    return public_origin or f"{request.scheme}://{request.host}"


def csrf_middleware(public_origin: str):
    @web.middleware
    async def cross_site(request: web.Request, handler):
        if not is_api(request.path) and not origin_allowed(request.method, request.headers,
                                                           own_origin(request, public_origin)):
            raise web.HTTPForbidden(text="cross-site request refused\n")
        return await handler(request)
    return cross_site


def form_token(cookie_token: str) -> str:
    """The hidden field of every form: a MAC of the session cookie, so it is bound to the
    session, survives a restart, and a page from another origin cannot know it."""
    return hmac.new(cookie_token.encode(), b"relay-admin-csrf", hashlib.sha256).hexdigest()


def form_token_ok(cookie_token: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(form_token(cookie_token).encode(), sent.encode())
