"""Session limits over real sockets: connection caps, idle and session timeouts, error and command budgets."""
from __future__ import annotations

import ssl
import time

import pytest

from relay import replies
from tests.conftest import USER
from tests.support.raw_smtp import RawSMTP, authed, connect, metric, start_relay


def wait_sessions_closed(relay, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while metric(relay, "relay_sessions_active") > 0:
        assert time.monotonic() < deadline, "sessions still open on the relay"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("limits"), config={"limits": {
        "connections_per_ip": 2, "connections": 4, "max_errors": 3, "max_commands": 12}})
    yield inst
    inst.stop()


@pytest.fixture(autouse=True)
def _fresh(request):
    """Each test starts with no session open on the shared relay (caps count open sessions)."""
    if "relay" in request.fixturenames:
        wait_sessions_closed(request.getfixturevalue("relay"))


def refused_with(relay, reply, *, implicit: bool = False, source: str | None = None) -> None:
    if implicit:
        # Counted at accept, before TLS: an implicit-TLS client past a cap is closed without a
        # handshake (a refused client must not cost a handshake slot), so it sees the TLS fail.
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            RawSMTP(relay.ports["implicit"], implicit=True, source=source).close()
        return
    c = RawSMTP(relay.ports["starttls"], source=source)
    try:
        assert c.banner.is_(reply), c.banner
        assert c.closed()
    finally:
        c.close()


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_per_ip_connection_cap(relay, implicit):
    before = metric(relay, "relay_connections_refused_total", reason="per_ip")
    ip = "127.0.0.21" if implicit else "127.0.0.20"
    a = connect(relay, source=ip, implicit=implicit)
    b = connect(relay, source=ip, implicit=not implicit)  # the cap spans listeners
    try:
        assert a.banner.code == 220 and b.banner.code == 220
        refused_with(relay, replies.TOO_MANY_CONNECTIONS_IP, implicit=implicit, source=ip)
        assert metric(relay, "relay_connections_refused_total", reason="per_ip") == before + 1
        # Another address is unaffected.
        with connect(relay, source="127.0.0.30") as other:
            assert other.ehlo().code == 250
        # The open sessions keep working.
        assert a.cmd("NOOP").code == 250 and b.cmd("NOOP").code == 250
        # A slot frees up when one of them leaves.
        assert a.cmd("QUIT").code == 221
        a.close()
        deadline = time.monotonic() + 5
        while True:
            c = connect(relay, source=ip)
            try:
                if c.banner.code == 220:
                    assert c.ehlo().code == 250
                    break
            finally:
                c.close()
            assert time.monotonic() < deadline, "slot never freed"
            time.sleep(0.02)
    finally:
        a.close()
        b.close()


def test_global_connection_cap(relay):
    before = metric(relay, "relay_connections_refused_total", reason="global")
    held = [connect(relay, source=ip) for ip in ("127.0.0.41", "127.0.0.41", "127.0.0.42", "127.0.0.42")]
    try:
        assert all(c.banner.code == 220 for c in held)
        refused_with(relay, replies.TOO_MANY_CONNECTIONS, source="127.0.0.43")
        refused_with(relay, replies.TOO_MANY_CONNECTIONS, implicit=True, source="127.0.0.44")
        assert metric(relay, "relay_connections_refused_total", reason="global") == before + 2
    finally:
        for c in held:
            c.close()


def test_max_errors_closes_the_session(relay):
    with connect(relay).secure() as c:
        assert c.cmd("BOGUS").code == 500
        assert c.cmd("MAIL FROM:<x@mg.example.com>").code == 530
        assert c.cmd("NOOP").code == 250  # successes do not reset the budget, but do not spend it
        c.send("ALSO BOGUS\r\n")
        assert c.read().code == 500
        r = c.read()
        assert r.is_(replies.TOO_MANY_ERRORS)
        assert c.closed()


def test_max_commands_closes_the_session(relay):
    with connect(relay).secure() as c:  # EHLO, STARTTLS, EHLO: three commands
        for _ in range(12 - 3):
            assert c.cmd("NOOP").code == 250
        r = c.cmd("NOOP")
        assert r.is_(replies.TOO_MANY_COMMANDS)
        assert c.closed()


@pytest.mark.parametrize("line", [
    "NOOP " + "x" * 1100,
    "MAIL FROM:<" + "a" * 1000 + "@mg.example.com>",
    "EHLO " + "h" * 20_000,
    "RCPT TO:<" + "r" * 100_000 + "@example.net>",
], ids=["noop", "mail", "ehlo-20k", "rcpt-100k"])
def test_overlong_command_line(relay, line):
    with authed(relay) as c:
        assert c.cmd(line).is_(replies.LINE_TOO_LONG)
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert c.cmd("RCPT TO:<bob@example.net>").code == 250


