"""Outbound session hygiene and ORCPT validation (issue 11, "Outbound session hygiene").

A transaction that goes wrong half-way must not leave its state to the next message on the
same outbound connection (a strict MX answers the next MAIL with "503 5.5.1 Error: nested MAIL
command", and the innocent message would bounce). Inbound, an ORCPT whose addr-type is not an
RFC 3461 atom or whose xtext is malformed gets 501 5.5.4, so nothing unencodable ever reaches
the outbound side.
"""
from __future__ import annotations

import pytest

from tests.conftest import PASSWORD, USER
from tests.support.hostile_mx import HostileMX
from tests.support.hostile_relay import (
    SENDER_DOMAIN, assert_left_queue, deferred_with_reason, delivered, message, no_traceback, outcomes, point,
    queue_show, start_relay, submit, until,
)
from tests.support.mx_sink import MXSink
from tests.support.raw_smtp import authed

OTHER = "other@" + SENDER_DOMAIN  # a second sender of the same credential's domain


@pytest.fixture
def peers(dns_server):
    with HostileMX(host="127.0.0.2", advertise_dsn=True) as mx, MXSink(host="127.0.0.1", port=mx.port) as home:
        point(dns_server, "hostile.example", "127.0.0.2")
        point(dns_server, SENDER_DOMAIN, "127.0.0.1")
        yield mx, home


def bounces(sink: MXSink) -> list:
    return [m for m in list(sink.messages) if m.mail_from in ("", "<>")]


# ---------------------------------------------------------------- ORCPT validation


@pytest.mark.timeout(60)
def test_orcpt_validation_replies(make_relay, dns_server, peers):
    mx, _ = peers
    relay = start_relay(make_relay, dns_server, mx.port, retry_schedule=[3600])
    refused = [
        "ORCPT=\u00fc;bob",            # raw non-ASCII addr-type
        "ORCPT=rfc822;bo+ZZb",         # "+" must be followed by two upper-case hex digits
        "ORCPT=rfc822;bo+2fb",         # ... upper-case (RFC 3461 4: hexchar)
        "ORCPT=rfc822;b\u00fcb",       # raw non-ASCII in the xtext
        "ORCPT=rfc(822);bob",          # addr-type is an atom: no specials
        "ORCPT=rfc.822;bob",           # ... a dot is not atext either
        "ORCPT=;bob",                  # empty addr-type
        "ORCPT=rfc822bob",             # no ";"
    ]
    accepted = [
        "ORCPT=rfc822;bob+40example.net",
        "ORCPT=RFC822;bob@hostile.example",
        "ORCPT=x-local;abc",
    ]
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        got = {}
        for param in refused + accepted:
            r = c.cmd(f"RCPT TO:<bob@hostile.example> {param}")
            got[param] = (r.code, r.lines[-1][:5])
        c.cmd("RSET")
    want = {p: (501, "5.5.4") for p in refused}
    want.update({p: (250, got[p][1]) for p in accepted})
    assert got == want


# ---------------------------------------------------------------- poisoned sessions


@pytest.mark.timeout(90)
def test_non_ascii_orcpt_never_poisons_the_next_message(make_relay, dns_server, peers):
    """Issue 11's reproduction: RCPT ... ORCPT=ü;bob (DSN-capable MX, so ORCPT is passed on), then a
    message from another sender over the same outbound connection. It must not get 503 nested MAIL
    (and bounce): the bad parameter is refused at RCPT, and what remains is delivered once."""
    mx, home = peers
    mx.greeting_delay = 1.5  # both messages are queued before the one outbound session starts
    relay = start_relay(make_relay, dns_server, mx.port, max_connections_per_destination=1,
                        retry_schedule=[3600])
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        poisoned = c.cmd("RCPT TO:<bob@hostile.example> ORCPT=\u00fc;bob")
        assert c.cmd("RCPT TO:<carol@hostile.example>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("first", rcpt="carol@hostile.example") + b".\r\n")
        r = c.read()
        assert r.code == 250, r
        q1 = r.lines[-1].rsplit(" ", 1)[-1]
    q2 = submit(relay, "dave@hostile.example", "second", sender=OTHER)
    until(lambda: all(queue_show(relay, q) is None or deferred_with_reason(relay, q) for q in (q1, q2)), 30,
          "both messages to settle")
    assert mx.nested_mail == 0, [line for _, line in mx.log]
    assert outcomes(relay, q2) == ["delivered"], outcomes(relay, q2)
    assert not bounces(home)
    assert (poisoned.code, poisoned.lines[-1][:5]) == (501, "5.5.4"), poisoned
    assert outcomes(relay, q1) == ["delivered"]
    until(lambda: mx.active == 0, 15, "the outbound session to end")
    assert sorted(tuple(m.rcpt_tos) for m in mx.messages) == [("carol@hostile.example",), ("dave@hostile.example",)]
    assert all(line.isascii() for _, line in mx.log)
    no_traceback(relay)


@pytest.mark.timeout(90)
def test_a_refused_data_command_does_not_poison_the_next_message_on_the_connection(make_relay, dns_server, peers):
    """The MX refuses the first DATA command (451): the transaction stays open on its side until
    RSET (RFC 5321 4.1.4). The next message on the same connection, from another sender, must be
    delivered once, not refused with 503 nested MAIL and bounced."""
    mx, home = peers
    mx.greeting_delay = 1.5
    mx.data_cmd_replies = ["451 4.3.0 Try DATA again later"]
    relay = start_relay(make_relay, dns_server, mx.port, max_connections_per_destination=1,
                        retry_schedule=[3600])
    s = relay.smtp()
    s.login(USER, PASSWORD)
    s.sendmail(USER, ["bob@hostile.example"], message("first", rcpt="bob@hostile.example"))
    s.sendmail(OTHER, ["dave@hostile.example"], message("second", rcpt="dave@hostile.example", sender=OTHER))
    s.quit()
    until(lambda: len(relay.events_named("delivery")) >= 2, 30, "both first attempts")
    first = next(e["qid"] for e in relay.events_named("queued") if e["sender"] == USER)
    second = next(e["qid"] for e in relay.events_named("queued") if e["sender"] == OTHER)
    assert mx.nested_mail == 0, [line for _, line in mx.log]
    assert outcomes(relay, second) == ["delivered"], relay.events_named("delivery", qid=second)
    assert not bounces(home)
    m = deferred_with_reason(relay, first)
    assert m is not None and "451 4.3.0" in m["recipients"][0]["last_error"], queue_show(relay, first)

    relay.cli("queue", "retry", "--all", check=True)
    until(lambda: delivered(relay, first), 20, "the first message after the retry")
    for q in (first, second):
        assert_left_queue(relay, q)
    until(lambda: mx.active == 0, 15, "the outbound session to end")
    assert sorted(m.subject for m in mx.messages) == ["first", "second"]
    assert mx.nested_mail == 0 and not bounces(home)
    no_traceback(relay)
