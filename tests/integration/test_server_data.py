"""DATA over real sockets: size and line checks, SMTP smuggling, header work, durable acceptance, store faults."""
from __future__ import annotations

import re
import sqlite3

import pytest

from relay import headers, replies
from tests.conftest import USER
from tests.support.raw_smtp import RawSMTP, authed, message_fields, start_relay

SIZE = 100_000
MAX_RECEIVED = 5


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    inst = start_relay(tmp_path_factory.mktemp("data"),
                       config={"limits": {"message_size": SIZE, "max_received_headers": MAX_RECEIVED}})
    yield inst
    inst.stop()


def begin(c: RawSMTP, rcpts: tuple[str, ...] = ("bob@example.net",), sender: str = USER) -> None:
    assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>").code == 250
    assert c.cmd("DATA").code == 354


def send_data(c: RawSMTP, content: bytes, **kw) -> tuple[int, str]:
    """MAIL, RCPT, DATA, the content as given, then CRLF.CRLF; (code, text) of the one reply."""
    begin(c, **kw)
    c.send(content + b".\r\n")
    r = c.read()
    return r.code, r.text


def qid_of(text: str) -> str:
    m = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", text)
    assert m, text
    return m.group(1)


def assert_session_usable(c: RawSMTP, relay) -> str:
    """After a refused DATA: no stray replies, and a normal message goes through."""
    r = c.cmd("NOOP")
    assert r.is_(replies.NOOP_OK), f"stray reply before NOOP's: {r}"
    code, text = send_data(c, b"Subject: after\r\n\r\nok\r\n")
    assert code == 250, text
    return qid_of(text)


def queued_ids(relay) -> set[str]:
    return {m["id"] for m in relay.queued()}


# ---------------------------------------------------------------- acceptance and headers

def test_queued_reply_means_committed(relay):
    with authed(relay) as c:
        code, text = send_data(c, b"Subject: durable\r\n\r\nbody\r\n")
        assert code == 250
        qid = qid_of(text)
    assert qid in queued_ids(relay)
    body = relay.body(qid)
    assert body is not None and f" id {qid}".encode() in body.split(b"\r\n\r\n")[0]


def test_message_survives_kill_after_250(make_relay):
    from tests.support.raw_smtp import hold_queue
    inst = make_relay(start=False, config=hold_queue())
    inst.add_user(USER, "correct horse battery staple")
    inst.start()
    with authed(inst) as c:
        code, text = send_data(c, b"Subject: crash\r\n\r\nstill here\r\n")
    qid = qid_of(text)
    inst.kill()  # SIGKILL: no shutdown path runs
    assert qid in queued_ids(inst)
    assert inst.body(qid).endswith(b"\r\n\r\nstill here\r\n")
    inst.start()
    assert qid in queued_ids(inst)


def test_another_process_reading_the_queue_does_not_lose_mail(make_relay):
    """`relay queue list`, a backup or a test opening the database must not take the relay's WAL with it.

    SQLite deletes the -wal file when it believes it closes the last connection, judged by the
    POSIX locks the relay holds; if the relay process drops those locks (closing any fd on the
    file does), the relay keeps committing into an unlinked WAL and every "250 queued" is lost.
    """
    from tests.support.raw_smtp import hold_queue
    inst = make_relay(start=False, config=hold_queue())
    inst.add_user(USER, "correct horse battery staple")
    inst.start()
    path = inst.config["storage"]["path"]
    reader = sqlite3.connect(path)
    reader.execute("SELECT COUNT(*) FROM messages").fetchall()
    reader.close()  # the outside reader goes away
    with authed(inst) as c:
        code, text = send_data(c, b"Subject: after a reader\r\n\r\nx\r\n")
    qid = qid_of(text)
    assert qid in queued_ids(inst), "committed mail invisible to other processes (WAL unlinked?)"
    inst.kill()
    inst.start()
    assert qid in queued_ids(inst), "committed mail lost across a restart"


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_received_header_names_tls_and_esmtpsa(relay, implicit):
    with authed(relay, implicit=implicit) as c:
        version = c.sock.version()
        cipher = c.sock.cipher()[0]
        code, text = send_data(c, b"Subject: trace\r\n\r\nx\r\n")
    qid = qid_of(text)
    stored = relay.body(qid)
    first = message_fields(stored)[0].decode()  # ours is the topmost trace field
    assert first.startswith("Received: from client.test ([127.0.0.1])")
    assert f"by relay.test (relay) with ESMTPSA id {qid}" in first
    assert f"using {version} with cipher {cipher}" in first
    assert "for <bob@example.net>" in first
    assert headers.count_received(stored) == 1


