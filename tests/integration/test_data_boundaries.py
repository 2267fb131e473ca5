"""DATA's end and content wherever TCP cuts the stream: the session reads DATA in whole lines
straight from the reader (relay/server/session.py), so the end of data (CRLF "." CRLF) split
over reads, dots at line ends and line starts, a line longer than the reader's limit, and a
command pipelined after the dot must all come out exactly as if read line by line. Real relay,
real sockets (STARTTLS + AUTH as a mail client), delivered to a real sink and compared byte for
byte; large bodies go through the spool file (limits.data_in_memory is small here)."""
from __future__ import annotations

import time

import pytest

from tests.conftest import PASSWORD, USER


def start(make_relay, dns_server, mx_sink):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port,
                       config={"limits": {"data_in_memory": 4096}, "domains": {"public_addresses": ["192.0.2.10"]}})
    relay.add_user(USER, PASSWORD)
    relay.start()
    return relay


def open_data(relay):
    s = relay.smtp()
    s.login(USER, PASSWORD)
    assert s.mail(USER)[0] == 250
    assert s.rcpt("bob@example.net")[0] == 250
    s.putcmd("data")
    assert s.getreply()[0] == 354
    return s


def send_in_pieces(s, pieces: list[bytes]) -> None:
    # TCP_NODELAY and a pause between pieces: each arrives as its own read on the relay's side.
    for p in pieces:
        s.sock.sendall(p)
        time.sleep(0.05)


def head(n: str) -> bytes:
    return f"From: {USER}\r\nTo: bob@example.net\r\nSubject: {n}\r\n\r\n".encode()


def lines(n: int, width: int = 70) -> bytes:
    # Dots where the end marker could be mistaken: at line ends ("x.\r\n") and line starts.
    return b"".join((b"." if i % 7 == 0 else b"") + b"y" * width + (b"." if i % 5 == 0 else b"") + b"\r\n"
                    for i in range(n))


SPLITS = {
    "dot line alone": lambda body: [body, b".\r\n"],
    "CR | LF dot": lambda body: [body[:-1], b"\n.\r\n"],
    "CRLF dot | CRLF": lambda body: [body + b".", b"\r\n"],
    "CRLF dot CR | LF": lambda body: [body + b".\r", b"\n"],
    "one send": lambda body: [body + b".\r\n"],
    "7-byte pieces": lambda body: [(body + b".\r\n")[i:i + 7] for i in range(0, len(body) + 3, 7)],
}


# 7-byte pieces of a spooled body would take minutes at a pause each: the small body has them.
CASES = [(split, size) for split in SPLITS for size in (300, 40_000) if not (split == "7-byte pieces" and size > 1000)]


