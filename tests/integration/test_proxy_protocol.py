"""PROXY protocol v1 and v2 on listeners, against the real relay (issue 15): a raw-socket client
writes the header itself, from 127.0.0.1 (the trusted proxy) claiming clients 127.0.0.7x; the
claimed client drives Received:, the log, the AUTH lockout, per-IP caps and trusted_networks.
The same relay keeps an ordinary listener, where a PROXY line is just a bad command."""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import struct
import time

import pytest

from relay import replies
from relay.server.proxy import V2_SIGNATURE
from tests.conftest import PASSWORD, USER
from tests.support.raw_smtp import RawSMTP, message_fields, metric, start_relay
from tests.support.relay_instance import client_tls_context, wait_until

PROXY_IP = "127.0.0.1"        # the load balancer, in trusted_proxies
OUTSIDER = "127.0.0.9"        # anyone else
TRUSTED_NET_CLIENT = "127.0.0.90"


def v1(src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 587) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 587, tlvs: bytes = b"") -> bytes:
    if src is None:  # LOCAL, as HAProxy's check-send-proxy health check sends it
        return V2_SIGNATURE + b"\x20\x00" + struct.pack("!H", len(tlvs)) + tlvs
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if a.version == 4 else 0x21
    payload = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(payload)) + payload


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("proxy"), config={
        "listeners": [
            {"address": "127.0.0.1", "port": 0, "tls": "starttls"},
            {"address": "127.0.0.1", "port": 0, "tls": "implicit"},
            {"address": "127.0.0.1", "port": 0, "tls": "starttls", "proxy_protocol": True,
             "trusted_proxies": ["127.0.0.1/32", "::1/128"]},
            {"address": "127.0.0.1", "port": 0, "tls": "implicit", "proxy_protocol": True,
             "trusted_proxies": ["127.0.0.1/32"]},
        ],
        "limits": {"connections_per_ip": 3, "auth_failures": 3, "auth_failures_per_network": 3,
                   "auth_failure_delay": 0.05, "proxy_header_timeout": 2, "proxy_headers": 20},
        "trusted_networks": [{"network": f"{TRUSTED_NET_CLIENT}/32", "domains": ["mg.example.com"]}],
    })
    yield inst
    inst.stop()


def proxied(relay, header: bytes, *, implicit: bool = False, source: str = PROXY_IP, timeout: float = 10) -> RawSMTP:
    port = relay.ports["proxy_implicit" if implicit else "proxy_starttls"]
    return RawSMTP(port, implicit=implicit, source=source, timeout=timeout, preamble=header)


