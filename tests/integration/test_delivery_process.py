"""Delivery in its own process: metrics in one scrape, restarts, dying with the parent, and the
single-process mode that `delivery.separate_process = false` keeps."""
from __future__ import annotations

import os
import re
import signal

from tests.conftest import PASSWORD, USER
from tests.support.relay_instance import wait_until


def start(make_relay, dns_server, mx_sink, **delivery):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port,
                       config={"delivery": delivery} if delivery else None)
    relay.add_user(USER, PASSWORD)
    return relay.start()


def submit(relay, subject: str) -> str:
    return relay.submit(USER, PASSWORD, USER, ["bob@example.net"], f"Subject: {subject}\r\n\r\nx\r\n".encode())


def child_pid(relay) -> int:
    kids = open(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read().split()
    assert len(kids) == 1, kids
    return int(kids[0])


def test_one_scrape_shows_both_processes(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink)
    qid = submit(relay, "metrics")
    assert relay.wait_event("delivery", qid=qid, result="delivered")
    delivered = re.compile(r'^relay_delivery_attempts_total\{mode="mx",result="delivered"\} 1\.0$', re.M)

    def scrape_with_delivery() -> str | None:
        text = relay.metrics_text()
        return text if delivered.search(text) else None

    text = wait_until(scrape_with_delivery, timeout=10,
                      what="the delivery counter (counted in the delivery process) in the scrape")
    # Counted in the parent, not doubled by the merge; each family once.
    assert re.search(r'^relay_messages_accepted_total\{kind="submission"\} 1\.0$', text, re.M)
    assert len(re.findall(r"^relay_build_info\{.*\} 1\.0$", text, re.M)) == 1
    assert len(re.findall(r"^# TYPE relay_delivery_attempts_total counter$", text, re.M)) == 1
    assert "_created" not in text


def test_a_killed_delivery_process_is_restarted_and_mail_still_flows(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink)
    first = child_pid(relay)
    os.kill(first, signal.SIGKILL)
    assert relay.wait_event("delivery_process_exited", code=-signal.SIGKILL)
    assert relay.wait_event("delivery_process_started", count=2)
    qid = submit(relay, "after restart")
    assert relay.wait_event("delivery", qid=qid, result="delivered")
    assert mx_sink.wait_for(1)
    assert child_pid(relay) != first


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting for a reaper


def test_the_delivery_process_dies_with_the_parent(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink)
    kid = child_pid(relay)
    relay.kill()  # SIGKILL: the parent gets no chance to stop the child itself
    wait_until(lambda: not alive(kid), timeout=10, what=f"delivery process {kid} to die with its parent")


def test_sigterm_stops_both_cleanly(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink)
    relay.signal(signal.SIGTERM)
    assert relay.proc.wait(30) == 0
    assert relay.wait_event("delivery_stopped"), "\n".join(relay.raw_log[-10:])
    assert relay.wait_event("stopped")
    assert not relay.events_named("delivery_process_exited")


def test_single_process_mode_still_delivers(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink, separate_process=False)
    assert not open(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read().split()
    qid = submit(relay, "inline")
    assert relay.wait_event("delivery", qid=qid, result="delivered")
    assert not relay.events_named("delivery_process_started")


def test_a_restart_refuses_a_database_other_than_the_parents(make_relay, dns_server, mx_sink):
    """storage.path edited in the file without a restart: a restarted delivery process would read
    another queue than the one the sessions fill. The parent refuses it and says why."""
    relay = start(make_relay, dns_server, mx_sink)
    text = relay.config_path.read_text()
    relay.config_path.write_text(text.replace(relay.config["storage"]["path"], str(relay.dir / "other.db")))
    os.kill(child_pid(relay), signal.SIGKILL)
    assert relay.wait_event("delivery_process_restart_failed")
    assert "storage.path" in relay.events_named("delivery_process_restart_failed")[0]["error"]


def test_a_message_that_cannot_be_signed_is_deferred_not_sent_unsigned(make_relay, dns_server, mx_sink):
    import sqlite3
    relay = start(make_relay, dns_server, mx_sink)
    with sqlite3.connect(relay.config["storage"]["path"]) as db:
        db.execute("UPDATE dkim_keys SET private_key = 'not a key'")
    qid = submit(relay, "unsignable")
    assert relay.wait_event("dkim_sign_failed", qid=qid)
    assert relay.wait_event("delivery", qid=qid, result="deferred")
    assert "DKIM signing failed" in relay.events_named("delivery", qid=qid)[0]["reply"]
    assert not mx_sink.messages
