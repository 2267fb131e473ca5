"""Properties of the pure parsers a client's bytes reach first, over arbitrary input (hypothesis).

What the session hands these functions is whatever a client sent: text decoded from UTF-8 with
surrogateescape (so invalid bytes arrive as lone surrogates), parameters of any shape, raw DATA
lines. None of them may raise (an exception in the session is a 451 and a traceback, and for a
permanent problem an endless retry), and what they accept must be safe to store and relay.

Budgets are fixed (`max_examples`), and failing examples are kept in .hypothesis/ by the default
database. Inputs that once broke the relay are pinned with @example.
"""
from __future__ import annotations

import email
import email.policy
import re
import string
from datetime import datetime, timezone

from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from relay import headers, policy, replies
from relay.bounce import ACTIONS, DSNRecipient, build_dsn
from relay.server.auth import b64, decode_plain

BARE_LF = re.compile(rb"(?<!\r)\n")
BARE_CR = re.compile(rb"\r(?!\n)")
BUDGET = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_BUDGET = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- strategies

# Pieces that matter to address and parameter syntax, so random joins reach the deep branches.
ADDRESS_PIECES = ["<", ">", "@", "%", "!", '"', "\\", "[", "]", ":", ",", ".", " ", "\t", "a", "Z", "0", "9",
                  "-", "_", "+", "=", "example", "com", "mg.example.com", "relay.test", "IPv6:", "127.0.0.1",
                  "xn--", "é", "ü", "日本", "\r", "\n", "\x00", "\x7f", "\x01", "SIZE=10", "SMTPUTF8",
                  "BODY=8BITMIME", "postmaster", "\u200b", "ß", "１", "²"]
structured = st.lists(st.sampled_from(ADDRESS_PIECES), max_size=30).map("".join)
any_text = st.one_of(st.text(max_size=200), structured)
# What the session really passes: client bytes decoded with surrogateescape.
client_text = st.one_of(any_text, st.binary(max_size=120).map(lambda b: b.decode("utf-8", "surrogateescape")))

PARAM_KEYS = ["SIZE", "BODY", "SMTPUTF8", "AUTH", "RET", "ENVID", "NOTIFY", "ORCPT", "size", "X-FOO", "", "ä"]
PARAM_VALUES = st.one_of(st.sampled_from(["", "0", "10", "99999999999999999999999", "7BIT", "8bitmime", "FULL",
                                          "hdrs", "<>", "a+2Bb", "+0D+0A", "+zz", "rfc822;a@b.c",
                                          "SUCCESS,FAILURE", "NEVER,DELAY", "NEVER", "=", ";", "-1", " 1", "²",
                                          "١٢", "１０", "\udcff"]),
                         st.text(max_size=30))
param = st.tuples(st.sampled_from(PARAM_KEYS), st.sampled_from(["=", "", "=="]), PARAM_VALUES).map("".join)
param_text = st.one_of(st.lists(param, max_size=6).map(" ".join), client_text)


def check_address(addr: policy.Address) -> None:
    text = str(addr)
    for bad in ("\r", "\n", "\x00", "%", "!"):
        assert bad not in text, (bad, addr)
    assert not addr.local.startswith("@"), addr
    assert "[" not in addr.domain and "]" not in addr.domain, addr  # no address literals
    assert "@" not in addr.domain, addr
    assert addr.local and addr.domain, addr
    # '@' in the local part only quoted, and then never as a routing trick (the parser refuses that).
    assert "@" not in addr.local, addr
    # The routing key is plain lower-case ASCII with at least two labels: what MX lookup gets.
    assert addr.ascii_domain.isascii() and addr.ascii_domain == addr.ascii_domain.lower(), addr
    assert len(addr.ascii_domain.split(".")) >= 2, addr
    text.encode("utf-8")  # storable: no lone surrogates


# ---------------------------------------------------------------- parse_path

@BUDGET
@given(text=client_text, smtputf8=st.booleans(), is_sender=st.booleans())
# Once a 451 and a traceback: bytes that are not UTF-8 reach parse_path as lone surrogates.
@example(text="<app\udcff@mg.example.com> SMTPUTF8", smtputf8=True, is_sender=True)
@example(text='<"b\udcffb"@example.net>', smtputf8=True, is_sender=False)
@example(text="<b\udcc3@example.net>", smtputf8=False, is_sender=False)
def test_parse_path_never_raises_and_accepts_only_safe_addresses(text, smtputf8, is_sender):
    result = policy.parse_path(text, smtputf8=smtputf8, is_sender=is_sender)
    if isinstance(result, replies.Reply):
        assert result.code == 553, result
        return
    addr, rest = result
    assert isinstance(rest, str)
    if addr is None:
        assert text.strip().startswith("<>"), text
        return
    check_address(addr)
    if not smtputf8:
        assert str(addr).isascii()


