import email
import email.policy
import re
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from relay.bounce import DSNRecipient, build_dsn

BARE_LF = re.compile(rb"(?<!\r)\n")
BARE_CR = re.compile(rb"\r(?!\n)")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
ORIGINAL = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nsecret body text\r\n"
BOB = DSNRecipient(
    final_recipient="bob@example.net", action="failed", status="5.1.1",
    diagnostic="550 5.1.1 <bob@example.net>: no such user", remote_mta="mx1.example.net",
    original_recipient="rfc822;bob@example.net", last_attempt=NOW,
)


def dsn(recipients=(BOB,), original=ORIGINAL, **kw):
    kw.setdefault("now", NOW)
    return build_dsn(reporting_mta="relay.example.com", original_sender="alice@example.com",
                     original_message=original, recipients=list(recipients), **kw)


def parse(data):
    return email.message_from_bytes(data, policy=email.policy.default)


def blocks(msg):
    return list(msg.iter_parts())[1].get_payload()


def assert_wire_safe(data):
    assert not BARE_LF.search(data)
    assert not BARE_CR.search(data)
    assert b"\0" not in data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_structure_and_headers():
    data = dsn(queue_id="4QX1Z", message_id="abc@relay.example.com")
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert msg["To"] == "alice@example.com"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == "<abc@relay.example.com>"
    assert msg["Date"].datetime == NOW
    text = list(msg.iter_parts())[0].get_content()
    assert "4QX1Z" in text and "no such user" in text and "bob@example.net" in text
    assert msg.get_boundary().encode() not in ORIGINAL


def test_generated_message_id_uses_reporting_mta():
    assert parse(dsn())["Message-ID"].endswith("@relay.example.com>")


