"""Large messages with bounded memory: DATA past limits.data_in_memory is spooled to a file as it
arrives, signed and sent from it in chunks, and the file goes once the message is finished; the
bytes of DATA in flight across sessions are capped (451 4.3.1, then it works again); a spool file
no row refers to (a crash) is removed at start."""
from __future__ import annotations

import hashlib
import os
import re
import smtplib
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
import pytest

from tests.conftest import PASSWORD, USER
from tests.integration.test_dkim import DOMAIN, dnsfunc_for, publish
from tests.support.relay_instance import wait_until


def spool_dir(relay) -> Path:
    return Path(relay.config["storage"]["path"] + ".spool")


def big_body(n: int, size: int) -> bytes:
    """About `size` bytes of lines that test the edges: dots at line starts (stuffing), trailing
    whitespace and runs of WSP (relaxed canonicalization), empty lines at the end."""
    # Long lines: the sink (aiosmtpd) reads DATA a line at a time.
    text = (f"message {n} " + "lorem ipsum dolor " * 50).encode()
    unit = (text + b"\r\n.starts with a dot " + text + b"\r\n..two dots\r\ntrailing space " + text
            + b" \r\ntab\tand  runs   of spaces\r\n\r\n")
    return unit * (size // len(unit)) + b".\r\nlast words  \r\n\r\n\r\n"


def message(n: int, size: int) -> tuple[bytes, bytes]:
    body = big_body(n, size)
    return (f"From: {USER}\r\nTo: bob@example.net\r\nSubject: big {n}\r\n\r\n".encode() + body), body


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def start(make_relay, dns_server, mx_sink, **limits):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port,
                       config={"limits": limits, "domains": {"public_addresses": ["192.0.2.10"]},
                               "delivery": {"max_connections_per_destination": 10}})
    relay.add_user(USER, PASSWORD)
    return relay


@pytest.mark.timeout(300)
def test_fifty_concurrent_large_messages_arrive_intact_signed_and_leave_no_space_behind(
        make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink, connections_per_ip=100)
    publish(dns_server, relay)
    relay.start()
    # 5 MB each keeps the suite's time down (the benchmark runs 50 x 10 MB and measures memory).
    n, size = 50, 5_000_000
    sent = {}

    def one(i: int) -> str:
        data, body = message(i, size)
        qid = relay.submit(USER, PASSWORD, USER, ["bob@example.net"], data)
        sent[f"big {i}"] = hashlib.sha256(body).hexdigest()
        return qid

    with ThreadPoolExecutor(n) as pool:
        qids = list(pool.map(one, range(n)))
    assert len(set(qids)) == n
    assert len(relay.events_named("queued", spooled=True)) == n
    assert mx_sink.wait_for(n, timeout=300), f"{len(mx_sink.messages)} of {n} delivered"
    got = {}
    for m in mx_sink.messages:
        subject = re.search(rb"^Subject: (.*)\r$", m.data, re.M).group(1).decode()
        got[subject] = hashlib.sha256(body_of(m.data)).hexdigest()
    assert got == sent
    # Signed from the file, and the signature holds at the receiver (over the streamed body).
    lookup = dnsfunc_for(dns_server)
    for m in mx_sink.messages[:2]:
        assert m.data.startswith(b"DKIM-Signature: ")
        assert dkim.verify(m.data, dnsfunc=lookup)
    # Every body file went when its message finished; the database never held the bodies.
    wait_until(lambda: not os.listdir(spool_dir(relay)), timeout=30, what="an empty spool directory")
    with relay.db() as conn:
        assert conn.execute("SELECT COUNT(*) FROM bodies WHERE path IS NOT NULL").fetchone()[0] == 0
        assert max(len(r[0]) for r in conn.execute("SELECT data FROM bodies")) < 4096  # header blocks only
    db = relay.config["storage"]["path"]
    assert os.path.getsize(db) + os.path.getsize(db + "-wal") < 20_000_000  # 250 MB went through


def test_small_messages_stay_in_the_database_and_large_ones_in_files(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink, data_in_memory=4096)
    relay.start()
    small = relay.submit(USER, PASSWORD, USER, ["bob@example.net"], message(1, 1000)[0])
    large = relay.submit(USER, PASSWORD, USER, ["bob@example.net"], message(2, 50_000)[0])
    assert relay.events_named("queued", qid=small)[0].get("spooled") is None
    assert relay.events_named("queued", qid=large)[0].get("spooled") is True
    assert mx_sink.wait_for(2)
    bodies = {re.search(rb"^Subject: (.*)\r$", m.data, re.M).group(1): body_of(m.data) for m in mx_sink.messages}
    assert bodies == {b"big 1": message(1, 1000)[1], b"big 2": message(2, 50_000)[1]}
    # Our Received field and a Message-ID were added to the spooled one's header block too.
    spooled = next(m.data for m in mx_sink.messages if b"Subject: big 2" in m.data)
    assert f"with ESMTPSA id {large}".encode() in spooled and b"\r\nMessage-ID: <" in spooled


