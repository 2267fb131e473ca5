"""One function per endpoint: read the request, call the operations layer, answer JSON.

Shapes follow Mailgun's domains/credentials API where it fits: a credential's `login` is the
full address (a bare local part is taken too), the password is optional (generated when
absent) and appears only in the answer to the call that set it, with `Cache-Control: no-store`.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from ..operations import OperationError, QueueFilter, as_dict
from .bodies import ApiError, flag, json_object, query

MAX_BODY_KEY = web.AppKey("max_body", int)
NO_STORE = {"Cache-Control": "no-store"}


def _ops(request: web.Request):
    from .app import OPS
    return request.config_dict[OPS]


def _actor(request: web.Request):
    from .app import actor
    return actor(request)


def _json(data: Any, status: int = 200, *, secret: bool = False) -> web.Response:
    # Nothing here is for caches; a body with a password must never be stored by one.
    return web.json_response(data, status=status, headers=NO_STORE if secret else {"Cache-Control": "no-store"})


async def _body(request: web.Request, fields: dict, required: tuple[str, ...] = ()) -> dict:
    return await json_object(request, fields, required=required, limit=request.config_dict[MAX_BODY_KEY])


def _login(request: web.Request, login: str) -> str:
    """`app` or `app@domain` for the domain in the path, as the full address."""
    domain = request.match_info["domain"]
    if "@" not in login:
        return f"{login}@{domain}"
    ops = _ops(request)
    _, at_domain = ops.credentials.normal(login)
    _, path_domain = ops.credentials.normal(f"x@{domain}")
    if at_domain != path_domain:
        raise OperationError("invalid", f"login {login!r} is not at the domain {domain!r} of this path")
    return login


# ---------------------------------------------------------------- domains

async def list_domains(request: web.Request) -> web.Response:
    query(request, ())
    return _json({"items": as_dict(await _ops(request).list_domains())})


async def add_domain(request: web.Request) -> web.Response:
    query(request, ())
    body = await _body(request, {"name": str, "dkim": bool}, required=("name",))
    info = await _ops(request).add_domain(_actor(request), body["name"], dkim=body.get("dkim", True))
    return _json(as_dict(info), 201)


async def get_domain(request: web.Request) -> web.Response:
    query(request, ())
    return _json(as_dict(await _ops(request).get_domain(request.match_info["domain"])))


async def remove_domain(request: web.Request) -> web.Response:
    params = query(request, ("force",))
    ops = _ops(request)
    name = request.match_info["domain"]
    info = await ops.get_domain(name)
    try:
        n = await ops.remove_domain(_actor(request), info.name, force=flag(params, "force"))
    except OperationError as exc:
        # The store words it for the CLI; here the switch is a query parameter.
        raise OperationError(exc.code, exc.message.replace("use --force", "use ?force=true"), exc.status) from None
    return _json({"removed": info.name, "removed_credentials": n})


async def verify_domain(request: web.Request) -> web.Response:
    query(request, ())
    await _body(request, {})
    ops = _ops(request)
    checks = await ops.check_domain(_actor(request), request.match_info["domain"])
    info = await ops.get_domain(request.match_info["domain"])
    return _json({"domain": info.name, "verified": info.state == "verified",
                  "records": [{k: v for k, v in as_dict(c).items() if k != "lookup"} for c in checks]})


async def domain_records(request: web.Request) -> web.Response:
    query(request, ())
    return _json({"items": as_dict(await _ops(request).domain_records(request.match_info["domain"]))})


# ---------------------------------------------------------------- credentials

async def list_credentials(request: web.Request) -> web.Response:
    query(request, ())
    return _json({"items": as_dict(await _ops(request).list_credentials(request.match_info["domain"]))})


async def create_credential(request: web.Request) -> web.Response:
    query(request, ())
    body = await _body(request, {"login": str, "password": str}, required=("login",))
    ops = _ops(request)
    login = _login(request, body["login"])
    await ops.get_domain(request.match_info["domain"])  # 404 for an unknown domain, before anything else
    info, password = await ops.create_credential(_actor(request), login, body.get("password"))
    return _json({"credential": as_dict(info), "password": password}, 201, secret=True)


async def reset_credential(request: web.Request) -> web.Response:
    query(request, ())
    body = await _body(request, {"password": str})
    ops = _ops(request)
    login = _login(request, request.match_info["login"])
    password = await ops.reset_credential(_actor(request), login, body.get("password"))
    user, _ = ops.credentials.normal(login)
    return _json({"login": user, "password": password}, secret=True)


async def delete_credential(request: web.Request) -> web.Response:
    query(request, ())
    ops = _ops(request)
    login = _login(request, request.match_info["login"])
    await ops.delete_credential(_actor(request), login)
    user, _ = ops.credentials.normal(login)
    return _json({"deleted": user})


# ---------------------------------------------------------------- queue

async def list_queue(request: web.Request) -> web.Response:
    params = query(request, ("state", "domain", "sender", "recipient", "qid", "after", "limit"))
    try:
        limit = int(params.get("limit", "50"))
    except ValueError:
        raise ApiError(422, "invalid", "limit: an integer from 1 to 500") from None
    flt = QueueFilter(state=params.get("state", "active"), domain=params.get("domain") or None,
                      sender=params.get("sender") or None, recipient=params.get("recipient") or None,
                      qid=params.get("qid") or None)
    page = await _ops(request).list_queue(flt, after=params.get("after") or None, limit=limit)
    return _json({"items": as_dict(page.items), "next": page.next})


async def show_message(request: web.Request) -> web.Response:
    query(request, ())
    return _json(as_dict(await _ops(request).show_message(request.match_info["qid"])))


async def retry(request: web.Request) -> web.Response:
    query(request, ())
    await _body(request, {})
    qid = request.match_info["qid"]
    n = await _ops(request).retry(_actor(request), qid)
    return _json({"id": qid, "due_now": n})


async def delete_message(request: web.Request) -> web.Response:
    params = query(request, ("bounce",))
    qid = request.match_info["qid"]
    bounced = await _ops(request).delete_message(_actor(request), qid, bounce=flag(params, "bounce"))
    return _json({"deleted": qid, "bounced": bounced})
