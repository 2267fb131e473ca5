"""The hostile receivers themselves (tests/support/hostile_mx.py), against smtplib and raw sockets.

Each misbehaviour is checked to do what the delivery tests rely on: a message counts only
when its whole final dot arrived, a slow reader really holds the sender to its rate, a reset
reaches the books even while reads are stopped, stalls never answer, tarpits answer late.
"""
from __future__ import annotations

import smtplib
import socket
import struct
import time

import pytest

from tests.support.dns_server import DNSServer
from tests.support.hostile_mx import HostileMX, free_port_on, mx_records_for

pytestmark = pytest.mark.timeout(60)

BODY = b"Subject: peer\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n"


def client(mx: HostileMX, timeout: float = 5) -> smtplib.SMTP:
    return smtplib.SMTP(*mx.address, local_hostname="client.test", timeout=timeout)


def raw(mx: HostileMX, timeout: float = 5) -> socket.socket:
    s = socket.create_connection(mx.address, timeout=timeout)
    s.recv(1024)  # banner
    return s


def cmd(s: socket.socket, line: bytes) -> bytes:
    s.sendall(line + b"\r\n")
    out = b""
    while not (out.endswith(b"\r\n") and (len(out.split(b"\r\n")[-2]) < 4 or out.split(b"\r\n")[-2][3:4] == b" ")):
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    return out


def open_data(s: socket.socket) -> None:
    assert cmd(s, b"EHLO client.test").startswith(b"250")
    assert cmd(s, b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert cmd(s, b"RCPT TO:<b@example.org>").startswith(b"250")
    assert cmd(s, b"DATA").startswith(b"354")


def reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.fixture
def mx():
    with HostileMX() as m:
        yield m


def test_accepts_and_records_a_message_byte_for_byte(mx):
    with client(mx) as s:
        s.ehlo()
        assert s.has_extn("size") and s.has_extn("8bitmime") and not s.has_extn("dsn")
        assert s.sendmail("a@example.com", ["b@example.org", "c@example.org"], BODY) == {}
    assert mx.wait_for(1)
    [m] = mx.messages
    assert (m.mail_from, m.rcpt_tos, m.connection, m.host) == ("a@example.com", ["b@example.org", "c@example.org"],
                                                              1, "127.0.0.1")
    assert m.data == BODY and m.subject == "peer"
    assert mx.wait_until(lambda: mx.settled)
    assert mx.connections == 1 and mx.max_active == 1 and mx.partials == 0
    assert mx.ended() == ["closed"]  # QUIT: we close


def test_empty_body_and_several_messages_per_connection(mx):
    with client(mx) as s:
        s.sendmail("a@example.com", ["b@example.org"], b"")
        s.sendmail("a@example.com", ["b@example.org"], BODY)
    assert mx.wait_for(2)
    assert [m.data for m in mx.messages] == [b"\r\n", BODY]  # smtplib ends even an empty body with CRLF
    assert {m.connection for m in mx.messages} == {1}


def test_a_message_counts_only_when_the_whole_final_dot_arrived(mx):
    s = raw(mx)
    open_data(s)
    s.sendall(b"Subject: cut\r\n\r\nbody\r\n.")  # everything but the dot's CRLF
    s.close()
    assert mx.wait_until(lambda: mx.settled)
    assert mx.messages == [] and mx.partials == 1 and mx.ended() == ["eof"]


def test_a_reset_mid_data_is_recorded_as_reset(mx):
    s = raw(mx)
    open_data(s)
    s.sendall(b"Subject: rst\r\n\r\nbody\r\n")
    time.sleep(0.1)  # let it be read: an RST with unread data is not what we test here
    reset(s)
    assert mx.wait_until(lambda: mx.settled)
    assert mx.ended() == ["reset"] and mx.partials == 1 and not mx.messages


def test_slow_reader_holds_the_sender_to_its_rate(mx):
    mx.data_rate = 200_000
    size = 600_000
    body = b"Subject: slow\r\n\r\n" + (b"x" * 78 + b"\r\n") * (size // 80)
    t0 = time.monotonic()
    with client(mx, timeout=30) as s:
        s.sendmail("a@example.com", ["b@example.org"], body)
    elapsed = time.monotonic() - t0
    assert mx.wait_for(1)
    assert mx.messages[0].data == body
    # ~3 s at 200 KB/s; the kernel and stream buffers (tens of KB) may absorb a little.
    assert elapsed >= 2.0, elapsed


def test_stopped_reader_sees_a_reset_while_its_reads_are_paused(mx):
    mx.stop_reading_after = 64 * 1024
    mx.stop_reading_for = None  # until reset
    s = raw(mx, timeout=10)
    open_data(s)
    s.setblocking(False)
    sent = 0
    chunk = b"y" * 78 + b"\r\n"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # push until the receiver's window is shut
        try:
            sent += s.send(chunk * 100)
        except BlockingIOError:
            if mx.stalled_reads:
                break
            time.sleep(0.01)
    assert mx.wait_until(lambda: mx.stalled_reads == 1)
    reset(s)
    assert mx.wait_until(lambda: mx.conns[0].end == "reset", timeout=5)
    assert not mx.messages


def test_stopped_reader_resumes_and_completes_what_a_graceful_close_left_behind(mx):
    """The duplicate mechanism of issue 11: data buffered before a FIN still arrives in full."""
    mx.stop_reading_after = 64 * 1024
    mx.stop_reading_for = 1.0
    s = raw(mx, timeout=10)
    open_data(s)
    body = b"Subject: late\r\n\r\n" + (b"z" * 78 + b"\r\n") * 4000
    s.sendall(body + b".\r\n")  # fits the socket buffers: sendall returns, then a FIN
    s.shutdown(socket.SHUT_WR)
    assert mx.wait_for(1, timeout=10)
    assert mx.messages[0].data == body and mx.stalled_reads == 1


def test_tarpit_answers_every_command_late(mx):
    mx.command_delay = 0.4
    t0 = time.monotonic()
    with client(mx) as s:
        s.ehlo()
        s.mail("a@example.com")
        s.rcpt("b@example.org")
        assert time.monotonic() - t0 >= 1.2
        s.rset()


def test_stall_at_rcpt_never_answers_but_sees_the_client_go(mx):
    mx.stall_at = {"RCPT"}
    s = client(mx, timeout=1)
    s.ehlo()
    s.mail("a@example.com")
    with pytest.raises((smtplib.SMTPServerDisconnected, socket.timeout, TimeoutError)):
        s.rcpt("b@example.org")
    s.close()  # (smtplib has closed it already after the timeout)
    assert mx.wait_until(lambda: mx.active == 0)
    assert mx.rcpt_commands() == 1
    assert mx.ended() == ["eof"]


def test_late_reply_to_the_dot_counts_the_message_before_replying(mx):
    mx.dot_reply_delay = 1.0
    s = raw(mx)
    open_data(s)
    s.sendall(BODY + b".\r\n")
    assert mx.wait_for(1, timeout=0.8)  # complete before any reply
    s.settimeout(3)
    t0 = time.monotonic()
    assert s.recv(1024).startswith(b"250 ")
    assert time.monotonic() - t0 >= 0.1
    s.close()


@pytest.mark.parametrize("how, end", [("fin", "closed"), ("rst", "closed")])
def test_close_mid_data(mx, how, end):
    mx.close_after_data_bytes = 10_000
    mx.close_how = how
    body = b"Subject: mid\r\n\r\n" + (b"q" * 78 + b"\r\n") * 2000
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError, smtplib.SMTPDataError)):
        with client(mx) as s:
            s.sendmail("a@example.com", ["b@example.org"], body)
    assert mx.wait_until(lambda: mx.settled)
    assert not mx.messages and mx.partials == 1 and mx.ended() == [end]


