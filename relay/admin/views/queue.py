"""The queue (filters, keyset pages, Retry now, Delete with confirmation, Bounce) and one
message (envelope, header block, every attempt). Subjects, headers and remote replies are
hostile text: autoescaped, truncated, never marked safe."""
from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from ...operations import QueueFilter
from .base import render
from .ops_base import actor, handles_errors, ops

STATES = ("active", "pending", "deferred", "finished", "delivered", "failed", "all")
FILTERS = ("state", "domain", "sender", "recipient", "qid")
PAGE = 50


def _filter(query) -> tuple[QueueFilter, dict]:
    raw = {k: str(query.get(k, "")).strip()[:320] for k in FILTERS}
    raw["state"] = raw["state"] if raw["state"] in STATES else "active"
    flt = QueueFilter(state=raw["state"], domain=raw["domain"] or None, sender=raw["sender"] or None,
                      recipient=raw["recipient"] or None, qid=raw["qid"] or None)
    return flt, raw


@handles_errors
async def queue_page(request: web.Request) -> web.StreamResponse:
    flt, raw = _filter(request.query)
    after = request.query.get("after") or None
    page = await ops(request).list_queue(flt, after=after, limit=PAGE)
    kept = {k: v for k, v in raw.items() if v}
    next_url = "/queue?" + urlencode({**kept, "after": page.next}) if page.next else None
    # Where an action returns to: this page without its last "done" message.
    here = "/queue?" + urlencode({**kept, **({"after": after} if after else {})})
    return render(request, "queue.html", title="Queue", items=page.items, f=raw, states=STATES,
                  next_url=next_url, first_url="/queue?" + urlencode(kept) if after else None, back=here,
                  done=request.query.get("done"))


def _back(form, qid: str | None = None) -> str:
    """Where to go after an action: a queue page we rendered, never an outside address."""
    back = str(form.get("back", ""))
    if back.startswith("/queue") and "//" not in back and "\\" not in back:
        return back
    return f"/queue/{qid}" if qid else "/queue"


def _with_done(url: str, done: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode({"done": done})


@handles_errors
async def message_page(request: web.Request) -> web.StreamResponse:
    m = await ops(request).show_message(request.match_info["qid"])
    return render(request, "message.html", title=f"Message {m.id}", m=m, back=request.path,
                  done=request.query.get("done"))


@handles_errors
async def retry(request: web.Request) -> web.StreamResponse:
    qid = request.match_info["qid"]
    form = await request.post()
    n = await ops(request).retry(actor(request), qid)
    raise web.HTTPSeeOther(_with_done(_back(form, qid), f"{qid}: {n} recipient(s) due now"))


@handles_errors
async def delete(request: web.Request) -> web.StreamResponse:
    qid = request.match_info["qid"]
    form = await request.post()
    bounced = await ops(request).delete_message(actor(request), qid, bounce=form.get("bounce") == "1")
    back = _back(form)
    if back.startswith(f"/queue/{qid}"):
        back = "/queue"  # the message page is gone
    raise web.HTTPSeeOther(_with_done(back, f"{qid} deleted" + (", sender notified" if bounced else "")))


def routes(app: web.Application) -> None:
    app.router.add_get("/queue", queue_page)
    app.router.add_get("/queue/{qid}", message_page)
    app.router.add_post("/queue/{qid}/retry", retry)
    app.router.add_post("/queue/{qid}/delete", delete)
