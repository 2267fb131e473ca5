"""One outbound SMTP session to one host (aiosmtplib), carrying messages in a row.

Maps every remote reply to a per-recipient outcome: 2xx delivered, 4xx transient, 5xx
permanent; anything that breaks the connection is transient (RFC 5321 4.2.1, 6.1: after the
final dot without a reply we do not know, so we retry and accept a possible duplicate).
"""
from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import re
import socket
import ssl
import struct
import termios
from typing import Awaitable, Callable

import aiosmtplib
from aiosmtplib.email import quote_address

from .. import memory, metrics
from ..logs import event
from ..policy import stuff, xtext_encode
from ..spool import Body
from . import DELIVERED, PERMANENT, TRANSIENT, Envelope, Fenced, RcptOutcome, all_same
from .dane import DANECheck, DANEMismatch
from .tls_policy import tls_result_of

log = logging.getLogger("relay.delivery")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class ConnectFailure(Exception):
    def __init__(self, reply: str, status: str = "4.4.1", tls_failed: bool = False, permanent: bool = False,
                 host: str | None = None, tls: str | None = None, greeted: bool = False,
                 tls_result: str | None = None):
        super().__init__(reply)
        # The TLSRPT result type (RFC 8460 4.3) when TLS failed or was missing: starttls-not-supported,
        # certificate-host-mismatch, certificate-expired, certificate-not-trusted, validation-failure.
        self.tls_result = tls_result
        self.greeted = greeted     # the session got past the greeting (counts toward max_mx_sessions)
        self.reply = reply
        self.status = status
        self.tls_failed = tls_failed
        self.permanent = permanent
        self.host = host           # the host that failed, for Remote-MTA and the log
        self.tls = tls             # "failed" (handshake/verification) or "unavailable" (no STARTTLS), for the log


@functools.lru_cache(maxsize=4096)
def _quoted(address: str, encoding: str) -> bytes:
    """`<address>` as aiosmtplib's mail()/rcpt() put it on the line (its parse and injection
    check included: a ValueError is raised each time, never cached), worked out once per
    address: email.utils' parser was 4 % of the delivery process's loop."""
    return quote_address(address).encode(encoding)


async def _mail(c: aiosmtplib.SMTP, sender: str, options: list[str], encoding: str) -> None:
    """aiosmtplib's SMTP.mail(), with the quoted address remembered."""
    if c.is_ehlo_or_helo_needed:
        await c.mail(sender, options=options, encoding=encoding)
        return
    resp = await c.execute_command(b"MAIL", b"FROM:" + _quoted(sender, encoding), *(o.encode("ascii") for o in options))
    if resp.code != 250:
        raise aiosmtplib.SMTPSenderRefused(resp.code, resp.message, sender)


async def _rcpt(c: aiosmtplib.SMTP, recipient: str, options: list[str], encoding: str) -> None:
    """aiosmtplib's SMTP.rcpt(), with the quoted address remembered."""
    if c.is_ehlo_or_helo_needed:
        await c.rcpt(recipient, options=options, encoding=encoding)
        return
    resp = await c.execute_command(b"RCPT", b"TO:" + _quoted(recipient, encoding), *(o.encode("ascii") for o in options))
    if resp.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(resp.code, resp.message, recipient)


def status_of(code: int, message: str) -> str:
    m = _ENHANCED.match(message.strip())
    if m and m.group(1) == str(code)[0]:
        return m.group(0)
    return f"{str(code)[0]}.0.0"


class DataStalled(Exception):
    """The body stopped moving (the receiver reads nothing) for data_xfer_timeout seconds."""


class _RefusedMidBody(aiosmtplib.SMTPDataError):
    """The receiver replied before the final dot: the session is out of step, so it is aborted."""


class StaleSession(Exception):
    """A reused session was found closed before anything of this message was sent: reconnect and retry."""