def raw(port: int, source: str = PROXY_IP, timeout: float = 5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def closed_without_reply(sock: socket.socket, within: float = 5) -> bool:
    """The relay closed the connection and sent nothing at all (no banner, no reply)."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except (ConnectionError, TimeoutError, socket.timeout):
        pass
    return got == b""


def send_message(c: RawSMTP, sender: str = USER, body: str = "Subject: hi\r\n\r\nhello\r\n") -> str:
    assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
    assert c.cmd("RCPT TO:<someone@example.net>").code == 250
    assert c.cmd("DATA").code == 354
    r = c.cmd(body + ".")
    assert r.code == 250, r
    return r.lines[-1].rsplit(" ", 1)[-1]


def received_of(relay, qid: str) -> bytes:
    body = wait_until(lambda: relay.body(qid), what="stored body")
    return next(f for f in message_fields(body) if f.lower().startswith(b"received:"))


# ------------------------------------------------------------------ the claimed client everywhere

@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_starttls_keeps_the_claimed_client_in_received_and_the_log(relay, make):
    client = "127.0.0.77" if make is v1 else "127.0.0.78"
    with proxied(relay, make(client)) as c:
        assert c.banner.code == 220
        c.secure().login()  # STARTTLS replaced aiosmtpd's Session: the address lives on the connection
        qid = send_message(c)
    assert f"([{client}])".encode() in received_of(relay, qid)
    wait_until(lambda: relay.events_named("connect", client=client, peer=PROXY_IP))
    wait_until(lambda: relay.events_named("tls", client=client, mode="starttls"))
    wait_until(lambda: relay.events_named("auth", client=client, result="success"))
    wait_until(lambda: relay.events_named("queued", qid=qid, client=client), what="queued line")


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_implicit_tls_header_comes_before_the_client_hello(relay, make):
    client = "127.0.0.79" if make is v1 else "127.0.0.80"
    with proxied(relay, make(client, dport=465), implicit=True) as c:  # header, then ClientHello
        assert c.banner.code == 220
        c.secure().login()
        qid = send_message(c)
    assert f"([{client}])".encode() in received_of(relay, qid)
    wait_until(lambda: relay.events_named("tls", client=client, mode="implicit"))


def test_ipv6_client_and_tlvs(relay):
    tlvs = b"\x01\x00\x04smtp" + b"\x05\x00\x03abc"
    with proxied(relay, v2("2001:db8::77", "2001:db8::1", tlvs=tlvs)) as c:
        assert c.banner.code == 220
        c.secure().login()
        qid = send_message(c)
    assert b"([2001:db8::77])" in received_of(relay, qid)


def test_ipv4_mapped_client_counts_as_its_ipv4_address(relay):
    with proxied(relay, v1("::ffff:127.0.0.92", "::ffff:127.0.0.1")) as c:
        assert c.banner.code == 220
    wait_until(lambda: relay.events_named("connect", client="127.0.0.92", peer=PROXY_IP), what="connect line")


def test_local_and_unknown_mean_the_proxy_itself(relay):
    listener = str(relay.ports["proxy_starttls"])
    before = metric(relay, "relay_connections_total", listener=listener)
    for header in (v2(None), b"PROXY UNKNOWN\r\n"):
        with proxied(relay, header) as c:
            assert c.banner.code == 220
            assert c.cmd("QUIT").code == 221
    assert metric(relay, "relay_connections_total", listener=listener) == before + 2
    # Health checks (HAProxy's check-send-proxy sends LOCAL): served, not logged at info.
    assert not relay.events_named("connect", client=PROXY_IP, listener=listener)
    assert not relay.events_named("proxy_refused", peer=PROXY_IP, reason="malformed")


def test_auth_lockout_follows_the_claimed_client_not_the_proxy(relay):
    guesser, neighbour = "127.0.0.81", "127.0.0.82"  # both behind the one proxy at 127.0.0.1
    for _ in range(3):
        with proxied(relay, v2(guesser)) as c:
            assert c.secure().auth_plain(USER, "wrong password").is_(replies.AUTH_INVALID)
    with proxied(relay, v2(guesser)) as c:
        assert c.secure().auth_plain(USER, PASSWORD).is_(replies.AUTH_LOCKED)
    with proxied(relay, v1(neighbour)) as c:
        c.secure().login()
    lock = wait_until(lambda: relay.events_named("auth_lockout", client=guesser), what="lockout line")
    assert lock and lock[0]["network"] == f"{guesser}/32"
    assert len(relay.events_named("auth", client=guesser, result="failure")) == 3
    assert not relay.events_named("auth", client=PROXY_IP, result="failure")


def test_per_ip_cap_counts_each_claimed_client(relay):
    busy, other = "127.0.0.83", "127.0.0.84"
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(proxied(relay, v2(busy))) for _ in range(3)]
        assert all(c.banner.code == 220 for c in held)
        # The 4th from the same claimed client is refused (421, per_ip, logged with its address)...
        with proxied(relay, v2(busy)) as c:
            assert c.banner.is_(replies.TOO_MANY_CONNECTIONS_IP)
        # ...while others behind the same proxy (already 3 connections from 127.0.0.1) get in.
        more = [stack.enter_context(proxied(relay, v1(other))) for _ in range(3)]
        assert all(c.banner.code == 220 for c in more)
    wait_until(lambda: relay.events_named("connection_refused", client=busy, reason="per_ip"))
    assert not relay.events_named("connection_refused", client=PROXY_IP)


def test_trusted_networks_apply_to_the_claimed_client(relay):
    with proxied(relay, v2(TRUSTED_NET_CLIENT)) as c:
        c.ehlo()
        qid = send_message(c, sender="noreply@mg.example.com")  # no AUTH: its network is trusted
    assert f"([{TRUSTED_NET_CLIENT}])".encode() in received_of(relay, qid)
    with proxied(relay, v2("127.0.0.91")) as c:  # behind the same proxy, not in the network
        c.ehlo()
        assert c.cmd("MAIL FROM:<noreply@mg.example.com>").code == 530


# ------------------------------------------------------------------ refusals

def test_untrusted_peer_sending_a_header_is_refused(relay):
    s = raw(relay.ports["proxy_starttls"], source=OUTSIDER)
    with s:
        try:
            s.sendall(v2("127.0.0.1"))
        except OSError:
            pass
        assert closed_without_reply(s)
    assert wait_until(lambda: relay.events_named("proxy_refused", reason="untrusted_peer", peer=OUTSIDER))
    assert metric(relay, "relay_proxy_refused_total", reason="untrusted_peer") >= 1


@pytest.mark.parametrize("sent,reason", [
    (b"EHLO client.test\r\n", "missing"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "missing"),       # a ClientHello, no header
    (b"PROXY TCP4 127.0.0.1 nonsense 1 2\r\n", "malformed"),
    (b"PROXY TCP4 " + b"1" * 120, "oversize"),
    (V2_SIGNATURE + b"\x21\x11\xff\xf0", "oversize"),
    (b"PROXY TCP4 127.0.0.5", "timeout"),                                # stalls mid-header
])
def test_trusted_peer_without_a_valid_header_is_refused(relay, sent, reason):
    before = metric(relay, "relay_proxy_refused_total", reason=reason)
    with raw(relay.ports["proxy_starttls"]) as s:
        s.sendall(sent)
        assert closed_without_reply(s, within=6)
    wait_until(lambda: metric(relay, "relay_proxy_refused_total", reason=reason) == before + 1,
               what=f"proxy_refused reason={reason}")
    wait_until(lambda: relay.events_named("proxy_refused", reason=reason, peer=PROXY_IP))
    assert not [line for line in relay.raw_log if "Traceback" in line]


def test_silent_trusted_peer_is_cut_at_the_deadline(relay):
    with raw(relay.ports["proxy_implicit"]) as s:
        t0 = time.monotonic()
        assert closed_without_reply(s, within=8)
        assert 1.5 < time.monotonic() - t0 < 6


def test_the_relay_says_nothing_before_the_header_is_complete(relay):
    header = v2("127.0.0.85")
    with raw(relay.ports["proxy_starttls"]) as s:
        s.sendall(header[:20])
        s.settimeout(0.7)
        with pytest.raises((TimeoutError, socket.timeout)):
            s.recv(100)  # no banner while the header is incomplete
        s.sendall(header[20:])
        s.settimeout(5)
        assert s.recv(100).startswith(b"220 ")
    wait_until(lambda: relay.events_named("connect", client="127.0.0.85"), what="connect line")


def test_plain_listener_treats_a_proxy_line_as_a_bad_command(relay):
    before = metric(relay, "relay_proxy_refused_total")
    with RawSMTP(relay.ports["starttls"], source=OUTSIDER) as c:
        assert c.banner.code == 220  # the greeting comes first: nothing is awaited here
        r = c.cmd(v1("127.0.0.99").rstrip(b"\r\n"))
        assert r.code == 500
        assert c.cmd("EHLO client.test").code == 250
    with RawSMTP(relay.ports["starttls"], source=OUTSIDER) as c:
        c.send(v2("127.0.0.99"))
        assert c.read().code == 500
    wait_until(lambda: relay.events_named("connect", client=OUTSIDER))
    assert not relay.events_named("connect", client="127.0.0.99")
    assert metric(relay, "relay_proxy_refused_total") == before


# ------------------------------------------------------------------ hostile

def test_a_stalled_proxy_connection_does_not_hold_others_up(relay):
    with raw(relay.ports["proxy_starttls"]) as stalled:
        stalled.sendall(v2("127.0.0.86")[:10])
        t0 = time.monotonic()
        with proxied(relay, v2("127.0.0.87")) as c:
            assert c.banner.code == 220
            c.secure()
        with proxied(relay, v1("127.0.0.87", dport=465), implicit=True) as c:
            assert c.banner.code == 220
        assert time.monotonic() - t0 < 1.5


def test_connections_stuck_in_the_header_phase_are_capped(relay):
    cap = 20  # limits.proxy_headers in this relay
    base = metric(relay, "relay_connections_refused_total", reason="proxy_headers")
    with contextlib.ExitStack() as stack:
        socks = []
        for i in range(200):
            try:
                s = stack.enter_context(raw(relay.ports["proxy_starttls"] if i % 2 else relay.ports["proxy_implicit"]))
                s.sendall(b"PROXY TCP4 ")
                socks.append(s)
            except OSError:
                pass  # closed at once by the cap: as intended
        wait_until(lambda: metric(relay, "relay_connections_refused_total", reason="proxy_headers") - base
                   >= 200 - cap, what="the connections past the cap refused")
        assert metric(relay, "relay_proxy_headers_in_progress") <= cap
        assert metric(relay, "relay_connections_refused_total", reason="proxy_headers") - base == 200 - cap
        # A direct client on the ordinary listener is served meanwhile.
        with RawSMTP(relay.ports["starttls"], source="127.0.0.88") as c:
            assert c.banner.code == 220
        # The deadline frees the slots; then proxied clients get in again.
        wait_until(lambda: metric(relay, "relay_proxy_headers_in_progress") == 0, timeout=10,
                   what="header reads timed out")
    with proxied(relay, v2("127.0.0.89")) as c:
        assert c.banner.code == 220
    # One refusal line per reason in the interval, not 180.
    assert len(relay.events_named("proxy_refused", reason="proxy_headers", peer=PROXY_IP)) == 1


def test_header_and_first_bytes_in_one_segment(relay):
    """A load balancer writes the header and the client's first bytes together (HAProxy did,
    every time): nothing past the header may be lost, on 587 or in the ClientHello on 465."""
    with raw(relay.ports["proxy_starttls"]) as s:
        s.sendall(v1("127.0.0.93") + b"EHLO pipelined.test\r\n")
        c = RawSMTP.__new__(RawSMTP)
        c.sock, c.buf = s, b""
        assert c.read().code == 220
        assert c.read().code == 250
    ctx = client_tls_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with raw(relay.ports["proxy_implicit"]) as s:
        s.sendall(v2("127.0.0.94", dport=465) + outgoing.read())  # one write: header + ClientHello
        s.settimeout(10)

        def pump(step):
            """Run a TLS step over the socket until it needs no more input."""
            while True:
                try:
                    result = step()
                    if pending := outgoing.read():
                        s.sendall(pending)
                    return result
                except ssl.SSLWantReadError:
                    if pending := outgoing.read():
                        s.sendall(pending)
                    chunk = s.recv(65536)
                    assert chunk, "closed during the handshake"
                    incoming.write(chunk)

        pump(tls.do_handshake)
        banner = pump(lambda: tls.read(4096))
        assert banner.startswith(b"220 "), banner
    wait_until(lambda: relay.events_named("tls", client="127.0.0.94", mode="implicit"), what="tls line")


def test_shutdown_with_header_reads_pending(tmp_path):
    inst = start_relay(tmp_path, config={"listeners": [
        {"address": "127.0.0.1", "port": 0, "tls": "starttls"},
        {"address": "127.0.0.1", "port": 0, "tls": "implicit", "proxy_protocol": True,
         "trusted_proxies": ["127.0.0.0/8"]}]})
    try:
        with contextlib.ExitStack() as stack:
            for _ in range(5):
                stack.enter_context(raw(inst.ports["proxy_implicit"])).sendall(b"PROXY TCP4 1")
            wait_until(lambda: metric(inst, "relay_proxy_headers_in_progress") == 5, what="5 header reads")
            t0 = time.monotonic()
            assert inst.stop() == 0
            assert time.monotonic() - t0 < 5
    finally:
        inst.stop()
    assert not [line for line in inst.raw_log if "Traceback" in line]


def test_a_proxys_own_check_is_never_a_trusted_client(tmp_path):
    # HAProxy on the relay's own host, loopback trusted for local apps: a LOCAL/UNKNOWN header
    # names no client, so the connection is the proxy's own and must not relay without AUTH.
    inst = start_relay(tmp_path, config={
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": "starttls", "proxy_protocol": True,
                       "trusted_proxies": ["127.0.0.1/32"]}],
        "trusted_networks": [{"network": "127.0.0.0/8", "domains": ["mg.example.com"]}],
    })
    try:
        for header in (v2(None), b"PROXY UNKNOWN\r\n"):
            with proxied(inst, header) as c:
                c.ehlo()
                assert c.cmd("MAIL FROM:<noreply@mg.example.com>").code == 530
                assert c.cmd("RCPT TO:<bob@example.net>").code in (503, 530)
        with proxied(inst, v2("127.0.0.77")) as c:  # a real client in the trusted network: trusted
            c.ehlo()
            assert c.cmd("MAIL FROM:<noreply@mg.example.com>").code == 250
    finally:
        inst.stop()
