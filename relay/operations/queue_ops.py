"""The mail queue for people: filtered keyset pages, one message's story, retry, delete, and
delete with a failure report to the sender (the DSN `relay queue delete --bounce` sent).

(Not `queue.py`: no module is named after a stdlib one.)
"""
from __future__ import annotations

import base64
import json
import math
import re

from .. import bounce
from ..config import Config
from ..store.contract import NewMessage, NewRecipient
from ..store.sqlite_queue import QueueStore
from .audit import Audit
from .errors import OperationError, invalid, translated
from .model import Actor, Attempt, MessageDetail, QueueFilter, QueueItem, QueuePage, RecipientInfo

MAX_PAGE = 500


def encode_cursor(created_at: float, qid: str) -> str:
    raw = json.dumps([created_at, qid], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# A cursor we made is a timestamp and a queue id: well under this. A forged one is refused
# before it is decoded (deep nesting made json.loads raise RecursionError: a 500).
_CURSOR_MAX = 256


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        if len(cursor) > _CURSOR_MAX:
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, qid = json.loads(raw)
        if not isinstance(created_at, (int, float)) or isinstance(created_at, bool) or not isinstance(qid, str) \
                or not math.isfinite(created_at):
            raise ValueError
        return float(created_at), qid
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, OverflowError):
        raise invalid("not a cursor from a previous page") from None


def signed_for(headers: str) -> str | None:
    """The d= of a DKIM-Signature in stored headers (the copy kept after signing)."""
    m = re.search(r"^DKIM-Signature:(?:.*\r?\n[ \t])*.*?\bd=([^;\s]+)", headers, re.I | re.M)
    return m.group(1) if m else None


def span(seconds: float) -> str:
    """7 days as "7d", 90 minutes as "90m": the largest unit that divides it."""
    s = int(seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s // n}{unit}"
    return f"{s}s"


class Queue:
    def __init__(self, cfg: Config, queue: QueueStore, audit: Audit):
        self.cfg = cfg
        self._queue = queue
        self._audit = audit

    async def list(self, flt: QueueFilter, after: str | None = None, limit: int = 50) -> QueuePage:
        if flt.state not in QueueStore.PAGE_STATES:
            raise invalid(f"unknown state {flt.state!r}; one of: {', '.join(QueueStore.PAGE_STATES)}")
        if not 1 <= limit <= MAX_PAGE:
            raise invalid(f"limit must be 1 to {MAX_PAGE}")
        key = decode_cursor(after) if after else None
        rows, more = await self._queue.page(state=flt.state, domain=flt.domain, sender=flt.sender,
                                            recipient=flt.recipient, qid=flt.qid, after=key, limit=limit)
        items = tuple(QueueItem(id=r["id"], sender=r["sender"], created_at=r["created_at"], size=r["size"],
                                recipients=tuple(r["recipients"]), state=r["state"],
                                next_attempt_at=r["next_attempt_at"], last_error=r["last_error"],
                                finished_at=r["finished_at"]) for r in rows)
        nxt = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more and rows else None
        return QueuePage(items, nxt)

    async def record(self, qid: str) -> dict | None:
        """The store's own view of a message (what `relay queue show --json` prints)."""
        m = await self._queue.show(qid)
        if m is not None:
            # The signing domain is cleared once the signed copy is stored; the copy itself says it.
            m["dkim_signed"] = m["dkim_domain"] is None and signed_for(m["headers"]) is not None
            m["dkim_domain"] = m["dkim_domain"] or signed_for(m["headers"])
        return m

    async def rows(self, *, finished: bool = False) -> list[dict]:
        """The store's listings for `relay queue list/history`."""
        return await self._queue.list(finished=finished)

    def _missing(self, qid: str) -> OperationError:
        return OperationError("not_found", f"message {qid} not in the queue nor among the messages finished in "
                                           f"the last {span(self.cfg.storage.finished_retention)}; "
                                           f"grep {qid} in the relay log")

    async def show(self, qid: str) -> MessageDetail:
        m = await self.record(qid)
        if m is None:
            raise self._missing(qid)
        return MessageDetail(
            id=m["id"], sender=m["sender"], created_at=m["created_at"], size=m["size"], auth_user=m["auth_user"],
            client_ip=m["client_ip"], state=m["state"], finished_at=m["finished_at"], dkim_domain=m["dkim_domain"],
            dkim_signed=m["dkim_signed"], headers=m["headers"],
            recipients=tuple(RecipientInfo(
                address=r["rcpt"], route=r["route"], state=r["state"], attempts=r["attempts"],
                next_attempt_at=r["next_attempt_at"] if r["state"] in ("pending", "deferred") else None,
                last_error=r["last_error"], remote_mta=r["remote_mta"], in_flight=r["in_flight"])
                for r in m["recipients"]),
            attempts=tuple(Attempt(ts=h["ts"], recipient=h["rcpt"], event=h["event"], reply=h["detail"],
                                   host=h.get("host"), tls=h.get("tls"), tls_policy=h.get("tls_policy"),
                                   tls_cipher=h.get("tls_cipher"),
                                   tls_verified=None if h.get("tls_verified") is None else bool(h["tls_verified"]))
                                   for h in m["history"]))

    async def retry(self, actor: Actor, qid: str | None) -> int:
        """Make a message's (or, with None, every) waiting recipient due now. A running relay's
        runner sees it at once when it is ours (on_enqueue), else at its next poll (2 s)."""
        if qid is not None and not await self._queue.show(qid):
            raise OperationError("not_found", f"message {qid} not in the queue")
        with translated():
            return await self._queue.retry(qid, also=self._audit.row(actor, "queue.retry", qid or "*"))

    async def delete(self, actor: Actor, qid: str, bounce_: bool = False) -> bool:
        """Delete a message; with `bounce_`, queue a failure report (RFC 3464) for the recipients
        still waiting, unless they asked for none (NOTIFY=NEVER, RFC 3461) or the sender is null.
        True when a report was queued."""
        m = await self._queue.show(qid)
        if m is None:
            raise self._missing(qid)
        dsn = None
        active = [r for r in m["recipients"] if r["state"] in ("pending", "deferred")]
        notified = [r for r in active if (r["notify"] or "").upper() != "NEVER"]
        if bounce_ and m["sender"] and notified:
            from ..queue_runner import route_of
            body = await self._queue.body(qid) or b""
            dsn_data = bounce.build_dsn(
                reporting_mta=self.cfg.server.hostname, original_sender=m["sender"], original_message=body,
                recipients=[bounce.DSNRecipient(r["rcpt"], "failed", "5.0.0",
                                                "deleted from the queue by the administrator",
                                                original_recipient=r["orcpt"], diagnostic_type="X-Relay")
                            for r in notified],
                ret=m["ret"] or "HDRS", envid=m["envid"], queue_id=m["id"], original_size=m["size"])
            dsn = NewMessage("", (NewRecipient(m["sender"], route_of(m["sender"])),), dsn_data,
                             smtputf8=not m["sender"].isascii())
        with translated():
            done = await self._queue.delete(qid, bounce=dsn, also=self._audit.row(
                actor, "queue.delete", qid, "bounced to the sender" if dsn else None))
        if not done:
            raise self._missing(qid)
        return dsn is not None
