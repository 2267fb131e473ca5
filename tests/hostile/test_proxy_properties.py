"""PROXY v1/v2 headers over arbitrary and mutated bytes (hypothesis): the parser raises nothing
but ProxyError, and the socket read (a real socketpair, random cuts) never takes a byte past
the header: what follows is left exactly as sent, for the session (EHLO, or a ClientHello)."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from relay.server import proxy
from relay.server.proxy import V2_SIGNATURE, ProxyError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def v1_line(draw) -> bytes:
    fam = draw(st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN"]))
    if fam == b"UNKNOWN":
        tail = draw(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b))
        return b"PROXY UNKNOWN" + (b" " + tail if tail else b"") + b"\r\n"
    addr = st.ip_addresses(v=4 if fam == b"TCP4" else 6).map(lambda a: str(a).encode())
    port = st.integers(0, 65535).map(lambda p: str(p).encode())
    return b" ".join([b"PROXY", fam, draw(addr), draw(addr), draw(port), draw(port)]) + b"\r\n"


@st.composite
def v2_block(draw) -> bytes:
    command = draw(st.sampled_from([0, 1]))
    fam = draw(st.sampled_from([0x00, 0x11, 0x21, 0x31, 0x01]))
    if fam == 0x11:
        addrs = draw(st.binary(min_size=12, max_size=12))
    elif fam == 0x21:
        addrs = draw(st.binary(min_size=36, max_size=36))
    elif fam == 0x31:
        addrs = draw(st.binary(min_size=216, max_size=216))
    else:
        addrs = b""
    tlvs = b"".join(bytes([k]) + struct.pack("!H", len(v)) + v
                    for k, v in draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=30)), max_size=4)))
    payload = addrs + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack("!H", len(payload)) + payload


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


HEADERS = st.one_of(v1_line(), v2_block())
EDITS = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3)


@SETTINGS
@given(data=st.one_of(st.binary(max_size=300), st.builds(_mutate, HEADERS, EDITS),
                      st.builds(lambda h, n: h[:n], HEADERS, st.integers(0, 300))),
       peeked=st.one_of(st.none(), st.binary(max_size=120)))
def test_parser_and_next_read_raise_only_their_own_error(data, peeked):
    for fn in (lambda: proxy.parse(data), lambda: proxy.next_read(data, peeked),
               lambda: proxy.parse_v1(data), lambda: proxy.parse_v2(data)):
        try:
            result = fn()
        except ProxyError:
            continue
        if isinstance(result, proxy.ProxyHeader) and result.source is not None:
            # A source we route by is a plain address: no scope, nothing a log or header could carry.
            ipaddress.ip_address(result.source[0].partition("%")[0])
            assert 0 <= result.source[1] <= 65535


async def _read_through(pieces: list[bytes]) -> tuple[proxy.ProxyHeader | ProxyError, bytes]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        async def feed():
            for p in pieces:
                b.sendall(p)
                await asyncio.sleep(0.001)
            b.shutdown(socket.SHUT_WR)
        feeder = asyncio.create_task(feed())
        try:
            got: proxy.ProxyHeader | ProxyError = await proxy.read_header(a, 5)
        except ProxyError as exc:
            got = exc
        await feeder
        a.setblocking(True)
        a.settimeout(2)
        rest = b""
        while chunk := a.recv(65536):
            rest += chunk
        return got, rest
    finally:
        a.close()
        b.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=HEADERS, after=st.binary(max_size=200), cuts=st.lists(st.integers(1, 600), max_size=4))
def test_a_valid_header_is_read_exactly_and_the_rest_left_as_sent(header, after, cuts):
    wire = header + after
    points = sorted({c for c in cuts if c < len(wire)})
    pieces = [wire[i:j] for i, j in zip([0] + points, points + [len(wire)])]
    got, rest = asyncio.run(_read_through(pieces))
    assert isinstance(got, proxy.ProxyHeader), got
    assert got.length == len(header)
    assert rest == after
