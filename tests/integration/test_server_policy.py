"""MAIL / RCPT policy, DSN parameters, PIPELINING, and POP3/IMAP refusals, over real sockets."""
from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support.raw_smtp import (RawSMTP, authed, connect, free_port, metric, start_relay)
from tests.support.relay_instance import client_tls_context

SIZE = 100_000
RCPT_LIMIT = 3


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("policy"),
                       config={"limits": {"message_size": SIZE, "recipients": RCPT_LIMIT}})
    yield inst
    inst.stop()


# ---------------------------------------------------------------- MAIL

@pytest.mark.parametrize("sender", [
    "app@mg.example.com", "other@mg.example.com", "App@MG.Example.COM", "x@eu.mg.example.com", "x@a.b.mg.example.com",
])
def test_sender_in_credential_domain_or_subdomain(relay, sender):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{sender}>").is_(replies.SENDER_OK)


@pytest.mark.parametrize("sender", [
    "app@example.com",            # the parent domain is not the credential's domain
    "app@evilmg.example.com",     # suffix without a dot boundary
    "app@mg.example.com.evil.net",
    "app@other.example",
])
def test_sender_outside_credential_domain(relay, sender):
    with authed(relay) as c:
        r = c.cmd(f"MAIL FROM:<{sender}>")
        assert r.code == 553 and r.text == "5.7.1 Sender address not allowed for this credential"
        assert relay.wait_event("sender_refused", sender=sender)


def test_null_sender_refused(relay):
    with authed(relay) as c:
        assert c.cmd("MAIL FROM:<>").is_(replies.NULL_SENDER)


def test_size_parameter(relay):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}> SIZE={SIZE}").is_(replies.SENDER_OK)
        assert c.cmd("RSET").code == 250
        r = c.cmd(f"MAIL FROM:<{USER}> SIZE={SIZE + 1}")
        assert r.is_(replies.SIZE_EXCEEDED) and r.text.startswith("5.3.4")
        assert c.cmd(f"MAIL FROM:<{USER}> SIZE=12x").code == 501


@pytest.mark.parametrize("params", [
    "AUTH=<>", f"AUTH={USER.replace('@', '+40')}", "AUTH=app@mg.example.com", "BODY=8BITMIME", "BODY=7BIT",
    "SMTPUTF8", "RET=FULL", "ret=hdrs", "ENVID=abc", "BODY=8BITMIME SMTPUTF8 AUTH=<> RET=HDRS ENVID=x SIZE=10",
])
def test_mail_parameters_accepted(relay, params):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}> {params}").is_(replies.SENDER_OK)


@pytest.mark.parametrize("param", ["FOO=bar", "XFORWARD", "MT-PRIORITY=3"])
def test_unknown_mail_parameter_is_named(relay, param):
    with authed(relay) as c:
        r = c.cmd(f"MAIL FROM:<{USER}> {param}")
        assert r.code == 555 and r.lines[-1].startswith("5.5.4 ")
        assert param.split("=")[0].upper() in r.text


@pytest.mark.parametrize("params", ["RET=MAYBE", "BODY=BINARYMIME", "SIZE", "SIZE=1 SIZE=2", "ENVID=" + "x" * 101,
                                    "AUTH=", "=x"])
def test_bad_mail_parameter_values(relay, params):
    with authed(relay) as c:
        r = c.cmd(f"MAIL FROM:<{USER}> {params}")
        assert r.code == 501 and r.lines[-1].startswith("5.5.4"), r


def test_mail_sequence_and_syntax(relay):
    with authed(relay) as c:
        assert c.cmd(f"MAIL <{USER}>").is_(replies.MAIL_SYNTAX)
        assert c.cmd("MAIL").is_(replies.MAIL_SYNTAX)
        assert c.cmd("MAIL FROM:").is_(replies.BAD_SENDER_ADDRESS)  # no path is not the null path
        assert c.cmd("MAIL FROM: SIZE=10").is_(replies.BAD_SENDER_ADDRESS)
        assert c.cmd("RCPT TO:<bob@example.net>").is_(replies.NEED_MAIL)
        assert c.cmd("DATA").is_(replies.NEED_MAIL)
        assert c.cmd(f"mail from:<{USER}>").is_(replies.SENDER_OK)
        assert c.cmd(f"MAIL FROM:<{USER}>").is_(replies.NESTED_MAIL)
        assert c.cmd("DATA").is_(replies.NEED_RCPT)


