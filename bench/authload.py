"""Authenticated-submission load generator for the benchmark (scenario 9), and its pure helpers.

One OS process per client connection slot, each a plain blocking loop: connect, EHLO, STARTTLS,
EHLO, AUTH PLAIN, MAIL/RCPT/DATA (pipelined, as both servers advertise PIPELINING), the body,
QUIT, a new connection for the next message. TLS and the socket work run in C (the ssl module
over blocking sockets), so a slot costs little Python per message and no slot waits for another's
GIL: the generator stays far from being the bottleneck, and it reports its own CPU so a run where
it is can be seen. `maximum_version` on the client's SSLContext caps the protocol (TLS 1.2 cell).

Only the standard library: the workers are started with the "spawn" method (no fork of a
parent that runs threads) and import this module alone.
"""
from __future__ import annotations

import base64
import multiprocessing
import resource
import socket
import ssl
import time
from dataclasses import dataclass, field


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 <= p <= 100) of `values`; NaN when empty.

    Nearest rank (the smallest value with at least p % of the values at or below it), so p99 of
    fewer than 100 values is the maximum, never an interpolation between two real latencies."""
    if not values:
        return float("nan")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile out of range: {p}")
    s = sorted(values)
    rank = max(1, -(-len(s) * p // 100))  # ceil(n * p / 100), at least the first value
    return s[int(rank) - 1]


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` messages over `parts` slots, the first ones taking the remainder: sums to `total`."""
    if parts <= 0:
        raise ValueError("parts must be positive")
    base, extra = divmod(max(0, total), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def tls_cap(name: str) -> ssl.TLSVersion | None:
    """'1.3' -> no cap (the client offers up to TLS 1.3); '1.2' -> TLSv1_2 as maximum_version."""
    caps = {"1.3": None, "1.2": ssl.TLSVersion.TLSv1_2}
    if name not in caps:
        raise ValueError(f"unknown TLS cap {name!r} (1.2 or 1.3)")
    return caps[name]


def reply_code(line: bytes) -> int | None:
    """The code of a final reply line (b'250 ok' -> 250), None for a continuation (b'250-...')."""
    if len(line) < 4 or not line[:3].isdigit():
        raise ValueError(f"not an SMTP reply line: {line[:60]!r}")
    return None if line[3:4] == b"-" else int(line[:3])


def make_message(size: int, sender: str, rcpt: str) -> bytes:
    """A message of about `size` bytes, 78-octet lines, no line starting with '.', CRLF ends."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench auth\r\n"
            f"Message-ID: <{time.time_ns()}@bench.example>\r\n\r\n").encode()
    line = b"X" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


@dataclass
class SlotResult:
    accepted: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)  # DATA's final '.' sent -> its 250
    cpu_s: float = 0.0  # this process's own user+system CPU over the loop
    started: float = 0.0  # time.time() of the first connect and the last QUIT's end
    ended: float = 0.0
    versions: set[str] = field(default_factory=set)  # TLS versions negotiated ('TLSv1.3', ...)


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def expect(self, code: int) -> None:
        while True:
            line = self.line()
            got = reply_code(line)
            if got is None:
                continue
            if got != code:
                raise RuntimeError(f"expected {code}, got {line[:120]!r}")
            return


def one_message(port: int, ctx: ssl.SSLContext, auth: bytes, sender: str, rcpt: str, wire: bytes,
                timeout: float, versions: set[str]) -> float:
    """One connection, one message; returns DATA -> 250 in seconds (adds the TLS version to `versions`)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(raw)
        c.expect(220)
        raw.sendall(b"EHLO bench.client\r\n")
        c.expect(250)
        raw.sendall(b"STARTTLS\r\n")
        c.expect(220)
        if c.buf:
            raise RuntimeError("data after STARTTLS's 220")
        tls = ctx.wrap_socket(raw, server_hostname="relay.bench")
        c.sock = tls
        versions.add(tls.version() or "?")
        tls.sendall(b"EHLO bench.client\r\n")
        c.expect(250)
        tls.sendall(b"AUTH PLAIN " + auth + b"\r\n")
        c.expect(235)
        tls.sendall(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        c.expect(250)
        c.expect(250)
        c.expect(354)
        tls.sendall(wire)
        t0 = time.perf_counter()
        c.expect(250)
        latency = time.perf_counter() - t0
        tls.sendall(b"QUIT\r\n")
        c.expect(221)
        return latency
    finally:
        raw.close()


def run_slot(port: int, messages: int, size: int, user: str, password: str, rcpt: str, tls: str,
             deadline: float, go, out) -> None:
    """A worker process: wait for `go`, send `messages` messages, put a SlotResult on `out`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cap = tls_cap(tls)
    if cap is not None:
        ctx.maximum_version = cap
    auth = base64.b64encode(f"\0{user}\0{password}".encode())
    wire = make_message(size, user, rcpt) + b".\r\n"
    res = SlotResult()
    go.wait(60)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    res.started = time.time()
    for _ in range(messages):  # bounded by the count and by the deadline
        if time.time() > deadline:
            break
        try:
            res.latencies.append(one_message(port, ctx, auth, user, rcpt, wire, timeout=30,
                                                    versions=res.versions))
            res.accepted += 1
        except (OSError, RuntimeError, ConnectionError, ssl.SSLError) as exc:
            res.errors += 1
            res.first_error = res.first_error or f"{type(exc).__name__}: {exc}"
            time.sleep(0.01)
    res.ended = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    res.cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    out.put(res)


def run_load(port: int, *, clients: int, messages: int, size: int, user: str, password: str, rcpt: str,
             tls: str, time_limit: float) -> dict:
    """`clients` processes at once, `messages` in all; wall time from the first connect to the last QUIT."""
    tls_cap(tls)  # an unknown cap fails here, not in every worker
    mp = multiprocessing.get_context("spawn")
    go = mp.Event()
    out = mp.Queue()
    deadline = time.time() + 60 + time_limit  # workers take a few seconds to spawn before `go`
    procs = [mp.Process(target=run_slot, args=(port, n, size, user, password, rcpt, tls, deadline, go, out),
                        daemon=True) for n in split_evenly(messages, clients)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    results: list[SlotResult] = []
    try:
        # Every worker imported and waiting: give them a moment, then release them at once.
        time.sleep(min(5.0, 0.1 * clients + 1.0))
        go.set()
        for _ in procs:
            results.append(out.get(timeout=time_limit + 90))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    started = min(r.started for r in results)
    ended = max(r.ended for r in results)
    lat = [x for r in results for x in r.latencies]
    accepted = sum(r.accepted for r in results)
    return {"accepted": accepted, "errors": sum(r.errors for r in results),
            "first_error": next((r.first_error for r in results if r.first_error), ""),
            "seconds": ended - started, "start": started, "latencies": lat,
            "client_cpu_s": sum(r.cpu_s for r in results),
            "tls_versions": sorted(set().union(*(r.versions for r in results)))}
