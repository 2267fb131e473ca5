"""End to end: submit over STARTTLS with a CLI-made credential; the MX sink receives it."""
from tests.conftest import PASSWORD, USER
from tests.support.mx_sink import MXSink, make_test_tls_context


def test_submit_and_deliver(make_relay, dns_server):
    mx_sink = MXSink(tls_context=make_test_tls_context()).start()
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port)
    relay.add_user(USER, PASSWORD)
    relay.start()
    qid = relay.submit(USER, PASSWORD, USER, ["bob@example.net"],
                       b"Subject: hi\r\nBcc: hidden@example.org\r\n\r\nhello\r\n")
    assert mx_sink.wait_for(1, timeout=15)
    msg = mx_sink.messages[0]
    assert msg.mail_from == USER and msg.rcpt_tos == ["bob@example.net"]
    # DKIM-Signature (made at acceptance) on top, then our Received.
    assert msg.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=mg.example.com;")
    assert b"\r\nReceived: from client.test" in msg.data
    assert f"id {qid}".encode() in msg.data
    assert b"Bcc:" not in msg.data and b"hidden@example.org" not in msg.data
    assert msg.tls  # opportunistic STARTTLS, certificate not verified
    assert relay.wait_event("delivery", result="delivered", qid=qid)
    assert relay.events_named("delivery", qid=qid)[0]["tls"].startswith("TLSv1.")
    mx_sink.stop()
