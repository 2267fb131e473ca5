"""The PROXY protocol (v1 text and v2 binary, haproxy's doc/proxy-protocol.txt) on listeners
behind a load balancer: a strict parser, and the read of the header off the raw socket before
the session (its caps, greeting and TLS) exists.

Why our own and not aiosmtpd's `proxy_protocol_timeout` path: aiosmtpd reads the header inside
its session, after our accept-time caps (which would count the load balancer, not the client),
and on an implicit-TLS listener the TLS layer would read the header as a ClientHello (aiosmtpd
issue #559). Reading it off the socket first, never a byte past its end, leaves the stream to the
session exactly as if the client had connected directly: the ClientHello on 465, EHLO on 587.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107                # the whole v1 line, CRLF included (proxy-protocol.txt 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16               # signature, version/command, family/protocol, length
# v2 allows 65535 bytes after the fixed part; what a load balancer sends (addresses, ALPN,
# authority, unique id, SSL sub-TLVs, AWS/Azure ids) is well under this. More is refused,
# never buffered: 200 stalled connections must not hold 13 MB.
V2_MAX_PAYLOAD = 4096

_V2_ADDR_LEN = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}


class ProxyError(Exception):
    """The header is missing, malformed, too long, or did not come in time; `reason` is the
    log/metric label (a fixed vocabulary: missing, malformed, oversize, timeout, eof)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProxyHeader:
    version: int
    # None: LOCAL (v2 health check), UNKNOWN (v1) or a family we do not route by (AF_UNIX,
    # AF_UNSPEC): the connection's own peer, the proxy, is the client (proxy-protocol.txt 2.1/2.2).
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int                                  # bytes the header took on the wire
    tlvs: tuple[tuple[int, bytes], ...] = ()     # v2 type-length-values, raw

    @property
    def local(self) -> bool:
        return self.source is None


def _v1_port(text: bytes) -> int:
    # Decimal, no leading zeros, 0..65535 (proxy-protocol.txt 2.1).
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyError("malformed", "bad port")
    port = int(text)
    if port > 65535:
        raise ProxyError("malformed", "bad port")
    return port


def _v1_addr(text: bytes, version: int) -> str:
    try:
        s = text.decode("ascii")
        addr = ipaddress.IPv4Address(s) if version == 4 else ipaddress.IPv6Address(s)
    except (UnicodeDecodeError, ValueError):
        raise ProxyError("malformed", f"bad TCP{version} address") from None
    return str(addr)


def parse_v1(line: bytes) -> ProxyHeader:
    """One complete v1 line, CRLF included."""
    if len(line) > V1_MAX:
        raise ProxyError("oversize", "v1 line longer than 107 bytes")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyError("malformed", "not a PROXY line")
    parts = line[len(V1_PREFIX):-2].split(b" ")
    if parts[0] == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF" (2.1)
        return ProxyHeader(1, None, None, len(line))
    if parts[0] not in (b"TCP4", b"TCP6") or len(parts) != 5:
        raise ProxyError("malformed", "expected TCP4|TCP6 src dst sport dport")
    version = 4 if parts[0] == b"TCP4" else 6
    src, dst = _v1_addr(parts[1], version), _v1_addr(parts[2], version)
    return ProxyHeader(1, (src, _v1_port(parts[3])), (dst, _v1_port(parts[4])), len(line))


def _tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    i = 0
    while i < len(block):
        if i + 3 > len(block):
            raise ProxyError("malformed", "truncated TLV")
        kind, n = block[i], struct.unpack_from("!H", block, i + 1)[0]
        if i + 3 + n > len(block):
            raise ProxyError("malformed", "TLV longer than the header")
        out.append((kind, bytes(block[i + 3:i + 3 + n])))
        i += 3 + n
    return tuple(out)


