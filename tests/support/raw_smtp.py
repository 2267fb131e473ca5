"""Shared helpers for the test_server_* files: a raw SMTP client over a real socket, and relay fixtures.

smtplib hides what the wire carries (it rewrites line endings, retries EHLO, swallows
pipelined replies); these tests need to send exact bytes and read every reply line. This
module holds no tests of its own.
"""
from __future__ import annotations

import base64
import re
import socket
import ssl
import threading
from pathlib import Path

from tests.conftest import PASSWORD, USER
from tests.support.dialog import Reply
from tests.support.relay_instance import RelayInstance, _merge, client_tls_context


class Resp(Reply):
    """A reply as the dialog runner parses it, plus a comparison with our reply constants."""

    def is_(self, reply) -> bool:
        """Same code, enhanced status and text as a `replies.Reply` constant (text may be extended)."""
        return self.code == reply.code and self.lines[-1].startswith(f"{reply.status} {reply.text}")


class RawSMTP:
    """Blocking line-level SMTP client: exact bytes out, every reply line in."""

    def __init__(self, port: int, *, implicit: bool = False, source: str | None = None, timeout: float = 10,
                 context: ssl.SSLContext | None = None, preamble: bytes = b""):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        if preamble:  # a PROXY protocol header, written as a load balancer would: before TLS
            sock.sendall(preamble)
        if implicit:
            sock = (context or client_tls_context()).wrap_socket(sock)
        self.sock: socket.socket = sock
        self.buf = b""
        self.banner = self.read()

    # ------------------------------------------------------------ wire

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; pending {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def read(self) -> Resp:
        lines = []
        while True:
            line = self.readline().decode("utf-8", "replace")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return Resp(int(line[:3]), lines)

    def cmd(self, line: str | bytes) -> Resp:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.read()

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF or reset), after any buffered lines."""
        try:
            while True:
                if self.buf:
                    self.readline()
                    continue
                if not self.sock.recv(65536):
                    return True
        except (ConnectionError, EOFError):
            return True
        except (TimeoutError, socket.timeout):
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawSMTP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ conveniences

    def ehlo(self, name: str = "client.test") -> Resp:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    def starttls(self) -> Resp:
        r = self.cmd("STARTTLS")
        assert r.code == 220, r
        assert not self.buf
        self.sock = client_tls_context().wrap_socket(self.sock)
        return r

    def secure(self) -> "RawSMTP":
        """EHLO, STARTTLS, EHLO (on an implicit-TLS connection: just EHLO)."""
        if isinstance(self.sock, ssl.SSLSocket):
            self.ehlo()
            return self
        self.ehlo()
        self.starttls()
        self.ehlo()
        return self

    def auth_plain(self, user: str = USER, password: str = PASSWORD, authz: str = "") -> Resp:
        blob = base64.b64encode(f"{authz}\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {blob}")

    def login(self, user: str = USER, password: str = PASSWORD) -> "RawSMTP":
        r = self.auth_plain(user, password)
        assert r.code == 235, r
        return self


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def connect(relay: RelayInstance, *, implicit: bool = False, source: str | None = None,
            timeout: float = 10) -> RawSMTP:
    return RawSMTP(relay.ports["implicit" if implicit else "starttls"], implicit=implicit, source=source,
                   timeout=timeout)


def authed(relay: RelayInstance, *, implicit: bool = False, source: str | None = None) -> RawSMTP:
    """Connected, TLS up, EHLO done, logged in as USER."""
    return connect(relay, implicit=implicit, source=source).secure().login()


def at_once(count: int, step, timeout: float = 60) -> dict[int, object]:
    """step(i) for i in range(count), each in its own thread, released together (a barrier):
    {i: what step(i) returned} for those that finished within `timeout`."""
    barrier = threading.Barrier(count)
    got: dict[int, object] = {}

    def run(i: int) -> None:
        barrier.wait(10)
        got[i] = step(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return got


def hold_queue() -> dict:
    """Config that keeps accepted mail in the queue: delivery goes to a smarthost port nobody listens on,
    so every attempt is transient (tests inspect the queue without racing the runner or real DNS)."""
    return {"delivery": {"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": free_port(), "tls": "none"}}}


def start_relay(workdir: Path, config: dict | None = None, users: dict[str, str] | None = None) -> RelayInstance:
    inst = RelayInstance(workdir, config=_merge(hold_queue(), config or {}))
    for user, password in (users or {USER: PASSWORD}).items():
        inst.add_user(user, password)
    return inst.start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(relay: RelayInstance, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the relay's /metrics page whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in relay.metrics_text().splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def message_fields(stored: bytes) -> list[bytes]:
    """Header fields of a stored message without the DKIM-Signature the relay may put on top."""
    from relay import headers
    return [f for f in headers.split(stored).fields if headers.field_name(f) != "dkim-signature"]
