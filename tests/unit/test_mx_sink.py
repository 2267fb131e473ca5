"""Tests for the MXSink test server (tests/support/mx_sink.py), with smtplib and aiosmtplib."""

from __future__ import annotations

import os
import smtplib
import ssl
import stat
import time

import aiosmtplib
import pytest

from tests.support.mx_sink import (
    MXSink,
    load_server_tls_context,
    make_test_cert_files,
    make_test_tls_context,
    shared_cert_files,
)

BODY = b"Subject: hello\r\n\r\nline one\r\n.leading dot is stuffed on the wire\r\n"


@pytest.fixture
def sink_factory():
    """Start sinks with any options; all are stopped after the test."""
    sinks: list[MXSink] = []

    def make(**kwargs) -> MXSink:
        sink = MXSink(**kwargs).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture
def mx(sink_factory) -> MXSink:
    return sink_factory()


def client(sink: MXSink, timeout: float = 5) -> smtplib.SMTP:
    return smtplib.SMTP(*sink.address, local_hostname="client.test", timeout=timeout)


def no_verify_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_plain_accept_records_message_and_options(mx):
    assert mx.port > 0 and mx.address == ("127.0.0.1", mx.port)
    with client(mx) as s:
        s.ehlo()
        # Nothing that was not asked for is offered.
        for ext in ("auth", "dsn", "starttls"):
            assert not s.has_extn(ext)
        assert s.has_extn("size") and s.has_extn("smtputf8")
        refused = s.sendmail("sender@example.com", ["rcpt@example.org"], BODY,
                             mail_options=["BODY=8BITMIME"])
    assert refused == {}
    assert mx.wait_for(1, timeout=2)
    [msg] = mx.messages
    assert msg.mail_from == "sender@example.com"
    assert msg.rcpt_tos == ["rcpt@example.org"]
    assert msg.data == BODY  # dot-unstuffed, byte for byte
    assert "BODY=8BITMIME" in msg.mail_options
    assert msg.rcpt_options == []
    assert (msg.tls, msg.auth_user, msg.connection) == (False, None, 1)
    assert mx.connections == 1


def test_connection_serial_proves_reuse(mx):
    with client(mx) as s:
        s.sendmail("a@example.com", ["b@example.org"], BODY)
        s.sendmail("a@example.com", ["c@example.org"], BODY)
    with client(mx) as s:
        s.sendmail("a@example.com", ["d@example.org"], BODY)
    assert mx.wait_for(3, timeout=2)
    assert [m.connection for m in mx.messages] == [1, 1, 2]
    assert mx.connections == 2


def test_starttls_required_and_recorded(sink_factory):
    mx = sink_factory(tls_context=make_test_tls_context(), require_tls=True)
    with client(mx) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert s.mail("a@example.com")[0] == 530
        s.starttls(context=no_verify_context())
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert mx.wait_for(1, timeout=2)
    assert mx.messages[0].tls is True


async def test_starttls_async_with_verified_cert(sink_factory):
    # The sink's loop runs in its own thread, so this test's loop is free to be the client.
    mx = sink_factory(tls_context=make_test_tls_context("mx.test"))
    cert_path, _ = shared_cert_files("mx.test")
    verify = ssl.create_default_context(cafile=cert_path)
    verify.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; the cert must pass it
    # The SAN carries 127.0.0.1 too, so hostname checking against the address works.
    await aiosmtplib.send(BODY, sender="a@example.com", recipients=["b@example.org"],
                          hostname=mx.host, port=mx.port, start_tls=True,
                          tls_context=verify, timeout=5)
    assert await mx.await_for(1, timeout=2)
    assert mx.messages[0].tls is True
    assert not await mx.await_for(2, timeout=0.05)


def test_auth_required_after_tls(sink_factory):
    mx = sink_factory(tls_context=make_test_tls_context(), auth={"alice": "s3cret"})
    with client(mx) as s:
        s.ehlo()
        assert not s.has_extn("auth")  # only offered once the session is encrypted
        s.starttls(context=no_verify_context())
        s.ehlo()
        assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        code, reply = s.mail("a@example.com")
        assert (code, reply[:5]) == (530, b"5.7.0")
        s.rset()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "wrong")
        s.login("alice", "s3cret")
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert mx.wait_for(1, timeout=2)
    assert mx.messages[0].auth_user == "alice"
    assert mx.messages[0].tls is True


def test_auth_login_without_tls(sink_factory):
    # A plain-text smarthost: AUTH offered and required without any TLS context.
    mx = sink_factory(auth={"bob": "pw"})
    with client(mx) as s:
        s.ehlo()
        assert s.has_extn("auth")
        assert s.mail("a@example.com")[0] == 530
        s.rset()
        s.user, s.password = "bob", "pw"
        assert s.auth("LOGIN", s.auth_login)[0] == 235
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert mx.wait_for(1, timeout=2)
    assert (mx.messages[0].auth_user, mx.messages[0].tls) == ("bob", False)


