"""Builds RFC 3464 delivery status notifications (bounces) as wire-ready bytes, without any I/O."""

from __future__ import annotations

import re
import secrets
import textwrap
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Sequence

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_MAX_LINE = 998  # RFC 5322 2.1.1 hard limit, excluding CRLF
_WIDTH = 78
# Words longer than this are hard-split; 200 chars are at most 800 UTF-8 octets, so any line fits.
_MAX_WORD = 200

_ADVICE = {  # keyed by "subject.detail" first, then "subject" of the enhanced status (RFC 3463)
    "1": "Check the recipient address for typing errors, or ask the recipient for their current address.",
    "2": "The recipient's mailbox cannot accept mail; try again later or reach the recipient another way.",
    "2.2": "The recipient's mailbox is full; try again later or reach the recipient another way.",
    "3": "The recipient's mail system could not accept the message; try again later or reach the recipient another way.",
    "3.4": "The message is too large for the recipient's server; send it again with smaller or fewer attachments.",
    "4": "The recipient's mail server could not be reached; check the domain part of the address, or try again later.",
    "4.7": "The message expired before it could be delivered; the recipient's server may be down. "
           "Try again later or reach the recipient another way.",
    "5": "The recipient's server reported a protocol problem; forward this report to your mail administrator.",
    "6": "The recipient's server could not handle the message content; try sending it again in a simpler form.",
    "7": "The recipient's server refused the message for policy or security reasons; contact the recipient "
         "another way, or forward this report to your mail administrator.",
}
_DEFAULT_ADVICE = "Forward this report to your mail administrator if you need help."


@dataclass(frozen=True)
class DSNRecipient:
    final_recipient: str
    action: str
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None
    # RFC 3464 2.3.6: "smtp" only for a remote SMTP reply; our own explanations use an X- type.
    diagnostic_type: str = "smtp"


def _clean(value: str) -> str:
    """Make untrusted text a single safe line: control chars and line separators become spaces, runs collapse."""
    out = []
    for ch in value:
        cat = unicodedata.category(ch)
        if cat == "Cs":
            out.append("\ufffd")  # lone surrogates (e.g. from surrogateescape) cannot be encoded as UTF-8
        elif cat in ("Cc", "Zl", "Zp"):
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def _single_line(value: str | None) -> str | None:
    # ENVID/ORCPT are echoed verbatim, so a value carrying CR/LF is dropped rather than repaired.
    if value is None or "\r" in value or "\n" in value:
        return None
    return _clean(value) or None


def _field(name: str, value: str) -> str:
    """One RFC 822-syntax field, folded at spaces so the unfolded value is unchanged."""
    words = [w[i:i + _MAX_WORD] for w in value.split(" ") for i in range(0, len(w), _MAX_WORD)]
    lines, cur, first = [], f"{name}:", True
    for w in words:
        if not first and len(cur) + 1 + len(w) > _WIDTH:
            lines.append(cur)
            cur = " " + w
        else:
            cur += " " + w
        first = False
    lines.append(cur)
    return "\r\n".join(lines) + "\r\n"


def _date(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # naive timestamps are taken to be UTC
    return format_datetime(dt)


def _normalise(data: bytes) -> bytes:
    data = data.replace(b"\0", b"").replace(b"\r\n", b"\n").replace(b"\r", b"")
    return data.replace(b"\n", b"\r\n")


def _header_section(data: bytes) -> bytes:
    if data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end + 2]