@BUDGET
@given(local=st.sampled_from(["victim", "VICTIM", '"victim"', "v.i-c_t+i=m"]),
       trick=st.sampled_from(["%", "!", "@"]),
       target=st.sampled_from(["target.example", "TARGET.EXAMPLE", "[127.0.0.1]", "relay.test"]),
       domain=st.sampled_from(["relay.test", "[127.0.0.1]", "mg.example.com"]),
       quoted=st.booleans(), route=st.booleans())
def test_routing_tricks_are_never_accepted(local, trick, target, domain, quoted, route):
    lp = f"{local.strip(chr(34))}{trick}{target}"
    if quoted:
        lp = f'"{lp}"'
    path = f"<{'@relay.test:' if route else ''}{lp}@{domain}>"
    result = policy.parse_path(path, smtputf8=True, is_sender=False)
    assert isinstance(result, replies.Reply) and result.code == 553, (path, result)
    assert result.status in ("5.7.1", "5.1.3"), (path, result)


# ---------------------------------------------------------------- MAIL / RCPT parameters

@BUDGET
@given(text=param_text, limit=st.integers(min_value=0, max_value=10**9))
@example(text="SIZE=²", limit=10**9)  # once int("²") -> ValueError -> 451 and a traceback
def test_parse_mail_params_never_raises(text, limit):
    result = policy.parse_mail_params(text, size_limit=limit)
    if isinstance(result, replies.Reply):
        assert result.code in (501, 552, 555), result
        return
    assert result.size is None or 0 <= result.size <= limit
    assert result.body in (None, "7BIT", "8BITMIME")
    assert result.ret in (None, "FULL", "HDRS")
    if result.envid is not None:
        # Stored decoded; it leaves the relay only re-encoded (outbound) or dropped when it has a line
        # break (DSN): the encoding must round-trip and be a single printable token.
        enc = policy.xtext_encode(result.envid)
        assert policy.xtext_decode(enc) == result.envid
        assert all(0x21 <= ord(c) <= 0x7E for c in enc)


@SMALL_BUDGET
@given(digits=st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=5))
@example(digits="²")
@example(digits="١٢")
def test_size_with_unicode_digits_is_a_syntax_error(digits):
    """RFC 1870 size-value is ASCII digits: "²" passes str.isdigit() but not int(), "١٢" both."""
    assume(not digits.isascii())
    result = policy.parse_mail_params(f"SIZE={digits}", size_limit=10**9)
    assert isinstance(result, replies.Reply) and result.code == 501, result


@BUDGET
@given(text=param_text)
def test_parse_rcpt_params_never_raises(text):
    result = policy.parse_rcpt_params(text)
    if isinstance(result, replies.Reply):
        assert result.code in (501, 555), result
        return
    if result.notify is not None:
        values = result.notify.split(",")
        assert set(values) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
        assert "NEVER" not in values or values == ["NEVER"]
    if result.orcpt is not None:
        addr_type, semi, addr = result.orcpt.partition(";")
        assert semi and addr_type and addr
        assert policy.xtext_decode(policy.xtext_encode(addr)) == addr


@BUDGET
@given(value=st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=60))
def test_xtext_round_trips_for_everything_it_can_decode(value):
    enc = policy.xtext_encode(value)
    assert policy.xtext_decode(enc) == value
    assert not any(c in enc for c in "\r\n =")


# ---------------------------------------------------------------- AUTH decoding

@BUDGET
@given(raw=st.one_of(st.binary(max_size=200), st.text(alphabet=string.ascii_letters + string.digits + "+/=*\r\n \t",
                                                     max_size=200).map(str.encode)))
def test_b64_and_decode_plain_never_raise(raw):
    decoded = b64(raw)
    if isinstance(decoded, replies.Reply):
        assert decoded is replies.AUTH_BAD_BASE64
        decoded = raw
    for blob in (decoded, raw):
        result = decode_plain(blob)
        if isinstance(result, replies.Reply):
            assert result is replies.AUTH_INVALID
        else:
            authc, password = result
            assert authc and b"\x00" not in authc and b"\x00" not in password


# ---------------------------------------------------------------- DATA

def _as_read(data: bytes) -> list[bytes]:
    """The lines the session feeds: split after each LF, the last one completed with an LF."""
    lines = data.splitlines(keepends=True)
    out: list[bytes] = []
    for line in lines:
        # bytes.splitlines also splits at a lone CR; the session's readuntil(b"\n") does not.
        if out and not out[-1].endswith(b"\n"):
            out[-1] += line
        else:
            out.append(line)
    if out and not out[-1].endswith(b"\n"):
        out[-1] += b"\n"
    return out