def test_rcpt_replies_are_per_recipient(mx):
    mx.rcpt_replies = {
        "bob@example.org": "550 5.1.1 No such user",
        "carol@example.org": "450 4.2.1 Mailbox busy",
    }
    with client(mx) as s:
        s.ehlo()
        assert s.mail("a@example.com")[0] == 250
        assert s.rcpt("alice@example.org") == (250, b"2.1.5 OK")
        assert s.rcpt("Bob@Example.ORG") == (550, b"5.1.1 No such user")  # lookup is lowercased
        assert s.rcpt("carol@example.org") == (450, b"4.2.1 Mailbox busy")
        assert s.data(BODY)[0] == 250
    assert mx.wait_for(1, timeout=2)
    assert mx.messages[0].rcpt_tos == ["alice@example.org"]


def test_mail_data_and_greeting_replies(mx):
    mx.mail_reply = "451 4.3.0 Try again later"
    with client(mx) as s, pytest.raises(smtplib.SMTPSenderRefused) as info:
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert info.value.smtp_code == 451

    mx.mail_reply = None
    mx.data_reply = "554 5.7.1 Content rejected"
    with client(mx) as s, pytest.raises(smtplib.SMTPDataError) as info:
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert info.value.smtp_code == 554
    assert mx.messages == [] and len(mx.rejected) == 1

    mx.greeting_reply = "421 4.3.2 Service not available"
    with pytest.raises(smtplib.SMTPConnectError) as info:
        client(mx)
    assert info.value.smtp_code == 421


def test_drop_on_connect(mx):
    mx.mode = "drop_on_connect"
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client(mx)
    assert mx.connections == 1


def test_drop_at_data_stores_nothing(mx):
    mx.mode = "drop_at_data"
    with client(mx) as s, pytest.raises(smtplib.SMTPServerDisconnected):
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert mx.messages == [] and mx.rejected == []
    mx.mode = "accept"  # the sink recovers for the retry
    with client(mx) as s:
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert mx.wait_for(1, timeout=2)
    assert mx.messages[0].connection == 2


def test_unknown_mode_rejected(mx):
    with pytest.raises(ValueError):
        mx.mode = "drop_at_dta"


async def test_stall_data_times_out_client_and_stop_is_prompt(mx):
    mx.mode = "stall_data"
    smtp = aiosmtplib.SMTP(hostname=mx.host, port=mx.port, timeout=1)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await smtp.sendmail("a@example.com", ["b@example.org"], BODY)
    smtp.close()
    assert mx.messages == []
    started = time.monotonic()
    mx.stop()
    assert time.monotonic() - started < 2


async def test_stall_banner_times_out_client(mx):
    mx.mode = "stall_banner"
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await aiosmtplib.SMTP(hostname=mx.host, port=mx.port, timeout=0.5).connect()
    assert mx.connections == 1


def test_dsn_parameters_accepted_and_recorded(sink_factory):
    mx = sink_factory(advertise_dsn=True)
    with client(mx) as s:
        s.ehlo()
        assert s.has_extn("dsn")
        s.sendmail("a@example.com", ["b@example.org"], BODY,
                   mail_options=["RET=HDRS", "ENVID=QQ314159"],
                   rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B@example.org"])
    assert mx.wait_for(1, timeout=2)
    msg = mx.messages[0]
    assert {"RET=HDRS", "ENVID=QQ314159"} <= set(msg.mail_options)
    assert msg.rcpt_options == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B@example.org"]


def test_dsn_parameters_refused_when_not_advertised(mx):
    with client(mx) as s:
        s.ehlo()
        s.mail("a@example.com")
        assert s.rcpt("b@example.org", ["NOTIFY=NEVER"])[0] == 555


def test_stop_closes_open_connections_and_is_idempotent(sink_factory):
    mx = sink_factory()
    s = client(mx)
    assert s.noop()[0] == 250
    mx.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    s.close()
    mx.stop()  # second stop is a no-op


def test_wait_for_and_clear(mx):
    assert mx.wait_for(0)
    assert not mx.wait_for(1, timeout=0.05)
    with client(mx) as s:
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert mx.wait_for(1, timeout=2)
    mx.clear()
    assert mx.messages == [] and mx.connections == 1  # serials keep counting


def test_context_manager():
    with MXSink(hostname="smarthost.test") as mx:
        with client(mx) as s:
            assert s.ehlo()[1].startswith(b"smarthost.test")
    with pytest.raises(OSError):
        client(mx, timeout=1)


def test_cert_files_are_usable(tmp_path, sink_factory):
    cert_path, key_path = make_test_cert_files(tmp_path, "relay.test")
    assert os.path.dirname(cert_path) == str(tmp_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    mx = sink_factory(tls_context=load_server_tls_context(cert_path, key_path))
    verify = ssl.create_default_context(cafile=cert_path)
    with client(mx) as s:
        s._host = "relay.test"  # smtplib passes _host as server_hostname: check the DNS SAN
        s.starttls(context=verify)
        assert s.sock.getpeercert()["subjectAltName"][0] == ("DNS", "relay.test")
