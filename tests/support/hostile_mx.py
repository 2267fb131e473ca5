"""Misbehaving SMTP receivers as real sockets: the hostile network the delivery engine must survive.

``HostileMX`` is a small hand-written SMTP server (not aiosmtpd: the misbehaviour has to reach
below the protocol, into how fast bytes are read off the socket and when replies are written).
Like ``MXSink`` it runs its own event loop in a daemon thread, listens on 127.0.0.x, port 0 (or a
given port, on several loopback addresses at once: 25 MX hosts are 25 addresses sharing the
relay's ``delivery.mx_port``), and keeps exact books:

- ``connections`` (accepted so far), ``active`` and ``max_active`` (concurrent TCP connections,
  counted from accept to the kernel-level end of the connection), ``by_host`` (accepts per
  listening address);
- ``messages``: only COMPLETED messages, i.e. the whole final ``CRLF.CRLF`` arrived. A message
  counts at that moment, whatever reply follows and whether or not the client is still there to
  read it: that is exactly when a real MX takes responsibility. ``partials`` counts DATA bodies
  that ended (reset, EOF, our own close) before their final dot, booked once ``settled``;
- ``ends``: how each connection ended, from the receiver's side: ``"reset"`` (a TCP RST reached
  us), ``"eof"`` (the client's FIN), ``"closed"`` (we closed it), ``"stopped"`` (the MX stopped);
- ``log``: every command line as (connection serial, line), and ``nested_mail`` (MAIL inside an
  open transaction, answered ``503 5.5.1 Error: nested MAIL command`` as Postfix does).

Behaviour is plain attributes, read when they matter, so a test may change them between
connections (``mx.dot_reply_delay = 0`` after the first attempt)::

    slow_reader   data_rate = 300_000               bytes/s while reading a DATA body
    stops reading stop_reading_after = 256 * 1024   bytes of body, then no read for
                  stop_reading_for = 5.0            seconds (None: until the MX stops)
    tarpit        command_delay = 1.5               seconds before every reply after the greeting
    late dot      dot_reply_delay = 5.0             seconds between the final dot and its reply
    mid-DATA      close_after_data_bytes = 100_000  close once that much body arrived
                  close_how = "fin" | "rst"
    stall         stall_at = {"RCPT"}               never answer these verbs (keeps reading)
    scripted      greeting, ehlo_hostname, mail_reply, rcpt_replies, data_cmd_replies, dot_reply
    on connect    on_connect = "accept" | "drop" (close at once) | "stall" (no banner ever)

The receive buffer of the listening sockets is small (``rcvbuf``), so a receiver that reads
slowly or not at all really holds the sender back (loopback autotuning would otherwise swallow
megabytes), and the reset of a connection whose reads are paused is still seen: a watcher polls
the kernel's TCP state (TCP_INFO) while reading is stopped.
"""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = ["HostileMX", "HostileMessage", "mx_records_for", "free_port", "free_port_on"]

DEFAULT_RCVBUF = 32 * 1024
_TCP_CLOSE = 7  # tcpi_state after a reset (linux/tcp_states.h); a FIN queues behind unread data
_ADDR = re.compile(r"<([^>]*)>")


@dataclass
class HostileMessage:
    mail_from: str
    rcpt_tos: list[str]
    rcpt_params: list[str]          # everything after the bracketed path, per RCPT, as sent
    data: bytes                     # dot-unstuffed, without the final dot line
    connection: int                 # serial of the TCP connection (1, 2, ...)
    host: str                       # the listening address it arrived on
    completed_at: float             # time.monotonic() when the final dot arrived

    @property
    def subject(self) -> str | None:
        m = re.search(rb"^Subject: (.*?)\r$", self.data, re.M)
        return m.group(1).decode(errors="replace") if m else None


@dataclass
class _Conn:
    serial: int
    host: str
    transport: asyncio.Transport | None = None
    end: str | None = None
    in_data: bool = False
    reads_stopped: bool = False
    closed_by_us: bool = False
    extra: dict = field(default_factory=dict)


