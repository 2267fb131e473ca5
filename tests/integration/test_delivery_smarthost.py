"""Delivery through a configured smarthost: STARTTLS or implicit TLS, AUTH, certificate checks.

The smarthost is an MXSink with a TLS context and credentials; the relay reaches it through
[delivery.smarthost] exactly as an operator configures it. No DNS is involved: every message,
bounces included, goes to the smarthost.
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import json
import smtplib

import pytest

from tests.conftest import PASSWORD, USER
from tests.support.relay_instance import wait_until
from tests.support.mx_sink import MXSink, make_test_tls_context, shared_cert_files

SMARTHOST_USER, SMARTHOST_PW = "relay-out", "smarthost secret"


def start_relay(make_relay, port: int, *, env=None, delivery=None, **smarthost):
    sh = {"host": "127.0.0.1", "port": port, "tls": "starttls", "verify_cert": False, **smarthost}
    relay = make_relay(start=False, config={"delivery": {"mode": "smarthost", "smarthost": sh, **(delivery or {})}},
                       env=env)
    relay.add_user(USER, PASSWORD)
    return relay.start()


def send(relay, rcpts, subject="hello", mail_options=()):
    s = relay.smtp()
    try:
        s.login(USER, PASSWORD)
        s.mail(USER, list(mail_options))
        for r in rcpts:
            code, msg = s.rcpt(r)
            assert code == 250, msg
        code, msg = s.data(f"From: {USER}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[-1]
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            pass


def queue_rows(relay):
    return json.loads(relay.cli("queue", "list", "--json", check=True).stdout)


class ImplicitTLSSink(MXSink):
    """An MXSink that speaks TLS from the first byte (port 465 style), built on the sink's own loop."""

    def __init__(self, ctx, **kw):
        super().__init__(**kw)
        self._implicit_ctx = ctx

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await self._loop.create_server(self._make_protocol, self.host, self._requested_port,
                                                      ssl=self._implicit_ctx)
        self.port = self._server.sockets[0].getsockname()[1]


@pytest.fixture
def smarthost():
    with MXSink(tls_context=make_test_tls_context(), auth={SMARTHOST_USER: SMARTHOST_PW}) as sink:
        yield sink


def test_starttls_and_auth_with_password_from_the_environment(make_relay, smarthost):
    relay = start_relay(make_relay, smarthost.port, username=SMARTHOST_USER, password_env="SMARTHOST_PW",
                        env={"SMARTHOST_PW": SMARTHOST_PW})
    q1 = send(relay, ["bob@example.net", "carol@example.org"], "one")
    q2 = send(relay, ["dave@example.com"], "two")
    assert smarthost.wait_for(2)
    # One transaction per message, whatever the recipient domains: the smarthost is one destination.
    assert sorted(m.rcpt_tos for m in smarthost.messages) == [["bob@example.net", "carol@example.org"],
                                                             ["dave@example.com"]]
    for m in smarthost.messages:
        assert m.tls and m.auth_user == SMARTHOST_USER and m.mail_from == USER
    for qid in (q1, q2):
        assert relay.wait_event("delivery", qid=qid, result="delivered")
    ev = relay.events_named("delivery", qid=q1)
    assert all(e["tls"].startswith("TLSv1.") and e["mx"] == "127.0.0.1" for e in ev)
    # Every destination shares the smarthost: fewer sessions than recipient domains (one per message
    # at most, when the second arrives while the first session is still busy).
    assert len({m.connection for m in smarthost.messages}) < 3
    wait_until(lambda: not relay.queued(), what="an empty queue")
    assert SMARTHOST_PW not in "\n".join(relay.raw_log)


def test_verified_certificate(make_relay, smarthost):
    # The sink's certificate lists 127.0.0.1 and is its own CA: trust it through SSL_CERT_FILE.
    relay = start_relay(make_relay, smarthost.port, username=SMARTHOST_USER, password=SMARTHOST_PW,
                        verify_cert=True, env={"SSL_CERT_FILE": shared_cert_files()[0]})
    qid = send(relay, ["bob@example.net"])
    assert smarthost.wait_for(1)
    assert relay.wait_event("delivery", qid=qid, result="delivered")


