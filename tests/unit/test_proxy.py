"""relay.server.proxy: the PROXY v1/v2 header parser, and its read off a socket (a socketpair:
no network) that never takes a byte past the header and gives up at its deadline."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time

import pytest

from relay.server import proxy
from relay.server.proxy import V2_SIGNATURE, ProxyError, ProxyHeader


def v2(command: int = 1, fam: int = 0x11, src: str = "192.0.2.7", dst: str = "198.51.100.1",
       sport: int = 40000, dport: int = 587, tlvs: bytes = b"", length: int | None = None,
       version: int = 2) -> bytes:
    if fam in (0x11, 0x21):
        addrs = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    elif fam in (0x31, 0x32):
        addrs = b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")
    else:
        addrs = b""
    payload = addrs + tlvs
    n = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([(version << 4) | command, fam]) + struct.pack("!H", n) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# ------------------------------------------------------------------ v1

V1_GOOD = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587\r\n", ("192.0.2.7", 40000), ("198.51.100.1", 587)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 25\r\n", ("2001:db8::7", 65535), ("2001:db8::1", 25)),
    (b"PROXY TCP4 127.0.0.77 127.0.0.1 0 2525\r\n", ("127.0.0.77", 0), ("127.0.0.1", 2525)),
]


@pytest.mark.parametrize("line,src,dst", V1_GOOD)
def test_v1_valid(line, src, dst):
    h = proxy.parse(line)
    assert h == ProxyHeader(1, src, dst, len(line))
    assert proxy.next_read(line) == 0


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"])
def test_v1_unknown_means_the_proxy_itself(line):
    h = proxy.parse(line)
    assert h.local and h.source is None and h.version == 1


V1_BAD = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n", "malformed"),          # a field missing
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587 x\r\n", "malformed"),    # one too many
    (b"PROXY TCP4 2001:db8::7 2001:db8::1 1 2\r\n", "malformed"),           # family mismatch
    (b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 587\r\n", "malformed"),     # leading zero
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 587\r\n", "malformed"),      # port range
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 587\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.999 198.51.100.1 1 587\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.7  198.51.100.1 1 587\r\n", "malformed"),         # double space
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 587\n", "malformed"),            # LF without CR
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 587\r\n", "malformed"),
    (b"PROXY TCP4 \xff\xfe 198.51.100.1 1 587\r\n", "malformed"),
    (b"PROXY TCP6 " + b"f" * 100 + b"\r\n", "oversize"),
]


@pytest.mark.parametrize("line,reason", V1_BAD)
def test_v1_refused(line, reason):
    with pytest.raises(ProxyError) as info:
        proxy.parse(line)
    assert info.value.reason == reason


def test_v1_incremental_needs_a_look_and_stops_at_the_line_end():
    line = V1_GOOD[0][0]
    after = b"EHLO client\r\n"
    assert proxy.next_read(b"") == -1
    assert proxy.next_read(b"", line + after) == len(line)        # never past the LF
    assert proxy.next_read(line[:10]) == -1                       # end unknown without a look
    assert proxy.next_read(line[:10], line[10:20]) == 10          # all of it is header: take it
    assert proxy.next_read(b"PROX", b"") == -1


@pytest.mark.parametrize("start", [b"EHLO client.test\r\n", b"\x16\x03\x01\x02\x00\x01", b"GET / HTTP/1.1\r\n",
                                   b"proxy TCP4", b"PROXX", b"\r\n\r\n\x00\r\nQUIX", b"\x00\x00"])
def test_no_header_or_wrong_signature_is_missing_at_once(start):
    with pytest.raises(ProxyError) as info:
        proxy.next_read(b"", start)
    assert info.value.reason == "missing"


def test_v1_longer_than_107_without_a_line_end_is_oversize():
    buf = b"PROXY TCP6 " + b"1" * 96
    assert len(buf) == 107
    with pytest.raises(ProxyError) as info:
        proxy.next_read(buf)
    assert info.value.reason == "oversize"
    # and a look never asks for more than the 107 bytes in all
    assert proxy.next_read(buf[:100], b"x" * 50) == 7


# ------------------------------------------------------------------ v2

def test_v2_tcp4():
    raw = v2()
    h = proxy.parse(raw)
    assert h == ProxyHeader(2, ("192.0.2.7", 40000), ("198.51.100.1", 587), len(raw))
    assert proxy.next_read(raw) == 0


def test_v2_tcp6():
    h = proxy.parse(v2(fam=0x21, src="2001:db8::7", dst="2001:db8::1", sport=1, dport=465))
    assert h.source == ("2001:db8::7", 1) and h.destination == ("2001:db8::1", 465)


def test_v2_local_is_the_proxy_itself_whatever_the_addresses():
    assert proxy.parse(v2(command=0, fam=0x00)).local
    assert proxy.parse(v2(command=0, fam=0x11)).local  # HAProxy's health check may fill them in
    # "discard the protocol block including the family" (2.2): whatever it holds
    assert proxy.parse(v2(command=0, fam=0x41, tlvs=b"\x01\xff")).local


@pytest.mark.parametrize("fam", [0x00, 0x10, 0x31])
def test_v2_proxy_with_unspec_or_unix_family_uses_the_connection(fam):
    assert proxy.parse(v2(fam=fam)).local


def test_v2_tlvs_kept_raw():
    tl = tlv(0x01, b"smtp") + tlv(0x05, b"unique-id-1") + tlv(0x04, b"")
    h = proxy.parse(v2(tlvs=tl))
    assert h.tlvs == ((0x01, b"smtp"), (0x05, b"unique-id-1"), (0x04, b""))
    assert h.source == ("192.0.2.7", 40000)


V2_BAD = [
    (v2(tlvs=tlv(0x01, b"smtp")[:-1]), "malformed"),                                   # TLV past the end
    (v2(tlvs=b"\x01\x00"), "malformed"),                                               # truncated TLV
    (v2(tlvs=b"\x01\xff\xff"), "malformed"),                                           # absurd TLV length
    (v2(version=1), "malformed"),
    (v2(command=2), "malformed"),
    (v2(fam=0x12), "malformed"),                                                       # datagram
    (v2(fam=0x41), "malformed"),
    (v2(fam=0x21, src="2001:db8::7", dst="2001:db8::1")[:16 + 20], "malformed"),       # length says more
    (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "malformed"),                   # addresses short
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "oversize"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", proxy.V2_MAX_PAYLOAD + 1), "oversize"),
]


@pytest.mark.parametrize("raw,reason", V2_BAD)
def test_v2_refused(raw, reason):
    with pytest.raises(ProxyError) as info:
        proxy.parse(raw)
    assert info.value.reason == reason


def test_v2_incremental_reads_exactly_the_header():
    raw = v2(tlvs=tlv(0x05, b"x" * 100))
    assert proxy.next_read(b"", raw + b"\x16\x03\x01") == 16
    assert proxy.next_read(raw[:5]) == 11
    assert proxy.next_read(raw[:16]) == len(raw) - 16
    assert proxy.next_read(raw[:40]) == len(raw) - 40
    with pytest.raises(ProxyError) as info:
        proxy.next_read(V2_SIGNATURE + b"\x21\x11\xff\xff")
    assert info.value.reason == "oversize"  # refused at its 16th byte, nothing more read


# ------------------------------------------------------------------ reading off a socket

async def _read(chunks: list[bytes], timeout: float = 2.0, gap: float = 0.0, close: bool = False):
    """Feed `chunks` into one end of a socketpair; read a header off the other. Returns
    (header or ProxyError, what was left in the socket after the header)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        async def feed():
            for c in chunks:
                b.sendall(c)
                if gap:
                    await asyncio.sleep(gap)
            if close:
                b.shutdown(socket.SHUT_WR)

        feeder = asyncio.create_task(feed())
        try:
            result: ProxyHeader | ProxyError = await proxy.read_header(a, timeout)
        except ProxyError as exc:
            result = exc
        if isinstance(result, ProxyError):
            feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        b.shutdown(socket.SHUT_WR) if not close else None
        a.setblocking(True)
        a.settimeout(1)
        rest = b""
        try:
            while chunk := a.recv(65536):
                rest += chunk
        except OSError:
            pass
        return result, rest
    finally:
        a.close()
        b.close()