class _Protocol(asyncio.StreamReaderProtocol):
    """Stream protocol that tells the MX when the connection really ends, and how."""

    def __init__(self, mx: "HostileMX", host: str):
        self.mx = mx
        self.host = host
        self.conn: _Conn | None = None
        reader = asyncio.StreamReader(limit=mx.stream_limit, loop=mx._loop)
        super().__init__(reader, self._client_connected, loop=mx._loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self.mx._register(self.host, transport)  # type: ignore[arg-type]
        super().connection_made(transport)

    def eof_received(self) -> bool:
        super().eof_received()
        if self.conn is not None and self.conn.end is None:
            self.conn.end = "eof"
        return False  # close our side too: connection_lost follows at once

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            if self.conn.end is None:
                if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                    self.conn.end = "reset"
                elif self.conn.closed_by_us:
                    self.conn.end = "closed"
                elif self.mx._stopping_flag:
                    self.conn.end = "stopped"
                else:
                    self.conn.end = "eof"
            self.mx._unregister(self.conn)
        super().connection_lost(exc)

    async def _client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.conn is not None
        task = asyncio.current_task()
        self.mx._tasks.add(task)
        try:
            await _Session(self.mx, self.conn, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.mx._tasks.discard(task)
            if not writer.transport.is_closing():
                self.conn.closed_by_us = True
                writer.transport.close()


class _Closed(Exception):
    pass


class _Session:
    def __init__(self, mx: "HostileMX", conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.mx, self.conn, self.reader, self.writer = mx, conn, reader, writer
        self.buf = bytearray()
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.rcpt_params: list[str] = []
        self.ehlo = False

    # -------------------------------------------------------------- wire

    async def _fill(self, n: int = 65536) -> None:
        try:
            chunk = await self.reader.read(n)
        except (ConnectionError, OSError):
            raise _Closed() from None
        if not chunk:
            raise _Closed()
        self.buf += chunk

    async def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > 64 * 1024:
                raise _Closed()  # not SMTP
            await self._fill()

    async def reply(self, text: str, delay: float | None = None) -> None:
        d = self.mx.command_delay if delay is None else delay
        if d:
            await asyncio.sleep(d)
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()

    async def stall(self) -> None:
        """Never answer: keep reading (and discarding) until the client goes away."""
        while True:
            self.buf.clear()
            await self._fill()

    # -------------------------------------------------------------- protocol

    async def run(self) -> None:
        mx = self.mx
        mode = mx.on_connect
        if mode == "drop":
            self.conn.closed_by_us = True
            self.writer.transport.close()
            return
        if mode == "stall":
            try:
                await self.stall()
            except _Closed:
                return
        if mx.greeting_delay:
            await asyncio.sleep(mx.greeting_delay)
        greeting = mx.greeting or f"220 {mx.hostname} ESMTP hostile"
        self.writer.write(greeting.encode() + b"\r\n")
        await self.writer.drain()
        if not greeting.startswith("220"):
            await asyncio.sleep(0.05)  # let the reply go before the FIN
            self.conn.closed_by_us = True
            self.writer.transport.close()
            return
        try:
            while True:
                line = await self.readline()
                text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                mx.log.append((self.conn.serial, text))
                verb = text.split(" ", 1)[0].upper()
                arg = text[len(verb):].strip()
                if verb in mx.stall_at:
                    await self.stall()
                handler = getattr(self, "smtp_" + verb, None)
                if handler is None:
                    await self.reply("500 5.5.2 Error: command not recognized")
                    continue
                if await handler(arg) is False:
                    return
        except _Closed:
            return

    async def smtp_EHLO(self, arg: str) -> None:
        mx = self.mx
        self._reset()
        self.ehlo = True
        lines = [f"{mx.ehlo_hostname or mx.hostname}"] + ["PIPELINING", "SIZE 67108864", "8BITMIME",
                                                         "ENHANCEDSTATUSCODES"]
        if mx.advertise_dsn:
            lines.append("DSN")
        if mx.smtputf8:
            lines.append("SMTPUTF8")
        await self.reply("\r\n".join(("250-" if i < len(lines) - 1 else "250 ") + t for i, t in enumerate(lines)))

    async def smtp_HELO(self, arg: str) -> None:
        self._reset()
        await self.reply(f"250 {self.mx.ehlo_hostname or self.mx.hostname}")

    async def smtp_NOOP(self, arg: str) -> None:
        await self.reply("250 2.0.0 Ok")

    async def smtp_RSET(self, arg: str) -> None:
        self._reset()
        await self.reply("250 2.0.0 Ok")

    async def smtp_QUIT(self, arg: str) -> bool:
        await self.reply("221 2.0.0 Bye", delay=0)
        self.conn.closed_by_us = True
        self.writer.transport.close()
        return False

    async def smtp_MAIL(self, arg: str) -> None:
        mx = self.mx
        if self.mail_from is not None:
            mx.nested_mail += 1
            await self.reply("503 5.5.1 Error: nested MAIL command")
            return
        m = _ADDR.search(arg)
        if not m:
            await self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        reply = mx.mail_reply or "250 2.1.0 Ok"
        if reply.startswith("2"):
            self.mail_from = m.group(1)
        await self.reply(reply)

    async def smtp_RCPT(self, arg: str) -> None:
        mx = self.mx
        if self.mail_from is None:
            await self.reply("503 5.5.1 Error: need MAIL command")
            return
        m = _ADDR.search(arg)
        if not m:
            await self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address = m.group(1)
        reply = mx.rcpt_replies.get(address.lower(), "250 2.1.5 Ok")
        if reply.startswith("2"):
            self.rcpts.append(address)
            self.rcpt_params.append(arg[m.end():].strip())
        await self.reply(reply)

    async def smtp_DATA(self, arg: str) -> None:
        mx = self.mx
        if not self.rcpts:
            await self.reply("503 5.5.1 Error: need RCPT command")
            return
        if mx.data_cmd_replies:
            # A refused DATA command leaves the transaction open (RFC 5321 4.1.4: the client
            # must RSET before its next MAIL).
            await self.reply(mx.data_cmd_replies.pop(0))
            return
        await self.reply("354 End data with <CR><LF>.<CR><LF>")
        body = await self._read_body()
        msg = HostileMessage(self.mail_from or "", list(self.rcpts), list(self.rcpt_params), body,
                             self.conn.serial, self.conn.host, time.monotonic())
        mx.messages.append(msg)
        self._reset()
        if mx.dot_reply_delay:
            await asyncio.sleep(mx.dot_reply_delay)
        # A tarpit's command_delay applies to the dot's reply as well, on top of dot_reply_delay.
        await self.reply((mx.dot_reply or "250 2.0.0 Ok: queued as {n}").format(n=len(mx.messages)))

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpts = []
        self.rcpt_params = []

    async def _read_body(self) -> bytes:
        """Read up to and including CRLF.CRLF at the configured pace; raise _Closed if it never comes."""
        mx, conn = self.mx, self.conn
        conn.in_data = True
        raw = bytearray()
        scanned = 0          # bytes of raw already searched for the terminator
        stopped_once = False
        try:
            while True:
                if self.buf:
                    raw += self.buf
                    self.buf.clear()
                    if raw.startswith(b".\r\n"):  # an empty body: the dot line comes first
                        self.buf[:0] = raw[3:]
                        body = b""
                        break
                    i = raw.find(b"\r\n.\r\n", max(0, scanned - 4))
                    if i >= 0:
                        self.buf[:0] = raw[i + 5:]  # pipelined bytes after the dot
                        body = bytes(raw[:i + 2])
                        break
                    scanned = len(raw)
                received = len(raw)
                if mx.close_after_data_bytes is not None and received >= mx.close_after_data_bytes:
                    conn.closed_by_us = True
                    if mx.close_how == "rst":
                        _set_linger_zero(self.writer.transport)
                        self.writer.transport.abort()
                    else:
                        self.writer.transport.close()
                    raise _Closed()
                if mx.stop_reading_after is not None and received >= mx.stop_reading_after and not stopped_once:
                    stopped_once = True
                    await self._stop_reading(mx.stop_reading_for)
                rate = mx.data_rate
                n = 65536 if not rate else max(1, min(65536, int(rate / 20)))
                t0 = time.monotonic()
                await self._fill(n)
                if rate:
                    pause = len(self.buf) / rate - (time.monotonic() - t0)
                    if pause > 0:
                        await asyncio.sleep(pause)
        except _Closed:
            mx.partials += 1
            raise
        finally:
            conn.in_data = False
        # RFC 5321 4.5.2: remove the transparency dots.
        if body.startswith(b".."):
            body = body[1:]
        return body.replace(b"\r\n..", b"\r\n.")

    async def _stop_reading(self, seconds: float | None) -> None:
        """Read nothing for `seconds` (None: until the MX stops), watching the TCP state meanwhile."""
        conn, mx = self.conn, self.mx
        conn.reads_stopped = True
        mx.stalled_reads += 1
        transport = self.writer.transport
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while deadline is None or time.monotonic() < deadline:
                if mx._stopping_flag:
                    raise _Closed()
                state = _tcp_state(sock)
                if state == _TCP_CLOSE and conn.end is None:
                    conn.end = "reset"
                await asyncio.sleep(0.05)
        finally:
            conn.reads_stopped = False
            if not transport.is_closing():
                transport.resume_reading()


def _tcp_state(sock) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except (OSError, AttributeError, ValueError):
        return None


def _set_linger_zero(transport: asyncio.BaseTransport) -> None:
    import struct
    sock = transport.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class HostileMX:
    """See the module doc. Start with ``with HostileMX(...) as mx:`` or ``.start()`` / ``.stop()``."""

    def __init__(self, *, host: str | Iterable[str] = "127.0.0.1", port: int = 0, hostname: str = "mx.hostile.test",
                 rcvbuf: int | None = DEFAULT_RCVBUF, advertise_dsn: bool = False, smtputf8: bool = True):
        self.hosts = [host] if isinstance(host, str) else list(host)
        self.host = self.hosts[0]
        self._requested_port = port
        self.hostname = hostname
        self.rcvbuf = rcvbuf
        self.advertise_dsn = advertise_dsn
        self.smtputf8 = smtputf8
        self.stream_limit = 16 * 1024

        # Behaviour (read on the loop thread when it matters).
        self.on_connect = "accept"
        self.greeting: str | None = None
        self.greeting_delay = 0.0
        self.ehlo_hostname: str | None = None
        self.command_delay = 0.0
        self.stall_at: set[str] = set()
        self.mail_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.data_cmd_replies: list[str] = []
        self.data_rate: float | None = None
        self.stop_reading_after: int | None = None
        self.stop_reading_for: float | None = None
        self.close_after_data_bytes: int | None = None
        self.close_how = "fin"
        self.dot_reply_delay = 0.0
        self.dot_reply: str | None = None

        # Books.
        self.messages: list[HostileMessage] = []
        self.partials = 0
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.by_host: dict[str, int] = {}
        self.conns: list[_Conn] = []
        self.log: list[tuple[int, str]] = []
        self.nested_mail = 0
        self.stalled_reads = 0
        self.port = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._stopping_flag = False
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "HostileMX":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"HostileMX-{self.hostname}", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is None or self._stopping_flag:
            return
        self._stopping_flag = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - best effort; the loop stops below regardless
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)

    def __enter__(self) -> "HostileMX":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"<HostileMX {','.join(self.hosts)}:{self.port} messages={len(self.messages)} "
                f"connections={self.connections} active={self.active} max_active={self.max_active}>")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # ---------------------------------------------------------------- observations

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        """True once at least `n` messages are complete."""
        return self.wait_until(lambda: len(self.messages) >= n, timeout)

    def wait_until(self, predicate: Callable[[], object], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    @property
    def settled(self) -> bool:
        """No connection open and no session still working through what it read.

        ``active`` drops when the kernel ends the connection; the session that was reading it
        books the partial body a moment later, on its own turn of the loop. Tests that look
        at ``partials`` wait for this, not for ``active == 0``."""
        return self.active == 0 and not self._tasks

    def subjects(self) -> list[str | None]:
        return [m.subject for m in list(self.messages)]

    def rcpt_commands(self) -> int:
        return sum(1 for _, line in list(self.log) if line[:4].upper() == "RCPT")

    def ended(self) -> list[str | None]:
        return [c.end for c in list(self.conns)]

    # ---------------------------------------------------------------- loop thread

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _open(self) -> None:
        port = self._requested_port
        for host in self.hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.rcvbuf:
                # Set before listen(): accepted sockets inherit it, and it turns off autotuning.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                for s in self._servers:
                    s.close()
                raise
            sock.listen(128)
            port = sock.getsockname()[1]
            server = await self._loop.create_server(lambda h=host: _Protocol(self, h), sock=sock)
            self._servers.append(server)
        self.port = port

    def _register(self, host: str, transport: asyncio.Transport) -> _Conn:
        with self._lock:
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.by_host[host] = self.by_host.get(host, 0) + 1
            conn = _Conn(self.connections, host, transport)
            self.conns.append(conn)
        return conn

    def _unregister(self, conn: _Conn) -> None:
        with self._lock:
            if conn.transport is not None:
                conn.transport = None
                self.active -= 1

    async def _shutdown(self) -> None:
        for s in self._servers:
            s.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        for _ in range(3):
            await asyncio.sleep(0)


# -------------------------------------------------------------------- helpers for tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_on(hosts: Iterable[str], attempts: int = 50) -> int:
    """A TCP port free on every one of `hosts` right now (the relay binds it next)."""
    hosts = list(hosts)
    for _ in range(attempts):
        port = free_port()
        socks = []
        try:
            for h in hosts:
                s = socket.socket()
                socks.append(s)
                s.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"no port free on all of {hosts}")


def mx_records_for(dns_server, domain: str, addresses: list[str], *, prefix: str = "mx") -> list[str]:
    """Point `domain` at one MX host per address (preferences 10, 20, ...); returns the host names."""
    hosts = [f"{prefix}{i + 1}.{domain}" for i in range(len(addresses))]
    dns_server.set(domain, "MX", [f"{10 * (i + 1)} {h}." for i, h in enumerate(hosts)])
    for h, a in zip(hosts, addresses):
        dns_server.set(h, "A", [a])
    return hosts