def test_command_line_at_limit_is_parsed(relay):
    with authed(relay) as c:
        r = c.cmd("NOOP " + "x" * 990)
        assert r.code == 250


# ---------------------------------------------------------------- timeouts (these measure time)

@pytest.fixture(scope="module")
def slow_relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("timeouts"), config={"limits": {"idle_timeout": 1,
                                                                             "session_timeout": 3}})
    yield inst
    inst.stop()


@pytest.mark.parametrize("stage", ["banner", "ehlo", "auth-prompt", "data"])
def test_idle_timeout(slow_relay, stage):
    c = connect(slow_relay, timeout=10)
    try:
        if stage != "banner":
            c.secure()
        if stage == "auth-prompt":
            assert c.cmd("AUTH LOGIN").code == 334
        if stage == "data":
            c.login()
            assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
            assert c.cmd("RCPT TO:<bob@example.net>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(b"Subject: half\r\n")
        t0 = time.monotonic()
        r = c.read()
        waited = time.monotonic() - t0
        assert r.is_(replies.TIMEOUT), r
        assert 0.8 <= waited < 3, waited
        assert c.closed()
    finally:
        c.close()
    if stage == "data":
        assert not slow_relay.queued()


def test_slow_but_moving_upload_is_not_cut_off(slow_relay):
    with authed(slow_relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert c.cmd("RCPT TO:<bob@example.net>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: slow\r\n\r\n")
        for i in range(4):  # 2 s in total, each gap under the 1 s idle timeout
            time.sleep(0.5)
            c.send(b"line %d\r\n" % i)
        r = c.cmd(".")
        assert r.code == 250, r


def test_session_time_limit(slow_relay):
    with connect(slow_relay).secure() as c:
        t0 = time.monotonic()
        code = 250
        while code == 250 and time.monotonic() - t0 < 6:
            time.sleep(0.3)
            try:
                r = c.cmd("NOOP")
            except (EOFError, ConnectionError):
                break
            code = r.code
        assert r.is_(replies.SESSION_TOO_LONG), r
        assert 2.5 <= time.monotonic() - t0 < 5
        assert c.closed()


# ---------------------------------------------------------------- hang-ups free their slot

@pytest.mark.parametrize("stage", ["banner", "ehlo", "starttls", "implicit", "data"])
def test_hangup_without_quit_frees_the_session(relay, stage):
    """Clients that just close must not leak their per-IP slot: the cap would then refuse them forever."""
    ip = "127.0.0.50"
    before = len(relay.events_named("disconnect", client=ip))
    for _ in range(3):  # more hang-ups than connections_per_ip allows at once
        c = connect(relay, source=ip, implicit=stage == "implicit")
        assert c.banner.code == 220
        if stage == "ehlo":
            c.ehlo()
        elif stage in ("starttls", "implicit"):
            c.secure()
        elif stage == "data":
            c.secure().login()
            assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
            assert c.cmd("RCPT TO:<bob@example.net>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(b"Subject: cut\r\n\r\npartial")
        c.close()
        wait_sessions_closed(relay)
    # The log is read on another thread: wait for the lines rather than race them.
    assert relay.wait_event("disconnect", count=before + 3, client=ip)


def test_pipelined_commands_then_half_close_get_every_reply(relay):
    import socket
    with connect(relay) as c:
        c.send("EHLO client.test\r\nNOOP\r\nQUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)  # like `printf ... | nc`: done sending, still reading
        assert c.read().code == 250
        assert c.read().is_(replies.NOOP_OK)
        assert c.read().is_(replies.BYE)
        assert c.closed()


@pytest.mark.parametrize("how", ["garbage", "tls1.1", "hangup"])
def test_failed_starttls_handshake_frees_the_session(relay, how):
    import socket
    import ssl
    import warnings
    ip = "127.0.0.60"
    for _ in range(3):  # more failures than connections_per_ip allows at once
        c = connect(relay, source=ip)
        assert c.banner.code == 220
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        if how == "garbage":
            c.send(b"this is not a ClientHello\r\n" * 20)
        elif how == "tls1.1":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            with pytest.raises((ssl.SSLError, ConnectionError)):
                ctx.wrap_socket(c.sock)
        c.close()
        wait_sessions_closed(relay)
    with connect(relay, source=ip) as c:
        assert c.banner.code == 220
    assert relay.wait_event("tls_failed", count=3 if how != "hangup" else 1, client=ip) or how == "hangup"


def test_silent_client_after_starttls_is_dropped_at_idle_timeout(slow_relay):
    c = connect(slow_relay, timeout=10)
    try:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        t0 = time.monotonic()
        assert c.closed()  # never sends a ClientHello; the relay gives up on it
        assert time.monotonic() - t0 < 5
    finally:
        c.close()
    wait_sessions_closed(slow_relay)
