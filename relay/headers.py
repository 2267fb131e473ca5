"""Pure header work on raw message bytes: count Received, strip Bcc, add Message-ID/Date, prepend Received.

Works on bytes with CRLF line endings (DATA checks guarantee them) and never re-encodes the
message: the body and every header we do not touch go out byte for byte, so signatures survive.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from email.utils import format_datetime
from datetime import datetime, timezone

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


@dataclass(frozen=True)
class Split:
    fields: list[bytes]   # each field with its continuation lines, CRLF-terminated
    body: bytes           # everything after the header section, including the empty line


def split(data: bytes) -> Split:
    """Split into header fields and the rest. A first line that is not a field means no header section."""
    spans: list[list[int]] = []   # [start, end) of each field in data, continuation lines included
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\r\n", pos)
        line_end = n if end < 0 else end + 2
        first = data[pos:pos + 1]
        if line_end - pos <= 2 and data[pos:line_end] in (b"\r\n", b""):
            break
        if first in (b" ", b"\t") and spans:
            spans[-1][1] = line_end   # a continuation extends the field: O(1), sliced once below
        elif _FIELD.match(data[pos:line_end]):
            spans.append([pos, line_end])
        else:
            break
        pos = line_end
    fields = [data[a:b] for a, b in spans]
    if fields and not fields[-1].endswith(b"\r\n"):
        fields[-1] += b"\r\n"
    return Split(fields, data[pos:])


def field_name(raw: bytes) -> str:
    m = _FIELD.match(raw)
    return m.group(1).decode("ascii").lower() if m else ""


def count_received(data: bytes) -> int:
    return sum(1 for f in split(data).fields if field_name(f) == "received")


def has_field(fields: list[bytes], name: str) -> bool:
    return any(field_name(f) == name for f in fields)


# The From: forms nearly every client writes, `Name <local@domain>`, `"Name" <local@domain>` and
# `local@domain`, read without the full RFC 5322 parser (which costs ~0.7 ms a message). Anything
# else (groups, comments, several addresses, quoted local parts) goes to the full parser.
_SIMPLE_FROM = re.compile(
    r'\s*(?:(?:"[^"\\\r\n]*"|[A-Za-z0-9 \t!#$%&\'*+\-/=?^_`{|}~.]*)\s*<([^<>@\s"()\\,;:\[\]]+)@([^<>@\s"()\\,;:\[\]]+)>'
    r'|([^<>@\s"()\\,;:\[\]]+)@([^<>@\s"()\\,;:\[\]]+))\s*')


def _ascii_domain(domain: str) -> str:
    """Lower-case ASCII (IDNA) form of a From: domain, or '' when it is not a host name."""
    domain = domain.strip().rstrip(".").lower()
    if domain and not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    return domain if domain and all(c.isalnum() or c in "-." for c in domain) else ""


def from_domains(fields: list[bytes]) -> list[str] | None:
    """The domain (lower-case ASCII, IDNA) of every address in the From: fields; None without a
    From: field. An address whose domain cannot be read gives '' (never allowed), as does a
    From: field with no address at all (an empty group): the caller refuses rather than guesses.
    Beyond the simple forms, parsed by the stdlib's RFC 5322 parser (display names, comments)."""
    values = [f for f in fields if field_name(f) == "from"]
    if not values:
        return None
    out: list[str] = []
    for raw in values:
        try:
            text = raw.decode("utf-8")  # RFC 6532: UTF-8 header values (SMTPUTF8)
        except UnicodeDecodeError:
            out.append("")
            continue
        value = text.split(":", 1)[1].replace("\r\n", "")
        m = _SIMPLE_FROM.fullmatch(value)
        if m is not None:
            out.append(_ascii_domain(m.group(2) or m.group(4)))
            continue
        from email import policy as email_policy
        from email.parser import HeaderParser
        try:
            header = HeaderParser(policy=email_policy.default).parsestr(f"From:{value}\r\n\r\n")["from"]
            addresses = list(header.addresses) if header is not None else []
        except Exception:  # noqa: BLE001 - any parser failure is an unreadable From:
            addresses = []
        if not addresses:
            out.append("")
        out.extend(_ascii_domain(a.domain or "") for a in addresses)
    return out


def ascii_helo(helo: str) -> str:
    """The EHLO argument as it may appear in Received: ASCII only (RFC 5322 2.2 header text;
    SMTPUTF8 is for addresses, not for a trace comment). A Unicode domain becomes its A-label,
    anything else non-ASCII becomes '?'; parentheses and backslashes would break the comment."""
    text = "".join(c for c in helo if c.isprintable() and c not in "()\\")[:255]
    if not text.isascii():
        try:
            a_label = text.encode("idna").decode("ascii")
        except UnicodeError:
            a_label = ""
        # The A-label only for something that is a host name; the codec also takes "café!".
        text = a_label if re.fullmatch(r"[A-Za-z0-9.-]+", a_label) else \
            "".join(c if c.isascii() else "?" for c in text)
    return text or "unknown"


def received_line(*, helo: str, client_ip: str, hostname: str, protocol: str, queue_id: str,
                  tls: str | None, recipient: str | None, now: datetime | None = None) -> bytes:
    """RFC 5321 4.4 trace field; protocol per RFC 3848 (ESMTPSA: authenticated, TLS)."""
    when = format_datetime(now or datetime.now(timezone.utc))
    helo_clean = ascii_helo(helo)
    parts = [f"Received: from {helo_clean} ([{client_ip}])", f"\tby {hostname} (relay) with {protocol} id {queue_id}"]
    if tls:
        parts.append(f"\t({tls})")
    if recipient:
        parts.append(f"\tfor <{recipient}>")
    parts[-1] += f"; {when}"
    return ("\r\n".join(parts) + "\r\n").encode("utf-8")


def prepare(data: bytes, *, received: bytes, hostname: str, queue_id: str,
            now: datetime | None = None) -> bytes:
    """Our Received on top, Bcc and Resent-Bcc removed (RFC 5322 3.6.3, 3.6.6), Message-ID and Date added when missing (RFC 6409 8)."""
    parts = split(data)
    # Resent-Bcc too (RFC 5322 3.6.6): blind recipients of a resend are as private.
    fields = [f for f in parts.fields if field_name(f) not in ("bcc", "resent-bcc")]
    extra: list[bytes] = []
    if not has_field(fields, "date"):
        extra.append(f"Date: {format_datetime(now or datetime.now(timezone.utc))}\r\n".encode("ascii"))
    if not has_field(fields, "message-id"):
        extra.append(f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{hostname}>\r\n".encode("ascii"))
    body = parts.body
    if not body.startswith(b"\r\n"):
        # No header/body separator (a message of headers only, or no headers at all).
        body = b"\r\n" + body
    return received + b"".join(fields) + b"".join(extra) + body
