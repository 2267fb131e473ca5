"""Delivery to MX hosts, end to end: the real relay process, a loopback DNS server, recording MX sinks.

Every domain's MX points at sinks on 127.0.0.x with one shared port (delivery.mx_port applies to
every MX host, as port 25 does in real life), so a "dead" MX is simply another loopback address
where nothing listens. Bounces go back to the sender's domain (mg.example.com), whose MX is the
same sink: they are the messages with the null reverse-path.
"""
from __future__ import annotations

import email
import email.policy
import json
import smtplib
import time

import pytest

from tests.conftest import PASSWORD, USER
from tests.support.relay_instance import wait_until
from tests.support.mx_sink import MXSink, make_test_tls_context, shared_cert_files

SENDER_DOMAIN = USER.rpartition("@")[2]


# ------------------------------------------------------------------ helpers


def start_relay(make_relay, dns_server, sink, *, name="relay", env=None, **delivery):
    """A relay whose example.net and sender-domain MX is `sink` (mx.example.net = 127.0.0.1)."""
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set(SENDER_DOMAIN, "MX", ["10 mx.example.net."])
    relay = make_relay(start=False, name=name, dns=dns_server.address, mx_port=sink.port,
                       config={"delivery": delivery} if delivery else None, env=env)
    relay.add_user(USER, PASSWORD)
    return relay.start()


def send(relay, rcpts, subject="hello", *, mail_options=(), rcpt_options=None, body="body\r\n"):
    """Submit one message (AUTH over STARTTLS) with optional DSN parameters; returns the queue id."""
    s = relay.smtp()
    try:
        s.login(USER, PASSWORD)
        code, msg = s.mail(USER, list(mail_options))
        assert code == 250, msg
        for r in rcpts:
            code, msg = s.rcpt(r, list((rcpt_options or {}).get(r, ())))
            assert code == 250, msg
        data = f"From: {USER}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\n{body}"
        code, msg = s.data(data.encode())
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[-1]
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            pass


def bounces(sink):
    return [m for m in sink.messages if m.mail_from in ("", "<>")]  # aiosmtpd keeps "<>" as sent


def normal(sink):
    return [m for m in sink.messages if m.mail_from not in ("", "<>")]