def test_message_id_and_date_added_when_missing(relay):
    with authed(relay) as c:
        code, text = send_data(c, b"Subject: bare\r\nFrom: app@mg.example.com\r\n\r\nbody line\r\n")
    qid = qid_of(text)
    parts = headers.split(relay.body(qid))
    names = [headers.field_name(f) for f in parts.fields]
    assert names.count("date") == 1 and names.count("message-id") == 1
    mid = next(f for f in parts.fields if headers.field_name(f) == "message-id").decode()
    assert re.fullmatch(rf"Message-ID: <{qid}\.[0-9a-f]+@relay\.test>\r\n", mid)
    assert parts.body == b"\r\nbody line\r\n"


def test_message_id_and_date_kept_when_present(relay):
    original = (b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <keep.me@mg.example.com>\r\n"
                b"Subject: kept\r\n\r\nbody\r\n")
    with authed(relay) as c:
        code, text = send_data(c, original)
    stored = relay.body(qid_of(text))
    fields = message_fields(stored)
    assert headers.field_name(fields[0]) == "received"
    # Everything but our Received (and a DKIM signature), byte for byte.
    assert b"".join(fields[1:]) + headers.split(stored).body == original


def test_bcc_removed_body_untouched(relay):
    body = b"\r\nBcc: this line is body text and stays\r\n..dot-stuffed\r\n\xc3\xa9 8bit\r\n"
    content = (b"From: app@mg.example.com\r\nBcc: hidden@example.org\r\nTo: bob@example.net\r\n"
               b"BCC: second@example.org,\r\n third@example.org\r\nSubject: s\r\n" + body)
    with authed(relay) as c:
        assert c.cmd(f"MAIL FROM:<{USER}> BODY=8BITMIME").code == 250
        assert c.cmd("RCPT TO:<bob@example.net>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(content + b".\r\n")
        r = c.read()
    stored = relay.body(qid_of(r.text))
    parts = headers.split(stored)
    assert not any(headers.field_name(f) == "bcc" for f in parts.fields)
    assert b"hidden@example.org" not in stored and b"third@example.org" not in stored
    # Transparency dot removed (RFC 5321 4.5.2); otherwise the body is byte-identical.
    assert parts.body == body.replace(b"\r\n..dot", b"\r\n.dot")


def test_message_without_header_section(relay):
    with authed(relay) as c:
        code, text = send_data(c, b"no headers here, just text\r\n")
    stored = relay.body(qid_of(text))
    assert stored.endswith(b"\r\n\r\nno headers here, just text\r\n")
    assert headers.count_received(stored) == 1


def test_received_loop_limit(relay):
    trace = b"".join(b"Received: from hop%d.example by x; Mon, 1 Jan 2024 10:00:00 +0000\r\n" % i
                     for i in range(MAX_RECEIVED + 1))
    with authed(relay) as c:
        code, text = send_data(c, trace[:-trace.index(b"\r\n") - 2] + b"Subject: at limit\r\n\r\nx\r\n")
        assert code == 250, text
        code, text = send_data(c, trace + b"Subject: loop\r\n\r\nx\r\n")
        assert (code, text) == (554, "5.4.6 " + replies.LOOP_DETECTED.text)
        assert_session_usable(c, relay)


# ---------------------------------------------------------------- size and lines

def test_size_enforced_while_reading_then_session_continues(relay):
    before = queued_ids(relay)
    with authed(relay) as c:
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (SIZE // 1000 + 20)
        code, text = send_data(c, big)
        assert (code, text) == (552, f"5.3.4 {replies.SIZE_EXCEEDED.text}")
        qid = assert_session_usable(c, relay)
    assert queued_ids(relay) - before == {qid}


def test_exactly_at_size_limit_is_accepted(relay):
    with authed(relay) as c:
        head = b"Subject: fits\r\n\r\n"
        line = b"y" * 98 + b"\r\n"
        n = (SIZE - len(head)) // len(line)
        content = head + line * n
        content += b"z" * (SIZE - len(content) - 2) + b"\r\n" if SIZE - len(content) >= 2 else b""
        assert len(content) == SIZE
        code, text = send_data(c, content)
        assert code == 250, text


def test_streaming_far_past_the_limit_is_cut_off(relay):
    before = queued_ids(relay)
    c = authed(relay)
    begin(c)
    chunk = (b"x" * 998 + b"\r\n") * 100
    try:
        for _ in range(40):  # 4 MB, well past 2 * message_size + 1 MiB
            c.send(chunk)
        c.send(b".\r\n")
    except OSError:  # broken pipe, reset, or the TLS layer's EOF (ssl.SSLEOFError): cut off
        pass
    try:
        r = c.read()
        assert r.code == 552
        assert c.closed()
    except (ConnectionError, EOFError):
        pass  # reset before the reply could be read: still cut off
    c.close()
    assert queued_ids(relay) == before


# 13000: the whole line and its CRLF arrive in one TLS record, past the reader limit (the LF lands
# beyond what LimitOverrunError lets us consume, so the CR and LF of one CRLF are read apart).
@pytest.mark.parametrize("length,ok", [(998, True), (999, False), (5000, False), (13_000, False), (60_000, False)])
def test_line_length(relay, length, ok):
    with authed(relay) as c:
        code, text = send_data(c, b"Subject: lines\r\n\r\n" + b"l" * length + b"\r\n")
        if ok:
            assert code == 250, text
        else:
            assert code == 550 and text.startswith("5.6.0"), text
            assert_session_usable(c, relay)


def test_dot_stuffed_998_octet_line_is_accepted(relay):
    with authed(relay) as c:
        code, text = send_data(c, b"Subject: dots\r\n\r\n." + b"." + b"d" * 997 + b"\r\n")
        assert code == 250, text
    assert relay.body(qid_of(text)).endswith(b"\r\n\r\n." + b"d" * 997 + b"\r\n")


@pytest.mark.parametrize("content", [
    b"Subject: lf\r\n\r\nbare\nline feed\r\n",
    b"Subject: cr\r\n\r\nbare\rcarriage return\r\n",
    b"Subject: lf-header\nX: y\r\n\r\nbody\r\n",
    b"Subject: nul\r\n\r\nnul\x00byte\r\n",
], ids=["bare-lf", "bare-cr", "bare-lf-header", "nul"])
def test_bare_line_endings_refused_nothing_stored(relay, content):
    before = queued_ids(relay)
    with authed(relay) as c:
        code, text = send_data(c, content)
        assert code == 550 and text.startswith("5.6.0"), text
        qid = assert_session_usable(c, relay)
    assert queued_ids(relay) - before == {qid}


# ---------------------------------------------------------------- SMTP smuggling

SMUGGLED = (b"MAIL FROM:<smuggled@mg.example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n")


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r.\n", b"\r.\r", b"\r\n.\r", b"\r\n\x00.\r\n"],
                         ids=["LF.LF", "LF.CRLF", "CR.LF", "CR.CR", "CRLF.CR", "CRLF-NUL.CRLF"])
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_smtp_smuggling(relay, fake_end, implicit):
    before = queued_ids(relay)
    with authed(relay, implicit=implicit) as c:
        begin(c)
        # One write, as an attacker would: fake end, smuggled transaction, then the real end.
        c.send(b"Subject: carrier\r\n\r\nhello" + fake_end + SMUGGLED + b"\r\n.\r\n")
        r = c.read()
        assert r.code in (250, 550), r  # exactly one reply to DATA ...
        nxt = c.cmd("NOOP")
        assert nxt.is_(replies.NOOP_OK), f"stray reply after DATA: {nxt}"  # ... and nothing after it
        new = queued_ids(relay) - before
        assert len(new) <= 1
        if r.code == 250:
            assert new == {qid_of(r.text)}
        else:
            assert not new
    with relay.db() as conn:
        assert not conn.execute("SELECT 1 FROM messages WHERE sender LIKE 'smuggled@%'").fetchall()
    assert not relay.events_named("queued", sender="smuggled@mg.example.com")


# ---------------------------------------------------------------- store failure -> 451, no details

def test_store_failure_is_451_without_details(relay):
    before = queued_ids(relay)
    with sqlite3.connect(relay.config["storage"]["path"]) as db:
        db.execute("CREATE TRIGGER inject_fault BEFORE INSERT ON bodies "
                   "BEGIN SELECT RAISE(ABORT, 'injected fault xyzzy'); END")
    try:
        with authed(relay) as c:
            code, text = send_data(c, b"Subject: fault\r\n\r\nx\r\n")
            assert (code, text) == (451, f"4.3.0 {replies.INTERNAL_ERROR.text}")
            assert "xyzzy" not in text
            assert queued_ids(relay) == before  # nothing half-stored
            # The transaction is over; the session goes on.
            assert c.cmd("RCPT TO:<bob@example.net>").is_(replies.NEED_MAIL)
            assert c.cmd("NOOP").code == 250
    finally:
        with sqlite3.connect(relay.config["storage"]["path"]) as db:
            db.execute("DROP TRIGGER inject_fault")
    assert relay.wait_event("store_unavailable")
    with authed(relay) as c:
        code, text = send_data(c, b"Subject: recovered\r\n\r\nx\r\n")
        assert code == 250, text


@pytest.mark.slow
def test_database_locked_by_another_process_is_451(relay):
    before = queued_ids(relay)
    with authed(relay) as c:  # log in first: AUTH's last_login update would wait on the lock too
        begin(c)
        blocker = sqlite3.connect(relay.config["storage"]["path"], isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # holds the write lock past the relay's busy_timeout
        try:
            c.sock.settimeout(30)
            c.send(b"Subject: locked\r\n\r\nx\r\n.\r\n")
            r = c.read()
            assert r.is_(replies.INTERNAL_ERROR) and r.text == f"4.3.0 {replies.INTERNAL_ERROR.text}"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert_session_usable(c, relay)
    assert len(queued_ids(relay) - before) == 1