data_bytes = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"Subject: a", b"\x00", b" ",
                              b"y" * 997, b"\xff"]), max_size=60).map(b"".join))


@BUDGET
@given(data=data_bytes, limit=st.integers(min_value=0, max_value=5000))
def test_data_state_never_keeps_a_bare_line_ending(data, limit):
    state = policy.DataState(limit)
    lines = _as_read(data)
    for line in lines:
        state.feed(line)
    assert state.size == sum(len(x) for x in lines)
    if state.size > limit:
        assert state.problem is not None
    if state.problem is not None:
        assert state.problem.code in (550, 552), state.problem
        return
    content = state.content()
    assert not BARE_LF.search(content) and not BARE_CR.search(content)
    assert b"\x00" not in content
    for line in lines:  # everything accepted was a CRLF line of at most 998 octets (+ a transparency dot)
        assert line.endswith(b"\r\n") and b"\r" not in line[:-2] and b"\n" not in line[:-2]
        assert len(line) - line.startswith(b".") <= 1000
    # Exactly the lines as sent, transparency dots removed (RFC 5321 4.5.2), nothing else changed.
    assert content == b"".join(line[1:] if line.startswith(b".") else line for line in lines)


data_with_dots_and_long_lines = st.one_of(data_bytes, st.lists(st.sampled_from(
    [b"\r\n", b".", b"..", b"x", b"y" * 998, b"z" * 997, b".\r\n", b"\r", b"\n"]), max_size=40).map(b"".join))


@BUDGET
@given(data=data_with_dots_and_long_lines, limit=st.integers(min_value=0, max_value=5000),
       cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=4))
def test_data_state_blocks_judge_exactly_like_lines(data, limit, cuts):
    """The session hands DataState runs of lines; the verdict, size and content must not depend on that."""
    lines = _as_read(data)
    by_line = policy.DataState(limit)
    for line in lines:
        by_line.feed(line)
    by_block = policy.DataState(limit)
    bounds = sorted({0, len(lines), *(c for c in cuts if c < len(lines))})
    for a, b in zip(bounds, bounds[1:]):
        by_block.feed_block(b"".join(lines[a:b]))
    assert (by_block.size, by_block.problem) == (by_line.size, by_line.problem)
    if by_line.problem is None:
        assert by_block.content() == by_line.content()


# ---------------------------------------------------------------- headers.prepare

FIELD_NAMES = ["Subject", "From", "To", "Bcc", "bcc", "BCC", "Received", "received", "Date", "Message-ID",
               "X-Bcc", "Resent-Bcc", "Bcc ", "Bcc\t", "DKIM-Signature"]
field_line = st.tuples(st.sampled_from(FIELD_NAMES),
                       st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
                       st.lists(st.text(alphabet=string.ascii_letters + " ", max_size=20), max_size=2)).map(
    lambda t: (f"{t[0]}: {t[1]}\r\n" + "".join(f" {c}\r\n" for c in t[2])).encode())
crlf_line = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=50).map(
    lambda s: s.encode() + b"\r\n")
message = st.tuples(st.lists(field_line, max_size=8), st.booleans(),
                    st.lists(st.one_of(crlf_line, field_line), max_size=6)).map(
    lambda t: b"".join(t[0]) + (b"\r\n" if t[1] else b"") + b"".join(t[2]))


def _prepare(data: bytes, qid: str = "QID1") -> bytes:
    received = headers.received_line(helo="client.test", client_ip="127.0.0.1", hostname="relay.test",
                                     protocol="ESMTPSA", queue_id=qid, tls=None, recipient=None)
    return headers.prepare(data, received=received, hostname="relay.test", queue_id=qid)


@BUDGET
@given(data=message)
def test_prepare_adds_one_received_and_never_leaves_bcc(data):
    once = _prepare(data)
    twice = _prepare(once, "QID2")
    assert headers.count_received(once) == headers.count_received(data) + 1
    assert headers.count_received(twice) == headers.count_received(once) + 1
    for out in (once, twice):
        fields = headers.split(out).fields
        assert not any(headers.field_name(f) == "bcc" for f in fields), out
        parsed = email.message_from_bytes(out, policy=email.policy.compat32)
        assert parsed.get_all("Bcc") is None, out
        assert headers.has_field(fields, "date") and headers.has_field(fields, "message-id")
        assert not BARE_LF.search(out) and not BARE_CR.search(out)
    # Never re-encoded: the original body (and everything after our header section) is kept verbatim.
    assert once.endswith(headers.split(data).body)
    # The second pass only puts its Received on top: no second Date/Message-ID, nothing else changed.
    assert twice.endswith(once) and headers.count_received(twice[:-len(once)]) == 1