def test_mail_before_ehlo(relay):
    with connect(relay, implicit=True) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").is_(replies.NEED_EHLO)


def test_ret_envid_notify_orcpt_are_stored(relay):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}> RET=HDRS ENVID=QQ+2B123").code == 250
        assert c.cmd("RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Btag@example.net").code == 250
        assert c.cmd("RCPT TO:<carol@example.net> NOTIFY=NEVER").code == 250
        assert c.cmd("RCPT TO:<dave@example.net>").code == 250
        assert c.cmd("DATA").code == 354
        r = c.cmd("Subject: dsn\r\n\r\nbody\r\n.")
        assert r.code == 250, r
        qid = r.text.rsplit(" ", 1)[-1]
    with relay.db() as conn:
        m = conn.execute("SELECT ret, envid FROM messages WHERE id=?", (qid,)).fetchone()
        assert (m["ret"], m["envid"]) == ("HDRS", "QQ+123")
        rows = conn.execute("SELECT rcpt, notify, orcpt FROM recipients WHERE msg_id=? ORDER BY id", (qid,)).fetchall()
    assert [tuple(r) for r in rows] == [
        ("bob@example.net", "SUCCESS,FAILURE", "rfc822;bob+tag@example.net"),
        ("carol@example.net", "NEVER", None),
        ("dave@example.net", None, None),
    ]


# ---------------------------------------------------------------- RCPT

@pytest.mark.parametrize("rcpt", [
    "bob@example.net", "<bob+tag@example.net>", "<first.last@sub.example.net>", '<"quoted"@example.net>',
    "<BOB@EXAMPLE.NET>", "<o'brien@example.net>",
])
def test_valid_recipients(relay, rcpt):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        target = rcpt if rcpt.startswith("<") else f"<{rcpt}>"
        assert c.cmd(f"RCPT TO:{target}").is_(replies.RCPT_OK)


OPEN_RELAY_BATTERY = [
    "<@relay.test:victim@example.org>",            # source route
    "<@a.example,@b.example:victim@example.org>",
    "<@RELAY.TEST:VICTIM@EXAMPLE.ORG>",
    "<victim%example.org@relay.test>",             # % hack
    "<VICTIM%EXAMPLE.ORG@RELAY.TEST>",
    "<victim%example.org>",
    "<example.org!victim@relay.test>",             # bang path
    "<EXAMPLE.ORG!VICTIM>",
    "<victim@example.org!relay.test>",
    '<"victim@example.org">',                      # quoted local part hiding an @
    '<"victim@example.org"@relay.test>',
    '<"VICTIM%EXAMPLE.ORG"@RELAY.TEST>',
    "<victim@[1.2.3.4]>",                          # address literals
    "<victim@[IPv6:::1]>",
    "<victim@1.2.3.4>",
    "<victim>",                                    # missing domain
    "<victim@>",
    "<@example.org>",
    "<victim@localhost>",
    "<victim@example.org",                         # unterminated
    "<victim@@example.org>",
    "<victim@exa mple.org>",
    "<victim@-example.org>",
    "<victim@example.org.>",
    "<.victim@example.org>",
    "<vic..tim@example.org>",
    "<victim@example.org>junk",
    "<victim@exämple.org>",                        # non-ASCII without SMTPUTF8
    "<" + "v" * 65 + "@example.org>",
    "<victim@" + "a" * 64 + ".org>",
]


@pytest.mark.parametrize("rcpt", OPEN_RELAY_BATTERY)
def test_recipient_syntax_battery(relay, rcpt):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        r = c.cmd(f"RCPT TO:{rcpt}".encode())
        assert r.code in (501, 553), r
        assert c.cmd("DATA").is_(replies.NEED_RCPT)