def test_bcc_is_removed_from_a_spooled_message(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink, data_in_memory=4096)
    relay.start()
    data = (f"From: {USER}\r\nTo: bob@example.net\r\nBcc: secret@example.net\r\nSubject: bcc\r\n\r\n".encode()
            + big_body(0, 100_000))
    relay.submit(USER, PASSWORD, USER, ["bob@example.net"], data)
    assert mx_sink.wait_for(1)
    assert b"secret@example.net" not in mx_sink.messages[0].data
    assert body_of(mx_sink.messages[0].data) == big_body(0, 100_000)


def _open_transaction(relay) -> smtplib.SMTP:
    s = relay.smtp()
    s.login(USER, PASSWORD)
    assert s.mail(USER)[0] == 250
    assert s.rcpt("bob@example.net")[0] == 250
    return s


def in_flight(relay) -> float:
    m = re.search(r"^relay_data_in_flight_bytes (\S+)$", relay.metrics_text(), re.M)
    return float(m.group(1)) if m else 0.0


def test_data_in_flight_cap_answers_451_and_then_recovers(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink, max_data_in_flight=1_000_000)
    relay.start()
    a = _open_transaction(relay)
    a.putcmd("data")
    assert a.getreply()[0] == 354
    chunk = big_body(0, 1_500_000)
    a.send(b"Subject: a\r\n\r\n" + chunk.replace(b"\r\n.", b"\r\n.."))  # dot-stuffed; not its end yet
    wait_until(lambda: in_flight(relay) > 1_000_000, timeout=30, what="A's bytes counted in flight")
    b = _open_transaction(relay)
    code, text = b.docmd("DATA")
    assert (code, text[:5]) == (451, b"4.3.1") and b"try again" in text
    # A crossed the cap itself: its message is refused too, after reading it to the end.
    a.send(b"end\r\n.\r\n")
    code, text = a.getreply()
    assert (code, text[:5]) == (451, b"4.3.1")
    wait_until(lambda: in_flight(relay) == 0, timeout=10, what="nothing in flight")
    assert not [p for p in spool_dir(relay).glob("*")] if spool_dir(relay).exists() else True
    # Both try again: the transaction B kept goes through, and A's next message too.
    assert b.data(message(1, 200_000)[0])[0] == 250
    assert a.mail(USER)[0] == 250 and a.rcpt("bob@example.net")[0] == 250
    assert a.data(message(2, 1000)[0])[0] == 250
    a.quit()
    b.quit()
    assert mx_sink.wait_for(2)


def test_declared_size_beyond_the_cap_is_refused_before_354(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink, max_data_in_flight=1_000_000)
    relay.start()
    s = relay.smtp()
    s.login(USER, PASSWORD)
    assert s.mail(USER, ["SIZE=2000000"])[0] == 250
    assert s.rcpt("bob@example.net")[0] == 250
    code, text = s.docmd("DATA")
    assert (code, text[:5]) == (451, b"4.3.1")
    s.quit()


def test_orphan_spool_files_are_removed_at_start_and_queued_ones_kept(make_relay, dns_server):
    # No MX answers: the large message stays queued (its file with it) across the restart.
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=1,
                       config={"limits": {"data_in_memory": 4096}})
    relay.add_user(USER, PASSWORD)
    relay.start()
    qid = relay.submit(USER, PASSWORD, USER, ["bob@example.net"], message(1, 100_000)[0])
    relay.stop()
    spool = spool_dir(relay)
    stored = qid + ".wire"  # the wire form (relay/spool.py)
    assert (spool / stored).exists()
    (spool / "0000DEAD0000000000").write_bytes(b"written, never committed")
    relay.start()
    assert relay.wait_event("spool_orphans_removed", files=1)
    assert sorted(os.listdir(spool)) == [stored]
    assert (spool / stored).stat().st_size > 90_000
    # The operator's view works from the row: headers, size.
    show = relay.cli("queue", "show", qid, check=True).stdout
    assert "Subject: big 1" in show
    # Deleting the queued message removes its file.
    relay.cli("queue", "delete", qid, check=True)
    wait_until(lambda: not (spool / stored).exists(), timeout=10, what="the deleted message's file gone")
