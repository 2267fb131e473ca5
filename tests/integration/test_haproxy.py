"""The relay behind Debian's HAProxy (issue 15): TCP mode, send-proxy-v2 on 25/465/587 and
send-proxy (v1) on 2525, each frontend on its own loopback port in front of a PROXY listener,
the 220/QUIT/221 health check with check-send-proxy (check-ssl on 465). Clients connect from
127.0.0.55/56; the relay must see them, not HAProxy at 127.0.0.1."""
from __future__ import annotations

import time

import pytest

from relay import replies
from tests.conftest import PASSWORD, USER
from tests.support import tools
from tests.support.haproxy import Frontend, HAProxy
from tests.support.raw_smtp import RawSMTP, free_port, message_fields, start_relay
from tests.support.relay_instance import wait_until

pytestmark = tools.needs("haproxy", reason="Debian package haproxy; CI installs it")

CLIENT, NEIGHBOUR = "127.0.0.55", "127.0.0.56"
HAPROXY_IP = "127.0.0.1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("haproxy")
    behind = {"proxy_protocol": True, "trusted_proxies": [f"{HAPROXY_IP}/32"]}
    relay = start_relay(tmp / "relay", config={
        "listeners": [{"address": "127.0.0.1", "port": 0, "tls": tls, **behind}
                      for tls in ("starttls", "implicit", "starttls", "starttls")],
        "limits": {"auth_failures": 3, "auth_failures_per_network": 3, "auth_failure_delay": 0.05,
                   "connections_per_ip": 5},
    })
    try:
        smtp, smtps, submission, alt = relay.listener_ports
        fronts = {
            25: Frontend("smtp", free_port(), smtp),
            465: Frontend("smtps", free_port(), smtps, tls=True),
            587: Frontend("submission", free_port(), submission),
            2525: Frontend("alt", free_port(), alt, proxy="v1"),
        }
        ha = HAProxy(tmp / "haproxy", list(fronts.values()))
        checked = ha.check()
        assert checked.returncode == 0, checked.stdout + checked.stderr
        ha.start()
        try:
            yield relay, ha, fronts
        finally:
            ha.stop()
    finally:
        relay.stop()


def through(fronts, port: int, source: str = CLIENT) -> RawSMTP:
    f = fronts[port]
    return RawSMTP(f.listen_port, implicit=f.tls, source=source)


@pytest.mark.parametrize("port", [25, 465, 587, 2525])
def test_real_client_in_received_and_log_on_every_port(stack, port):
    relay, _ha, fronts = stack
    with through(fronts, port) as c:
        assert c.banner.code == 220
        c.secure().login()
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        assert c.cmd("RCPT TO:<someone@example.net>").code == 250
        assert c.cmd("DATA").code == 354
        r = c.cmd(f"Subject: via haproxy {port}\r\n\r\nhello\r\n.")
        assert r.code == 250, r
        qid = r.lines[-1].rsplit(" ", 1)[-1]
    body = wait_until(lambda: relay.body(qid), what="stored body")
    received = next(f for f in message_fields(body) if f.lower().startswith(b"received:"))
    assert f"([{CLIENT}])".encode() in received
    listener = str(fronts[port].backend_port)
    wait_until(lambda: relay.events_named("connect", client=CLIENT, peer=HAPROXY_IP, listener=listener))
    wait_until(lambda: relay.events_named("queued", qid=qid, client=CLIENT), what="queued line")


def test_lockout_hits_the_real_client_not_everyone_behind_haproxy(stack):
    relay, _ha, fronts = stack
    for _ in range(3):
        with through(fronts, 587, source=CLIENT) as c:
            assert c.secure().auth_plain(USER, "not the password").is_(replies.AUTH_INVALID)
    with through(fronts, 465, source=CLIENT) as c:
        assert c.secure().auth_plain(USER, PASSWORD).is_(replies.AUTH_LOCKED)
    with through(fronts, 587, source=NEIGHBOUR) as c:  # same HAProxy, another client
        c.secure().login()
    wait_until(lambda: relay.events_named("auth_lockout", client=CLIENT, network=f"{CLIENT}/32"))
    wait_until(lambda: relay.events_named("auth", client=CLIENT, result="failure"))
    assert not relay.events_named("auth", client=HAPROXY_IP)
    assert not relay.events_named("auth_lockout", client=NEIGHBOUR)


def test_health_checks_keep_servers_up_without_refusals(stack):
    relay, ha, _fronts = stack
    # inter 500ms: a few seconds is several checks per port (v2 LOCAL on three, v1 on 2525).
    time.sleep(3)
    assert ha.server_states() == {"be_smtp": "UP", "be_smtps": "UP", "be_submission": "UP", "be_alt": "UP"}
    assert not relay.events_named("proxy_refused")
    assert not relay.events_named("tls_failed")
    assert not [line for line in relay.raw_log if "Traceback" in line]
    # LOCAL checks are not logged at info: the log is not a stream of the load balancer's checks.
    # (v1 checks name HAProxy's own check connection as the client, so those are plain sessions.)
    local_like = [e for e in relay.events_named("connect", client=HAPROXY_IP)
                  if e.get("listener") != str(_fronts[2525].backend_port)]
    assert local_like == []