# ---------------------------------------------------------------- bounces

hostile_text = st.one_of(st.text(max_size=120), st.sampled_from([
    "550 5.1.1 <bob@example.net>\r\nBcc: injected@evil.test", "x" * 3000, "\udcff\udcfe", "\x00\x01\x1b[31m",
    "Subject: injected\r\n\r\nbody", "\u2028\u2029", "日本語の説明"]))
status = st.builds(lambda a, b, c: f"{a}.{b}.{c}", st.sampled_from("245"), st.integers(0, 999), st.integers(0, 999))
recipient = st.builds(
    DSNRecipient,
    final_recipient=st.one_of(st.emails(), hostile_text.filter(lambda s: s.strip())),
    action=st.sampled_from(sorted(ACTIONS)), status=status,
    diagnostic=st.none() | hostile_text, remote_mta=st.none() | hostile_text,
    original_recipient=st.none() | hostile_text,
    last_attempt=st.none() | st.datetimes(timezones=st.just(timezone.utc)),
    will_retry_until=st.none() | st.datetimes(timezones=st.just(timezone.utc)),
    diagnostic_type=st.sampled_from(["smtp", "X-Relay", "", "bad type\r\n"]))


@SMALL_BUDGET
@given(original=st.one_of(st.binary(max_size=3000), message), rcpts=st.lists(recipient, min_size=1, max_size=3),
       ret=st.sampled_from(["FULL", "HDRS", "full"]), envid=st.none() | hostile_text,
       sender=st.one_of(st.emails(), hostile_text),
       # server.hostname: the operator's, a validated host name (config.is_hostname), not remote input
       mta=st.one_of(st.just("relay.test"), st.from_regex(r"\A[a-z0-9]{1,63}(\.[a-z0-9-]{1,63}){1,3}\Z")),
       queue_id=st.none() | hostile_text, message_id=st.none() | hostile_text)
def test_build_dsn_is_always_parseable(original, rcpts, ret, envid, sender, mta, queue_id, message_id):
    try:
        data = build_dsn(reporting_mta=mta, original_sender=sender, original_message=original, recipients=rcpts,
                         ret=ret, envid=envid, queue_id=queue_id, message_id=message_id,
                         arrival_date=datetime(2024, 1, 2, tzinfo=timezone.utc))
    except ValueError as exc:
        # The documented refusals only: nothing to report from / to.
        assert "reporting_mta is empty" in str(exc) or "null reverse-path" in str(exc), exc
        return
    assert not BARE_LF.search(data) and not BARE_CR.search(data) and b"\x00" not in data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects, msg.defects
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    assert parts[2].get_content_type() in ("message/rfc822", "text/rfc822-headers")
    for p in parts:
        assert not p.defects, (p.get_content_type(), p.defects)
    blocks = parts[1].get_payload()
    assert len(blocks) == 1 + len(rcpts)
    assert blocks[0]["Reporting-MTA"].startswith("dns; ")
    for block, r in zip(blocks[1:], rcpts):
        assert block["Action"] == r.action and block["Status"] == r.status
        assert block["Final-Recipient"].split(";", 1)[0] in ("rfc822", "utf-8")
    # Injected header lines never become fields of the report.
    assert msg.get_all("Bcc") is None and len(msg.get_all("Subject")) == 1


@settings(max_examples=400, deadline=None)
@given(addr_type=st.text(max_size=12), addr=st.text(max_size=40), notify=st.text(max_size=20))
@example(addr_type="ü", addr="bob", notify="")
@example(addr_type="rfc822", addr="bo+ZZb", notify="")
def test_every_accepted_rcpt_parameter_reencodes_to_ascii(addr_type, addr, notify):
    """What RCPT accepts is what delivery sends on: it must encode as ASCII by construction (a
    raw non-ASCII ORCPT once raised mid-transaction and poisoned the outbound session)."""
    text = f"ORCPT={addr_type};{addr}" + (f" NOTIFY={notify}" if notify else "")
    got = policy.parse_rcpt_params(text)
    if isinstance(got, replies.Reply):
        assert (got.code, got.status) in ((501, "5.5.4"), (555, "5.5.4"))
        return
    kind, _, original = got.orcpt.partition(";")
    wire = f"ORCPT={kind};{policy.xtext_encode(original)}"
    wire.encode("ascii")  # raises if not
    if got.notify:
        got.notify.encode("ascii")
    assert policy.xtext_decode(policy.xtext_encode(original)) == original