async def test_read_v1_leaves_the_rest_for_the_session():
    line = V1_GOOD[0][0]
    h, rest = await _read([line + b"EHLO client.test\r\n"])
    assert h.source == ("192.0.2.7", 40000) and rest == b"EHLO client.test\r\n"


async def test_read_v2_leaves_the_client_hello():
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc" + b"\xaa" * 50
    h, rest = await _read([v2(tlvs=tlv(1, b"smtp")) + hello])
    assert h.source == ("192.0.2.7", 40000) and rest == hello


async def test_read_in_pieces():
    raw = v2(fam=0x21, src="2001:db8::7", dst="2001:db8::1")
    h, rest = await _read([raw[i:i + 3] for i in range(0, len(raw), 3)] + [b"QUIT\r\n"], gap=0.001)
    assert h.source == ("2001:db8::7", 40000) and rest == b"QUIT\r\n"
    line = V1_GOOD[1][0]
    h, rest = await _read([line[i:i + 5] for i in range(0, len(line), 5)] + [b"QUIT\r\n"], gap=0.001)
    assert h.source == ("2001:db8::7", 65535) and rest == b"QUIT\r\n"


async def test_read_garbage_and_truncated():
    err, _ = await _read([b"EHLO client.test\r\n"])
    assert isinstance(err, ProxyError) and err.reason == "missing"
    err, _ = await _read([V1_GOOD[0][0][:20]], close=True)
    assert isinstance(err, ProxyError) and err.reason == "eof"
    err, _ = await _read([v2()[:20]], close=True)
    assert isinstance(err, ProxyError) and err.reason == "eof"
    err, _ = await _read([b"PROXY TCP4 " + b"9" * 200])
    assert isinstance(err, ProxyError) and err.reason == "oversize"


async def test_slowloris_one_byte_a_second_is_cut_at_the_deadline():
    line = V1_GOOD[0][0]
    t0 = time.monotonic()
    err, _ = await _read([line[i:i + 1] for i in range(len(line))], timeout=1.5, gap=0.5)
    took = time.monotonic() - t0
    assert isinstance(err, ProxyError) and err.reason == "timeout"
    assert 1.4 < took < 3.0, took   # the whole header's deadline, not one per byte


async def test_silence_times_out():
    err, _ = await _read([], timeout=0.3)
    assert isinstance(err, ProxyError) and err.reason == "timeout"