def parse_dsn(raw: bytes):
    """(message, per-message fields, [per-recipient fields]) of an RFC 3464 report."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    return msg, blocks[0], blocks[1:]


def subject_of(m) -> str:
    return email.message_from_bytes(m.data, policy=email.policy.default)["Subject"]


def queue_json(relay) -> list[dict]:
    cp = relay.cli("queue", "list", "--json", check=True)
    return json.loads(cp.stdout)


def assert_queue_empty(relay):
    wait_until(lambda: not relay.queued(), timeout=10, what="the queue to empty")


@pytest.fixture
def sink():
    with MXSink() as s:
        yield s


# ------------------------------------------------------------------ MX selection

@pytest.mark.parametrize("dead", ["closed_port", "drop_on_connect", "greeting_4xx"])
def test_next_mx_is_tried_when_the_preferred_one_fails(make_relay, dns_server, sink, dead):
    # The preferred MX (listed second on purpose: order comes from preference, not the answer).
    bad = None
    if dead != "closed_port":
        bad = MXSink(host="127.0.0.2", port=sink.port).start()
        if dead == "drop_on_connect":
            bad.mode = "drop_on_connect"
        else:
            bad.greeting_reply = "421 4.3.2 mx1 is too busy"
    try:
        relay = start_relay(make_relay, dns_server, sink)
        dns_server.set("example.org", "MX", ["20 mx2.example.org.", "10 mx1.example.org."])
        dns_server.set("mx1.example.org", "A", ["127.0.0.2"])
        dns_server.set("mx2.example.org", "A", ["127.0.0.1"])
        qid = send(relay, ["bob@example.org"])
        assert sink.wait_for(1)
        assert sink.messages[0].rcpt_tos == ["bob@example.org"]
        assert relay.wait_event("delivery", qid=qid, result="delivered")
        assert relay.events_named("delivery", qid=qid)[0]["mx"] == "mx2.example.org"
        failed = relay.events_named("outbound_connect_failed", domain="example.org")
        assert [e["mx"] for e in failed] == ["mx1.example.org"]
        if bad is not None:
            assert bad.connections >= 1 and not bad.messages
        if dead == "greeting_4xx":
            assert "421 4.3.2 mx1 is too busy" in failed[0]["error"]
        assert_queue_empty(relay)
    finally:
        if bad is not None:
            bad.stop()


def test_preferred_mx_is_used_first(make_relay, dns_server, sink):
    backup = MXSink(host="127.0.0.2", port=sink.port).start()
    try:
        relay = start_relay(make_relay, dns_server, sink)
        dns_server.set("example.org", "MX", ["20 backup.example.org.", "5 primary.example.org."])
        dns_server.set("primary.example.org", "A", ["127.0.0.1"])
        dns_server.set("backup.example.org", "A", ["127.0.0.2"])
        qid = send(relay, ["bob@example.org"])
        assert sink.wait_for(1)
        assert relay.wait_event("delivery", qid=qid, result="delivered", mx="primary.example.org")
        assert backup.connections == 0
        assert not relay.events_named("outbound_connect_failed")
    finally:
        backup.stop()


def test_implicit_mx_uses_the_domains_address(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink)
    dns_server.set("implicit.example", "A", ["127.0.0.1"])  # no MX at all (RFC 5321 5.1)
    qid = send(relay, ["bob@implicit.example"])
    assert sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["bob@implicit.example"]
    assert relay.wait_event("delivery", qid=qid, result="delivered", mx="implicit.example")


def test_null_mx_fails_at_once_with_5_1_10(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink)
    dns_server.set("nomail.example", "MX", ["0 ."])
    dns_server.set("nomail.example", "A", ["127.0.0.1"])  # must not be used as an implicit MX
    qid = send(relay, ["bob@nomail.example"], "nullmx")
    assert sink.wait_for(1)
    [dsn] = bounces(sink)
    assert dsn.rcpt_tos == [USER] and not normal(sink)
    msg, per_msg, [r] = parse_dsn(dsn.data)
    assert msg["To"] == USER and msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert per_msg["Reporting-MTA"] == "dns; relay.test"
    assert r["Final-Recipient"] == "rfc822; bob@nomail.example"
    assert r["Action"] == "failed" and r["Status"] == "5.1.10"
    # Our own finding, not a remote SMTP reply (RFC 3464 2.3.6): an X- diagnostic type.
    assert r["Diagnostic-Code"].startswith("X-Relay; 556 5.1.10") and "null MX" in r["Diagnostic-Code"]
    assert r["Remote-MTA"] is None
    ev = relay.events_named("delivery", qid=qid)
    assert [e["result"] for e in ev] == ["failed"] and ev[0]["attempt"] == 1
    assert_queue_empty(relay)


def test_nxdomain_fails_at_once(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink)
    qid = send(relay, ["bob@nowhere.example"], "nx")
    assert sink.wait_for(1)
    [dsn] = bounces(sink)
    _, _, [r] = parse_dsn(dsn.data)
    assert r["Action"] == "failed" and r["Status"] == "5.1.2"
    assert "NXDOMAIN" in r["Diagnostic-Code"]
    assert relay.wait_event("delivery", qid=qid)
    assert [e["result"] for e in relay.events_named("delivery", qid=qid)] == ["failed"]


def test_servfail_defers_then_cli_retry_delivers(make_relay, dns_server, sink):
    # A long retry delay: only `relay queue retry` (another process) can bring it back quickly.
    relay = start_relay(make_relay, dns_server, sink, retry_schedule=[3600])
    dns_server.set("flaky.example", "MX", ["10 mx.example.net."])
    dns_server.servfail.add("flaky.example")
    qid = send(relay, ["bob@flaky.example"], "servfail")
    assert relay.wait_event("delivery", qid=qid, result="deferred")
    [row] = queue_json(relay)
    assert row["id"] == qid and row["state"] == "deferred"
    assert "SERVFAIL" in row["last_error"]
    assert row["next_attempt_at"] > time.time() + 3000
    assert not sink.messages  # deferred, not bounced

    dns_server.servfail.discard("flaky.example")
    cp = relay.cli("queue", "retry", "--all", check=True)
    assert "1 recipient(s) due now" in cp.stdout
    assert sink.wait_for(1, timeout=10)
    assert normal(sink)[0].rcpt_tos == ["bob@flaky.example"] and not bounces(sink)
    assert relay.wait_event("delivery", qid=qid, result="delivered")
    assert relay.events_named("delivery", qid=qid, result="delivered")[0]["attempt"] == 2
    assert_queue_empty(relay)


def test_dns_timeout_defers(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink, retry_schedule=[3600])
    dns_server.drop.add("slow.example")
    qid = send(relay, ["bob@slow.example"])
    assert relay.wait_event("delivery", qid=qid, result="deferred", timeout=15)
    assert "timeout" in relay.events_named("delivery", qid=qid)[0]["reply"]
    assert not sink.messages


# ------------------------------------------------------------------ outcomes per recipient

def test_multi_domain_partial_failure_bounces_only_the_refused_recipient(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink)
    dns_server.set("example.org", "MX", ["10 mx.example.net."])
    sink.rcpt_replies["carol@example.org"] = "550 5.1.1 <carol@example.org>: Recipient address rejected"
    qid = send(relay, ["bob@example.net", "carol@example.org", "dave@example.net"], "partial")
    assert sink.wait_for(2)
    wait_until(lambda: len(relay.events_named("delivery", qid=qid)) == 3, what="three outcomes")
    [delivered] = normal(sink)
    # One transaction carries every recipient of a domain.
    assert delivered.rcpt_tos == ["bob@example.net", "dave@example.net"]
    [dsn] = bounces(sink)
    msg, _, blocks = parse_dsn(dsn.data)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; carol@example.org"]
    assert blocks[0]["Action"] == "failed" and blocks[0]["Status"] == "5.1.1"
    assert blocks[0]["Diagnostic-Code"] == "smtp; 550 5.1.1 <carol@example.org>: Recipient address rejected"
    assert blocks[0]["Remote-MTA"] == "dns; mx.example.net"
    returned = list(msg.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"  # RET defaults to HDRS
    assert b"Subject: partial" in returned.get_payload(decode=True) or "Subject: partial" in str(returned)
    results = {e["rcpt"]: e["result"] for e in relay.events_named("delivery", qid=qid)}
    assert results == {"bob@example.net": "delivered", "carol@example.org": "failed",
                       "dave@example.net": "delivered"}
    assert_queue_empty(relay)


def test_4xx_is_retried_until_success_and_never_delivered_twice(make_relay, dns_server, sink):
    # 5 s to the retry: the two CLI calls below take over a second on a busy machine, and the
    # second attempt must not come before they look.
    relay = start_relay(make_relay, dns_server, sink, retry_schedule=[5])
    sink.rcpt_replies["bob@example.net"] = "451 4.2.0 bob's mailbox is busy"
    qid = send(relay, ["bob@example.net", "dave@example.net"], "retry")
    assert relay.wait_event("delivery", qid=qid, result="deferred", rcpt="bob@example.net")
    assert sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["dave@example.net"]
    [row] = queue_json(relay)
    assert row["state"] == "deferred" and row["last_error"] == "451 4.2.0 bob's mailbox is busy"
    show = json.loads(relay.cli("queue", "show", qid, "--json", check=True).stdout)
    states = {r["rcpt"]: (r["state"], r["attempts"]) for r in show["recipients"]}
    assert states == {"bob@example.net": ("deferred", 1), "dave@example.net": ("delivered", 1)}

    sink.rcpt_replies.clear()
    assert relay.wait_event("delivery", qid=qid, result="delivered", rcpt="bob@example.net", timeout=15)
    assert sink.wait_for(2)
    assert [m.rcpt_tos for m in sink.messages] == [["dave@example.net"], ["bob@example.net"]]
    assert relay.events_named("delivery", qid=qid, result="delivered", rcpt="bob@example.net")[0]["attempt"] == 2
    # Signed once, before the first attempt, and stored: the retry sends the very same bytes.
    assert sink.messages[0].data.startswith(b"DKIM-Signature:")
    assert sink.messages[0].data == sink.messages[1].data
    assert len(relay.events_named("dkim_signed", qid=qid)) == 1
    assert not bounces(sink)  # no delay warning either: delay_warning_after defaults to 0 (off)
    assert_queue_empty(relay)
    time.sleep(1.5)  # past the next retry step: nothing is delivered again
    assert len(sink.messages) == 2


def test_data_5xx_fails_and_data_4xx_defers(make_relay, dns_server, sink):
    # The DATA reply is per sink, so the sender's bounces go to a second sink (127.0.0.3).
    with MXSink(host="127.0.0.3", port=sink.port) as home:
        relay = start_relay(make_relay, dns_server, sink, retry_schedule=[3600])
        dns_server.set(SENDER_DOMAIN, "MX", ["10 mx." + SENDER_DOMAIN + "."])
        dns_server.set("mx." + SENDER_DOMAIN, "A", ["127.0.0.3"])
        sink.data_reply = "554 5.7.1 Message rejected as spam"
        q1 = send(relay, ["bob@example.net"], "spam")
        assert relay.wait_event("delivery", qid=q1, result="failed")
        assert home.wait_for(1)
        _, _, [r] = parse_dsn(home.messages[0].data)
        assert r["Status"] == "5.7.1" and r["Diagnostic-Code"] == "smtp; 554 5.7.1 Message rejected as spam"
        sink.data_reply = "452 4.3.1 Insufficient system storage"
        q2 = send(relay, ["bob@example.net"], "full")
        assert relay.wait_event("delivery", qid=q2, result="deferred")
        assert relay.events_named("delivery", qid=q2)[0]["reply"] == "452 4.3.1 Insufficient system storage"
        assert not sink.messages and len(sink.rejected) == 2
        assert [row["id"] for row in queue_json(relay)] == [q2]


def test_expiry_bounces_with_4_4_7_and_the_remote_reply(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink, retry_schedule=[1], max_queue_lifetime=3)
    sink.rcpt_replies["bob@example.net"] = "451 4.3.0 Greylisted, come back later"
    qid = send(relay, ["bob@example.net"], "expiry")
    assert sink.wait_for(1, timeout=15)
    [dsn] = bounces(sink)
    assert dsn.rcpt_tos == [USER]
    msg, per_msg, [r] = parse_dsn(dsn.data)
    assert per_msg["Arrival-Date"]
    assert r["Final-Recipient"] == "rfc822; bob@example.net"
    assert r["Action"] == "failed"
    assert r["Status"] == "4.4.7"
    assert r["Diagnostic-Code"] == "smtp; 451 4.3.0 Greylisted, come back later"
    assert r["Remote-MTA"] == "dns; mx.example.net"
    text = list(msg.iter_parts())[0].get_content()
    assert qid in text and "Greylisted" in text
    ev = relay.events_named("delivery", qid=qid)
    assert [e["result"] for e in ev][-1] == "failed" and len(ev) >= 2
    assert all(e["result"] == "deferred" for e in ev[:-1])
    assert_queue_empty(relay)


def test_no_bounce_for_a_bounce(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink)
    sink.rcpt_replies["bob@example.net"] = "550 5.1.1 no such user"
    sink.rcpt_replies[USER.lower()] = "550 5.1.1 the sender's mailbox is gone too"
    qid = send(relay, ["bob@example.net"], "double")
    assert relay.wait_event("bounce", qid=qid)
    dsn_qid = relay.events_named("bounce", qid=qid)[0]["dsn_qid"]
    assert relay.wait_event("delivery", qid=dsn_qid, result="failed")
    assert relay.wait_event("bounce_dropped", qid=dsn_qid)
    assert_queue_empty(relay)
    assert not relay.events_named("bounce", qid=dsn_qid)
    assert not sink.messages and sink.connections >= 2


# ------------------------------------------------------------------ connections and TLS

def test_connection_reuse_carries_several_messages(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink, max_connections_per_destination=1)
    s = relay.smtp()
    s.login(USER, PASSWORD)
    for i in range(5):  # five transactions in one submission session: quickly, one after another
        s.sendmail(USER, [f"user{i}@example.net"], f"Subject: reuse {i}\r\n\r\nhi\r\n".encode())
    s.quit()
    assert sink.wait_for(5)
    conns = {m.connection for m in sink.messages}
    assert len(conns) <= 2, f"5 messages over {len(conns)} connections"
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == [f"user{i}@example.net" for i in range(5)]


def test_lines_starting_with_dots_arrive_exactly_as_submitted(make_relay, dns_server, sink):
    """Transparency both ways (RFC 5321 4.5.2): unstuffed on receipt, stuffed again on delivery."""
    relay = start_relay(make_relay, dns_server, sink)
    body = ".\r\n..\r\n.leading\r\n...three\r\nmiddle . dot\r\n.\r\nend.\r\n"
    send(relay, ["bob@example.net"], "dots", body=body)
    assert sink.wait_for(1)
    assert sink.messages[0].data.endswith(b"\r\n\r\n" + body.encode())


def test_per_destination_connection_limit(make_relay, dns_server, sink):
    sink.mode = "stall_data"  # every session hangs at DATA: count concurrent connections
    relay = start_relay(make_relay, dns_server, sink, max_connections_per_destination=2, command_timeout=30)
    s = relay.smtp()
    s.login(USER, PASSWORD)
    for i in range(6):
        s.sendmail(USER, [f"user{i}@example.net"], f"Subject: limit {i}\r\n\r\nhi\r\n".encode())
    s.quit()
    wait_until(lambda: sink.connections >= 2, what="two connections")
    time.sleep(1.0)  # give a third connection every chance to appear
    assert sink.connections == 2


def test_global_connection_limit_spans_destinations(make_relay, dns_server, sink):
    other = MXSink(host="127.0.0.2", port=sink.port).start()
    try:
        sink.mode = other.mode = "stall_data"
        relay = start_relay(make_relay, dns_server, sink, max_connections=1, command_timeout=30)
        dns_server.set("example.org", "MX", ["10 mx.example.org."])
        dns_server.set("mx.example.org", "A", ["127.0.0.2"])
        s = relay.smtp()
        s.login(USER, PASSWORD)
        for rcpt in ("a@example.net", "b@example.org", "c@example.net", "d@example.org"):
            s.sendmail(USER, [rcpt], b"Subject: global\r\n\r\nhi\r\n")
        s.quit()
        wait_until(lambda: sink.connections + other.connections >= 1, what="a connection")
        time.sleep(1.0)  # give a second connection every chance to appear
        assert sink.connections + other.connections == 1
    finally:
        other.stop()


def test_opportunistic_tls_and_plain_are_logged(make_relay, dns_server, sink):
    tls_sink = MXSink(host="127.0.0.2", port=sink.port, tls_context=make_test_tls_context()).start()
    try:
        relay = start_relay(make_relay, dns_server, sink)
        dns_server.set("secure.example", "MX", ["10 mx.secure.example."])
        dns_server.set("mx.secure.example", "A", ["127.0.0.2"])
        q1 = send(relay, ["bob@example.net"])
        q2 = send(relay, ["bob@secure.example"])
        assert sink.wait_for(1) and tls_sink.wait_for(1)
        assert not sink.messages[0].tls and tls_sink.messages[0].tls
        assert relay.wait_event("delivery", qid=q1, result="delivered", tls="plain")
        assert relay.wait_event("delivery", qid=q2, result="delivered")
        assert relay.events_named("delivery", qid=q2)[0]["tls"].startswith("TLSv1.")
    finally:
        tls_sink.stop()


def test_require_tls_defers_without_starttls_or_with_an_unverified_certificate(make_relay, dns_server, sink):
    tls_sink = MXSink(host="127.0.0.2", port=sink.port, tls_context=make_test_tls_context()).start()
    try:
        relay = start_relay(make_relay, dns_server, sink, retry_schedule=[3600],
                            require_tls_domains=["example.net", "secure.example"])
        dns_server.set("secure.example", "MX", ["10 mx.test."])
        dns_server.set("mx.test", "A", ["127.0.0.2"])
        q1 = send(relay, ["bob@example.net"])     # the sink offers no STARTTLS
        q2 = send(relay, ["bob@secure.example"])  # self-signed certificate: verification fails
        assert relay.wait_event("delivery", qid=q1, result="deferred")
        assert relay.wait_event("delivery", qid=q2, result="deferred")
        e1, e2 = relay.events_named("delivery", qid=q1)[0], relay.events_named("delivery", qid=q2)[0]
        assert "STARTTLS" in e1["reply"] and e1["tls"] == "unavailable"
        assert "certificate" in e2["reply"].lower() and e2["tls"] == "failed" and e2["mx"] == "mx.test"
        assert not sink.messages and not tls_sink.messages
        assert {r["state"] for r in queue_json(relay)} == {"deferred"}
    finally:
        tls_sink.stop()


def test_require_tls_delivers_when_the_certificate_verifies(make_relay, dns_server, sink):
    # The sink's certificate is for mx.test (and is its own CA): trust it the way OpenSSL lets
    # an operator point at a private CA, through SSL_CERT_FILE.
    tls_sink = MXSink(host="127.0.0.2", port=sink.port, tls_context=make_test_tls_context("mx.test")).start()
    try:
        relay = start_relay(make_relay, dns_server, sink, require_tls=True,
                            env={"SSL_CERT_FILE": shared_cert_files("mx.test")[0]})
        dns_server.set("secure.example", "MX", ["10 mx.test."])
        dns_server.set("mx.test", "A", ["127.0.0.2"])
        qid = send(relay, ["bob@secure.example"])
        assert tls_sink.wait_for(1)
        assert tls_sink.messages[0].tls
        assert relay.wait_event("delivery", qid=qid, result="delivered")
        assert relay.events_named("delivery", qid=qid)[0]["tls"].startswith("TLSv1.")
    finally:
        tls_sink.stop()


# ------------------------------------------------------------------ DSN parameters and reports

def test_dsn_parameters_are_passed_to_a_dsn_capable_mx(make_relay, dns_server):
    with MXSink(advertise_dsn=True) as sink:
        relay = start_relay(make_relay, dns_server, sink)
        qid = send(relay, ["bob@example.net"], "dsnpass", mail_options=["RET=HDRS", "ENVID=env+2B42"],
                   rcpt_options={"bob@example.net": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob+40example.net"]})
        assert sink.wait_for(1)
        m = sink.messages[0]
        assert "RET=HDRS" in m.mail_options and "ENVID=env+2B42" in m.mail_options
        # ORCPT is decoded on the way in and xtext-encoded again on the way out ("@" needs no escape).
        assert "NOTIFY=SUCCESS,FAILURE" in m.rcpt_options and "ORCPT=rfc822;Bob@example.net" in m.rcpt_options
        assert relay.wait_event("delivery", qid=qid, result="delivered")
        assert_queue_empty(relay)
        # The DSN-capable MX now owns the success notification (RFC 3461 5.2.1): none from us.
        time.sleep(0.5)
        assert not bounces(sink)


def test_notify_success_to_a_non_dsn_mx_sends_a_relayed_report_echoing_envid_and_orcpt(
        make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink)
    qid = send(relay, ["bob@example.net"], "success", mail_options=["ENVID=job-42"],
               rcpt_options={"bob@example.net": ["NOTIFY=SUCCESS", "ORCPT=rfc822;bob+2Balias@example.net"]})
    assert sink.wait_for(2)
    assert not any("NOTIFY" in o for o in normal(sink)[0].rcpt_options)  # not DSN-capable: not passed
    [dsn] = bounces(sink)
    msg, per_msg, [r] = parse_dsn(dsn.data)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert per_msg["Original-Envelope-Id"] == "job-42"
    assert r["Original-Recipient"] == "rfc822;bob+alias@example.net"
    # RFC 3461 5.2.2: relayed to an MX that does not support DSN.
    assert r["Action"] == "relayed" and r["Status"] == "2.0.0"
    assert r["Remote-MTA"] == "dns; mx.example.net"
    assert relay.wait_event("bounce", qid=qid)


def test_notify_never_suppresses_the_bounce_and_failure_only_is_default(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink)
    sink.rcpt_replies["bob@example.net"] = "550 5.1.1 no such user"
    sink.rcpt_replies["carol@example.net"] = "550 5.1.1 no such user"
    qid = send(relay, ["bob@example.net", "carol@example.net", "dave@example.net"], "never",
               rcpt_options={"bob@example.net": ["NOTIFY=NEVER"]})
    assert relay.wait_event("bounce", qid=qid)
    assert sink.wait_for(2)
    [dsn] = bounces(sink)
    _, _, blocks = parse_dsn(dsn.data)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; carol@example.net"]
    # dave (no NOTIFY) was delivered: no success report by default.
    assert [m.rcpt_tos for m in normal(sink)] == [["dave@example.net"]]
    assert_queue_empty(relay)


@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
def test_ret_full_returns_the_message_and_hdrs_only_its_headers(make_relay, dns_server, sink, ret):
    relay = start_relay(make_relay, dns_server, sink)
    sink.rcpt_replies["bob@example.net"] = "550 5.1.1 no such user"
    send(relay, ["bob@example.net"], "ret", mail_options=[f"RET={ret}"], body="the secret body\r\n")
    assert sink.wait_for(1)
    [dsn] = bounces(sink)
    msg, _, _ = parse_dsn(dsn.data)
    returned = list(msg.iter_parts())[2]
    if ret == "FULL":
        assert returned.get_content_type() == "message/rfc822"
        assert b"the secret body" in dsn.data
    else:
        assert returned.get_content_type() == "text/rfc822-headers"
        assert b"the secret body" not in dsn.data
    assert b"Subject: ret" in dsn.data


def test_delay_warning_is_sent_once_then_delivery(make_relay, dns_server, sink):
    relay = start_relay(make_relay, dns_server, sink, retry_schedule=[1], delay_warning_after=1)
    sink.rcpt_replies["bob@example.net"] = "452 4.2.2 Mailbox full"
    qid = send(relay, ["bob@example.net"], "delay")
    assert sink.wait_for(1, timeout=15)
    [warning] = bounces(sink)
    msg, _, [r] = parse_dsn(warning.data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert r["Action"] == "delayed" and r["Status"] == "4.2.2"
    assert r["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full"
    assert r["Will-Retry-Until"]
    # Further deferrals send no second warning.
    n = len(relay.events_named("delivery", qid=qid))
    wait_until(lambda: len(relay.events_named("delivery", qid=qid)) >= n + 2, what="two more attempts")
    assert len(bounces(sink)) == 1
    sink.rcpt_replies.clear()
    assert relay.wait_event("delivery", qid=qid, result="delivered", timeout=10)
    assert sink.wait_for(2)
    assert len(bounces(sink)) == 1
