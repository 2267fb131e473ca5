"""Pure envelope and content decisions: each check returns a Reply to send, or None for "go on".

No I/O here: the session parses a command, asks these functions, and sends what they return.
Address syntax follows RFC 5321 4.1.2 (Path, Mailbox); parameters RFC 1870 (SIZE), RFC 6152
(BODY), RFC 6531 (SMTPUTF8), RFC 4954 (AUTH=), RFC 3461 (DSN).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import replies
from .replies import Reply

_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_XTEXT_CHAR = re.compile(r"^([\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_ENVID_MAX = 100
# RFC 3461 4.2: ORCPT's addr-type is an atom (RFC 5322 atext): ASCII only, so whatever we pass
# on re-encodes to ASCII by construction (a raw "ü" here once poisoned the outbound session).
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")
_DSN_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


@dataclass(frozen=True)
class Address:
    local: str
    domain: str          # as given (may be Unicode when SMTPUTF8)
    ascii_domain: str    # IDNA form, lower case: used for routing and policy

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass
class MailParams:
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    auth: str | None = None
    ret: str | None = None
    envid: str | None = None
    requiretls: bool = False   # RFC 8689: deliver only over verified TLS, to servers that take it on


@dataclass
class RcptParams:
    notify: str | None = None
    orcpt: str | None = None


def _non_ascii(text: str) -> bool:
    return any(ord(c) > 127 for c in text)


def parse_domain(domain: str, smtputf8: bool) -> str | Reply:
    """The ASCII (IDNA) form of a mail domain, or why it is not acceptable."""
    if domain.startswith("["):
        return replies.IP_LITERAL
    if _non_ascii(domain):
        if not smtputf8:
            return replies.SMTPUTF8_REQUIRED
        try:
            ascii_d = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return replies.BAD_RCPT_ADDRESS
    else:
        ascii_d = domain
    ascii_d = ascii_d.lower()
    labels = ascii_d.split(".")
    if len(ascii_d) > 253 or len(labels) < 2 or not all(_LABEL.match(lab) for lab in labels):
        return replies.BAD_RCPT_ADDRESS
    if labels[-1].isdigit():  # 1.2.3.4 written without brackets
        return replies.IP_LITERAL
    return ascii_d


def parse_path(text: str, *, smtputf8: bool, is_sender: bool) -> tuple[Address | None, str] | Reply:
    """Parse `<local@domain> params` from MAIL/RCPT. Returns (address or None for <>, rest) or a Reply.

    Refuses what open relays were once tricked with: source routes (`<@a:b@c>`), `%` and `!`
    routing, quoted local parts hiding an `@`, and address literals.
    """
    bad = replies.BAD_SENDER_ADDRESS if is_sender else replies.BAD_RCPT_ADDRESS
    text = text.strip()
    # Lone surrogates are bytes that were not UTF-8 (the command line is decoded with
    # surrogateescape): never a valid address, with or without SMTPUTF8.
    if any(c in text for c in "\r\n\x00") or any("\udc80" <= c <= "\udcff" for c in text):
        return bad
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end < 0:
            return bad
        inner, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(" "):
            return bad
    else:
        inner, _, rest = text.partition(" ")
        if not inner:
            return bad  # "MAIL FROM:" with no path at all; only "<>" is the null path
    rest = rest.strip()
    if inner == "":
        return (None, rest)
    if inner.startswith("@"):
        return replies.ROUTE_NOT_ALLOWED
    if not smtputf8 and _non_ascii(inner):
        return replies.SMTPUTF8_REQUIRED
    if inner.startswith('"'):
        close = _closing_quote(inner)
        if close < 0 or close + 1 >= len(inner) or inner[close + 1] != "@":
            return bad
        local, domain = inner[:close + 1], inner[close + 2:]
        content = local[1:-1]
        if any(c in content for c in "@%!") or len(local) > 64:
            return replies.ROUTE_NOT_ALLOWED
        if any(ord(c) < 32 or ord(c) == 127 for c in content):
            return bad
    else:
        local, at, domain = inner.rpartition("@")
        if not at or not local:
            return bad
        if "@" in local or "%" in local or "!" in local:
            return replies.ROUTE_NOT_ALLOWED
        if len(local.encode("utf-8")) > 64:
            return bad
        if _non_ascii(local):
            if any(ord(c) < 32 or c.isspace() or c in '"(),:;<>@[\\]' for c in local):
                return bad
        elif not _ATEXT.match(local):
            return bad
    if "!" in domain or "%" in domain:
        return replies.ROUTE_NOT_ALLOWED
    parsed = parse_domain(domain, smtputf8)
    if isinstance(parsed, Reply):
        return bad if parsed is replies.BAD_RCPT_ADDRESS else parsed
    if len(inner.encode("utf-8")) > 254:
        return bad
    return (Address(local, domain, parsed), rest)


def _closing_bracket(text: str) -> int:
    in_quote = escaped = False
    for i, c in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif c == "\\" and in_quote:
            escaped = True
        elif c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return i
    return -1


def _closing_quote(text: str) -> int:
    escaped = False
    for i, c in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            return i
    return -1


def xtext_decode(value: str) -> str | None:
    """RFC 3461 4 xtext -> text, or None when malformed."""
    if not _XTEXT_CHAR.match(value):
        return None
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=" else f"+{ord(c):02X}" for c in value)


def _split_params(text: str) -> list[tuple[str, str | None]] | Reply:
    out = []
    for item in text.split():
        key, eq, value = item.partition("=")
        if not key or not all(c.isalnum() or c == "-" for c in key) or (eq and not value):
            return replies.PARAM_SYNTAX
        if any(k == key.upper() for k, _ in out):
            return replies.PARAM_SYNTAX.with_text(f"Duplicate parameter {key.upper()}")
        out.append((key.upper(), value if eq else None))
    return out


def parse_mail_params(text: str, *, size_limit: int, requiretls: bool = False) -> MailParams | Reply:
    """`requiretls`: the REQUIRETLS parameter is offered (RFC 8689 4.1: only over TLS)."""
    params = MailParams()
    items = _split_params(text)
    if isinstance(items, Reply):
        return items
    for key, value in items:
        if key == "SIZE":
            # RFC 1870: ASCII digits only ("²" and "١" pass str.isdigit() but not int()).
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                return replies.PARAM_SYNTAX.with_text("SIZE needs a decimal number")
            params.size = int(value)
            if params.size > size_limit:
                return replies.SIZE_EXCEEDED
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return replies.PARAM_SYNTAX.with_text("BODY must be 7BIT or 8BITMIME")
            params.body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                return replies.PARAM_SYNTAX.with_text("SMTPUTF8 takes no value")
            params.smtputf8 = True
        elif key == "AUTH":
            # RFC 4954 5: accepted and recorded; "<>" or an xtext mailbox.
            if value is None or (value != "<>" and xtext_decode(value) is None):
                return replies.PARAM_SYNTAX.with_text("AUTH= needs <> or an xtext mailbox")
            params.auth = value
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return replies.PARAM_SYNTAX.with_text("RET must be FULL or HDRS")
            params.ret = value.upper()
        elif key == "ENVID":
            decoded = xtext_decode(value or "")
            if not value or decoded is None or len(value) > _ENVID_MAX:
                return replies.PARAM_SYNTAX.with_text("ENVID must be xtext, at most 100 characters")
            params.envid = decoded
        elif key == "REQUIRETLS" and requiretls:
            if value is not None:
                return replies.PARAM_SYNTAX.with_text("REQUIRETLS takes no value")
            params.requiretls = True
        else:
            return replies.UNKNOWN_PARAM.with_text(f"Unsupported MAIL parameter {key}")
    return params


def parse_rcpt_params(text: str) -> RcptParams | Reply:
    params = RcptParams()
    items = _split_params(text)
    if isinstance(items, Reply):
        return items
    for key, value in items:
        if key == "NOTIFY":
            values = (value or "").upper().split(",")
            if not value or not set(values) <= _DSN_NOTIFY or ("NEVER" in values and len(values) > 1):
                return replies.PARAM_SYNTAX.with_text("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
            params.notify = ",".join(values)
        elif key == "ORCPT":
            addr_type, semi, addr = (value or "").partition(";")
            if not semi or not _ADDR_TYPE.match(addr_type) or not addr or xtext_decode(addr) is None \
                    or len(value or "") > 500:
                return replies.PARAM_SYNTAX.with_text("ORCPT must be addr-type;xtext (RFC 3461 4.2)")
            params.orcpt = f"{addr_type.lower()};{xtext_decode(addr)}"
        else:
            return replies.UNKNOWN_PARAM.with_text(f"Unsupported RCPT parameter {key}")
    return params


def domain_allowed(ascii_domain: str, allowed: tuple[str, ...]) -> bool:
    """True when the domain is one of `allowed` or a subdomain of one."""
    return any(ascii_domain == d or ascii_domain.endswith("." + d) for d in allowed)


def check_sender(sender: Address | None, allowed_domains: tuple[str, ...], *, trusted: bool = False) -> Reply | None:
    if sender is None:
        # Only the relay itself sends from <> (bounces); a client doing so could forge DSNs.
        return replies.NULL_SENDER
    if not domain_allowed(sender.ascii_domain, allowed_domains):
        return replies.SENDER_NOT_TRUSTED if trusted else replies.SENDER_NOT_ALLOWED
    return None


def check_from_header(from_domains: list[str] | None, allowed_domains: tuple[str, ...], mode: str) -> Reply | None:
    """policy.from_header: with "domain", every From: address must be at one of the principal's
    domains or a subdomain (headers.from_domains gives them); the message is DKIM-signed with
    that domain's key, so a mismatch would be one customer signing as another."""
    if mode == "off" or from_domains is None:
        return None
    bad = [d for d in from_domains if not domain_allowed(d, allowed_domains)]
    if not bad:
        return None
    shown = bad[0] or "an unreadable address"
    return replies.FROM_NOT_ALLOWED.with_text(
        f"{replies.FROM_NOT_ALLOWED.text}: {shown} is not {' or '.join(allowed_domains)} "
        "or a subdomain (policy.from_header)")


