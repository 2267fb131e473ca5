"""Operating the delivery engine: `relay queue ...`, graceful SIGTERM mid-delivery, and SIGKILL recovery.

The real relay process, a loopback DNS server and recording MX sinks; the queue is inspected
through the CLI (as an operator would) or read directly from the SQLite file after the process
is gone.
"""
from __future__ import annotations

import email
import email.policy
import json
import re
import signal
import smtplib
import time

import pytest

from tests.conftest import PASSWORD, USER
from tests.support.relay_instance import wait_until
from tests.support.mx_sink import MXSink, SlowSink

SENDER_DOMAIN = USER.rpartition("@")[2]


def start_relay(make_relay, dns_server, sink, *, server=None, **delivery):
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set(SENDER_DOMAIN, "MX", ["10 mx.example.net."])
    config = {"delivery": delivery}
    if server:
        config["server"] = server
    relay = make_relay(start=False, dns=dns_server.address, mx_port=sink.port, config=config)
    relay.add_user(USER, PASSWORD)
    return relay.start()


def submit_many(relay, subjects, rcpt="bob@example.net") -> dict[str, str]:
    """Send each subject as one transaction of a single session; {subject: queue id}."""
    qids = {}
    s = relay.smtp()
    try:
        s.login(USER, PASSWORD)
        for subject in subjects:
            s.mail(USER)
            code, msg = s.rcpt(rcpt)
            assert code == 250, msg
            code, msg = s.data(f"From: {USER}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
            assert code == 250, msg
            qids[subject] = msg.decode().rsplit(" ", 1)[-1]
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            pass
    return qids


def subject_of(raw: bytes) -> str:
    return email.message_from_bytes(raw, policy=email.policy.default)["Subject"]


def is_bounce(m) -> bool:
    return m.mail_from in ("", "<>")


# ------------------------------------------------------------------ relay queue ...

def test_queue_list_show_retry_delete(make_relay, dns_server):
    with MXSink() as sink:
        relay = start_relay(make_relay, dns_server, sink, retry_schedule=[3600])
        cp = relay.cli("queue", "list")
        assert cp.returncode == 0 and cp.stdout.strip() == "queue is empty"

        sink.rcpt_replies["bob@example.net"] = "451 4.2.0 Mailbox busy, try later"
        qids = submit_many(relay, ["keep", "drop", "bounce-me"])
        for qid in qids.values():
            assert relay.wait_event("delivery", qid=qid, result="deferred")

        # list: a table, and the same facts as JSON.
        cp = relay.cli("queue", "list", check=True)
        lines = cp.stdout.splitlines()
        assert re.split(r"\s{2,}", lines[0]) == ["ID", "AGE", "SENDER", "RECIPIENTS", "STATE", "NEXT ATTEMPT",
                                                 "LAST ERROR"]
        assert len(lines) == 4
        for qid in qids.values():
            [line] = [ln for ln in lines if ln.startswith(qid)]
            assert "deferred" in line and USER in line and "451 4.2.0 Mailbox busy" in line
        rows = json.loads(relay.cli("queue", "list", "--json", check=True).stdout)
        assert {r["id"] for r in rows} == set(qids.values())
        for r in rows:
            assert r["state"] == "deferred" and r["recipients"] == ["bob@example.net"]
            assert r["sender"] == USER and r["last_error"] == "451 4.2.0 Mailbox busy, try later"
            assert r["next_attempt_at"] > time.time() + 3000

        # show: recipients, history and headers.
        keep = qids["keep"]
        cp = relay.cli("queue", "show", keep, check=True)
        assert f"id:        {keep}" in cp.stdout and "Subject: keep" in cp.stdout
        assert re.search(r"bob@example\.net\s+deferred\s+1\s", cp.stdout)
        shown = json.loads(relay.cli("queue", "show", keep, "--json", check=True).stdout)
        assert shown["id"] == keep and shown["sender"] == USER and shown["state"] == "deferred"
        [r] = shown["recipients"]
        assert (r["rcpt"], r["state"], r["attempts"], r["in_flight"]) == ("bob@example.net", "deferred", 1, False)
        assert r["last_error"] == "451 4.2.0 Mailbox busy, try later" and r["remote_mta"] == "mx.example.net"
        assert [h["event"] for h in shown["history"]] == ["queued", "deferred"]

        # Errors: one line on stderr, exit 1 for an unknown id, 2 for a usage error.
        cp = relay.cli("queue", "show", "NOSUCHID")
        assert cp.returncode == 1 and "NOSUCHID" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1
        assert relay.cli("queue", "retry", "NOSUCHID").returncode == 1
        cp = relay.cli("queue", "retry")
        assert cp.returncode == 2 and "--all" in cp.stderr

        # delete without a bounce: out of the queue, nobody told; the history says so until a
        # second delete (or the retention) removes it.
        cp = relay.cli("queue", "delete", qids["drop"], check=True)
        assert f"deleted {qids['drop']}" in cp.stdout
        assert qids["drop"] not in {r["id"] for r in json.loads(relay.cli("queue", "list", "--json").stdout)}
        assert json.loads(relay.cli("queue", "show", qids["drop"], "--json", check=True).stdout)["state"] == "deleted"
        relay.cli("queue", "delete", qids["drop"], check=True)
        assert relay.cli("queue", "show", qids["drop"]).returncode == 1

        # delete --bounce: gone, and the sender gets a failure report (delivered by the running relay).
        sink.rcpt_replies.pop("bob@example.net")
        cp = relay.cli("queue", "delete", qids["bounce-me"], "--bounce", "--json", check=True)
        assert json.loads(cp.stdout) == {"deleted": qids["bounce-me"], "bounced": True}
        assert sink.wait_for(1, timeout=10)
        [dsn] = sink.messages
        assert is_bounce(dsn) and dsn.rcpt_tos == [USER]
        report = email.message_from_bytes(dsn.data, policy=email.policy.default)
        blocks = list(report.iter_parts())[1].get_payload()
        assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.net" and blocks[1]["Action"] == "failed"
        assert "deleted from the queue by the administrator" in blocks[1]["Diagnostic-Code"]

        # retry ID: the running relay (another process) notices within its poll interval.
        cp = relay.cli("queue", "retry", keep, "--json", check=True)
        assert json.loads(cp.stdout) == {"due_now": 1}
        assert sink.wait_for(2, timeout=10)
        assert subject_of(sink.messages[1].data) == "keep"
        assert relay.wait_event("delivery", qid=keep, result="delivered")
        wait_until(lambda: relay.cli("queue", "list").stdout.startswith("queue is empty\n"), what="an empty queue")
        assert json.loads(relay.cli("queue", "retry", "--all", "--json", check=True).stdout) == {"due_now": 0}
        assert len(sink.messages) == 2


def test_cli_use_while_running_keeps_the_daemons_commits_durable(make_relay, dns_server):
    # A CLI process opening and closing the database must not take the running daemon's WAL
    # with it: what the daemon commits afterwards has to survive a crash.
    with MXSink() as sink:
        sink.rcpt_replies["bob@example.net"] = "451 4.2.0 later"
        relay = start_relay(make_relay, dns_server, sink, retry_schedule=[3600])
        relay.cli("queue", "list", check=True)
        qids = submit_many(relay, ["after-cli"])
        assert relay.wait_event("delivery", qid=qids["after-cli"], result="deferred")
        assert [r["id"] for r in json.loads(relay.cli("queue", "list", "--json", check=True).stdout)] == \
            [qids["after-cli"]]
        relay.kill()
        with relay.db() as conn:
            rows = [dict(r) for r in conn.execute("SELECT msg_id, state, attempts FROM recipients")]
        assert rows == [{"msg_id": qids["after-cli"], "state": "deferred", "attempts": 1}]


# ------------------------------------------------------------------ graceful stop

def test_sigterm_lets_a_delivery_in_flight_finish(make_relay, dns_server):
    with SlowSink(data_delay=1.0) as sink:
        relay = start_relay(make_relay, dns_server, sink, server={"shutdown_grace": 5})
        [qid] = submit_many(relay, ["finishing"]).values()
        assert sink.wait_for(1)  # the sink has the message and holds back its 250 for a second
        t0 = time.monotonic()
        relay.signal(signal.SIGTERM)
        assert relay.proc.wait(15) == 0
        assert time.monotonic() - t0 < 5
        assert relay.wait_event("delivery", qid=qid, result="delivered")
        assert relay.queued() == []  # settled before exit: nothing left to deliver twice

        relay.start()
        time.sleep(1.0)
        assert len(sink.messages) == 1


def test_sigterm_releases_stalled_deliveries_and_loses_nothing(make_relay, dns_server):
    with MXSink() as sink:
        sink.mode = "stall_data"  # the MX never answers the final dot
        relay = start_relay(make_relay, dns_server, sink, server={"shutdown_grace": 2},
                            max_connections_per_destination=2, command_timeout=60)
        qids = submit_many(relay, [f"stalled-{i}" for i in range(4)])
        wait_until(lambda: sink.connections >= 2, what="two stalled deliveries")
        t0 = time.monotonic()
        relay.signal(signal.SIGTERM)
        assert relay.proc.wait(20) == 0
        assert time.monotonic() - t0 < 2 + 3  # the grace period, not the 60 s command timeout
        with relay.db() as conn:
            rows = [dict(r) for r in conn.execute("SELECT msg_id, state, attempts, lease_token FROM recipients")]
        assert sorted(r["msg_id"] for r in rows) == sorted(qids.values())
        # Leases given back and the interrupted attempts not counted against the message.
        assert all(r["lease_token"] is None and r["state"] == "pending" and r["attempts"] == 0 for r in rows), rows

        sink.mode = "accept"
        relay.start()
        assert sink.wait_for(4, timeout=15)
        assert sorted(subject_of(m.data) for m in sink.messages) == sorted(qids)
        wait_until(lambda: not relay.queued(), what="an empty queue")


# ------------------------------------------------------------------ crash

@pytest.mark.slow
def test_sigkill_mid_delivery_loses_nothing_and_duplicates_only_what_was_in_flight(make_relay, dns_server):
    with SlowSink(data_delay=0.1) as sink:
        relay = start_relay(make_relay, dns_server, sink, max_connections_per_destination=2)
        subjects = [f"crash-{i:02d}" for i in range(30)]
        qids = submit_many(relay, subjects)
        assert len(qids) == 30
        wait_until(lambda: len(sink.messages) >= 6, what="deliveries under way")
        relay.kill()  # SIGKILL: no cleanup at all
        at_kill = {subject_of(m.data) for m in sink.messages}
        assert 0 < len(at_kill) < 30, "the kill must land mid-delivery"

        with relay.db() as conn:
            leased = {r["msg_id"] for r in conn.execute(
                "SELECT msg_id FROM recipients WHERE lease_token IS NOT NULL")}
            queued = {r["msg_id"] for r in conn.execute("SELECT msg_id FROM recipients")}
        by_qid = {q: s for s, q in qids.items()}
        in_flight = {by_qid[q] for q in leased}
        settled = {s for s, q in qids.items() if q not in queued}
        assert settled <= at_kill  # what the relay recorded as delivered, the sink has

        relay.start()
        assert relay.wait_event("queue_recovered") or not leased
        wait_until(lambda: {subject_of(m.data) for m in sink.messages} >= set(subjects), timeout=30,
                   what="every accepted message at the sink")
        wait_until(lambda: not relay.queued(), what="an empty queue")
        time.sleep(0.5)

        counts: dict[str, int] = {}
        for m in sink.messages:
            counts[subject_of(m.data)] = counts.get(subject_of(m.data), 0) + 1
        assert set(counts) == set(subjects)
        twice = {s for s, n in counts.items() if n > 1}
        assert all(n <= 2 for n in counts.values()), counts
        # A duplicate is only ever a message the sink had taken but whose 250 the relay never saw.
        assert twice <= in_flight & at_kill, (twice, in_flight)
        # Per connection (2): at most one message awaiting its 250 and one awaiting its settle commit.
        assert len(twice) <= 4, twice
        assert not (twice & settled)
        assert not any(is_bounce(m) for m in sink.messages)