@pytest.mark.parametrize("raw", [b"<vic\rtim@example.org>", b"<victim@exa\x00mple.org>", b"<vic\x00tim@example.org>",
                                 b"<victim@example.org\r>", b"<\x7fvictim@example.org>"])
def test_recipient_with_control_characters(relay, raw):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        r = c.cmd(b"RCPT TO:" + raw)
        assert r.code in (500, 501, 553), r
        assert c.cmd("DATA").is_(replies.NEED_RCPT)


def test_smtputf8_recipient(relay):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}> SMTPUTF8").code == 250
        assert c.cmd("RCPT TO:<jörg@exämple.org>").is_(replies.RCPT_OK)


def test_rcpt_syntax_and_parameters(relay):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert c.cmd("RCPT <bob@example.net>").is_(replies.RCPT_SYNTAX)
        assert c.cmd("RCPT TO:<>").code == 553
        assert c.cmd("RCPT TO:").is_(replies.BAD_RCPT_ADDRESS)
        r = c.cmd("RCPT TO:<bob@example.net> FOO=1")
        assert r.code == 555 and "FOO" in r.text
        assert c.cmd("RCPT TO:<bob@example.net> NOTIFY=NEVER,SUCCESS").code == 501
        assert c.cmd("RCPT TO:<bob@example.net> NOTIFY=SOMETIMES").code == 501
        assert c.cmd("RCPT TO:<bob@example.net> ORCPT=rfc822").code == 501
        assert c.cmd("RCPT TO:<bob@example.net> notify=delay orcpt=RFC822;bob@example.net").is_(replies.RCPT_OK)


def test_recipient_limit(relay):
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        for i in range(RCPT_LIMIT):
            assert c.cmd(f"RCPT TO:<r{i}@example.net>").is_(replies.RCPT_OK)
        r = c.cmd("RCPT TO:<one.too.many@example.net>")
        assert r.is_(replies.TOO_MANY_RCPTS) and r.text.startswith("4.5.3")
        assert c.cmd("DATA").code == 354
        r = c.cmd("Subject: many\r\n\r\nx\r\n.")
        assert r.code == 250
        qid = r.text.rsplit(" ", 1)[-1]
    rcpts = [m["rcpt"] for m in relay.queued() if m["id"] == qid]
    assert rcpts == [f"r{i}@example.net" for i in range(RCPT_LIMIT)]


# ---------------------------------------------------------------- PIPELINING