def check_recipient_count(current: int, limit: int) -> Reply | None:
    return replies.TOO_MANY_RCPTS if current >= limit else None


# feed_block's clean-block test, by C-level passes over the block instead of Python over its
# lines: one map marks the LFs, one the CRs; the block has no bare CR or LF exactly when the LF
# marks are the CR marks moved on by one (each LF right after a CR, each CR right before a
# LF). At 1 MB messages this costs 40 % of the counts (CR, LF, CRLF) and split it replaced.
_LF_MARKS = bytes(1 if i == 10 else 0 for i in range(256))
_CR_MARKS = bytes(1 if i == 13 else 0 for i in range(256))
# The longest line a clean block may hold, its LF included (998 octets and CRLF, RFC 5321
# 4.5.3.1.6); a 999-octet line is allowed when it starts with a transparency dot.
_MAX_LINE = 1000


def unstuff(wire: bytes) -> bytes:
    """Content from its wire form (whole lines): each line's leading transparency dot removed
    (RFC 5321 4.5.2)."""
    if wire.startswith(b"."):
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")


def stuff(content: bytes) -> bytes:
    """Wire form from content (whole lines): a dot added before each line that starts with one."""
    return (b"." if content.startswith(b".") else b"") + content.replace(b"\r\n.", b"\r\n..")