def test_refused_data_command_leaves_the_transaction_open_and_nested_mail_is_503(mx):
    mx.data_cmd_replies = ["451 4.3.0 try DATA later"]
    with client(mx) as s:
        s.ehlo()
        s.mail("a@example.com")
        s.rcpt("b@example.org")
        assert s.docmd("DATA")[0] == 451
        code, text = s.mail("c@example.com")
        assert code == 503 and b"nested MAIL" in text
        assert s.rset()[0] == 250
        assert s.sendmail("c@example.com", ["d@example.org"], BODY) == {}
    assert mx.nested_mail == 1 and [m.mail_from for m in mx.messages] == ["c@example.com"]


def test_greeting_421_and_drop_and_stall_on_connect(mx):
    mx.greeting = "421 4.3.2 go away"
    with pytest.raises(smtplib.SMTPConnectError):
        client(mx)
    mx.greeting = None
    mx.on_connect = "drop"
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client(mx)
    mx.on_connect = "stall"
    with pytest.raises((socket.timeout, TimeoutError, smtplib.SMTPServerDisconnected)):
        client(mx, timeout=0.5)
    assert mx.wait_until(lambda: mx.active == 0)
    assert mx.connections == 3 and not mx.messages


def test_greeting_and_ehlo_names_are_scriptable(mx):
    mx.hostname = "relay.test"
    mx.ehlo_hostname = "other.test"
    with client(mx) as s:
        assert s.ehlo()[1].split(b"\n")[0] == b"other.test"
    s = socket.create_connection(mx.address, timeout=5)
    assert s.recv(100).startswith(b"220 relay.test ")
    s.close()


def test_concurrent_connections_are_counted(mx):
    socks = [socket.create_connection(mx.address, timeout=5) for _ in range(4)]
    assert mx.wait_until(lambda: mx.active == 4)
    for s in socks:
        s.close()
    assert mx.wait_until(lambda: mx.active == 0)
    assert mx.max_active == 4 and mx.connections == 4


def test_many_addresses_share_one_port_and_25_mx_records_resolve():
    hosts = [f"127.0.1.{i}" for i in range(1, 26)]
    port = free_port_on(hosts)
    with HostileMX(host=hosts, port=port) as mx, DNSServer({}) as server:
        assert mx.port == port
        names = mx_records_for(server, "many.example", hosts)
        assert len(names) == 25
        import dns.resolver  # the relay's own resolver library, pointed at the loopback server
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = server.port
        answer = sorted(r.resolve("many.example", "MX"), key=lambda x: x.preference)
        assert [str(a.exchange).rstrip(".") for a in answer] == names
        for h in (hosts[0], hosts[-1]):
            socket.create_connection((h, port), timeout=5).close()
        assert mx.wait_until(lambda: mx.connections == 2 and mx.active == 0)
        assert mx.by_host == {hosts[0]: 1, hosts[-1]: 1}