def test_pipelined_transaction_in_one_write(relay):
    with authed(relay) as c:
        c.send(f"MAIL FROM:<{USER}>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<bad%x@example.net>\r\n"
               "RCPT TO:<b@example.net>\r\nDATA\r\n")
        assert c.read().is_(replies.SENDER_OK)
        assert c.read().is_(replies.RCPT_OK)
        assert c.read().code == 553
        assert c.read().is_(replies.RCPT_OK)
        assert c.read().code == 354
        # Body, end of data, and the next transaction in one more write.
        c.send(f"Subject: pipelined\r\n\r\nhi\r\n.\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        r = c.read()
        assert r.code == 250 and "queued as" in r.text
        qid1 = r.text.rsplit(" ", 1)[-1]
        assert [c.read().code for _ in range(3)] == [250, 250, 354]
        c.send("Subject: second\r\n\r\nyo\r\n.\r\nQUIT\r\n")
        r = c.read()
        assert r.code == 250
        qid2 = r.text.rsplit(" ", 1)[-1]
        assert c.read().is_(replies.BYE)
    q = relay.queued()
    assert [m["rcpt"] for m in q if m["id"] == qid1] == ["a@example.net", "b@example.net"]
    assert [m["rcpt"] for m in q if m["id"] == qid2] == ["c@example.net"]


def test_pipelined_with_ehlo_and_auth(relay):
    """Whole session in one write after TLS, as some clients do with PIPELINING + AUTH PLAIN IR."""
    with connect(relay, implicit=True) as c:
        import base64
        blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        c.send(f"EHLO client.test\r\nAUTH PLAIN {blob}\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<z@example.net>\r\n"
               "DATA\r\n")
        assert c.read().code == 250
        assert c.read().is_(replies.AUTH_OK)
        assert [c.read().code for _ in range(3)] == [250, 250, 354]
        assert c.cmd("Subject: one write\r\n\r\nx\r\n.").code == 250


def test_smtplib_pipelining_client(relay):
    s = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    try:
        s.starttls(context=client_tls_context())
        s.login(USER, PASSWORD)
        refused = s.sendmail(USER, ["p@example.net", "q@example.net"], b"Subject: smtplib\r\n\r\nhello\r\n")
        assert refused == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail(USER, ["x%y@example.net"], b"Subject: no\r\n\r\n")
    finally:
        s.quit()
    assert {"p@example.net", "q@example.net"} <= {m["rcpt"] for m in relay.queued()}


# ---------------------------------------------------------------- POP3 / IMAP spoken to an SMTP port

MAILBOX_COMMANDS = ["USER app@mg.example.com", "PASS Pop3-Secret-Password", "STAT", "RETR 1", "CAPA",
                    "a1 LOGIN app@mg.example.com Imap-Secret-Password", "a1 SELECT INBOX", "a2 CAPABILITY"]


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls-port", "implicit-port"])
def test_mailbox_commands_on_smtp_port(relay, implicit):
    pop3 = metric(relay, "relay_mailbox_protocol_refusals_total", protocol="pop3")
    imap = metric(relay, "relay_mailbox_protocol_refusals_total", protocol="imap")
    with connect(relay, implicit=implicit) as c:
        for line in MAILBOX_COMMANDS:
            r = c.cmd(line)
            assert r.is_(replies.NOT_A_MAILBOX), (line, r)
            assert "only sends mail" in r.text
    assert metric(relay, "relay_mailbox_protocol_refusals_total", protocol="pop3") == pop3 + 5
    assert metric(relay, "relay_mailbox_protocol_refusals_total", protocol="imap") == imap + 3
    assert not any("Secret-Password" in line for line in relay.raw_log)


# ---------------------------------------------------------------- refusal listeners

def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_refusal_listeners(make_relay):
    busy = socket.create_server(("127.0.0.1", 0))  # held open: that refusal port is taken
    busy_port = busy.getsockname()[1]
    try:
        inst = make_relay(start=False, config={"refusal": {
            "pop3_port": free_port(), "imap_port": free_port(), "pop3s_port": free_port(), "imaps_port": busy_port}})
        inst.add_user(USER, PASSWORD)
        inst.start()
        assert {"pop3", "imap", "pop3s"} <= set(inst.ports) and "imaps" not in inst.ports
        skipped = inst.events_named("refusal_listener_skipped")
        assert len(skipped) == 1 and skipped[0]["port"] == busy_port and skipped[0]["level"] == "warning"
        # The relay still serves SMTP.
        with authed(inst) as c:
            assert c.cmd(f"MAIL FROM:<{USER}>").code == 250

        for key, tls, prefix in (("pop3", False, b"-ERR "), ("imap", False, b"* BYE "), ("pop3s", True, b"-ERR ")):
            sock = socket.create_connection(("127.0.0.1", inst.ports[key]), timeout=5)
            if tls:
                sock = client_tls_context().wrap_socket(sock)
            with sock:
                data = _read_all(sock)
            assert data.startswith(prefix) and b"only sends mail" in data and data.endswith(b"\r\n"), (key, data)
        assert metric(inst, "relay_mailbox_protocol_refusals_total", protocol="pop3") == 2
        assert metric(inst, "relay_mailbox_protocol_refusals_total", protocol="imap") == 1
    finally:
        busy.close()


def test_imaps_refusal_listener(make_relay):
    inst = make_relay(config={"refusal": {"imaps_port": free_port()}})
    with client_tls_context().wrap_socket(socket.create_connection(("127.0.0.1", inst.ports["imaps"]), timeout=5)) as s:
        data = _read_all(s)
    assert data.startswith(b"* BYE ") and b"only sends mail" in data
    assert metric(inst, "relay_mailbox_protocol_refusals_total", protocol="imap") == 1
