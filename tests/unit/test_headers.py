"""headers: split, count_received, received_line, prepare (tables and properties)."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from relay import headers

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
RECEIVED = b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (relay) with ESMTPSA id Q1; x\r\n"


def prepare(data: bytes) -> bytes:
    return headers.prepare(data, received=RECEIVED, hostname="relay.test", queue_id="Q1", now=NOW)


# ---------------------------------------------------------------- split

@pytest.mark.parametrize("data,fields,body", [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", [b"A: 1\r\n", b"B: 2\r\n"], b"\r\nbody\r\n"),
    (b"A: 1\r\n folded\r\n\tmore\r\nB: 2\r\n\r\n", [b"A: 1\r\n folded\r\n\tmore\r\n", b"B: 2\r\n"], b"\r\n"),
    (b"A: 1\r\n", [b"A: 1\r\n"], b""),
    (b"A: 1", [b"A: 1\r\n"], b""),
    (b"", [], b""),
    (b"\r\nbody only\r\n", [], b"\r\nbody only\r\n"),
    (b"not a header line\r\nA: 1\r\n", [], b"not a header line\r\nA: 1\r\n"),
    (b" leading space: x\r\n", [], b" leading space: x\r\n"),
    (b"Name : spaced colon\r\n\r\n", [b"Name : spaced colon\r\n"], b"\r\n"),
    (b"A: 1\r\nno colon here\r\n", [b"A: 1\r\n"], b"no colon here\r\n"),
    (b"A: 1\r\n\r\nB: 2\r\n", [b"A: 1\r\n"], b"\r\nB: 2\r\n"),
])
def test_split(data, fields, body):
    got = headers.split(data)
    assert (got.fields, got.body) == (fields, body)


@pytest.mark.parametrize("raw,name", [(b"Subject: x\r\n", "subject"), (b"BCC : x\r\n", "bcc"),
                                      (b"Message-ID: <a@b>\r\n", "message-id"), (b"no colon\r\n", "")])
def test_field_name(raw, name):
    assert headers.field_name(raw) == name


@pytest.mark.parametrize("data,n", [
    (b"Received: a\r\nreceived: b\r\nRECEIVED : c\r\nX-Received: d\r\n\r\nReceived: in body\r\n", 3),
    (b"Subject: x\r\n\r\n", 0),
    (b"\r\nReceived: body only\r\n", 0),
    (b"Received: a\r\n  folded\r\n\r\n", 1),
])
def test_count_received(data, n):
    assert headers.count_received(data) == n


# ---------------------------------------------------------------- received_line

def test_received_line_full():
    line = headers.received_line(helo="client.test", client_ip="192.0.2.1", hostname="relay.test",
                                 protocol="ESMTPSA", queue_id="ABC", tls="using TLSv1.3 with cipher X (256/256 bits)",
                                 recipient="bob@example.net", now=NOW)
    assert line == (b"Received: from client.test ([192.0.2.1])\r\n"
                    b"\tby relay.test (relay) with ESMTPSA id ABC\r\n"
                    b"\t(using TLSv1.3 with cipher X (256/256 bits))\r\n"
                    b"\tfor <bob@example.net>; Mon, 06 May 2024 07:08:09 +0000\r\n")
    assert headers.count_received(line + b"\r\n") == 1


def test_received_line_minimal_and_hostile_helo():
    line = headers.received_line(helo="evil\r\nBcc: x (y)\\", client_ip="192.0.2.1", hostname="relay.test",
                                 protocol="ESMTP", queue_id="ABC", tls=None, recipient=None, now=NOW)
    assert line.count(b"\r\n") == 2 and line.endswith(b"+0000\r\n")
    assert b"(" not in line.split(b"\r\n")[0][len(b"Received: from "):-len(b" ([192.0.2.1])")]
    assert headers.split(line + b"\r\n").fields == [line]


# ---------------------------------------------------------------- prepare

def test_prepare_adds_date_and_message_id():
    out = prepare(b"Subject: hi\r\n\r\nbody\r\n")
    parts = headers.split(out)
    assert parts.fields[0] == RECEIVED
    assert [headers.field_name(f) for f in parts.fields] == ["received", "subject", "date", "message-id"]
    assert parts.fields[2] == b"Date: Mon, 06 May 2024 07:08:09 +0000\r\n"
    assert parts.fields[3].startswith(b"Message-ID: <Q1.") and parts.fields[3].endswith(b"@relay.test>\r\n")
    assert parts.body == b"\r\nbody\r\n"


def test_prepare_keeps_existing_date_and_message_id():
    data = b"date: Tue, 1 Jan 2019 00:00:00 +0000\r\nMESSAGE-ID: <own@x>\r\nSubject: s\r\n\r\nb\r\n"
    assert prepare(data) == RECEIVED + data


def test_prepare_strips_every_bcc():
    data = (b"To: a@example.net\r\nBcc: secret@example.org\r\nbcc : two@example.org,\r\n three@example.org\r\n"
            b"BCC:\r\nSubject: s\r\nDate: x\r\nMessage-ID: <m@x>\r\n\r\nBcc: body text stays\r\n")
    out = prepare(data)
    assert out == RECEIVED + (b"To: a@example.net\r\nSubject: s\r\nDate: x\r\nMessage-ID: <m@x>\r\n"
                              b"\r\nBcc: body text stays\r\n")


@pytest.mark.parametrize("data,body", [
    (b"", b"\r\n"),
    (b"Subject: only headers\r\n", b"\r\n"),
    (b"just a body line\r\n", b"\r\njust a body line\r\n"),
])
def test_prepare_without_separator_adds_one(data, body):
    out = prepare(data)
    assert headers.split(out).body == body
    assert out.endswith(body)


# ---------------------------------------------------------------- properties

_name = st.sampled_from([b"Received", b"received", b"Bcc", b"BCC", b"bcc ", b"Subject", b"To", b"Date",
                         b"Message-ID", b"X-Thing", b"Resent-Bcc"])
_value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_field = st.builds(lambda n, v, folds: n + b": " + v + b"\r\n" + b"".join(b"\t" + f + b"\r\n" for f in folds),
                   _name, _value, st.lists(_value.filter(lambda v: v.strip() != b""), max_size=2))
_body_line = st.one_of(_value.map(lambda v: v + b"\r\n"), _field)
_message = st.one_of(
    st.builds(lambda fs, sep, body: b"".join(fs) + sep + b"".join(body),
              st.lists(_field, max_size=8), st.sampled_from([b"\r\n", b""]), st.lists(_body_line, max_size=5)),
    st.binary(max_size=300),
)


@settings(max_examples=400, deadline=None)
@given(_message)
def test_prepare_adds_exactly_one_received(data):
    assert headers.count_received(prepare(data)) == headers.count_received(data) + 1


@settings(max_examples=400, deadline=None)
@given(_message)
def test_prepare_never_leaves_bcc(data):
    out = headers.split(prepare(data))
    assert not any(headers.field_name(f) == "bcc" for f in out.fields)


@settings(max_examples=400, deadline=None)
@given(_message)
def test_prepare_never_changes_the_body(data):
    body = headers.split(data).body
    out = prepare(data)
    assert headers.split(out).body == (body if body.startswith(b"\r\n") else b"\r\n" + body)
    assert out.endswith(body)


@settings(max_examples=400, deadline=None)
@given(_message)
def test_prepare_keeps_other_fields_in_order(data):
    before = [f for f in headers.split(data).fields if headers.field_name(f) not in ("bcc", "resent-bcc")]
    after = headers.split(prepare(data)).fields
    assert after[0] == RECEIVED
    assert after[1:1 + len(before)] == [f if f.endswith(b"\r\n") else f + b"\r\n" for f in before]
    names = [headers.field_name(f) for f in after]
    assert names.count("date") >= 1 and names.count("message-id") >= 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_split_and_count_never_raise(data):
    parts = headers.split(data)
    assert b"".join(parts.fields).replace(b"\r\n", b"") == data[:len(data) - len(parts.body)].replace(b"\r\n", b"")
    assert headers.count_received(data) >= 0


def test_resent_bcc_is_removed_like_bcc():
    from relay import headers as h
    out = h.prepare(b"Subject: x\r\nResent-Bcc: hidden@example.org\r\nResent-To: a@example.net\r\n\r\nbody\r\n",
                    received=b"Received: x\r\n", hostname="relay.test", queue_id="Q")
    assert b"hidden@example.org" not in out and b"Resent-To: a@example.net\r\n" in out


# ---------------------------------------------------------------- From: domains, EHLO text (issue 12)

@pytest.mark.parametrize("raw, domains", [
    (b"From: App <app@mg.example.com>\r\n", ["mg.example.com"]),
    (b"From: app@MG.Example.COM.\r\n", ["mg.example.com"]),
    (b'From: "App, Inc." <app@mg.example.com>\r\n', ["mg.example.com"]),
    (b"From: App\r\n <app@mg.example.com>\r\n", ["mg.example.com"]),           # folded
    (b"From: a@mg.example.com (comment)\r\n", ["mg.example.com"]),
    ("From: a@bücher.example\r\n".encode(), ["xn--bcher-kva.example"]),      # RFC 6532 UTF-8
    (b'From: "a@mg.example.com" <x@evil.example>\r\n', ["evil.example"]),     # the display name is not the address
    (b"From: a@evil.example <a@mg.example.com>\r\n", ["evil.example"]),       # ambiguous: the stricter reading
    (b"From: a@mg.example.com, b@evil.example\r\n", ["mg.example.com", "evil.example"]),
    (b"From: undisclosed:;\r\n", [""]),
    (b"From: a@[192.0.2.1]\r\n", [""]),
    (b"From: \r\n", [""]),
    (b"From: a@b\xff.example\r\n", [""]),                                     # not UTF-8
])
def test_from_domains(raw, domains):
    assert headers.from_domains([b"Subject: x\r\n", raw]) == domains


def test_from_domains_without_a_from_field():
    assert headers.from_domains([b"Subject: x\r\n"]) is None


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_from_domains_never_raises(value):
    out = headers.from_domains([b"From: " + value.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"])
    assert out and all(d == "" or d.isascii() for d in out)


@pytest.mark.parametrize("helo, shown", [
    ("client.example", "client.example"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("café!", "caf?!"),
    ("\udcff\udcfeinvalid", "invalid"),     # undecodable bytes (surrogateescape)
    ("(((", "unknown"),
])
def test_ascii_helo(helo, shown):
    assert headers.ascii_helo(helo) == shown