@pytest.mark.parametrize("split,size", CASES, ids=[f"{sp}-{'spooled' if n > 4096 else 'in memory'}" for sp, n in CASES])
def test_the_end_of_data_is_found_wherever_the_stream_is_cut(make_relay, dns_server, mx_sink, split, size):
    relay = start(make_relay, dns_server, mx_sink)
    wire = head(f"{split} {size}") + lines(size // 72)
    s = open_data(relay)
    send_in_pieces(s, SPLITS[split](wire))
    code, text = s.getreply()
    assert code == 250, text
    assert s.noop()[0] == 250  # nothing of the message was taken for a command
    s.quit()
    assert mx_sink.wait_for(1, timeout=30)
    got = mx_sink.messages[0].data
    # The sink unstuffs as RFC 5321 says: what it holds is the content the client meant.
    content = b"".join(ln[1:] if ln.startswith(b".") else ln for ln in wire.splitlines(keepends=True))
    assert got.endswith(content.split(b"\r\n\r\n", 1)[1])
    assert f"Subject: {split} {size}".encode() in got


def test_a_line_longer_than_the_reader_limit_is_refused_and_the_session_goes_on(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink)
    s = open_data(relay)
    # 300 KB without a line end (past the 256 KiB the reader holds while DATA runs), then the
    # end of data cut between its CR and the rest.
    send_in_pieces(s, [head("long") + b"z" * 300_000, b"\r", b"\n.\r\n"])
    code, text = s.getreply()
    assert (code, text[:5]) == (550, b"5.6.0") and b"Line longer than 998" in text, (code, text)
    assert s.noop()[0] == 250
    assert s.mail(USER)[0] == 250 and s.rcpt("bob@example.net")[0] == 250
    assert s.data(head("after") + b"fine\r\n")[0] == 250
    s.quit()
    assert mx_sink.wait_for(1, timeout=30)
    assert [m for m in mx_sink.messages if b"Subject: after" in m.data]
    assert not [m for m in mx_sink.messages if b"Subject: long" in m.data]


def test_a_command_pipelined_after_the_dot_is_answered_after_the_250(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink)
    s = open_data(relay)
    s.sock.sendall(head("piped") + lines(600) + b".\r\nNOOP\r\n")
    code, text = s.getreply()
    assert code == 250, text
    assert s.getreply()[0] == 250  # the NOOP's
    s.quit()
    assert mx_sink.wait_for(1, timeout=30)


def test_a_header_block_of_many_short_dot_ended_lines_costs_linear_time(make_relay, dns_server, mx_sink):
    # Each "x.\r\n" line is a read of its own (the reader stops at every ".\r\n"); past
    # limits.data_in_memory, a header block that has not ended yet was joined and split again
    # at every such read: quadratic, on the event loop every session shares. 64 KB of them
    # froze the relay for tens of seconds; HEADER_LIMIT (1 MB) of them, for hours.
    relay = start(make_relay, dns_server, mx_sink)
    other = relay.smtp()
    s = open_data(relay)
    fields = b"".join(b"X-A: %05d.\r\n" % i for i in range(5000))  # 60 KB, all before the blank line
    t0 = time.monotonic()
    s.sock.sendall(head("many")[:-2] + fields + b"\r\nbody\r\n.\r\n")
    time.sleep(0.2)
    t1 = time.monotonic()
    assert other.noop()[0] == 250
    assert time.monotonic() - t1 < 3, "another session waited on this one's header block"
    code, text = s.getreply()
    assert code == 250, text
    assert time.monotonic() - t0 < 10
    s.quit()
    other.quit()
    assert mx_sink.wait_for(1, timeout=30)
    got = mx_sink.messages[0].data
    assert fields in got and got.endswith(b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize("line", [b"a.\r\n", b"..\r\n", b".a.\r\n"])
def test_a_body_of_dot_ended_lines_is_read_in_runs_not_a_line_a_read(make_relay, dns_server, mx_sink, line):
    # Every "a.\r\n" stops the reader's search for ".\r\n": read one line a read, 8 MB of them
    # cost the loop every session shares over 7 s (~0.7 s at a stretch per buffer). Lines that
    # start with a (stuffed) dot too.
    relay = start(make_relay, dns_server, mx_sink)
    other = relay.smtp()
    s = open_data(relay)
    body = line * (8_000_000 // len(line))
    import threading
    sender = threading.Thread(target=s.sock.sendall, args=(head("dots") + body + b".\r\n",))
    t0 = time.monotonic()
    sender.start()
    worst = 0.0
    while sender.is_alive() and time.monotonic() - t0 < 30:
        t1 = time.monotonic()
        assert other.noop()[0] == 250
        worst = max(worst, time.monotonic() - t1)
        time.sleep(0.05)
    sender.join(30)
    code, text = s.getreply()
    assert code == 250, text
    elapsed = time.monotonic() - t0
    s.quit()
    other.quit()
    assert elapsed < 3, elapsed
    assert worst < 0.5, worst
    assert mx_sink.wait_for(1, timeout=60)
    got = mx_sink.messages[0].data
    content = b"".join(ln[1:] if ln.startswith(b".") else ln for ln in [line]) * (8_000_000 // len(line))
    assert got.endswith(b"\r\n\r\n" + content)


def test_the_rest_of_a_refused_body_is_counted_not_read_a_line_at_a_time(make_relay, dns_server, mx_sink):
    # Once DATA is refused (a bare LF here) the rest is only counted to the end marker; a body
    # of one-octet lines ("\n") was still split and fed a line at a time: 16 MB of them held
    # the loop every session shares for ~8 s.
    relay = start(make_relay, dns_server, mx_sink)
    other = relay.smtp()
    s = open_data(relay)
    import threading
    sender = threading.Thread(target=s.sock.sendall, args=(head("bare") + b"\n" * 16_000_000 + b"\r\n.\r\n",))
    t0 = time.monotonic()
    sender.start()
    worst = 0.0
    while sender.is_alive() and time.monotonic() - t0 < 30:
        t1 = time.monotonic()
        assert other.noop()[0] == 250
        worst = max(worst, time.monotonic() - t1)
        time.sleep(0.05)
    sender.join(30)
    code, text = s.getreply()
    elapsed = time.monotonic() - t0
    assert code == 550 and b"bare" in text.lower(), (code, text)
    assert s.noop()[0] == 250
    s.quit()
    other.quit()
    assert elapsed < 3, elapsed
    assert worst < 0.5, worst
