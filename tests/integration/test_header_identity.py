"""Header identity (issue 12, part 6): the From: header must be at the credential's domain
(policy.from_header), require_verified judges the sender's own domain, EHLO text in Received:
is ASCII."""
from __future__ import annotations

import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support.raw_smtp import authed, connect, start_relay


def data(c, content: bytes, sender: str = USER):
    assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
    assert c.cmd("RCPT TO:<bob@example.net>").code == 250
    assert c.cmd("DATA").code == 354
    c.send(content + b".\r\n")
    return c.read()


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("from"))
    yield inst
    inst.stop()


@pytest.mark.parametrize("from_field", [
    b"From: App <app@mg.example.com>",
    b"From: news@eu.mg.example.com",                 # a subdomain of the credential's domain
    b"From: =?utf-8?q?App_=C3=A9?= <app@MG.Example.com>",
    b"From: app@mg.example.com (the app)",
])
def test_from_at_the_credentials_domain_is_accepted(relay, from_field):
    with authed(relay) as c:
        r = data(c, from_field + b"\r\nSubject: ok\r\n\r\nbody\r\n")
        assert r.code == 250, r


@pytest.mark.parametrize("from_field, named", [
    (b"From: Bank <alerts@bank.example>", "bank.example"),
    (b"From: app@mg.example.com.evil.example", "mg.example.com.evil.example"),
    (b"From: \"app@mg.example.com\" <x@evil.example>", "evil.example"),
    (b"From: app@mg.example.com, ceo@bank.example", "bank.example"),
    (b"From: undisclosed:;", "an unreadable address"),
])
def test_from_at_another_domain_is_refused_naming_the_rule(relay, from_field, named):
    with authed(relay) as c:
        r = data(c, from_field + b"\r\nSubject: spoof\r\n\r\nbody\r\n")
        assert r.is_(replies.FROM_NOT_ALLOWED), r
        assert named in r.text and "policy.from_header" in r.text
        # The session goes on: the next, honest message is accepted.
        assert data(c, b"From: app@mg.example.com\r\nSubject: ok\r\n\r\nx\r\n").code == 250


def test_a_second_from_field_is_checked_too(relay):
    with authed(relay) as c:
        r = data(c, b"From: app@mg.example.com\r\nFrom: ceo@bank.example\r\nSubject: two\r\n\r\nx\r\n")
        assert r.is_(replies.FROM_NOT_ALLOWED), r


def test_from_header_off_accepts_any(tmp_path):
    inst = start_relay(tmp_path, config={"policy": {"from_header": "off"}})
    try:
        with authed(inst) as c:
            assert data(c, b"From: Bank <alerts@bank.example>\r\nSubject: x\r\n\r\nx\r\n").code == 250
    finally:
        inst.stop()


def test_require_verified_judges_the_senders_domain(tmp_path):
    """A trusted network with two domains, only the second one verified."""
    inst = start_relay(tmp_path, config={
        "domains": {"require_verified": True},
        "trusted_networks": [{"network": "127.0.0.0/30", "domains": ["first.example", "second.example"]}]})
    try:
        inst.cli("domain", "add", "first.example", check=True)
        inst.cli("domain", "add", "second.example", check=True)
        with inst.db() as db:
            db.execute("UPDATE domains SET verified_at = 1 WHERE name = 'second.example'")
        with connect(inst, source="127.0.0.2") as c:
            c.ehlo()
            assert c.cmd("MAIL FROM:<app@second.example>").code == 250
            assert c.cmd("RSET").code == 250
            r = c.cmd("MAIL FROM:<app@first.example>")
            assert r.code == 550 and "first.example" in r.text, r
    finally:
        inst.stop()


@pytest.mark.parametrize("helo, shown", [
    ("bücher.example".encode(), b"xn--bcher-kva.example"),
    ("caf\u00e9!".encode(), b"caf?!"),
    (b"\xff\xfeinvalid", b"invalid"),
])
def test_ehlo_text_in_received_is_ascii(relay, helo, shown):
    with connect(relay) as c:
        c.ehlo()
        c.starttls()
        assert c.cmd(b"EHLO " + helo).code == 250
        c.login()
        r = data(c, b"From: app@mg.example.com\r\nSubject: helo\r\n\r\nx\r\n")
        assert r.code == 250, r
        qid = r.text.rsplit(" ", 1)[-1]
    body = relay.body(qid)
    received = body.split(b"\r\n\tby ", 1)[0]
    assert received.startswith(b"Received: from ") and received.isascii(), received
    assert received == b"Received: from " + shown + b" ([127.0.0.1])"
