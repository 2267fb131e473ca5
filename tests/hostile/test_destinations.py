"""Hostile destinations (issue 11, "A fair scheduler" and "MX limits and loops"): a tarpit that
stalls at RCPT must cost only its own share, 25 MX records cost at most max_mx_addresses
connections, and mail whose MX is the relay itself fails at once instead of looping.

The real relay process, a loopback DNS server, HostileMX peers on 127.0.0.x and an MXSink for
healthy domains and bounces, all sharing one port (delivery.mx_port is one port for every MX).
"""
from __future__ import annotations

import email
import email.policy
import os

import pytest

from tests.conftest import USER
from tests.support.hostile_mx import HostileMX, free_port_on, mx_records_for
from tests.support.hostile_relay import (
    SENDER_DOMAIN, assert_left_queue, deferred_with_reason, delivered, metric, no_traceback, outcomes, point,
    queue_list, queue_show, start_relay, submit, submit_many, until,
)
from tests.support.mx_sink import MXSink


def bounces(sink: MXSink) -> list:
    return [m for m in list(sink.messages) if m.mail_from in ("", "<>")]


def dsn_fields(raw: bytes) -> dict:
    """The (single) per-recipient block of an RFC 3464 report."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    blocks = list(msg.iter_parts())[1].get_payload()
    [r] = blocks[1:]
    return {k: str(v) for k, v in r.items()}


# ---------------------------------------------------------------- a tarpit's backlog and a healthy domain


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tarpit_backlog_does_not_delay_a_healthy_domain(make_relay, dns_server):
    """2,400 messages (HOSTILE_BACKLOG) queued to an MX that never answers RCPT, then one to a
    healthy domain. The healthy one is delivered while the tarpit is still on its first waves of
    attempts (an ordering, not a stopwatch: with a global backlog cap it would wait until the
    tarpit's attempts had time out, one wave of 20 s after another), and the tarpit never sees
    more than max_connections_per_destination connections at once."""
    n = int(os.environ.get("HOSTILE_BACKLOG", "2400"))
    limit = 3
    with HostileMX(host="127.0.0.2") as tarpit, MXSink(host="127.0.0.1", port=tarpit.port) as healthy:
        tarpit.stall_at = {"RCPT"}
        point(dns_server, "tarpit.example", "127.0.0.2")
        point(dns_server, "healthy.example", "127.0.0.1")
        point(dns_server, SENDER_DOMAIN, "127.0.0.1")
        relay = start_relay(make_relay, dns_server, tarpit.port, max_connections_per_destination=limit,
                            command_timeout=20, retry_schedule=[3600])
        submit_many(relay, "bob@tarpit.example", n, "tarpit")
        until(lambda: tarpit.active >= 1, 30, "the tarpit's first connection")
        qid = submit(relay, "alice@healthy.example", "healthy")
        # Stop at whichever comes first: the healthy delivery, or a second wave of tarpit attempts.
        until(lambda: healthy.messages or tarpit.rcpt_commands() > 2 * limit, 120,
              "the healthy delivery (or the tarpit's backlog moving on without it)")
        assert [m.rcpt_tos for m in healthy.messages] == [["alice@healthy.example"]], \
            f"healthy mail still waiting after {tarpit.rcpt_commands()} tarpit attempts"
        assert tarpit.rcpt_commands() <= 2 * limit
        until(lambda: delivered(relay, qid), 10, "the healthy delivery to be settled")
        assert_left_queue(relay, qid)
        assert tarpit.max_active <= limit, f"{tarpit.max_active} concurrent connections to the tarpit"
        assert not tarpit.messages
        no_traceback(relay)


# ---------------------------------------------------------------- 25 MX records


@pytest.mark.timeout(90)
@pytest.mark.parametrize("refusal", ["greeting_421", "drop_on_connect", "banner_timeout"])
def test_25_refusing_mx_records_cost_at_most_max_mx_addresses_connections(make_relay, dns_server, refusal):
    hosts = [f"127.0.1.{i}" for i in range(1, 26)]
    port = free_port_on(hosts + ["127.0.0.1"])
    with HostileMX(host=hosts, port=port) as mxs, MXSink(host="127.0.0.1", port=port) as home:
        if refusal == "greeting_421":
            mxs.greeting = "421 4.3.2 Service not available, closing transmission channel"
        elif refusal == "drop_on_connect":
            mxs.on_connect = "drop"
        else:
            mxs.on_connect = "stall"
        names = mx_records_for(dns_server, "many.example", hosts)
        point(dns_server, SENDER_DOMAIN, "127.0.0.1")
        relay = start_relay(make_relay, dns_server, port, connect_timeout=1, retry_schedule=[3600])
        qid = submit(relay, "bob@many.example", "many-mx")
        until(lambda: deferred_with_reason(relay, qid) or mxs.connections > 5, 60, "the deferral")
        assert 1 <= mxs.connections <= 5, f"{mxs.connections} connection attempts in one delivery attempt"
        # The limit keeps the most preferred addresses (Postfix smtp_mx_address_limit).
        assert set(mxs.by_host) <= set(hosts[:5]), mxs.by_host
        until(lambda: deferred_with_reason(relay, qid), 30, "the deferral")
        assert outcomes(relay, qid) == ["deferred"]
        [r] = queue_show(relay, qid)["recipients"]
        assert r["last_error"], r
        assert not home.messages  # deferred, not bounced
        assert names[0].startswith("mx1.")
        no_traceback(relay)


# ---------------------------------------------------------------- loops


@pytest.mark.timeout(60)
def test_mx_pointing_at_the_relay_fails_with_5_4_6_and_queues_no_copy(make_relay, dns_server):
    """loop.example's MX is 127.0.0.1 and delivery.mx_port is the relay's own listener. The relay
    trusts 127.0.0.0/8 for the sender's domain, so without loop detection its own connection would
    be accepted as a trusted client and queue the message again, and again (issue 11: 51 copies)."""
    port = free_port_on(["127.0.0.1", "127.0.0.2"])
    with MXSink(host="127.0.0.2", port=port) as home:
        point(dns_server, "loop.example", "127.0.0.1")
        point(dns_server, SENDER_DOMAIN, "127.0.0.2")
        relay = start_relay(make_relay, dns_server, port, retry_schedule=[3600], config={
            "listeners": [{"address": "127.0.0.1", "port": port, "tls": "starttls"},
                          {"address": "127.0.0.1", "port": 0, "tls": "implicit"}],
            "trusted_networks": [{"network": "127.0.0.0/8", "domains": [SENDER_DOMAIN]}]})
        assert relay.port == port
        qid = submit(relay, "bob@loop.example", "looping")
        until(lambda: home.messages or len(relay.events_named("queued")) > 1, 30,
              "the bounce (or a copy queued back into the relay)")
        assert len(relay.events_named("queued")) == 1, "the relay delivered the message to itself"
        [dsn] = bounces(home)
        assert dsn.rcpt_tos == [USER]
        r = dsn_fields(dsn.data)
        assert r["Action"] == "failed" and r["Status"] == "5.4.6"
        assert "mail for loop.example loops back to myself" in r["Diagnostic-Code"]
        assert outcomes(relay, qid) == ["failed"]
        assert_left_queue(relay, qid)
        until(lambda: not queue_list(relay), 15, "an empty queue (the bounce delivered)")
        # Never connected to itself: the only SMTP connection the relay saw is our submission.
        assert metric(relay, "relay_connections_total") == 1
        assert not relay.events_named("trusted_session")
        no_traceback(relay)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["greeting", "ehlo"])
def test_remote_naming_our_hostname_is_a_loop(make_relay, dns_server, where):
    """The relay's server.hostname is relay.test (tests.support.relay_instance); an MX that greets,
    or answers EHLO, with that name is this relay behind another address (NAT, a proxy): 5.4.6."""
    with HostileMX(host="127.0.0.3", hostname="mx.mirror.example") as mirror, \
            MXSink(host="127.0.0.1", port=mirror.port) as home:
        if where == "greeting":
            mirror.hostname = "relay.test"
        else:
            mirror.ehlo_hostname = "relay.test"
        point(dns_server, "mirror.example", "127.0.0.3")
        point(dns_server, SENDER_DOMAIN, "127.0.0.1")
        relay = start_relay(make_relay, dns_server, mirror.port, retry_schedule=[3600])
        qid = submit(relay, "bob@mirror.example", "mirror")
        until(lambda: home.messages or mirror.messages or outcomes(relay, qid), 30, "an outcome")
        assert not mirror.messages
        assert not [line for _, line in mirror.log if line.upper().startswith("MAIL")], mirror.log
        until(lambda: home.messages, 15, "the bounce")
        [dsn] = bounces(home)
        r = dsn_fields(dsn.data)
        assert r["Status"] == "5.4.6" and "loops back to myself" in r["Diagnostic-Code"], r
        assert outcomes(relay, qid) == ["failed"]
        assert_left_queue(relay, qid)
        no_traceback(relay)


# ---------------------------------------------------------------- dead destination


@pytest.mark.timeout(90)
def test_dead_destination_is_suspended_then_probed_with_one_connection(make_relay, dns_server):
    """Three connections in a row are lost (dead_destination_failures = 3): the destination's other
    mail is deferred without a connection ("4.4.1 delivery temporarily suspended: <last error>")
    until the backoff ends; then one probe goes, and once it succeeds everything is delivered once."""
    with HostileMX(host="127.0.0.2") as dead, MXSink(host="127.0.0.1", port=dead.port) as home:
        dead.on_connect = "drop"
        point(dns_server, "dead.example", "127.0.0.2")
        point(dns_server, SENDER_DOMAIN, "127.0.0.1")
        relay = start_relay(make_relay, dns_server, dead.port, max_connections_per_destination=1,
                            dead_destination_failures=3, dead_destination_backoff=8, connect_timeout=2,
                            retry_schedule=[1])
        qids = [submit(relay, f"user{i}@dead.example", f"dead-{i}") for i in range(6)]
        until(lambda: all(outcomes(relay, q) for q in qids) or dead.connections > 3, 30,
              "a first outcome for every message")
        assert dead.connections == 3, f"{dead.connections} connections before the suspension"
        suspended = [q for q in qids if any("delivery temporarily suspended" in (r["last_error"] or "")
                                            for r in (queue_show(relay, q) or {"recipients": []})["recipients"])]
        assert len(suspended) >= 3, [queue_show(relay, q) for q in qids]
        assert all(queue_show(relay, q)["recipients"][0]["state"] == "deferred" for q in qids)

        dead.on_connect = "accept"  # the destination comes back; only the probe can find out
        until(lambda: all(delivered(relay, q) for q in qids), 40, "every message delivered after the probe")
        for q in qids:
            assert_left_queue(relay, q)
        until(lambda: dead.active == 0, 15, "the session to end")
        assert sorted(dead.subjects()) == sorted(f"dead-{i}" for i in range(6))
        assert dead.max_active == 1 and not home.messages
        no_traceback(relay)