def _lines_fit(block: bytes | bytearray) -> bool:
    """Every line of `block` (which ends with LF) is at most _MAX_LINE octets: from each line
    start, the last LF within the next _MAX_LINE octets is found (one C-level search that
    covers many lines at once); none there means a longer line."""
    pos, end = 0, len(block)
    while end - pos > _MAX_LINE:
        last = block.rfind(b"\n", pos, pos + _MAX_LINE)
        if last < 0:
            return False
        pos = last + 1
    return True


@dataclass
class DataState:
    """Running checks over DATA lines (RFC 5321 2.3.8, 4.5.3.1.6), fed line by line as read.

    `parts` hold the content so far in its wire form, transparency dots kept, as the pieces the
    session read (no copy into one buffer): a large message is spooled as it came and delivery
    sends it without stuffing it again; `content()` removes the dots."""
    size_limit: int
    size: int = 0
    problem: Reply | None = None
    parts: list[bytes] = field(default_factory=list)   # wire form: lines as received, dots kept
    buffered: int = 0                                   # bytes in parts

    def discard(self) -> None:
        self.parts = []
        self.buffered = 0

    def take(self) -> list[bytes]:
        """The pieces held so far (for the spool file); nothing is held afterwards."""
        parts = self.parts
        self.discard()
        return parts

    def feed(self, line: bytes) -> None:
        """`line` is one line as read, including its line ending (the final dot line is not fed)."""
        self.size += len(line)
        if self.problem is not None:
            return
        # What is wrong with the line itself wins over the size it brings the message to: the
        # verdict must not depend on how TCP cut the stream into reads.
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            # A bare CR or LF could end DATA for the next hop where it did not for us (smuggling).
            self.problem = replies.BARE_LINE_ENDING
        elif b"\x00" in line:
            self.problem = replies.NUL_IN_DATA
        elif len(line) > 1001 or (len(line) == 1001 and not line.startswith(b".")):
            self.problem = replies.DATA_LINE_TOO_LONG
        elif self.size > self.size_limit:
            self.problem = replies.SIZE_EXCEEDED
        if self.problem is not None:
            self.discard()
            return
        self._keep(line)

    def _keep(self, piece: bytes) -> None:
        # Many short pieces (lines fed one by one) are merged, so a list of line objects never
        # costs ~65x the message size for short lines.
        if self.parts and len(self.parts[-1]) < 4096 and len(piece) < 4096:
            self.parts[-1] += piece
        else:
            self.parts.append(piece)
        self.buffered += len(piece)

    def feed_block(self, block: bytes) -> None:
        """Many lines at once (`block` starts at a line start and ends with LF): the same verdicts
        as feeding them one by one, but a clean block is checked by C-level scans and kept as
        it is."""
        if self.problem is None and self.size + len(block) <= self.size_limit and block.endswith(b"\r\n") \
                and b"\x00" not in block:
            lf, cr = block.translate(_LF_MARKS), block.translate(_CR_MARKS)
            if lf[1:] == cr[:-1] and not lf[0] and _lines_fit(block):
                self.size += len(block)
                self._keep(block)
                return
        # Something to refuse (or a 999-octet dot line): line by line decides which verdict.
        # Once refused, the rest is only counted (feed would do no more), not split into lines:
        # a refused body of one-octet lines cost the shared loop half a second a MB.
        start, end = 0, len(block)
        while start < end:
            if self.problem is not None:
                self.size += end - start
                return
            stop = block.find(b"\n", start) + 1 or end
            self.feed(bytes(block[start:stop]))
            start = stop

    def content(self) -> bytes:
        return unstuff(b"".join(self.parts))


def check_received_count(count: int, limit: int) -> Reply | None:
    return replies.LOOP_DETECTED if count > limit else None