def _limit_lines(data: bytes, header: bool) -> bytes:
    """Split lines over 998 octets; in a header section, fold before existing whitespace where possible."""
    out = []
    for line in data.split(b"\r\n"):
        while len(line) > _MAX_LINE:
            cut, pad = (_MAX_LINE - 1, b" ") if header else (_MAX_LINE, b"")
            ws = max(line.rfind(b" ", 1, _MAX_LINE), line.rfind(b"\t", 1, _MAX_LINE)) if header else -1
            if ws > 0:
                cut, pad = ws, b""
            else:
                for _ in range(3):  # avoid splitting a UTF-8 sequence
                    if 0x80 <= line[cut] < 0xC0:
                        cut -= 1
            out.append(line[:cut])
            line = pad + line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=76, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def _advice(status: str) -> str:
    _, subject, detail = status.split(".")
    return _ADVICE.get(f"{subject}.{detail}") or _ADVICE.get(subject, _DEFAULT_ADVICE)


def _explain(r: DSNRecipient, addr: str, remote: str | None, diag: str | None) -> list[str]:
    if r.action == "failed":
        paras = [f"Delivery to <{addr}> failed (status {r.status})."]
    elif r.action == "delayed":
        paras = [f"Delivery to <{addr}> is delayed (status {r.status})."]
    elif r.action == "delivered":
        paras = [f"Your message was delivered to <{addr}>."]
    elif r.action == "relayed":
        paras = [f"Your message was relayed to <{addr}> by a system that does not send delivery reports; "
                 "no further notifications will follow."]
    else:
        paras = [f"Your message was delivered to <{addr}>, which forwarded it to further recipients."]
    if diag:
        paras.append(_wrap(f"The server {remote} replied:" if remote else "The reply was:", "    "))
        paras[-1] += "\n" + _wrap(diag, "        ")
    elif remote and r.action in ("failed", "delayed"):
        paras.append(_wrap(f"The problem was reported by {remote}.", "    "))
    if r.action == "failed":
        paras.append(_wrap("What you can do: " + _advice(r.status), "    "))
    elif r.action == "delayed":
        until = f" until {_date(r.will_retry_until)}" if r.will_retry_until else ""
        paras.append(_wrap(f"No action is needed: delivery will be retried{until}. "
                           "You will be notified if it ultimately fails.", "    "))
    paras[0] = _wrap(paras[0])
    return ["\n".join(paras)]


def _part(headers: list[str], body: bytes) -> bytes:
    return "".join(h + "\r\n" for h in headers).encode() + b"\r\n" + body


