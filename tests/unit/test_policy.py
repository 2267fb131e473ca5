"""policy: address parsing (with the classic open-relay battery), MAIL/RCPT parameters, sender rules, DATA checks."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from relay import policy, replies
from relay.policy import Address, DataState

# ---------------------------------------------------------------- parse_path: valid

VALID = [
    # text, smtputf8, (local, domain, ascii_domain), rest
    ("<bob@example.net>", False, ("bob", "example.net", "example.net"), ""),
    ("bob@example.net", False, ("bob", "example.net", "example.net"), ""),
    ("  <bob@example.net>  ", False, ("bob", "example.net", "example.net"), ""),
    ("<Bob.Smith+tag@Sub.Example.NET> SIZE=10", False, ("Bob.Smith+tag", "Sub.Example.NET", "sub.example.net"),
     "SIZE=10"),
    ("<o'brien@example.net>", False, ("o'brien", "example.net", "example.net"), ""),
    ('<"quoted name"@example.net>', False, ('"quoted name"', "example.net", "example.net"), ""),
    ('<"a\\"b"@example.net>', False, ('"a\\"b"', "example.net", "example.net"), ""),
    ("<x@a-b.example.net>", False, ("x", "a-b.example.net", "a-b.example.net"), ""),
    ("<jörg@exämple.org> SMTPUTF8", True, ("jörg", "exämple.org", "xn--exmple-cua.org"), "SMTPUTF8"),
    ("<x@xn--exmple-cua.org>", False, ("x", "xn--exmple-cua.org", "xn--exmple-cua.org"), ""),
    ("<" + "a" * 64 + "@example.net>", False, ("a" * 64, "example.net", "example.net"), ""),
]


@pytest.mark.parametrize("text,utf8,addr,rest", VALID)
@pytest.mark.parametrize("is_sender", [True, False])
def test_parse_path_valid(text, utf8, addr, rest, is_sender):
    assert policy.parse_path(text, smtputf8=utf8, is_sender=is_sender) == (Address(*addr), rest)


@pytest.mark.parametrize("text,rest", [("<>", ""), ("<> SIZE=100 RET=HDRS", "SIZE=100 RET=HDRS"), (" <> ", "")])
def test_parse_path_null(text, rest):
    assert policy.parse_path(text, smtputf8=False, is_sender=True) == (None, rest)


# ---------------------------------------------------------------- parse_path: invalid (open-relay battery)

ROUTE = replies.ROUTE_NOT_ALLOWED
LITERAL = replies.IP_LITERAL
BAD = "bad"            # the malformed-address reply for the side (5.1.7 sender / 5.1.3 recipient)
UTF8 = replies.SMTPUTF8_REQUIRED

INVALID = [
    ("<@relay.test:victim@example.org>", ROUTE),
    ("<@a.example,@b.example:victim@example.org>", ROUTE),
    ("<@RELAY.TEST:VICTIM@EXAMPLE.ORG>", ROUTE),
    ("<victim%example.org@relay.test>", ROUTE),
    ("<VICTIM%EXAMPLE.ORG@RELAY.TEST>", ROUTE),
    ("<victim%example.org>", BAD),
    ("<example.org!victim@relay.test>", ROUTE),
    ("<EXAMPLE.ORG!VICTIM@RELAY.TEST>", ROUTE),
    ("<victim@example.org!relay.test>", ROUTE),
    ("<victim@example.org%relay.test>", ROUTE),
    ("<EXAMPLE.ORG!VICTIM>", BAD),
    ('<"victim@example.org"@relay.test>', ROUTE),
    ('<"VICTIM@EXAMPLE.ORG"@RELAY.TEST>', ROUTE),
    ('<"victim%example.org"@relay.test>', ROUTE),
    ('<"example.org!victim"@relay.test>', ROUTE),
    ('<"victim@example.org">', BAD),
    ("<victim@example.org@relay.test>", ROUTE),
    ("<victim@[1.2.3.4]>", LITERAL),
    ("<victim@[IPv6:::1]>", LITERAL),
    ("<VICTIM@[127.0.0.1]>", LITERAL),
    ("<victim@1.2.3.4>", LITERAL),
    ("<victim>", BAD),
    ("<victim@>", BAD),
    ("<@example.org>", ROUTE),
    ("<victim@localhost>", BAD),
    ("<victim@example.org", BAD),
    ("victim@example.org>", BAD),
    ("<victim@example.org>junk", BAD),
    ("<vic tim@example.org>", BAD),
    ("<victim@exa mple.org>", BAD),
    ("<victim@-example.org>", BAD),
    ("<victim@example-.org>", BAD),
    ("<victim@example..org>", BAD),
    ("<victim@example.org.>", BAD),
    ("<.victim@example.org>", BAD),
    ("<victim.@example.org>", BAD),
    ("<vic..tim@example.org>", BAD),
    ("<vic(tim@example.org>", BAD),
    ("<\"unterminated@example.org>", BAD),
    ('<"ctl\x01"@example.org>', BAD),
    ("<vic\rtim@example.org>", BAD),
    ("<vic\ntim@example.org>", BAD),
    ("<victim@exa\x00mple.org>", BAD),
    ("<victim@exämple.org>", UTF8),
    ("<jörg@example.org>", UTF8),
    ("<" + "v" * 65 + "@example.org>", BAD),
    ("<victim@" + "a" * 64 + ".org>", BAD),
    ("<victim@" + ".".join(["abcdefghij"] * 25) + ".org>", BAD),
    ("", BAD),
    ("<", BAD),
    (">", BAD),
]


@pytest.mark.parametrize("text,expected", INVALID)
@pytest.mark.parametrize("is_sender", [True, False])
def test_parse_path_invalid(text, expected, is_sender):
    got = policy.parse_path(text, smtputf8=False, is_sender=is_sender)
    if expected == BAD:
        expected = replies.BAD_SENDER_ADDRESS if is_sender else replies.BAD_RCPT_ADDRESS
    assert got == expected
    assert got.code in (501, 553)


def test_parse_path_utf8_needs_valid_idna():
    assert policy.parse_path("<x@ex\u00e4mple\u3002\u3002org>", smtputf8=True, is_sender=False) == \
        replies.BAD_RCPT_ADDRESS


@settings(max_examples=500, deadline=None)
@given(st.text(), st.booleans(), st.booleans())
def test_parse_path_never_raises(text, utf8, is_sender):
    got = policy.parse_path(text, smtputf8=utf8, is_sender=is_sender)
    assert isinstance(got, (tuple, replies.Reply))
    if isinstance(got, tuple):
        addr, rest = got
        assert addr is None or ("@" in str(addr) and not any(c in str(addr) for c in "\r\n\x00"))


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"<[a-z0-9.%!@:\[\]\"]{0,30}>", fullmatch=True))
def test_accepted_addresses_never_route(text):
    got = policy.parse_path(text, smtputf8=False, is_sender=False)
    if isinstance(got, tuple) and got[0] is not None:
        addr = got[0]
        assert not any(c in addr.local for c in "@%!") and not any(c in addr.domain for c in "%!@[]:")


# ---------------------------------------------------------------- MAIL / RCPT parameters

def test_mail_params_all():
    p = policy.parse_mail_params("size=100 body=8bitmime SMTPUTF8 AUTH=<> RET=hdrs ENVID=a+2Bb", size_limit=1000)
    assert p == policy.MailParams(size=100, body="8BITMIME", smtputf8=True, auth="<>", ret="HDRS", envid="a+b")


def test_mail_params_empty():
    assert policy.parse_mail_params("", size_limit=10) == policy.MailParams()


@pytest.mark.parametrize("text,expected", [
    ("SIZE=1001", replies.SIZE_EXCEEDED),
    ("SIZE=99999999999999999999999", replies.PARAM_SYNTAX),
    ("SIZE=-1", replies.PARAM_SYNTAX),
    ("SIZE", replies.PARAM_SYNTAX),
    ("SIZE=", replies.PARAM_SYNTAX),
    ("BODY=BINARYMIME", replies.PARAM_SYNTAX),
    ("SMTPUTF8=yes", replies.PARAM_SYNTAX),
    ("AUTH", replies.PARAM_SYNTAX),
    ("AUTH=a b", replies.UNKNOWN_PARAM),   # "b" is its own (unknown) parameter
    ("RET=ALL", replies.PARAM_SYNTAX),
    ("ENVID=" + "x" * 101, replies.PARAM_SYNTAX),
    ("ENVID=a+zz", replies.PARAM_SYNTAX),
    ("SIZE=1 SIZE=1", replies.PARAM_SYNTAX),
    ("=x", replies.PARAM_SYNTAX),
    ("X_Y=1", replies.PARAM_SYNTAX),
    ("FOO=bar", replies.UNKNOWN_PARAM),
])
def test_mail_params_refused(text, expected):
    got = policy.parse_mail_params(text, size_limit=1000)
    assert (got.code, got.status) == (expected.code, expected.status)


def test_unknown_mail_param_is_named():
    got = policy.parse_mail_params("XCLIENT=1", size_limit=10)
    assert got.code == 555 and "XCLIENT" in got.text


def test_size_at_limit_is_fine():
    assert policy.parse_mail_params("SIZE=1000", size_limit=1000).size == 1000


def test_rcpt_params():
    p = policy.parse_rcpt_params("notify=success,delay ORCPT=rfc822;bob+2Bx@example.net")
    assert p == policy.RcptParams(notify="SUCCESS,DELAY", orcpt="rfc822;bob+x@example.net")
    assert policy.parse_rcpt_params("") == policy.RcptParams()
    assert policy.parse_rcpt_params("NOTIFY=NEVER").notify == "NEVER"


@pytest.mark.parametrize("text,code", [
    ("NOTIFY=NEVER,SUCCESS", 501), ("NOTIFY=", 501), ("NOTIFY=SOMETIMES", 501), ("NOTIFY", 501),
    ("ORCPT=rfc822", 501), ("ORCPT=;x@y", 501), ("ORCPT=rfc822;", 501), ("ORCPT=rfc822;a+zz", 501),
    # RFC 3461 4.2: addr-type is an atom, xtext is ASCII with +XX escapes (upper-case hex)
    ("ORCPT=ü;bob", 501), ("ORCPT=rfc(822);bob", 501), ("ORCPT=rfc822;bo+ZZb", 501), ("ORCPT=rfc822;böb", 501),
    ("ORCPT=rfc 822;bob", 501), ("ORCPT=rfc822;bob+2b", 501),
    ("NOTIFY=DELAY NOTIFY=DELAY", 501), ("FOO=1", 555), ("SIZE=1", 555),
])
def test_rcpt_params_refused(text, code):
    got = policy.parse_rcpt_params(text)
    assert isinstance(got, replies.Reply) and got.code == code


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_param_parsers_never_raise(text):
    assert isinstance(policy.parse_mail_params(text, size_limit=1000), (policy.MailParams, replies.Reply))
    assert isinstance(policy.parse_rcpt_params(text), (policy.RcptParams, replies.Reply))


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F)))
def test_xtext_round_trip(value):
    assert policy.xtext_decode(policy.xtext_encode(value)) == value


# ---------------------------------------------------------------- sender and recipient rules

def addr(s: str) -> Address:
    got = policy.parse_path(f"<{s}>", smtputf8=True, is_sender=True)
    assert isinstance(got, tuple)
    return got[0]


@pytest.mark.parametrize("sender,allowed", [
    ("a@mg.example.com", True), ("a@MG.EXAMPLE.COM", True), ("a@x.mg.example.com", True),
    ("a@example.com", False), ("a@evilmg.example.com", False), ("a@mg.example.com.evil.net", False),
    ("a@other.example", False),
])
def test_check_sender(sender, allowed):
    got = policy.check_sender(addr(sender), ("mg.example.com",))
    assert got is None if allowed else got == replies.SENDER_NOT_ALLOWED
    trusted = policy.check_sender(addr(sender), ("mg.example.com",), trusted=True)
    assert trusted is None if allowed else trusted == replies.SENDER_NOT_TRUSTED


def test_check_sender_null():
    assert policy.check_sender(None, ("mg.example.com",)) == replies.NULL_SENDER


def test_check_recipient_count():
    assert policy.check_recipient_count(0, 2) is None
    assert policy.check_recipient_count(1, 2) is None
    assert policy.check_recipient_count(2, 2) == replies.TOO_MANY_RCPTS


def test_check_received_count():
    assert policy.check_received_count(50, 50) is None
    assert policy.check_received_count(51, 50) == replies.LOOP_DETECTED


# ---------------------------------------------------------------- DataState

def feed(lines: list[bytes], limit: int = 10_000) -> DataState:
    d = DataState(limit)
    for line in lines:
        d.feed(line)
    return d


def test_data_state_good_message_and_dot_unstuffing():
    d = feed([b"Subject: x\r\n", b"\r\n", b"..leading dot\r\n", b".\r\n"[:0] + b"body\r\n"])
    assert d.problem is None
    assert d.content() == b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n"
    assert d.size == len(b"Subject: x\r\n\r\n..leading dot\r\nbody\r\n")


@pytest.mark.parametrize("line,problem", [
    (b"bare lf\n", replies.BARE_LINE_ENDING),
    (b"bare\rcr\r\n", replies.BARE_LINE_ENDING),
    (b"cr only\r", replies.BARE_LINE_ENDING),
    (b"\r\r\n", replies.BARE_LINE_ENDING),
    (b"nul\x00\r\n", replies.NUL_IN_DATA),
    (b"x" * 999 + b"\r\n", replies.DATA_LINE_TOO_LONG),
    (b"." + b"x" * 999 + b"\r\n", replies.DATA_LINE_TOO_LONG),
])
def test_data_state_problems(line, problem):
    d = feed([b"Subject: x\r\n", b"\r\n", line, b"more\r\n"])
    assert d.problem == problem
    assert d.content() == b""  # nothing kept once the message is refused


@pytest.mark.parametrize("line", [b"x" * 998 + b"\r\n", b"." + b"x" * 998 + b"\r\n", b"\r\n", b"\xff\xfe 8bit\r\n"])
def test_data_state_acceptable_lines(line):
    assert feed([line]).problem is None


def test_data_state_size_counted_while_reading():
    d = DataState(20)
    d.feed(b"0123456789\r\n")
    assert d.problem is None
    d.feed(b"0123456789\r\n")
    assert d.problem == replies.SIZE_EXCEEDED and d.content() == b""
    d.feed(b"more\r\n")
    assert d.size == 30 and d.content() == b""


def test_data_state_first_problem_wins():
    d = feed([b"bare\n", b"x" * 5000 + b"\r\n"], limit=100)
    assert d.problem == replies.BARE_LINE_ENDING


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=1200), max_size=20))
def test_data_state_never_keeps_bad_lines(chunks):
    d = DataState(5000)
    for c in chunks:
        d.feed(c)
    if d.problem is None:
        content = d.content()
        assert b"\x00" not in content
        assert content.count(b"\r") == content.count(b"\r\n") == content.count(b"\n")
        assert all(len(line) <= 998 for line in content.split(b"\r\n"))
    else:
        assert d.content() == b""


@pytest.mark.parametrize("domains, mode, refused", [
    (None, "domain", False),                                   # no From: field
    (["mg.example.com"], "domain", False),
    (["eu.mg.example.com"], "domain", False),
    (["mg.example.com", "evil.example"], "domain", True),
    ([""], "domain", True),
    (["evil.example"], "off", False),
])
def test_check_from_header(domains, mode, refused):
    r = policy.check_from_header(domains, ("mg.example.com",), mode)
    assert (r is not None) == refused
    if r is not None:
        assert (r.code, r.status) == (550, "5.7.1") and "policy.from_header" in r.text