def outcome_of(code: int, message: str, host: str, tls: str | None, dsn: bool = False) -> RcptOutcome:
    text = " ".join(message.split())[:900]
    reply = f"{code} {text}"
    kind = DELIVERED if 200 <= code < 300 else PERMANENT if 500 <= code < 600 else TRANSIENT
    return RcptOutcome(kind, reply, status_of(code, text) if kind != DELIVERED else "2.0.0", host, tls,
                       dsn and kind == DELIVERED)


def _describe_exc(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {' '.join(exc.message.split())}"
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return "timeout"
    if isinstance(exc, DataStalled):
        return str(exc)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return "connection lost"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure ({exc.reason or exc})"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


def _dane_verify(client: aiosmtplib.SMTP, dane: DANECheck, where: str, host: str):
    """Match the peer's chain to the TLSA records (RFC 7672 3); ConnectFailure (4.7.5) if not."""
    ssl_obj = client.transport.get_extra_info("ssl_object") if client.transport else None
    try:
        if ssl_obj is None:
            raise DANEMismatch("no TLS session after STARTTLS")
        return dane.verify(ssl_obj)
    except DANEMismatch as exc:
        client.close()
        raise ConnectFailure(f"{where}: DANE authentication failed: {exc.reason}; will retry", "4.7.5",
                             tls_failed=True, host=host, tls="failed", tls_result=exc.result) from None


class Session:
    """An open, greeted (and where possible encrypted) session to `host`."""

    def __init__(self, client: aiosmtplib.SMTP, host: str, tls: str | None, cipher: str | None = None,
                 verified: bool = False, dane: str | None = None):
        self.client = client
        # The TLSA record (text) that authenticated the peer (DANE, RFC 7672), or None.
        self.dane = dane
        self.host = host
        self.tls = tls or "plain"
        self.cipher = cipher
        self.verified = verified and tls is not None  # the certificate was checked (PKIX, for `host`)
        self.messages = 0
        self.alive = True

    @property
    def security(self) -> str:
        """plain | tls | verified: what the downgrade memory compares."""
        # A DANE-authenticated peer counts as "tls" only: "verified" in the memory means PKIX, which
        # a DANE-EE host with a self-signed certificate could not offer once its TLSA goes.
        if self.dane:
            return "tls"
        return "verified" if self.verified else "tls" if self.tls != "plain" else "plain"

    @classmethod
    async def open(cls, *, address: str, port: int, host: str, helo: str, connect_timeout: float,
                   command_timeout: float, tls: str, verify: bool, username: str = "", password: str = "",
                   tls_context: ssl.SSLContext | None = None,
                   own_hostname: frozenset[str] = frozenset(), dane: DANECheck | None = None) -> "Session":
        """tls: 'opportunistic' | 'required' | 'starttls' | 'implicit' | 'none'. With `dane`, the
        handshake does not verify (tls_context must not) and the peer's chain is matched against
        the TLSA records right after it, before the second EHLO: a mismatch aborts (4.7.5)."""
        client = aiosmtplib.SMTP(hostname=address, port=port, local_hostname=helo, timeout=command_timeout,
                                 use_tls=tls == "implicit", start_tls=False, validate_certs=verify,
                                 tls_context=tls_context if tls == "implicit" else None)
        where = f"{host}[{address}]:{port}"
        matched = None
        try:
            greeting = await client.connect(timeout=connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise ConnectFailure(f"{where} greeted with {_describe_exc(exc)}", status_of(exc.code, exc.message),
                                 host=host) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            implicit = tls == "implicit"
            raise ConnectFailure(f"{where}: {_describe_exc(exc)}", tls_failed=implicit, host=host,
                                 tls="failed" if implicit and isinstance(exc.__cause__ or exc, ssl.SSLError)
                                 else None) from None
        try:
            try:
                ehlo = await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                ehlo = await client.helo()  # RFC 5321 3.2: an old server that refuses EHLO still speaks SMTP
            for reply in (greeting, ehlo):
                # A server that names us is us (a forwarding loop through another name or NAT),
                # as Postfix decides ("mail for X loops back to myself").
                name = reply.message.split(None, 1)[0].lower().rstrip(".") if reply.message.strip() else ""
                if name in own_hostname:
                    client.close()
                    raise ConnectFailure(f"{where} greeted us with our own hostname {name}", "5.4.6",
                                         permanent=True, host=host)
            if tls in ("opportunistic", "required", "starttls"):
                if client.supports_extension("starttls"):
                    try:
                        await client.starttls(server_hostname=host, validate_certs=verify, tls_context=tls_context)
                    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                        client.close()
                        raise ConnectFailure(f"{where}: STARTTLS failed: {_describe_exc(exc)}",
                                             "4.7.5" if tls != "opportunistic" else "4.4.1", tls_failed=True,
                                             host=host, tls="failed", tls_result=tls_result_of(exc)) from None
                    if dane is not None:
                        matched = _dane_verify(client, dane, where, host)
                    await client.ehlo()
                elif tls != "opportunistic":
                    client.close()
                    raise ConnectFailure(f"{where} does not offer STARTTLS and TLS is required", "4.7.5",
                                         host=host, tls="unavailable", tls_result="starttls-not-supported")
            if username:
                try:
                    await client.login(username, password)
                except aiosmtplib.SMTPResponseException as exc:
                    client.close()
                    # Transient on purpose: a wrong smarthost password is the operator's to fix, not a bounce.
                    raise ConnectFailure(f"{where} refused our login: {_describe_exc(exc)}", "4.7.0",
                                         host=host) from None
        except ConnectFailure as exc:
            exc.greeted = True
            raise
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            client.close()
            raise ConnectFailure(f"{where}: {_describe_exc(exc)}", host=host, greeted=True) from None
        ssl_obj = client.transport.get_extra_info("ssl_object") if client.transport else None
        cipher = ssl_obj.cipher() if ssl_obj else None
        if dane is not None:
            return cls(client, host, ssl_obj.version() if ssl_obj else None, cipher[0] if cipher else None,
                       verified=ssl_obj is not None, dane=str(matched))
        return cls(client, host, ssl_obj.version() if ssl_obj else None, cipher[0] if cipher else None,
                   verified=verify and ssl_obj is not None)

    async def send(self, env: Envelope, *, xfer_timeout: float, done_timeout: float,
                   fence: Callable[[], Awaitable[None]] | None = None) -> dict[str, RcptOutcome]:
        """One transaction. `fence` runs after the last RCPT and before DATA: it raises (`Fenced`)
        when the lease on this job is no longer ours, and then nothing is sent.

        Any failure in the middle of the transaction (a lost connection, a timeout, a bug such as
        an encoding error) leaves the SMTP state unknown: the connection is aborted, never reused,
        so the next message cannot inherit a half-open transaction (a `503 nested MAIL`)."""
        c = self.client
        body = Body.of(env.data)
        opts: list[str] = []
        if c.supports_extension("size"):
            opts.append(f"SIZE={body.total}")
        if c.supports_extension("8bitmime") and not await body.is_ascii():
            opts.append("BODY=8BITMIME")
        if env.smtputf8:
            if not c.supports_extension("smtputf8"):
                return all_same(env, RcptOutcome(
                    PERMANENT, f"{self.host} does not support SMTPUTF8, required by this message's addresses",
                    "5.6.7", self.host, self.tls))
            opts.append("SMTPUTF8")
        if env.requiretls:
            # RFC 8689 4.2.1: only over TLS whose certificate was verified, to a server that
            # advertises REQUIRETLS (and takes the parameter on); anything else is a permanent
            # failure, 5.7.30, never a silent downgrade.
            if not self.verified:
                return all_same(env, RcptOutcome(
                    PERMANENT, f"REQUIRETLS: {self.host} could not be reached over verified TLS "
                    f"(TLS: {self.tls})", "5.7.30", self.host, self.tls))
            if not c.supports_extension("requiretls"):
                return all_same(env, RcptOutcome(
                    PERMANENT, f"REQUIRETLS: {self.host} does not support REQUIRETLS, required by the sender",
                    "5.7.30", self.host, self.tls))
            opts.append("REQUIRETLS")
        dsn = c.supports_extension("dsn")
        if dsn and env.ret:
            opts.append(f"RET={env.ret}")
        if dsn and env.envid:
            opts.append(f"ENVID={xtext_encode(env.envid)}")
        enc = "utf-8" if env.smtputf8 else "ascii"
        reused = self.messages > 0
        self.messages += 1
        result: dict[str, RcptOutcome] = {}
        transfer = _Transfer()
        try:
            try:
                await _mail(c, env.sender, opts, enc)
            except aiosmtplib.SMTPResponseException as exc:
                if reused and exc.code == 421:
                    # The server closed the idle cached session (RFC 5321 3.8): not this message's fault.
                    self.abort()
                    raise StaleSession(self.host) from None
                await self._rset()
                return all_same(env, outcome_of(exc.code, exc.message, self.host, self.tls))
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                if reused:
                    self.abort()
                    raise StaleSession(self.host) from exc
                raise
            accepted = []
            for r in env.recipients:
                ropts = []
                if dsn and r.notify:
                    ropts.append(f"NOTIFY={r.notify}")
                if dsn and r.orcpt:
                    kind, _, addr = r.orcpt.partition(";")
                    ropts.append(f"ORCPT={kind};{xtext_encode(addr)}")
                try:
                    await _rcpt(c, r.address, ropts, enc)
                    accepted.append(r)
                except aiosmtplib.SMTPResponseException as exc:
                    result[r.address] = outcome_of(exc.code, exc.message, self.host, self.tls)
            if not accepted:
                await self._rset()
                return result
            if fence is not None:
                await fence()
            try:
                resp = await _data(c, body, xfer_timeout=xfer_timeout, done_timeout=done_timeout,
                                   transfer=transfer)
                code, message = resp.code, resp.message
            except _RefusedMidBody as exc:
                # Refused before the dot (out of step, so the connection goes); it cannot have the message.
                self.abort()
                code, message = exc.code, exc.message
            except aiosmtplib.SMTPResponseException as exc:
                # A refusal of DATA itself, or the reply to the dot: the session is in step.
                code, message = exc.code, exc.message
                if not transfer.started:
                    # DATA refused: the transaction is still open at the receiver; end it
                    # (RFC 5321 4.1.4) or the next MAIL on this connection gets 503.
                    await self._rset()
            for r in accepted:
                # Only a recipient whose NOTIFY went along hands its success report over to the remote.
                result[r.address] = outcome_of(code, message, self.host, self.tls, dsn=dsn and r.notify is not None)
            return result
        except (StaleSession, Fenced):
            self.abort()
            raise
        except asyncio.CancelledError:
            # The attempt's deadline (or shutdown) cut in: nothing more may reach the receiver.
            self._note_lost_reply(env, transfer, "cancelled")
            if transfer.started and not transfer.dot_sent:
                metrics.DATA_ABORTED.labels("deadline").inc()
            self.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - aiosmtplib, OSError, TLS, and bugs alike break the session
            self.abort()
            if transfer.started and not transfer.dot_sent:
                metrics.DATA_ABORTED.labels("stalled" if isinstance(exc, DataStalled) else "error").inc()
                event(log, "data_aborted", logging.WARNING, qid=env.qid, host=self.host, error=_describe_exc(exc))
            if transfer.dot_sent:
                self._note_lost_reply(env, transfer, _describe_exc(exc))
                text = (f"{self.host}: {_describe_exc(exc)} after the end of the message; "
                        "it may have been delivered (RFC 1047)")
            else:
                text = f"{self.host}: {_describe_exc(exc)}"
            broken = RcptOutcome(TRANSIENT, text, "4.4.2", self.host, self.tls, connection_failed=True)
            # Replies already given (a 550 to one RCPT) stand; only the undecided recipients are retried.
            return {r.address: result.get(r.address, broken) for r in env.recipients}

    def _note_lost_reply(self, env: Envelope, transfer: "_Transfer", why: str) -> None:
        """The whole message went out but its reply did not come back: the receiver may have
        it, and the retry may be a second copy (RFC 1047). Counted, so it can be watched."""
        if transfer.dot_sent:
            metrics.REPLY_LOST_AFTER_DOT.inc()
            event(log, "reply_lost_after_dot", logging.WARNING, qid=env.qid, host=self.host, error=why)

    async def _rset(self) -> None:
        try:
            await self.client.rset()
        except Exception:  # noqa: BLE001 - any failure leaves the session's state unknown
            self.abort()

    def abort(self) -> None:
        """Drop the connection with a reset: what is still buffered (ours or the kernel's) is
        discarded instead of being delivered after we gave up on it."""
        self.alive = False
        transport = self.client.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.abort()
        self.client.close()

    async def close(self) -> None:
        if self.alive and self.client.is_connected:
            try:
                await self.client.quit(timeout=5)
            except Exception:  # noqa: BLE001 - a failed QUIT still ends the session
                self.abort()
                return
        self.client.close()
        self.alive = False


_CHUNK = 256 * 1024
# A wire-form file is read a MiB at a time: a thread hop costs ~50-80 us of CPU, which was a
# tenth of a 1 MB message's delivery at 256 KiB reads; still written to the socket by _CHUNK.
_WIRE_READ = 1024 * 1024


class _Transfer:
    """How far one DATA got, for the decision that matters after a failure: could the
    receiver have the whole message? Only once the final dot is in the kernel's hands."""

    def __init__(self) -> None:
        self.started = False       # DATA accepted with 354: the body is on its way
        self.dot_sent = False      # the last byte of ".\r\n" left our buffers


def _stuffed(data: bytes) -> bytes:
    """The body as it goes on the wire: dot-stuffed (RFC 5321 4.5.2), ending in CRLF.CRLF. As we
    store it a body has CRLF lines only, so one replace does it (aiosmtplib's two regexes cost a
    fifth of the delivery process's CPU); anything else has its line ends mended first."""
    if not (data.endswith(b"\r\n") and data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")):
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
    return stuff(data) + b".\r\n"


def _stuff_piece(piece: bytes, before: bytes) -> bytes:
    """Dot-stuff one piece of a body read in pieces; `before` is the (up to) two bytes that
    preceded it on the wire, b"\r\n" at the start. Joined with them, a line start that
    straddles the border (CRLF | ".", or CR | LF ".") is seen like any other."""
    return (before + piece).replace(b"\r\n.", b"\r\n..")[len(before):]


async def _wire_pieces(body: Body, chunk: int = _CHUNK, wire_read: int = _WIRE_READ):
    """The body as it goes on the wire, in pieces: dot-stuffed, ending in CRLF.CRLF. A body in
    memory is one piece (as before spooling); a spooled one comes from its file a chunk at a
    time, so at most a chunk (and its stuffed copy) is in memory."""
    if body.data is not None:
        yield _stuffed(body.prefix + body.data if body.prefix else body.data)
        return
    if body.wire:
        # Stored as it goes on the wire: sent as read, only the prefix (our DKIM-Signature
        # field) stuffed, and the dot added.
        last = b"\r\n"
        if body.prefix:
            yield stuff(body.prefix)  # a header field: starts a line
            last = body.prefix[-2:]
        async for piece in body.wire_chunks(wire_read):
            memory.TRIMMER.note(len(piece))
            yield piece
            last = (last + piece)[-2:] if len(piece) < 2 else piece[-2:]
        yield b".\r\n" if last == b"\r\n" else b"\r\n.\r\n"
        return
    before = b"\r\n"
    first = body.prefix
    async for piece in body.chunks(chunk):
        if first:
            piece, first = first + piece, b""
        yield _stuff_piece(piece, before)
        before = (before + piece)[-2:]
    if first:  # an empty content (cannot come from DATA, but be whole)
        yield _stuff_piece(first, before)
        before = (before + first)[-2:]
    # Spool files hold checked DATA (CRLF lines only); still, never let the dot join a last line.
    yield b".\r\n" if before == b"\r\n" else b"\r\n.\r\n"


def _unacknowledged(transport: asyncio.BaseTransport) -> int | None:
    """Bytes the kernel has sent (or holds) that the receiver's TCP has not acknowledged yet
    (Linux SIOCOUTQ); None where that cannot be known."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return None


async def _until_acknowledged(proto, transport: asyncio.BaseTransport, xfer_timeout: float,
                              transfer: "_Transfer") -> None:
    """The body is all in the kernel: wait until the receiver has acknowledged it (or replied),
    still on the progress clock. The kernel's send buffer holds megabytes: counting the dot as
    sent when it merely reached our kernel would wait out the long done timeout on a receiver
    that stopped reading, and then count a possible duplicate the receiver never had."""
    loop = asyncio.get_running_loop()
    waiter = proto._response_waiter
    left = _unacknowledged(transport)
    progress_at = loop.time()
    while left and waiter is not None and not waiter.done():
        await asyncio.wait({waiter}, timeout=0.05)
        now_left = _unacknowledged(transport)
        if now_left is None:
            break
        if now_left < left:
            left, progress_at = now_left, loop.time()
        elif loop.time() - progress_at > xfer_timeout:
            raise DataStalled(f"no progress sending the message for {xfer_timeout:g}s")
    transfer.dot_sent = True


async def _data(c: aiosmtplib.SMTP, data: "bytes | Body", *, xfer_timeout: float, done_timeout: float,
                transfer: _Transfer) -> aiosmtplib.SMTPResponse:
    """DATA with two clocks, as Postfix has (smtp_data_xfer_timeout, smtp_data_done_timeout):
    the body must keep moving (no progress for `xfer_timeout` s is a failure), and the reply to
    the final dot gets a long wait of its own. One timeout over both (what aiosmtplib does)
    fired on slow readers while the rest of the body, dot included, was still buffered and
    went out after we gave up: the receiver accepted the message and we sent it again.

    Any failure here raises; the caller aborts the connection with a reset (`Session.abort`),
    which discards whatever is still buffered, so a message whose dot did not leave us can
    never be completed by the receiver."""
    start = await c.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    transfer.started = True
    proto = c.protocol
    assert proto is not None and proto.transport is not None
    transport = proto.transport
    # Every write that the kernel cannot take at once pauses us until our buffer is empty
    # again, so "drained" means "handed to the kernel" and each drain is progress. (high=1,
    # not 0: the TLS transport pauses at size >= high, so 0 would pause on an empty buffer.)
    transport.set_write_buffer_limits(high=1, low=0)
    # A reply that comes before the dot (a receiver refusing mid-body) must be kept, not
    # dropped as unsolicited: arm the protocol's reply flag as read_response would.
    proto._response_pending = True
    loop = asyncio.get_running_loop()
    early: asyncio.Future | None = None
    # A spooled body is read from its file between writes; reading is not sending, so the
    # progress clock only runs while a write waits for the kernel, as before.
    async for piece in _wire_pieces(Body.of(data)):
        payload = memoryview(piece)
        for off in range(0, len(payload), _CHUNK):
            proto.write(payload[off:off + _CHUNK])
            if not proto._paused:
                continue
            drain = loop.create_task(proto._drain_helper())
            early = early or proto._response_waiter
            done, _ = await asyncio.wait({drain, early}, timeout=xfer_timeout, return_when=asyncio.FIRST_COMPLETED)
            if drain not in done:
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
                if early in done:
                    # The receiver answered before the dot: whatever it said, this body is over.
                    resp = early.result()
                    raise _RefusedMidBody(resp.code if resp.code >= 400 else 451, resp.message)
                raise DataStalled(f"no progress sending the message for {xfer_timeout:g}s")
            drain.result()  # raises if the connection was lost meanwhile
    done_by = loop.time() + done_timeout
    await _until_acknowledged(proto, transport, xfer_timeout, transfer)
    resp = await proto.read_response(timeout=max(0.0, done_by - loop.time()))
    if resp.code != 250:
        raise aiosmtplib.SMTPDataError(resp.code, resp.message)
    return resp
