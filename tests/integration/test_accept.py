"""Connections counted at accept, before TLS: silent implicit-TLS floods, the handshake cap and
deadline, refusal ports 993/995, and running out of file descriptors (issue 12, part 1)."""
from __future__ import annotations

import contextlib
import socket
import ssl

import pytest

from relay import replies
from tests.support.raw_smtp import RawSMTP, connect, metric, start_relay
from tests.support.relay_instance import client_tls_context, wait_until


def silent(port: int, source: str) -> socket.socket:
    """A TCP connection that never sends a byte (no ClientHello, no EHLO)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def tls_handshake(port: int, source: str) -> ssl.SSLSocket:
    return client_tls_context().wrap_socket(silent(port, source))


@pytest.fixture
def relay(tmp_path):
    inst = start_relay(tmp_path, config={
        "limits": {"connections_per_ip": 5, "connections": 60, "tls_handshakes": 8, "tls_handshake_timeout": 2},
        "refusal": {"pop3s_port": 0, "imaps_port": 0}})
    yield inst
    inst.stop()


def test_silent_implicit_tls_flood_is_capped_per_ip_at_accept(relay):
    flooder, other = "127.0.0.61", "127.0.0.62"
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(silent(relay.ports["implicit"], flooder)) for _ in range(40)]
        # Counted at accept, not after a handshake that never comes: 5 held, 35 refused.
        wait_until(lambda: metric(relay, "relay_connections_refused_total", reason="per_ip") >= 35,
                   what="35 per-IP refusals")
        assert metric(relay, "relay_connections_refused_total", reason="per_ip") == 35
        assert metric(relay, "relay_sessions_active") == 5
        # Another client is served on both ports meanwhile.
        with connect(relay, source=other) as c:
            assert c.secure().cmd("NOOP").code == 250
        with connect(relay, implicit=True, source=other) as c:
            assert c.banner.code == 220 and c.ehlo().code == 250
        # The handshake deadline frees the flooder's slots, with one log line each.
        wait_until(lambda: metric(relay, "relay_sessions_active") == 0, timeout=20, what="silent sessions dropped")
        assert len(relay.events_named("tls_failed", client=flooder, error="deadline")) == 5
        assert len(held) == 40
    # 35 refusals, one log line (rate-limited per client and reason): the flood does not bury the log.
    assert len(relay.events_named("connection_refused", client=flooder, reason="per_ip")) == 1
    # No traceback reached the log.
    assert not [line for line in relay.raw_log if "Traceback" in line]


def test_handshake_cap_refuses_beyond_it_and_frees_at_the_deadline(relay):
    sources = [f"127.0.0.{70 + i}" for i in range(8)]
    with contextlib.ExitStack() as stack:
        for ip in sources:  # one per address: the per-IP cap is not what refuses here
            stack.enter_context(silent(relay.ports["implicit"], ip))
        wait_until(lambda: metric(relay, "relay_tls_handshakes_in_progress") == 8, what="8 handshakes in progress")
        # A ninth implicit-TLS client is closed without a handshake; STARTTLS gets 454 4.7.0.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_handshake(relay.ports["implicit"], "127.0.0.80").close()
        with connect(relay, source="127.0.0.81") as c:
            c.ehlo()
            assert c.cmd("STARTTLS").is_(replies.TLS_BUSY)
            assert c.cmd("NOOP").code == 250  # the session itself goes on in plain text
        assert metric(relay, "relay_connections_refused_total", reason="tls_handshakes") == 2
        assert relay.events_named("tls_refused", reason="handshakes_in_progress")
        # Once the silent ones pass the deadline, handshakes are possible again.
        wait_until(lambda: metric(relay, "relay_tls_handshakes_in_progress") == 0, timeout=20,
                   what="handshakes given up")
        with connect(relay, implicit=True, source="127.0.0.80") as c:
            assert c.banner.code == 220


def test_refusal_tls_ports_count_at_accept(tmp_path):
    inst = start_relay(tmp_path, config={
        "limits": {"connections_per_ip": 3, "tls_handshake_timeout": 2},
        "refusal": {"pop3_port": 0, "imap_port": 0, "pop3s_port": 0, "imaps_port": _free_port()}})
    try:
        port = inst.ports["imaps"]
        with contextlib.ExitStack() as stack:
            for _ in range(10):
                stack.enter_context(silent(port, "127.0.0.91"))
            wait_until(lambda: metric(inst, "relay_connections_refused_total", reason="per_ip") >= 7,
                       what="7 refusals at accept")
            wait_until(lambda: metric(inst, "relay_tls_handshakes_in_progress") == 3, what="3 handshakes held")
            # Another address still gets the IMAP refusal text over TLS.
            with tls_handshake(port, "127.0.0.92") as s:
                assert s.recv(4096).startswith(b"* BYE This server only sends mail")
            wait_until(lambda: metric(inst, "relay_tls_handshakes_in_progress") == 0, timeout=20,
                       what="silent handshakes dropped at the deadline")
        # The slots came back: the flooding address is served again.
        with tls_handshake(port, "127.0.0.91") as s:
            assert s.recv(4096).startswith(b"* BYE")
    finally:
        inst.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_out_of_descriptors_pauses_accepting_and_logs_once(make_relay):
    from tests.conftest import PASSWORD, USER
    inst = make_relay(start=False, nofile=128, config={
        "limits": {"connections_per_ip": 1000, "connections": 1000},
        "delivery": {"separate_process": False}})
    inst.add_user(USER, PASSWORD)
    inst.start()
    with contextlib.ExitStack() as stack:
        held = []
        # Bounded: more connections than the relay has descriptors left.
        for i in range(300):
            try:
                held.append(stack.enter_context(silent(inst.port, f"127.0.1.{1 + i % 200}")))
            except OSError:
                break
        wait_until(lambda: inst.events_named("accept_paused"), what="accept_paused logged")
        # While the descriptors stay used up, clients wait in the kernel's backlog unanswered
        # (the metrics endpoint cannot accept either); each try outlasts a pause, so the relay
        # retries accept() several times meanwhile.
        for _ in range(3):
            with contextlib.suppress(OSError, EOFError), RawSMTP(inst.port, source="127.0.0.3", timeout=1.5) as c:
                pytest.fail(f"answered while out of descriptors: {c.banner}")
    assert len(inst.events_named("accept_paused")) == 1, "one line per interval, not one per attempt"
    assert inst.events_named("accept_paused")[0]["error"] == "EMFILE"
    # Descriptors back: a client is served again.
    def served() -> bool:
        try:
            with RawSMTP(inst.port, source="127.0.0.2") as c:
                return c.banner.code == 220 and c.ehlo().code == 250
        except (OSError, EOFError):
            return False
    wait_until(served, timeout=20, what="a client served after the flood")
    assert metric(inst, "relay_accept_pauses_total", error="EMFILE") >= 2
    assert not [line for line in inst.raw_log if "out of system resource" in line or "Traceback" in line]