def test_unverifiable_certificate_defers_and_keeps_the_message(make_relay, smarthost):
    relay = start_relay(make_relay, smarthost.port, username=SMARTHOST_USER, password=SMARTHOST_PW,
                        verify_cert=True, delivery={"retry_schedule": [3600]})
    qid = send(relay, ["bob@example.net"])
    assert relay.wait_event("delivery", qid=qid, result="deferred")
    assert "certificate" in relay.events_named("delivery", qid=qid)[0]["reply"].lower()
    assert not smarthost.messages
    [row] = queue_rows(relay)
    assert row["id"] == qid and row["state"] == "deferred"


def test_wrong_password_defers_rather_than_bounces(make_relay, smarthost):
    relay = start_relay(make_relay, smarthost.port, username=SMARTHOST_USER, password="wrong password",
                        delivery={"retry_schedule": [3600]})
    qid = send(relay, ["bob@example.net"])
    assert relay.wait_event("delivery", qid=qid, result="deferred")
    reply = relay.events_named("delivery", qid=qid)[0]["reply"]
    assert "refused our login" in reply and "535" in reply
    assert not smarthost.messages
    assert [r["state"] for r in queue_rows(relay)] == ["deferred"]
    assert "wrong password" not in "\n".join(relay.raw_log)


def test_smarthost_rejection_bounces_through_the_smarthost(make_relay, smarthost):
    relay = start_relay(make_relay, smarthost.port, username=SMARTHOST_USER, password=SMARTHOST_PW)
    smarthost.rcpt_replies["bob@example.net"] = "550 5.7.1 Relaying denied for bob"
    qid = send(relay, ["bob@example.net", "carol@example.net"])
    assert smarthost.wait_for(2)
    first, dsn = smarthost.messages
    assert first.rcpt_tos == ["carol@example.net"]
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [USER]
    msg = email.message_from_bytes(dsn.data, policy=email.policy.default)
    blocks = list(msg.iter_parts())[1].get_payload()
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.net"
    assert blocks[1]["Status"] == "5.7.1" and blocks[1]["Diagnostic-Code"] == "smtp; 550 5.7.1 Relaying denied for bob"
    assert relay.wait_event("bounce", qid=qid)


def test_smarthost_down_defers_then_delivers_when_it_is_back(make_relay):
    probe = MXSink().start()
    port = probe.port
    probe.stop()  # nothing listens there now
    relay = start_relay(make_relay, port, tls="none")
    qid = send(relay, ["bob@example.net"])
    assert relay.wait_event("delivery", qid=qid, result="deferred")
    with MXSink(port=port) as sink:  # retry_schedule [1, 2, 4]: the next attempt finds it
        assert sink.wait_for(1, timeout=15)
        assert relay.wait_event("delivery", qid=qid, result="delivered", tls="plain")
        assert not sink.messages[0].tls


def test_implicit_tls(make_relay):
    sink = ImplicitTLSSink(make_test_tls_context(), auth={SMARTHOST_USER: SMARTHOST_PW}).start()
    try:
        relay = start_relay(make_relay, sink.port, tls="implicit", username=SMARTHOST_USER, password=SMARTHOST_PW)
        qid = send(relay, ["bob@example.net"])
        assert sink.wait_for(1)
        assert sink.messages[0].auth_user == SMARTHOST_USER
        assert relay.wait_event("delivery", qid=qid, result="delivered")
        assert relay.events_named("delivery", qid=qid)[0]["tls"].startswith("TLSv1.")
    finally:
        sink.stop()


def test_implicit_tls_with_an_unverifiable_certificate_defers(make_relay):
    sink = ImplicitTLSSink(make_test_tls_context()).start()
    try:
        relay = start_relay(make_relay, sink.port, tls="implicit", verify_cert=True,
                            delivery={"retry_schedule": [3600]})
        qid = send(relay, ["bob@example.net"])
        assert relay.wait_event("delivery", qid=qid, result="deferred")
        ev = relay.events_named("delivery", qid=qid)[0]
        assert ev["tls"] == "failed" and "certificate" in ev["reply"].lower()
        assert not sink.messages
    finally:
        sink.stop()


def test_starttls_required_but_not_offered_defers(make_relay):
    with MXSink(auth={SMARTHOST_USER: SMARTHOST_PW}) as plain:
        relay = start_relay(make_relay, plain.port, username=SMARTHOST_USER, password=SMARTHOST_PW,
                            delivery={"retry_schedule": [3600]})
        qid = send(relay, ["bob@example.net"])
        assert relay.wait_event("delivery", qid=qid, result="deferred")
        assert "STARTTLS" in relay.events_named("delivery", qid=qid)[0]["reply"]
        assert not plain.messages  # the password never crossed in clear text
