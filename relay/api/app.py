"""The API application: bearer-key authentication with a per-IP limit on failures, the scope
check, JSON errors with stable codes (never a traceback, never an HTML page), and the routes.

Every handler calls the operations layer and serialises what it returns; none touches a store.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections import deque
from typing import Awaitable, Callable

from aiohttp import web

from ..logs import event
from ..operations import Actor, OperationError, Operations
from . import handlers
from .bodies import MAX_BODY, ApiError
from .openapi import SPEC

log = logging.getLogger("relay.api")

OPS = web.AppKey("ops", Operations)
# A typed request key where aiohttp has them (3.13+), else the string key older ones use.
PRINCIPAL = web.RequestKey("principal", object) if hasattr(web, "RequestKey") else "relay.api.principal"
READ_METHODS = ("GET", "HEAD", "OPTIONS")


class AuthFailures:
    """Failed bearer tokens per client IP in a sliding window: past `limit` within `window`
    seconds the IP gets 429 without its token being looked at, until the window frees up.
    In memory (one process), bounded: the oldest IPs are dropped past `max_ips`."""

    def __init__(self, limit: int = 10, window: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 max_ips: int = 10_000):
        self.limit, self.window, self._clock, self._max_ips = limit, window, clock, max_ips
        self._fails: dict[str, deque[float]] = {}

    @staticmethod
    def key(ip: str) -> str:
        # An IPv6 /64 is one address (a host gets a whole /64), as for the admin's login limit.
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if addr.version == 6 and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)  # not ::/64, which every mapped IPv4 client is in
        return str(ipaddress.ip_network(f"{addr}/64", strict=False)) if addr.version == 6 else str(addr)

    def _recent(self, ip: str) -> deque[float]:
        ip = self.key(ip)
        q = self._fails.get(ip)
        if q is None:
            return deque()
        cutoff = self._clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._fails[ip]
        return q

    def blocked_for(self, ip: str) -> float:
        """Seconds until this IP may try again (0: it may)."""
        q = self._recent(ip)
        if len(q) < self.limit:
            return 0.0
        return max(1.0, q[0] + self.window - self._clock())

    def fail(self, ip: str) -> None:
        ip = self.key(ip)
        if ip not in self._fails and len(self._fails) >= self._max_ips:
            self._fails.pop(next(iter(self._fails)))
        self._fails.setdefault(ip, deque()).append(self._clock())
        q = self._fails[ip]
        while len(q) > self.limit:
            q.popleft()


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers={"Cache-Control": "no-store", **(headers or {})})


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except OperationError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        message = {404: "no such endpoint", 405: f"method {request.method} not allowed here"}.get(
            exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, message, headers)
    except Exception as exc:  # noqa: BLE001 - an API answers JSON, never a traceback
        event(log, "api_error", logging.ERROR, method=request.method, path=request.path,
              error=f"{type(exc).__name__}: {exc}")
        return error_response(500, "internal", "internal error; the relay log has the details")


def _client_ip(request: web.Request) -> str:
    # request.remote is the socket peer, or what the web admin's trusted-proxy middleware set.
    return request.remote or "-"


def make_auth_middleware(failures: AuthFailures):
    @web.middleware
    async def auth_middleware(request: web.Request, handler):
        if request.match_info.route.resource is not None and \
                request.match_info.route.resource.canonical.endswith("/openapi.json"):
            return await handler(request)
        ip = _client_ip(request)
        wait = failures.blocked_for(ip)
        if wait:
            event(log, "api_auth_failed", logging.WARNING, ip=ip, reason="rate_limited")
            raise ApiError(429, "rate_limited", "too many failed API keys from this address; try again later",
                           {"Retry-After": str(int(wait + 0.999))})
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            reason = "missing" if not header else "malformed"
            principal, revoked = None, False
        else:
            ops: Operations = request.config_dict[OPS]
            principal, revoked = await ops.authenticate_api_key(token)
            reason = "revoked" if revoked else "unknown"
        if principal is None:
            failures.fail(ip)
            event(log, "api_auth_failed", logging.WARNING, ip=ip, reason=reason)
            raise ApiError(401, "unauthorized",
                           "API key revoked" if revoked else
                           "send an API key: Authorization: Bearer <token> (relay admin api-key add)",
                           {"WWW-Authenticate": 'Bearer realm="relay"'})
        if request.method not in READ_METHODS and principal.scope != "write":
            raise ApiError(403, "forbidden", f"API key {principal.key_id} has the read scope; changes need write")
        request[PRINCIPAL] = principal
        return await handler(request)
    return auth_middleware


def actor(request: web.Request) -> Actor:
    return Actor(request[PRINCIPAL].key_id, "api", _client_ip(request))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC, dumps=lambda d: json.dumps(d, indent=1))


def make_api_app(ops: Operations, *, max_body: int = MAX_BODY, auth_failures: AuthFailures | None = None) -> web.Application:
    """The /api/v1/ sub-application over `ops`. `max_body`: the largest request body read."""
    app = web.Application(middlewares=[errors_middleware, make_auth_middleware(auth_failures or AuthFailures())],
                          client_max_size=max_body)
    app[OPS] = ops
    app[handlers.MAX_BODY_KEY] = max_body
    r = app.router
    r.add_get("/openapi.json", openapi)
    r.add_get("/domains", handlers.list_domains)
    r.add_post("/domains", handlers.add_domain)
    r.add_get("/domains/{domain}", handlers.get_domain)
    r.add_delete("/domains/{domain}", handlers.remove_domain)
    r.add_post("/domains/{domain}/verify", handlers.verify_domain)
    r.add_get("/domains/{domain}/records", handlers.domain_records)
    r.add_get("/domains/{domain}/credentials", handlers.list_credentials)
    r.add_post("/domains/{domain}/credentials", handlers.create_credential)
    r.add_put("/domains/{domain}/credentials/{login}", handlers.reset_credential)
    r.add_delete("/domains/{domain}/credentials/{login}", handlers.delete_credential)
    r.add_get("/queue", handlers.list_queue)
    r.add_get("/queue/{qid}", handlers.show_message)
    r.add_post("/queue/{qid}/retry", handlers.retry)
    r.add_delete("/queue/{qid}", handlers.delete_message)
    return app
