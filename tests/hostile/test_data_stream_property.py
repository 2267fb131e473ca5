"""DATA through the real relay against a line-by-line reference model (hypothesis).

Random wire streams (header fields, some starting with "."; bodies of dot lines, bare CR and LF,
NUL, lines of 997-1001 octets, a size near limits.message_size; header blocks near the spill
border) are cut into random TCP pieces and sent to a real relay after STARTTLS + AUTH. The model
reads the stream as RFC 5321 says, one line at a time: it decides accept or refuse, and for an
accepted message the content the next hop must get (transparency dots removed). The relay's
answer must agree, the session must go on (nothing of the message taken for a command), and the
sink must hold exactly the model's content under our trace fields: nothing lost, cut, doubled or
read differently by the receiver, in memory or spooled (limits.data_in_memory is small here).
One relay serves every example; the budget is fixed.
"""
from __future__ import annotations

import time

import dkim

import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st

from tests.conftest import PASSWORD, USER
from tests.integration.test_dkim import dnsfunc_for, publish

SIZE_LIMIT = 60_000
IN_MEMORY = 4096


def model(wire: bytes) -> tuple[bool, bytes]:
    """(accepted, content) for the DATA bytes before CRLF "." CRLF, read line by line."""
    size = 0
    lines = _lf_lines(wire)
    for line in lines:
        size += len(line)
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-1]:
            return False, b""
        if b"\x00" in line:
            return False, b""
        text = line[:-2]
        if len(text) > 998 + (1 if text.startswith(b".") else 0):
            return False, b""
    if size > SIZE_LIMIT:
        return False, b""
    return True, b"".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


def _lf_lines(data: bytes) -> list[bytes]:
    out, start = [], 0
    while start < len(data):
        stop = data.find(b"\n", start) + 1 or len(data)
        out.append(data[start:stop])
        start = stop
    return out


_BODY_CHARS = st.sampled_from([b"a", b"b", b".", b" ", b"\r", b"\n", b"\r\n", b"\x00", b"\xc3\xa9"])


@st.composite
def body_line(draw) -> bytes:
    kind = draw(st.sampled_from(["short", "dots", "long", "odd"]))
    if kind == "dots":
        text = b"." * draw(st.integers(1, 4))
    elif kind == "long":
        n = draw(st.sampled_from([997, 998, 999, 1000]))
        text = (b"." if draw(st.booleans()) else b"") + b"x" * n
    elif kind == "odd":
        text = b"".join(draw(st.lists(_BODY_CHARS, max_size=8)))
    else:
        text = b"line" + (b"." if draw(st.booleans()) else b"")
    return text + b"\r\n"


@st.composite
def message(draw, tag: str) -> bytes:
    fields = [f"From: {USER}\r\n".encode(), b"To: bob@example.net\r\n", f"Subject: {tag}\r\n".encode(),
              b"Date: Wed, 02 Dec 2026 06:00:00 +0000\r\n", f"Message-ID: <{tag}@example.com>\r\n".encode()]
    for _ in range(draw(st.integers(0, 4))):
        fields.append(draw(st.sampled_from([b".X-Dot: v\r\n", b"X-A: b\r\n", b"\tfolded\r\n", b"..X-Two: v\r\n"])))
    # A header block of about the spill threshold: its end lands near the first spill.
    pad = draw(st.sampled_from([0, 0, IN_MEMORY - 400, IN_MEMORY - 200, IN_MEMORY, 2 * IN_MEMORY]))
    while pad > 0:
        width = min(pad, 900)
        fields.append(b"X-Pad: " + b"p" * width + b"\r\n")
        pad -= width + 9
    head = b"".join(fields)
    lines = draw(st.lists(body_line(), max_size=40))
    bulk = draw(st.sampled_from([0, 0, 1, 2]))
    filler = b"".join(b"f" * 70 + b"\r\n" for _ in range({0: 0, 1: 100, 2: (SIZE_LIMIT - 200) // 72}[bulk]))
    body = filler + b"".join(lines)
    if draw(st.booleans()):
        # Up to the byte at limits.message_size (wire octets, as the relay counts them).
        room = SIZE_LIMIT - len(head) - 2 - len(body)
        if room >= 3:
            body += b"z" * (min(room - 2 + draw(st.integers(-1, 1)), 990)) + b"\r\n"
    if draw(st.integers(0, 5)) == 0:
        # No empty line: the header section ends at a line that is not a field (the relay puts
        # the separator in, as the content's expected form below says).
        return head + b"not a field line\r\n" + body
    return head + b"\r\n" + body


def wire_of(msg: bytes) -> bytes:
    """The client's DATA bytes for `msg` (already in wire form), ending with the end marker."""
    return msg + (b".\r\n" if msg.endswith(b"\r\n") else b"\r\n.\r\n")


def start(make_relay, dns_server, mx_sink):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port,
                       config={"limits": {"data_in_memory": IN_MEMORY, "message_size": SIZE_LIMIT},
                               "domains": {"public_addresses": ["192.0.2.10"]}})
    relay.add_user(USER, PASSWORD)
    relay.start()
    publish(dns_server, relay)
    return relay


def test_data_streams_match_the_line_by_line_model(make_relay, dns_server, mx_sink):
    relay = start(make_relay, dns_server, mx_sink)
    counter = iter(range(10**6))
    dnsfunc = dnsfunc_for(dns_server)

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(data=st.data())
    def run(data):
        tag = f"m{next(counter):06d}"  # fixed width: draws must not depend on it
        msg = data.draw(message(tag))
        wire = wire_of(msg)
        # The stream must not hold an earlier end of data (the rest would be commands).
        assume((b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3)
        data_part = wire[:-3]
        accepted, content = model(data_part)
        content = content.replace(b"\r\nnot a field line\r\n", b"\r\n\r\nnot a field line\r\n", 1)
        event("accepted" if accepted else "refused")
        event("spooled" if accepted and len(data_part) > IN_MEMORY else "in memory")
        cuts = sorted(set(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=5))))
        # A session of its own: refusals count toward limits.max_errors.
        with relay.smtp(timeout=30) as s:
            s.login(USER, PASSWORD)
            one(s, tag, wire, accepted, content, cuts)

    def one(s, tag, wire, accepted, content, cuts):
        assert s.mail(USER)[0] == 250
        assert s.rcpt("bob@example.net")[0] == 250
        s.putcmd("data")
        assert s.getreply()[0] == 354
        prev = 0
        for c in cuts + [len(wire)]:
            s.sock.sendall(wire[prev:c])
            prev = c
            time.sleep(0.01)
        code, text = s.getreply()
        assert (code == 250) == accepted, (code, text, tag)
        if not accepted:
            assert 500 <= code < 600, (code, text)
        assert s.noop()[0] == 250
        if accepted:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = [m for m in mx_sink.messages if f"Subject: {tag}\r\n".encode() in m.data]
                if got:
                    break
                time.sleep(0.02)
            assert len(got) == 1, tag
            delivered = got[0].data
            assert delivered.endswith(content), tag
            trace = delivered[:len(delivered) - len(content)]
            # Only our trace field (and a signature) above what the client sent.
            assert b"Received: from client.test" in trace, trace[:500]
            # The signature covers what was sent (the content unstuffed from the spool file's wire form).
            assert dkim.verify(delivered, dnsfunc=dnsfunc), tag
            assert all(ln[:1] in (b" ", b"\t") or ln.split(b":")[0] in (b"Received", b"DKIM-Signature")
                       for ln in trace.splitlines()), trace[:500]

    run()
