"""server.event_loop: uvloop by default, asyncio's on request; sessions behave the same on both,
implicit TLS included (uvloop reads the ClientHello before the session's first step: it must
still reach the handshake), and a bad value is one line from check-config."""
from __future__ import annotations

import socket

import pytest

from tests.support.relay_instance import RelayInstance, client_tls_context

USER, PASSWORD = "app@loop.example", "correct horse battery"


def submit(relay: RelayInstance, implicit: bool) -> None:
    s = relay.smtp(implicit=implicit)
    try:
        s.login(USER, PASSWORD)
        s.sendmail(USER, ["someone@elsewhere.test"], f"From: {USER}\r\nSubject: loop\r\n\r\nhello\r\n".encode())
    finally:
        s.quit()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sessions_run_on_the_configured_loop(tmp_path, loop):
    relay = RelayInstance(tmp_path / "relay", config={"server": {"event_loop": loop},
                                                      "delivery": {"mode": "smarthost", "smarthost": {
                                                          "host": "127.0.0.1", "port": 9, "tls": "none"}}})
    relay.cli("domain", "add", "loop.example", "--no-dkim", check=True)
    relay.add_user(USER, PASSWORD)
    relay.start()
    try:
        ready = [e for e in relay.events if e.get("event") == "ready"]
        assert ready and ready[0]["event_loop"] == loop, ready
        submit(relay, implicit=False)
        submit(relay, implicit=True)
        # A client that sends its ClientHello at once and then waits still gets its ServerHello.
        with socket.create_connection(("127.0.0.1", relay.ports["implicit"]), timeout=10) as raw:
            with client_tls_context().wrap_socket(raw) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                assert tls.recv(4096).startswith(b"220 ")
        queued = [e for e in relay.events if e.get("event") == "queued"]
        assert len(queued) == 2, queued
    finally:
        relay.stop()


def test_bad_event_loop_is_one_line(tmp_path):
    relay = RelayInstance(tmp_path / "relay", config={"server": {"event_loop": "trio"}})
    cp = relay.cli("check-config")
    assert cp.returncode != 0
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and "server.event_loop" in lines[0] and "'trio'" in lines[0], cp.stderr
