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


def received_line(*, helo: str, client_ip: str, hostname: str, protocol: str, queue_id: str,
                  tls: str | None, recipient: str | None, now: datetime | None = None) -> bytes:
    """RFC 5321 4.4 trace field; protocol per RFC 3848 (ESMTPSA: authenticated, TLS)."""
    when = format_datetime(now or datetime.now(timezone.utc))
    helo_clean = "".join(c for c in helo if c.isprintable() and c not in "()\\")[:255] or "unknown"
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
