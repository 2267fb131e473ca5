"""Domains (DNS status chips, records expected vs found, "Check now", zone snippet) and a
domain's SMTP settings and credentials, in the hosted provider's flow: "Create New SMTP User",
"Reset Password" and "Delete" in pop-ups (the HTML popover attribute: no JavaScript), a
server-generated password by default, shown once on the POST's response, at most N of N."""
from __future__ import annotations

from urllib.parse import quote, urlencode

from aiohttp import web

from ...operations import OperationError
from .base import deps, render
from .ops_base import actor, check_cache, handles_errors, ops
from .settings import listener_rows


@handles_errors
async def domains_page(request: web.Request) -> web.StreamResponse:
    domains = await ops(request).list_domains()
    cache = check_cache(request)
    rows = [{"d": d, "chips": cache.chips(d.name)} for d in domains]
    return render(request, "domains.html", title="Domains", rows=rows)


@handles_errors
async def domain_page(request: web.Request, status: int = 200, message: str | None = None) -> web.StreamResponse:
    name = request.match_info["domain"]
    o = ops(request)
    d = await o.get_domain(name)
    records = await o.domain_records(d.name)
    checked_at, checks = check_cache(request).get(d.name)
    return render(request, "domain.html", status=status, title=f"Domain {d.display}", d=d, records=records,
                  checks=checks, checked_at=checked_at, chips=check_cache(request).chips(d.name), message=message)


@handles_errors
async def check_now(request: web.Request) -> web.StreamResponse:
    name = request.match_info["domain"]
    checks = await ops(request).check_domain(actor(request), name)
    d = await ops(request).get_domain(name)
    check_cache(request).put(d.name, checks)
    raise web.HTTPSeeOther(f"/domains/{quote(d.name)}")


@handles_errors
async def zone(request: web.Request) -> web.StreamResponse:
    name = request.match_info["domain"]
    d = await ops(request).get_domain(name)
    text = await ops(request).zone_snippet(d.name)
    return web.Response(text=text, content_type="text/plain", headers={
        "Content-Disposition": f'attachment; filename="{d.name}.zone"'})


async def _credentials_page(request: web.Request, *, status: int = 200, shown: dict | None = None,
                            error: str | None = None, message: str | None = None) -> web.StreamResponse:
    o = ops(request)
    name = request.match_info["domain"]
    d = await o.get_domain(name)
    creds = await o.list_credentials(d.name)
    cfg = deps(request).cfg
    listeners = deps(request).listeners or [(lst.port, lst.tls) for lst in cfg.listeners]
    return render(request, "credentials.html", status=status, title=f"SMTP settings for {d.display}", d=d,
                  creds=creds, full=len(creds) >= d.credential_cap, shown=shown, error=error, message=message,
                  server=cfg.server.hostname, listeners=listener_rows(listeners),
                  min_length=cfg.credentials.min_password_length)


@handles_errors
async def credentials_page(request: web.Request) -> web.StreamResponse:
    done = request.query.get("deleted")
    return await _credentials_page(request, message=f"Deleted {done}." if done else None)


def _password_choice(form) -> str | None:
    """None: let the server generate one (the default); else the manual password as typed."""
    if form.get("mode") == "manual":
        return str(form.get("password", ""))[:1024]
    return None


@handles_errors
async def create(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    d = await ops(request).get_domain(request.match_info["domain"])
    local = str(form.get("local", "")).strip()[:64]
    username = f"{local}@{d.name}"
    try:
        info, password = await ops(request).create_credential(actor(request), username, _password_choice(form))
    except OperationError as exc:
        return await _credentials_page(request, status=exc.status, error=exc.message)
    # The only time the password is ever shown: this response (Cache-Control: no-store).
    return await _credentials_page(request, status=201, shown={"username": info.username, "password": password,
                                                               "what": "created"})


@handles_errors
async def reset(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    username = str(form.get("username", ""))[:320]
    try:
        password = await ops(request).reset_credential(actor(request), username, _password_choice(form))
    except OperationError as exc:
        return await _credentials_page(request, status=exc.status, error=exc.message)
    return await _credentials_page(request, shown={"username": username, "password": password, "what": "reset"})


@handles_errors
async def delete(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    username = str(form.get("username", ""))[:320]
    try:
        await ops(request).delete_credential(actor(request), username)
    except OperationError as exc:
        return await _credentials_page(request, status=exc.status, error=exc.message)
    d = await ops(request).get_domain(request.match_info["domain"])
    raise web.HTTPSeeOther(f"/domains/{quote(d.name)}/credentials?" + urlencode({"deleted": username}))


def routes(app: web.Application) -> None:
    app.router.add_get("/domains", domains_page)
    app.router.add_get("/domains/{domain}", domain_page)
    app.router.add_post("/domains/{domain}/check", check_now)
    app.router.add_get("/domains/{domain}/zone", zone)
    app.router.add_get("/domains/{domain}/credentials", credentials_page)
    app.router.add_post("/domains/{domain}/credentials/create", create)
    app.router.add_post("/domains/{domain}/credentials/reset", reset)
    app.router.add_post("/domains/{domain}/credentials/delete", delete)