def test_per_recipient_fields():
    carol = DSNRecipient("carol@example.org", "delayed", "4.4.7", remote_mta="mx.example.org",
                         will_retry_until=datetime(2024, 5, 6, tzinfo=timezone.utc))
    per_msg, b1, b2 = blocks(parse(dsn([BOB, carol], arrival_date=NOW)))
    assert per_msg["Reporting-MTA"] == "dns; relay.example.com"
    assert per_msg["Arrival-Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert b1["Original-Recipient"] == "rfc822;bob@example.net"
    assert b1["Final-Recipient"] == "rfc822; bob@example.net"
    assert b1["Action"] == "failed"
    assert b1["Status"] == "5.1.1"
    assert b1["Remote-MTA"] == "dns; mx1.example.net"
    assert b1["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    assert b1["Last-Attempt-Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert b2["Final-Recipient"] == "rfc822; carol@example.org"
    assert b2["Action"] == "delayed"
    assert b2["Will-Retry-Until"] == "Mon, 06 May 2024 00:00:00 +0000"
    assert b2["Diagnostic-Code"] is None and b2["Original-Recipient"] is None


def test_envid_and_orcpt_echoed():
    per_msg, rcpt = blocks(parse(dsn(envid="QQ314159")))
    assert per_msg["Original-Envelope-Id"] == "QQ314159"
    assert rcpt["Original-Recipient"] == "rfc822;bob@example.net"


def test_non_ascii_address_uses_utf8_type():
    r = DSNRecipient("jöran@exämple.se", "failed", "5.1.1")
    data = dsn([r])
    assert_wire_safe(data)
    assert blocks(parse(data))[1]["Final-Recipient"] == "utf-8; jöran@exämple.se"


def test_ret_full_includes_body_hdrs_does_not():
    full = parse(dsn(ret="FULL"))
    returned = list(full.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_content()
    assert inner["Subject"] == "hello"
    assert "secret body text" in inner.get_content()

    for ret in ("HDRS", "bogus"):
        data = dsn(ret=ret)
        assert b"secret body text" not in data
        part = list(parse(data).iter_parts())[2]
        assert part.get_content_type() == "text/rfc822-headers"
        assert b"Subject: hello\r\n" in part.get_payload(decode=True)


def test_full_falls_back_to_headers_when_too_large():
    big = ORIGINAL + b"x" * 2000 + b"\r\n"
    msg = parse(dsn(original=big, ret="FULL", max_full=1000))
    text, _, returned = msg.iter_parts()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"xxxx" not in returned.get_payload(decode=True)
    assert "only its headers are attached" in " ".join(text.get_content().split())


@pytest.mark.parametrize("actions, subject", [
    (["failed", "delayed"], "Undelivered Mail Returned to Sender"),
    (["failed"], "Undelivered Mail Returned to Sender"),
    (["delayed"], "Delayed Mail (still being retried)"),
    (["delivered", "relayed"], "Successful Mail Delivery Report"),
    (["delivered"], "Successful Mail Delivery Report"),
])
def test_subject_variants(actions, subject):
    status = {"failed": "5.0.0", "delayed": "4.0.0"}
    rcpts = [DSNRecipient(f"r{i}@example.net", a, status.get(a, "2.0.0")) for i, a in enumerate(actions)]
    assert parse(dsn(rcpts))["Subject"] == subject


def test_invalid_input_rejected():
    with pytest.raises(ValueError):
        dsn([DSNRecipient("a@b", "bounced", "5.0.0")])
    with pytest.raises(ValueError):
        dsn([DSNRecipient("a@b", "failed", "550")])
    with pytest.raises(ValueError):
        dsn([])
    with pytest.raises(ValueError):
        build_dsn(reporting_mta="relay.example.com", original_sender="", original_message=ORIGINAL,
                  recipients=[BOB])


def test_hostile_content_stays_wire_safe():
    long_diag = "550 5.7.1 " + " ".join(f"word{i}" for i in range(700)) + " " + "Z" * 1500
    assert len(long_diag) > 5000
    original = (b"Subject: caf\xc3\xa9 \xff\xfe\n" + b"X-Long: " + b"h" * 2000 + b"\n"
                + b"X-Bare-CR: a\rb\x00c\n\nbody line\nmore \xe9 8-bit\n" + b"y" * 3000 + b"\n")
    data = dsn([DSNRecipient("bob@example.net", "failed", "5.7.1", diagnostic=long_diag)],
               original=original, ret="FULL")
    assert_wire_safe(data)
    msg = parse(data)
    returned = list(msg.iter_parts())[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    # Folding is lossless for words that fit: unfolding restores the diagnostic up to the hard-split token.
    diag = str(blocks(msg)[1]["Diagnostic-Code"])
    assert diag.startswith("smtp; 550 5.7.1 word0 word1") and "word699" in diag


def test_crlf_injection_creates_no_field():
    evil = "550 oops\r\nX-Injected: yes\r\n\r\nFinal-Recipient: rfc822; mallory@evil"
    r = DSNRecipient("bob@example.net\r\nX-Addr: 1", "failed", "5.0.0", diagnostic=evil,
                     remote_mta="mx\nX-Mta: 1", original_recipient="rfc822;bob\r\nX-Orcpt: 1")
    data = dsn([r], envid="ENV\r\nX-Envid: 1", queue_id="Q\r\nX-Queue: 1")
    assert_wire_safe(data)
    msg = parse(data)
    per_msg, rcpt = blocks(msg)
    assert len(blocks(msg)) == 2
    for block in (msg, per_msg, rcpt):
        assert not [k for k in block.keys() if k.startswith("X-")]
    assert per_msg["Original-Envelope-Id"] is None
    assert rcpt["Original-Recipient"] is None
    assert rcpt["Final-Recipient"].startswith("rfc822; bob@example.net")
    assert "mallory" in rcpt["Diagnostic-Code"]


addresses = st.one_of(st.emails(), st.text(min_size=1, max_size=60))
recipient = st.builds(
    DSNRecipient,
    final_recipient=addresses,
    action=st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded"]),
    status=st.sampled_from(["5.1.1", "4.4.7", "2.0.0", "5.7.1"]),
    diagnostic=st.none() | st.text(max_size=300),
    remote_mta=st.none() | st.text(max_size=40),
    original_recipient=st.none() | st.text(max_size=60),
)


@settings(max_examples=200, deadline=None)
@given(original=st.binary(max_size=4000), rcpts=st.lists(recipient, min_size=1, max_size=3),
       ret=st.sampled_from(["FULL", "HDRS"]), envid=st.none() | st.text(max_size=40))
def test_property_wire_safe_and_parseable(original, rcpts, ret, envid):
    data = dsn(rcpts, original=original, ret=ret, envid=envid)
    assert_wire_safe(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    parts = list(msg.iter_parts())
    returned = "message/rfc822" if ret == "FULL" else "text/rfc822-headers"
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", returned]
    assert len(blocks(msg)) - 1 == len(rcpts)
    for block, r in zip(blocks(msg)[1:], rcpts):
        assert block["Action"] == r.action and block["Status"] == r.status