def parse_v2(data: bytes) -> ProxyHeader:
    """One complete v2 header (exactly 16 + its length field bytes)."""
    if len(data) < V2_FIXED or not data.startswith(V2_SIGNATURE):
        raise ProxyError("malformed", "bad v2 signature")
    ver_cmd, fam, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if length > V2_MAX_PAYLOAD:
        raise ProxyError("oversize", f"v2 length {length} > {V2_MAX_PAYLOAD}")
    if len(data) != V2_FIXED + length:
        raise ProxyError("malformed", "v2 length does not match")
    if ver_cmd >> 4 != 2:
        raise ProxyError("malformed", "unsupported version")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyError("malformed", "unsupported command")
    payload = data[V2_FIXED:]
    if command == 0:
        # LOCAL: the proxy speaking for itself (health checks); "the receiver must ... use the
        # real connection endpoints and discard the protocol block including the family" (2.2).
        return ProxyHeader(2, None, None, len(data))
    addr_len = _V2_ADDR_LEN.get(fam, 0)
    if fam >> 4 > 3 or fam & 0x0F > 2:
        raise ProxyError("malformed", "unsupported family/protocol")
    if len(payload) < addr_len:
        raise ProxyError("malformed", "address block truncated")
    tlvs = _tlvs(payload[addr_len:])
    if fam in (0x11, 0x21):  # TCP over IPv4 / IPv6
        n = 4 if fam == 0x11 else 16
        src = str(ipaddress.ip_address(payload[:n]))
        dst = str(ipaddress.ip_address(payload[n:2 * n]))
        sport, dport = struct.unpack_from("!HH", payload, 2 * n)
        return ProxyHeader(2, (src, sport), (dst, dport), len(data), tlvs)
    if fam & 0x0F == 2:
        raise ProxyError("malformed", "datagram on a stream listener")
    # UNSPEC or AF_UNIX: "the receiver must ... use the real connection endpoints" (2.2)
    return ProxyHeader(2, None, None, len(data), tlvs)


def parse(data: bytes) -> ProxyHeader:
    """A whole header, v1 or v2 (what `read_header` took off the socket)."""
    if data.startswith(V2_SIGNATURE[:1]):
        return parse_v2(data)
    return parse_v1(data)


def next_read(buf: bytes, peeked: bytes | None = None) -> int:
    """How many more bytes certainly belong to the header, given the `buf` read so far: 0 when
    it is complete, -1 when only a look at the waiting bytes can tell (MSG_PEEK, `peeked`).
    Raises ProxyError as soon as `buf` (and `peeked`) cannot be the start of a header.

    v2 says its length in its 16th byte; a v1 line ends at its first LF, which only a look at
    the waiting bytes finds without taking a byte past it."""
    seen = buf + (peeked or b"")
    if not seen:
        return -1
    if seen[:1] == V2_SIGNATURE[:1]:
        if not V2_SIGNATURE.startswith(seen[:len(V2_SIGNATURE)]):
            raise ProxyError("missing", "no PROXY signature")
        if len(buf) < V2_FIXED:
            return V2_FIXED - len(buf)
        length = struct.unpack_from("!H", buf, 14)[0]
        if length > V2_MAX_PAYLOAD:
            raise ProxyError("oversize", f"v2 length {length} > {V2_MAX_PAYLOAD}")
        return V2_FIXED + length - len(buf)
    if not V1_PREFIX.startswith(seen[:len(V1_PREFIX)]):
        raise ProxyError("missing", "no PROXY signature")
    if buf.endswith(b"\n"):
        return 0
    if len(buf) >= V1_MAX:
        raise ProxyError("oversize", "v1 line longer than 107 bytes")
    if not peeked:
        return -1
    lf = peeked.find(b"\n")
    return min(lf + 1 if lf >= 0 else len(peeked), V1_MAX - len(buf))


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


def _recv(sock: socket.socket, n: int, flags: int = 0) -> bytes | None:
    try:
        data = sock.recv(n, flags)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise ProxyError("eof", type(exc).__name__) from None
    if not data:
        raise ProxyError("eof", "closed before the end of the header")
    return data


async def read_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Read one PROXY header off a non-blocking socket, never a byte past its end, within
    `timeout` seconds in all (a byte-a-second drip is cut off at the deadline, not per byte)."""
    loop = asyncio.get_running_loop()
    buf = b""

    async def run() -> ProxyHeader:
        nonlocal buf
        while True:
            want = next_read(buf)
            if want < 0:
                peeked = _recv(sock, V1_MAX - len(buf), socket.MSG_PEEK)
                if peeked is None:
                    await _readable(loop, sock)
                    continue
                want = next_read(buf, peeked)
            if want == 0:
                return parse(buf)
            data = _recv(sock, want)
            if data is None:
                await _readable(loop, sock)
                continue
            buf += data

    try:
        return await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        raise ProxyError("timeout", f"{len(buf)} bytes in {timeout:g}s") from None