def build_dsn(*, reporting_mta: str, original_sender: str, original_message: bytes,
              recipients: Sequence[DSNRecipient], ret: str = "HDRS", envid: str | None = None,
              arrival_date: datetime | None = None, queue_id: str | None = None,
              now: datetime | None = None, message_id: str | None = None,
              max_full: int = 1_048_576, original_size: int | None = None) -> bytes:
    """`original_size`: the message's real size when `original_message` is only its header
    block (a spooled body larger than `max_full` is not read back for a DSN)."""
    mta = _clean(reporting_mta).replace(" ", "")
    sender = _clean(original_sender)
    if not mta:
        raise ValueError("reporting_mta is empty")
    if not sender:
        raise ValueError("no DSN is sent to the null reverse-path (RFC 3461 6.2)")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"invalid DSN action {r.action!r}")
        if not _STATUS_RE.fullmatch(r.status):
            raise ValueError(f"invalid enhanced status {r.status!r}")

    actions = {r.action for r in recipients}
    if "failed" in actions:
        subject = "Undelivered Mail Returned to Sender"
        intro = "Your message could not be delivered to one or more recipients. The details are below."
    elif "delayed" in actions:
        subject = "Delayed Mail (still being retried)"
        intro = ("Your message has not yet been delivered to one or more recipients. "
                 "The mail system is still trying; you do not need to send it again.")
    else:
        subject = "Successful Mail Delivery Report"
        intro = "Your message was delivered as requested. The details are below."

    # Returned content.
    norm = _normalise(original_message)
    headers = _header_section(norm)
    full = ret.upper() == "FULL"
    note = "Your original message is attached." if full else "The headers of your original message are attached."
    size = max(len(original_message), original_size or 0)
    if full and size > max_full:
        full = False
        note = (f"Your original message ({size} bytes) is larger than the {max_full}-byte "
                "limit for returning it in full, so only its headers are attached.")
    if full:
        returned = _limit_lines(headers, True) + _limit_lines(norm[len(headers):], False)
    else:
        if len(headers) > max_full:
            cut = headers.rfind(b"\r\n", 0, max_full)
            headers = headers[:cut + 2] if cut >= 0 else b""
            note += f" They exceeded {max_full} bytes and were truncated."
        returned = _limit_lines(headers, True)

    # Part 1: human-readable.
    paras = [f"This is the mail system at host {mta}.", _wrap(intro)]
    qid = _clean(queue_id) if queue_id else ""
    if qid:
        paras.append(_wrap(f"Queue ID: {qid} (quote it when asking your mail administrator for help)."))
    # Part 2: machine-readable.
    status = _field("Reporting-MTA", f"dns; {mta}")
    env = _single_line(envid)
    if env:
        status += _field("Original-Envelope-Id", env)
    if arrival_date:
        status += _field("Arrival-Date", _date(arrival_date))
    for r in recipients:
        addr = _clean(r.final_recipient)
        remote = _clean(r.remote_mta) if r.remote_mta else None
        diag = _clean(r.diagnostic) if r.diagnostic else None
        paras += _explain(r, addr, remote, diag)
        block = ""
        orcpt = _single_line(r.original_recipient)
        if orcpt:
            block += _field("Original-Recipient", orcpt)
        block += _field("Final-Recipient", f"{'rfc822' if addr.isascii() else 'utf-8'}; {addr}")
        block += _field("Action", r.action) + _field("Status", r.status)
        if remote:
            block += _field("Remote-MTA", f"dns; {remote}")
        if diag:
            dtype = _clean(r.diagnostic_type).replace(" ", "") or "smtp"
            block += _field("Diagnostic-Code", f"{dtype}; {diag}")
        if r.last_attempt:
            block += _field("Last-Attempt-Date", _date(r.last_attempt))
        if r.will_retry_until:
            block += _field("Will-Retry-Until", _date(r.will_retry_until))
        status += "\r\n" + block
    paras.append(_wrap(note))
    text = ("\n\n".join(paras) + "\n").replace("\n", "\r\n").encode()
    status_bytes = status.encode()

    def cte(data: bytes) -> str:
        return f"Content-Transfer-Encoding: {'7bit' if data.isascii() else '8bit'}"

    parts = [
        _part(["Content-Type: text/plain; charset=utf-8", "Content-Description: Notification", cte(text)], text),
        _part(["Content-Type: message/delivery-status", "Content-Description: Delivery report",
               cte(status_bytes)], status_bytes),
        _part([f"Content-Type: {'message/rfc822' if full else 'text/rfc822-headers'}",
               "Content-Description: Undelivered message" if full else "Content-Description: Message headers",
               cte(returned)], returned),
    ]
    while True:
        boundary = f"=_bounce_{secrets.token_hex(16)}"
        if not any(boundary.encode() in p for p in parts):
            break

    date = _date(now or datetime.now(timezone.utc))
    mid = _clean(message_id).replace(" ", "").strip("<>") if message_id else ""
    mid = f"<{mid}>" if mid else f"<{secrets.token_hex(16)}@{mta}>"
    head = (_field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>") + _field("To", f"<{sender}>")
            + _field("Subject", subject) + _field("Date", date) + _field("Message-ID", mid)
            + "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            + f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"\r\n')
    if not all(p.isascii() for p in parts):
        head += "Content-Transfer-Encoding: 8bit\r\n"  # RFC 2046 5.1: a multipart containing 8bit parts is 8bit
    delim = f"\r\n--{boundary}\r\n".encode()
    return (head.encode() + b"\r\nThis is a MIME-encapsulated message.\r\n"
            + f"--{boundary}\r\n".encode() + delim.join(parts) + f"\r\n--{boundary}--\r\n".encode())
