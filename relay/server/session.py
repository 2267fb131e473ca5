"""One SMTP submission session on top of aiosmtpd's protocol machinery.

aiosmtpd gives us the asyncio protocol, the STARTTLS switch (with the RFC 3207 discard of
pipelined plaintext) and per-command timeouts. Everything a client can get wrong or abuse is
ours: the command loop (so unknown commands are never logged and internal errors become 451,
not aiosmtpd's "500 Error: (OperationalError) ..."), AUTH with its state machine, MAIL/RCPT
parameter handling (AUTH=, DSN), and DATA read with progress timeouts and smuggling checks.
Every reply carries an enhanced status code (RFC 2034) and comes from `replies`.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, sslproto

from .. import headers, memory, metrics, policy, replies
from ..spool import WIRE_SUFFIX, SpoolFile
from ..config import LimitsConfig
from ..credentials import CredentialStore, Principal, StoreError, normalize_username
from ..logs import event
from ..store.contract import NewMessage, NewRecipient, QueueStore, StorageFull, StoreUnavailable
from ..replies import Reply
from ..tls import describe, take_over
from .auth import BUSY, MAX_RESPONSE, NETWORK, PAIR, UNAVAILABLE, USER, AuthThrottle, b64, decode_plain

log = logging.getLogger("relay.smtp")

POP3_VERBS = frozenset({"USER", "PASS", "STAT", "LIST", "RETR", "DELE", "UIDL", "TOP", "APOP", "CAPA", "STLS", "LAST"})
IMAP_COMMANDS = frozenset({"LOGIN", "CAPABILITY", "SELECT", "EXAMINE", "AUTHENTICATE", "STARTTLS", "LOGOUT", "LIST",
                           "LSUB", "STATUS", "FETCH", "NOOP", "ID", "ENABLE", "NAMESPACE", "IDLE"})
AUTH_MECHANISMS = ("LOGIN", "PLAIN")
MAX_LINE = 1000  # command lines; RFC 5321 allows 512 plus extensions, AUTH responses need more


@dataclass(frozen=True)
class Settings:
    """What SIGHUP may change for new commands without dropping sessions."""
    hostname: str
    limits: LimitsConfig
    trusted: tuple[tuple[Any, tuple[str, ...]], ...] = ()   # (ip_network, allowed domains)
    unverified_domains_refused: bool = False
    from_header: str = "domain"  # policy.from_header
    # Our own host names (when they are real FQDNs): a client that says EHLO with one of them is
    # our own outbound side come back (a loop through NAT or a forwarder), never a trusted client.
    own_names: frozenset[str] = frozenset()


@dataclass
class ServerState:
    """Shared by every session: stores, TLS context, throttles, connection counts."""
    settings: Settings
    credentials: CredentialStore
    queue: QueueStore
    tls_context: ssl.SSLContext
    throttle: AuthThrottle
    sessions: set = field(default_factory=set)
    per_ip: dict[str, int] = field(default_factory=dict)
    handshakes: int = 0  # TLS handshakes in progress, capped by limits.tls_handshakes
    proxy_pending: int = 0  # PROXY-listener connections reading their header (limits.proxy_headers)
    # (client, reason) -> [last logged (monotonic), refusals not logged since]: see refusal_logged.
    refusals_logged: dict[tuple[str, str], list] = field(default_factory=dict)

    def admission(self, ip: str) -> tuple[str, Reply] | None:
        """The caps at accept, before any TLS: (reason, reply) to refuse with, or None."""
        limits = self.settings.limits
        if self.draining:
            return "draining", replies.SHUTTING_DOWN
        if len(self.sessions) + self.elsewhere >= limits.connections:
            return "global", replies.TOO_MANY_CONNECTIONS
        if self.per_ip.get(ip, 0) >= limits.connections_per_ip:
            return "per_ip", replies.TOO_MANY_CONNECTIONS_IP
        return None

    def ip_joined(self, ip: str) -> None:
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def ip_left(self, ip: str) -> None:
        n = self.per_ip.get(ip, 1) - 1
        if n <= 0:
            self.per_ip.pop(ip, None)
        else:
            self.per_ip[ip] = n

    async def drain(self, deadline: float) -> None:
        """Shutdown: no new sessions; open ones finish their transaction until `deadline`
        (monotonic), then get 421; back once all are gone or a second past it."""
        self.draining = True
        while True:
            for sess in list(self.sessions):
                sess.drain_close(force=time.monotonic() >= deadline)
            if not self.sessions or time.monotonic() >= deadline + 1:
                return
            await asyncio.sleep(0.05)

    def note_refusal(self, ip: str, listener: str, reason: str, reply: Reply) -> None:
        if reply is not replies.SHUTTING_DOWN:
            metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        suppressed = self.refusal_logged(ip, reason, time.monotonic())
        if suppressed is not None:
            event(log, "connection_refused", client=ip, listener=listener, reason=reason,
                  reply=str(reply), unlogged_since_last=suppressed or None)

    def refusal_logged(self, ip: str, reason: str, now: float, interval: float = 60.0) -> int | None:
        """Rate-limits connection_refused lines to one per client and reason per interval: a flood
        of connections past a cap must not bury the lines fail2ban reads. None: stay quiet;
        otherwise log now, with this many refusals since the last line."""
        entry = self.refusals_logged.get((ip, reason))
        if entry is not None and now - entry[0] < interval:
            entry[1] += 1
            return None
        if entry is None and len(self.refusals_logged) >= 10_000:
            self.refusals_logged.clear()
        suppressed = entry[1] if entry is not None else 0
        self.refusals_logged[(ip, reason)] = [now, 0]
        return suppressed
    draining: bool = False
    # Several acceptance workers (issue 16). In the parent: connections handed to workers and not
    # yet released, counted against limits.connections with `sessions` (per_ip counts them too).
    elsewhere: int = 0
    # In a worker: the parent applied the connection caps at accept; `on_release(conn_id)` tells
    # it a handed-over connection ended.
    admitted_upstream: bool = False
    on_release: Any = None
    data_in_flight: int = 0  # bytes of DATA being received now, all sessions (limits.max_data_in_flight)
    spool_dir: str | None = None  # where DATA past limits.data_in_memory goes; None: kept in memory
    # Optional hook: (domain) -> awaitable bool, True when the domain has verified its DNS.
    domain_verified: Any = None

    # client address -> (name, domains) of its trusted network, or None; for one Settings
    # (a reload starts afresh). Parsing the address and walking the networks was per MAIL.
    _trusted_seen: dict[str, tuple[str, Any] | None] = field(default_factory=dict)
    _trusted_for: Any = None

    def trusted_principal(self, ip: str, helo: str | None = None) -> Principal | None:
        settings = self.settings
        if helo and helo.lower().rstrip(".") in settings.own_names:
            return None
        seen = self._trusted_seen
        if self._trusted_for is not settings:
            seen.clear()
            self._trusted_for = settings
        try:
            hit = seen[ip]
        except KeyError:
            hit = None
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                addr = None
            if addr is not None:
                for net, domains in settings.trusted:
                    if addr in net:
                        hit = (f"trusted:{net}", domains)
                        break
            if len(seen) >= 4096:
                seen.clear()
            seen[ip] = hit
        return Principal(hit[0], hit[1], kind="trusted") if hit is not None else None


_RANDOM = bytearray()


def _queue_id() -> str:
    """store.contract.new_queue_id's form (time prefix, 40 random bits, upper-case hex), with the
    random bytes taken from the kernel 4 KiB at a time instead of one getrandom(2) a message."""
    if len(_RANDOM) < 5:
        _RANDOM[:] = os.urandom(4096)
    rnd = bytes(_RANDOM[-5:])
    del _RANDOM[-5:]
    return f"{int(time.time()):08X}"[-8:] + rnd.hex().upper()


def budget_username(login: bytes) -> str:
    """The key a login's failures are counted under: the credential's normal form (case and
    Unicode/IDNA domain folded), so spelling one username several ways buys no extra guesses."""
    text = login.decode("utf-8", "replace")
    try:
        return normalize_username(text)[0]
    except StoreError:
        return text.strip().lower()[:320]


@dataclass
class Transaction:
    sender: policy.Address
    params: policy.MailParams
    principal: Principal
    recipients: list[tuple[policy.Address, policy.RcptParams]] = field(default_factory=list)


# A header section is parsed whole (Bcc removal, Message-ID, DKIM): past this much without its
# end the message is refused rather than held (Postfix's header_size_limit is 100 KB).
HEADER_LIMIT = 1_048_576
DATA_READ_LIMIT = 262_144
SPILL_UNIT = 1_048_576


def _last_two(prev: bytes, piece: bytes) -> bytes:
    """The last two bytes of the stream after `piece` (`prev`: those before it), without
    copying a large piece."""
    return piece[-2:] if len(piece) >= 2 else (prev + piece)[-2:]


class _Incoming:
    """One DATA transfer's bytes: counted against limits.max_data_in_flight as they arrive, and
    past limits.data_in_memory moved out of memory into a spool file: first the header block,
    once it is complete, prepared (our Received, Bcc gone, Message-ID/Date added), then the rest
    as it comes, in writes of up to SPILL_UNIT. At most about max(data_in_memory, SPILL_UNIT)
    of the message is ever held here."""

    def __init__(self, state: "ServerState", qid: str, prepare: Any):
        self.state = state
        self.qid = qid
        self.prepare = prepare               # content-so-far -> prepared bytes (headers.prepare)
        limits = state.settings.limits
        self.threshold = limits.data_in_memory
        self.cap = limits.max_data_in_flight
        self.counted = 0
        self.file: SpoolFile | None = None
        self.fields: list[bytes] = []        # the header fields as received, once spooled
        self.head = b""                      # the prepared header block, kept in the row
        self.ascii = True                    # every spooled byte so far is ASCII (BODY=8BITMIME later)
        self.enqueued = False
        # While the header block has not ended, the next try at starting the file waits for
        # the content to double (capped just past HEADER_LIMIT): each try joins and splits all
        # of it, and a read can be one short line ("x.\r\n" ends a read), so trying at every
        # read was quadratic on the shared loop. A few tries in all, as long as the header grows.
        self.retry_at = 0

    def step_count(self, data: policy.DataState) -> None:
        grown = data.size - self.counted
        if grown <= 0:
            return
        self.counted = data.size
        self.state.data_in_flight += grown
        metrics.DATA_IN_FLIGHT.inc(grown)
        if self.state.data_in_flight > self.cap and data.problem is None:
            # Whoever crosses the cap is refused (after reading to the end: the rest of DATA
            # must not be taken for commands); its bytes are dropped, not held.
            data.problem = replies.DATA_IN_FLIGHT
            data.discard()

    def release(self) -> None:
        self.state.data_in_flight -= self.counted
        metrics.DATA_IN_FLIGHT.dec(self.counted)
        self.counted = 0

    async def step(self, data: policy.DataState) -> None:
        """After each run of lines: count them; spill to the spool file past the threshold."""
        self.step_count(data)
        # Spooling starts at the threshold; then the file is written a SPILL_UNIT at a time
        # (a thread hop a write: at 1 MB messages they were a tenth of the acceptance CPU).
        unit = max(self.threshold, self.retry_at) if self.file is None else max(self.threshold, SPILL_UNIT)
        if data.problem is None and data.buffered >= unit and self.state.spool_dir is not None:
            await self._spill(data)

    async def _spill(self, data: policy.DataState) -> None:
        try:
            if self.file is None:
                await self._start_file(data)
            else:
                await self._write(data.take())
        except OSError as exc:
            full = self._failed(exc)
            data.problem = replies.STORAGE_FULL if full else replies.INTERNAL_ERROR
            data.discard()

    async def _start_file(self, data: policy.DataState) -> None:
        """Once the header block is complete: the prepared header block, then the rest of the
        content so far, as it came. The file holds the message's wire form (transparency dots
        kept), so delivery sends it without stuffing it again; only the header block is
        unstuffed here, to be read and prepared."""
        wire = b"".join(data.parts)
        blank = wire.find(b"\r\n\r\n")
        region = bytes(wire if blank < 0 else wire[:blank + 2])
        parts = headers.split(policy.unstuff(region))
        if blank < 0 and not parts.body:  # the header block has not ended yet: its fields may go on
            if len(wire) > HEADER_LIMIT:
                data.problem = replies.HEADERS_TOO_LARGE
                data.discard()
            self.retry_at = min(2 * len(wire), HEADER_LIMIT + 1)
            return
        # Where the header section ends in the wire form: unstuffing removes a dot, never a
        # line, so it is after as many line ends as the fields hold.
        off = 0
        for _ in range(sum(f.count(b"\n") for f in parts.fields)):
            off = wire.index(b"\n", off) + 1
        self.fields = parts.fields
        # Our Received on top, Bcc gone, Message-ID/Date added: prepared on the fields alone
        # (it ends with the empty line that separates the body).
        self.head = self.prepare(b"".join(parts.fields))
        rest = wire[off:]
        data.discard()
        del wire, region, parts
        self.file = SpoolFile(self.state.spool_dir, self.qid + WIRE_SUFFIX)
        head = policy.stuff(self.head[:-2]) + (b"" if rest.startswith(b"\r\n") else b"\r\n")
        await self._write([head, rest])

    def _note_ascii(self, pieces: list[bytes]) -> None:
        # Known now, so delivery need not read the file once more to choose BODY=8BITMIME.
        self.ascii = self.ascii and all(p.isascii() for p in pieces)

    async def _write(self, pieces: list[bytes]) -> None:
        self._note_ascii(pieces)
        assert self.file is not None
        await self.file.write(pieces)

    async def finish(self, data: policy.DataState) -> None:
        """The end of DATA: the rest goes to the file (if spooling), then the file is synced."""
        if self.file is None:
            return
        try:
            last = data.take()
            self._note_ascii(last)
            await self.file.commit(last)
        except OSError as exc:
            raise (StorageFull(str(exc)) if self._failed(exc) else StoreUnavailable(f"spool: {exc}")) from None

    def _failed(self, exc: OSError) -> bool:
        """Log and count a spool write that failed (the store's own error metric: the operator
        watches one); True when the disk is full."""
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        metrics.STORE_ERRORS.labels("full" if full else "unavailable").inc()
        event(log, "spool_failed", logging.ERROR, qid=self.qid, error=str(exc))
        return full

    async def drop(self) -> None:
        """Not queued (refused, failed, disconnected): the file goes."""
        if self.file is not None and not self.enqueued:
            f, self.file = self.file, None
            try:
                await f.discard()
            except OSError as exc:  # an orphan then, removed at the next start
                event(log, "spool_failed", logging.WARNING, qid=self.qid, error=str(exc))


class _NoHandler:
    """aiosmtpd wants a handler; our hooks live on the protocol itself."""


class Session(SMTP):
    # aiosmtpd sizes the StreamReader from this (default 1001). RFC 4954 4 lets an AUTH line or
    # response run to 12288 octets, so the reader must hold that much; other commands are
    # held to MAX_LINE in the command loop, DATA lines to 998 octets by policy.DataState.
    line_length_limit = MAX_RESPONSE + 2

    def __init__(self, state: ServerState, listener_name: str, implicit_tls: bool, client_ip: str | None = None,
                 proxy_local: bool = False, conn_id: int | None = None):
        # Not SMTP.__init__: it introspects the class with inspect.getmembers() for every
        # connection (7% of CPU under load) to find hooks and AUTH mechanisms we replace anyway.
        # We set exactly the attributes aiosmtpd's protocol code we keep (connection_made/lost,
        # eof_received, push, the STARTTLS switch) reads.
        s = state.settings
        loop = asyncio.get_running_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.__ident__ = "ESMTP relay ready"
        self.event_handler = _NoHandler()
        self.data_size_limit = None
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = s.hostname
        # Read at each handshake from `state.tls_context` (SIGHUP swaps it), never kept here.
        self.tls_context = None
        self.require_starttls = False
        self._timeout_duration = s.limits.idle_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._auth_required = False
        self._proxy_timeout = None
        self._handle_hooks = {}
        self._smtp_verbs = self._verbs()
        self._enforce_call_limit = False
        self.state = state
        self.listener_name = listener_name
        self.implicit_tls = implicit_tls
        # The client, for every cap, lockout, trusted network, Received: field, log line and
        # metric: the socket's peer, or on a PROXY listener the address its header named (given
        # here, kept on the connection: aiosmtpd's own Session is replaced at STARTTLS).
        self.client_ip = client_ip or "unknown"
        self.proxy_peer: str | None = None
        self._proxied = client_ip is not None
        # A PROXY LOCAL/UNKNOWN header: the load balancer's own health check (every few seconds,
        # on every port): its connect/tls/disconnect lines go to debug, not the operator's log.
        self._quiet = logging.DEBUG if proxy_local else logging.INFO
        # ... and never a trusted-network client, whatever the proxy's own address: the header
        # named no client, so no client may relay without AUTH through it.
        self._proxy_local = proxy_local
        self.principal: Principal | None = None
        self.txn: Transaction | None = None
        self.helo: str | None = None
        self.esmtp = False
        self.commands = 0
        self.errors = 0
        self.tls_info: str | None = None
        self._registered = False
        self.conn_id = conn_id  # an acceptance worker's: the parent's number for this connection
        self._session_timer: asyncio.TimerHandle | None = None
        self._in_data = False
        self._busy = False  # a command is running (DATA may be committing): the drain waits for it
        self._tls_up = False  # set when a STARTTLS handshake completes

    _METHOD_NAMES: tuple[str, ...] | None = None

    def _verbs(self) -> frozenset[str]:
        """The VERBs this class has an smtp_VERB for; found once per class (a bound method per
        verb per connection was a dict of fifteen built for each new connection)."""
        cls = type(self)
        names = cls.__dict__.get("_METHOD_NAMES")
        if names is None:
            names = cls._METHOD_NAMES = tuple(n for n in dir(cls) if n.startswith("smtp_"))
            cls._VERBS = frozenset(n[5:] for n in names)
        return cls.__dict__["_VERBS"]

    # ---------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            # STARTTLS finished: RFC 3207 4.2, forget everything learnt in clear text.
            self._tls_up = True
            self.principal = None
            self.txn = None
            self.helo = None
            self.esmtp = False
            self.tls_info = describe(transport.get_extra_info("ssl_object"))
            mode = "implicit" if self.implicit_tls else "starttls"
            metrics.TLS_HANDSHAKES.labels(mode, "ok").inc()
            event(log, "tls", self._quiet, client=self.client_ip, listener=self.listener_name, mode=mode,
                  tls=self.tls_info)
            return
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        if self._proxied:
            self.proxy_peer = str(peer[0])
        else:
            self.client_ip = str(peer[0])
        # asyncio sets TCP_NODELAY only when the listening socket says IPPROTO_TCP, which a socket
        # bound by hand (port 0) does not: then Nagle held the 2nd reply of every pipelined group
        # until the client's delayed ACK, 40 ms each.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        # Counted here, at accept and before any TLS (implicit ports too): the handshake comes later,
        # in `_handle_client`, so a silent client holds a slot it is charged for.
        st = self.state
        limits = st.settings.limits
        # An acceptance worker's session was admitted by the parent, which counts every worker's
        # connections (server/workers.py): here only a drain that began meanwhile refuses it.
        if not st.admitted_upstream:
            refused = st.admission(self.client_ip)
        else:
            refused = ("draining", replies.SHUTTING_DOWN) if st.draining else None
        if refused is not None:
            reason, refuse = refused
            st.note_refusal(self.client_ip, self.listener_name, reason, refuse)
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()
            if not self.implicit_tls:  # a TLS client would read a plain-text reply as a protocol error
                transport.write(f"{refuse}\r\n".encode())
            transport.close()
            return
        self._registered = True
        st.sessions.add(self)
        st.ip_joined(self.client_ip)
        metrics.CONNECTIONS.labels(self.listener_name).inc()
        metrics.SESSIONS_ACTIVE.inc()
        self._session_timer = self.loop.call_later(limits.session_timeout, self._session_expired)
        event(log, "connect", self._quiet, client=self.client_ip, listener=self.listener_name, tls=self.tls_info,
              peer=self.proxy_peer, proxy="local" if self._quiet == logging.DEBUG else None)

    def connection_lost(self, error: Exception | None) -> None:
        if self.conn_id is not None:
            # Handed over by the parent: its count of this client's connections goes down once.
            conn_id, self.conn_id = self.conn_id, None
            self.state.on_release(conn_id)
        if self._registered:
            self._registered = False
            st = self.state
            st.sessions.discard(self)
            st.ip_left(self.client_ip)
            metrics.SESSIONS_ACTIVE.dec()
            if self._session_timer is not None:
                self._session_timer.cancel()
            event(log, "disconnect", self._quiet, client=self.client_ip,
                  user=self.principal.username if self.principal else None, commands=self.commands)
        if self.session is not None and self._timeout_handle is not None:
            super().connection_lost(error)
        else:
            self.transport = None

    def eof_received(self) -> bool:
        # aiosmtpd cancels the command loop here and, on plain TCP, keeps the half-closed socket
        # open, so connection_lost never ran: every client that hung up without QUIT leaked its
        # per-IP slot and session count until the caps refused everyone. Instead the loop reads
        # what came before EOF (a pipelined "... QUIT" then shutdown), gets EOF, and closes.
        self._reader.feed_eof()
        # True keeps a plain socket writable for the last replies; TLS cannot half-close.
        return not self.tls_active

    def _close_with(self, reply: Reply | None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if reply is not None:
                try:
                    self.transport.write(f"{reply}\r\n".encode())
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_data and b"\n" in data:
            # Progress-based idle timeout in DATA, counted in completed lines as they arrive (the
            # reader sees them only at each ".\r\n"); a byte-a-second drip completes none.
            self._reset_timeout()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Called for every DATA line: move a deadline instead of replacing a TimerHandle each
        # time (which profiling showed at 7% of CPU); the timer re-arms itself when it fires early.
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None or self._timeout_handle.cancelled():
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        event(log, "timeout", client=self.client_ip, in_data=self._in_data)
        self._close_with(replies.TIMEOUT)

    def _session_expired(self) -> None:
        event(log, "session_timeout", client=self.client_ip)
        self._close_with(replies.SESSION_TOO_LONG)

    def drain_close(self, force: bool) -> bool:
        """Shutdown: close now if between transactions (or forced). True when closed."""
        if force or (self.txn is None and not self._in_data and not self._busy):
            self._close_with(replies.SHUTTING_DOWN)
            return True
        return False

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    # ---------------------------------------------------------------- replies

    async def reply(self, r: Reply | str) -> None:
        text = str(r)
        if isinstance(r, Reply) and r.code >= 500:
            self.errors += 1
        await self.push(text)
        if self.errors >= self.state.settings.limits.max_errors and self.transport is not None:
            event(log, "too_many_errors", client=self.client_ip, errors=self.errors)
            self._close_with(replies.TOO_MANY_ERRORS)

    def _reject(self, reason: str, r: Reply) -> Reply:
        metrics.MESSAGES_REJECTED.labels(reason).inc()
        return r

    # ---------------------------------------------------------------- command loop

    async def _handle_client(self) -> None:
        if self.implicit_tls:
            # Port 465 (RFC 8314 3.3): TLS from the first byte, started here in the session, after
            # the connection caps; the greeting is the first thing sent inside it.
            try:
                if not await self._start_tls():
                    self._close_with(None)
                    return
            except ConnectionError:
                return
        await self.push(f"220 {self.hostname} {replies.BANNER}")
        limits = self.state.settings.limits
        while self.transport is not None:
            try:
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    await self._discard_long_line(exc.consumed)
                    await self.reply(replies.LINE_TOO_LONG)
                    continue
                except asyncio.IncompleteReadError:
                    break
                self.commands += 1
                if self.commands > limits.max_commands:
                    self._close_with(replies.TOO_MANY_COMMANDS)
                    break
                line = line.rstrip(b"\r\n")
                verb_b, _, arg_b = line.partition(b" ")
                if len(line) > (MAX_RESPONSE if verb_b.upper() == b"AUTH" else MAX_LINE):
                    await self.reply(replies.LINE_TOO_LONG)
                    continue
                try:
                    verb = verb_b.decode("ascii").upper()
                except UnicodeDecodeError:
                    await self.reply(replies.SYNTAX_ERROR)
                    continue
                method = getattr(self, "smtp_" + verb) if verb in self._smtp_verbs else None
                if method is None:
                    # Never log the line: a POP3 "PASS secret" sent here is a password.
                    if self._is_mailbox_protocol(verb, arg_b):
                        await self.reply(replies.NOT_A_MAILBOX)
                    else:
                        await self.reply(replies.SYNTAX_ERROR.with_text(
                            "Command unrecognized" if verb.isalpha() else "Syntax error"))
                    continue
                arg = arg_b.strip().decode("utf-8", "surrogateescape") or None
                self._reset_timeout()
                self._busy = True
                try:
                    await method(arg)
                finally:
                    self._busy = False
                if self.state.draining and self.txn is None and self.transport is not None:
                    self._close_with(replies.SHUTTING_DOWN)
                    break
            except asyncio.CancelledError:
                raise
            except (ConnectionError, asyncio.IncompleteReadError):
                break
            except StorageFull:
                await self._safe_reply(replies.STORAGE_FULL)
            except StoreUnavailable as exc:
                event(log, "store_unavailable", logging.ERROR, client=self.client_ip, error=str(exc))
                await self._safe_reply(replies.INTERNAL_ERROR)
            except Exception:  # noqa: BLE001 - a bug must cost a retry, never a bounce or a leak
                log.exception("internal error in session with %s", self.client_ip)
                await self._safe_reply(replies.INTERNAL_ERROR)
        if self.transport is not None:
            self.transport.close()

    async def _safe_reply(self, r: Reply) -> None:
        self.txn = None
        try:
            await self.push(str(r))
        except Exception:  # noqa: BLE001
            pass

    async def _discard_long_line(self, consumed: int) -> None:
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)

    def _is_mailbox_protocol(self, verb: str, arg: bytes) -> bool:
        if verb in POP3_VERBS:
            metrics.REFUSALS.labels("pop3").inc()
            return True
        second = arg.split(b" ", 1)[0].upper()
        if second.decode("ascii", "replace") in IMAP_COMMANDS:
            metrics.REFUSALS.labels("imap").inc()
            return True
        return False

    # ---------------------------------------------------------------- greeting and simple commands

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=True)

    async def smtp_HELO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=False)

    async def _helo(self, arg: str | None, esmtp: bool) -> None:
        if not arg or " " in arg.strip():
            await self.reply(replies.HELO_SYNTAX)
            return
        self.helo = arg.strip()
        self.esmtp = esmtp
        self.txn = None  # RFC 5321 4.1.4: EHLO resets the transaction
        if self.session is not None:
            self.session.host_name = self.helo
        if not esmtp:
            await self.push(f"250 {self.hostname}")
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.state.settings.limits.message_size}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
        if not self.tls_active:
            lines.append("STARTTLS")
        else:
            # RFC 8689 4.1: REQUIRETLS is offered only once the session is encrypted.
            lines += ["REQUIRETLS", "AUTH " + " ".join(AUTH_MECHANISMS)]
        await self.push("\r\n".join(replies.multiline(250, lines)))

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(replies.NOOP_OK)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.reply(replies.PARAM_SYNTAX.with_text("Syntax: RSET"))
            return
        self.txn = None
        await self.reply(replies.RESET_OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self.push(str(replies.BYE))
        if self.transport is not None:
            self.transport.close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.reply(replies.VRFY_CANNOT)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(replies.NOT_IMPLEMENTED)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.reply(replies.HELP)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_active:
            await self.reply(replies.TLS_ALREADY)
            return
        if arg:
            await self.reply(replies.PARAM_SYNTAX.with_text("Syntax: STARTTLS"))
            return
        if not self.helo:
            await self.reply(replies.NEED_EHLO)
            return
        if self.state.handshakes >= self.state.settings.limits.tls_handshakes:
            self._tls_refused()
            await self.reply(replies.TLS_BUSY)
            return
        await self.push(str(replies.READY_TLS))
        if not await self._start_tls():  # the cap filled while the 220 went out
            self._close_with(None)
            raise ConnectionError("TLS handshake refused")

    def _tls_refused(self) -> None:
        mode = "implicit" if self.implicit_tls else "starttls"
        metrics.TLS_HANDSHAKES.labels(mode, "refused").inc()
        metrics.CONNECTIONS_REFUSED.labels("tls_handshakes").inc()
        event(log, "tls_refused", logging.WARNING, client=self.client_ip, listener=self.listener_name, mode=mode,
              reason="handshakes_in_progress", limit=self.state.settings.limits.tls_handshakes)

    async def _start_tls(self) -> bool:
        """Run the server side of a TLS handshake on this connection (implicit TLS or after
        STARTTLS): False when too many handshakes are in progress (nothing started); raises
        ConnectionError when the handshake fails or passes its deadline.

        The same switch aiosmtpd uses for STARTTLS: SSLProtocol wraps the raw transport and calls
        our connection_made again once the handshake is done. Not `loop.start_tls`: that never
        calls connection_made, and aiosmtpd's reader/writer re-pointing and session reset live there.
        """
        st = self.state
        limits = st.settings.limits
        if st.handshakes >= limits.tls_handshakes:
            # Handshakes are the CPU-heavy part of a connection: past the cap, a flood of
            # ClientHellos (or of silent connections) waits nowhere, it is refused.
            self._tls_refused()
            return False
        mode = "implicit" if self.implicit_tls else "starttls"
        st.handshakes += 1
        metrics.TLS_HANDSHAKES_IN_PROGRESS.inc()
        waiter = self.loop.create_future()
        try:
            self._tls_protocol = sslproto.SSLProtocol(self.loop, self, st.tls_context, waiter, server_side=True,
                                                      ssl_handshake_timeout=limits.tls_handshake_timeout)
            self._original_transport = self.transport
            self.transport = self._tls_protocol._app_transport
            early = b""
            if self.implicit_tls and self._reader._buffer:
                # The ClientHello may already sit in the StreamReader (tls.take_over). On an
                # implicit-TLS port every byte is TLS, so it goes to the handshake (after
                # STARTTLS, bytes sent before our 220 are discarded instead: RFC 3207 section 6).
                early = bytes(self._reader._buffer)
                self._reader._buffer.clear()
            take_over(self._original_transport, self._tls_protocol, early)
            await waiter
            if not self._tls_up:
                # SSLProtocol resolves the waiter with no error when the connection is closed or
                # aborted mid-handshake (deadline, idle timeout, a client reset): a failure too.
                raise ConnectionResetError("connection closed during the TLS handshake")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed handshake ends the session, nothing more
            metrics.TLS_HANDSHAKES.labels(mode, "failed").inc()
            reason = "deadline" if isinstance(exc, ConnectionAbortedError) else type(exc).__name__
            event(log, "tls_failed", client=self.client_ip, listener=self.listener_name, mode=mode, error=reason)
            # asyncio never calls connection_lost on a protocol whose TLS handshake failed, so
            # without this the session kept its per-IP slot and count forever: a handful of
            # broken handshakes locked an address out, a stream of them filled the global cap.
            self.connection_lost(exc)
            raise ConnectionError("TLS handshake failed") from None
        finally:
            st.handshakes -= 1
            metrics.TLS_HANDSHAKES_IN_PROGRESS.dec()
        return True

    # ---------------------------------------------------------------- AUTH (RFC 4954)

    async def smtp_AUTH(self, arg: str | None) -> None:
        if not self.helo or not self.esmtp:
            await self.reply(replies.AUTH_NEED_EHLO)
            return
        if not self.tls_active:
            await self.reply(replies.AUTH_TLS_REQUIRED)
            return
        if self.principal is not None and self.principal.kind == "auth":
            await self.reply(replies.AUTH_ALREADY)
            return
        if self.txn is not None:
            await self.reply(replies.AUTH_IN_TRANSACTION)
            return
        parts = (arg or "").split()
        if not parts or len(parts) > 2:
            await self.reply(replies.AUTH_BAD_SYNTAX)
            return
        mech = parts[0].upper()
        if mech not in AUTH_MECHANISMS:
            await self.reply(replies.AUTH_MECH_UNKNOWN)
            return
        throttle = self.state.throttle
        if throttle.network_locked(self.client_ip):
            await self._auth_refused(mech, "", NETWORK)
            return
        initial = parts[1].encode("utf-8", "surrogateescape") if len(parts) == 2 else None
        if mech == "PLAIN":
            creds = await self._auth_plain(initial)
        else:
            creds = await self._auth_login(initial)
        if creds is None:  # aborted or malformed: reply already sent
            metrics.AUTH_ATTEMPTS.labels(mech, "aborted").inc()
            return
        login, password = (b"", b"") if isinstance(creds, Reply) else creds
        username = budget_username(login)
        refused = await throttle.acquire(self.client_ip, username)  # may wait for attempts in flight
        if refused is not None:
            await self._auth_refused(mech, username, refused)
            return
        principal: Principal | None = None
        hit: list[str] = []
        try:
            if not isinstance(creds, Reply):
                principal = await self.state.credentials.cached(login, password)
                if principal is None:
                    if not throttle.take_pending():
                        await self._auth_refused(mech, username, BUSY)
                        return
                    try:
                        principal = await self.state.credentials.verify(login, password)
                    finally:
                        throttle.end_pending()
            if principal is None:
                # Counted before the delay, so attempts on other connections see it at once.
                hit = throttle.failure(self.client_ip, username)
            else:
                throttle.success(self.client_ip, username)
        finally:
            throttle.end(self.client_ip, username)
        if principal is None:
            metrics.AUTH_ATTEMPTS.labels(mech, "failure").inc()
            # Stable line for fail2ban (contrib/fail2ban): event=auth result=failure client=IP
            event(log, "auth", logging.WARNING, client=self.client_ip, mechanism=mech, result="failure",
                  user=username)
            for scope in hit:
                metrics.AUTH_LOCKOUTS.inc()
                event(log, "auth_lockout", logging.WARNING, client=self.client_ip, scope=scope,
                      network=throttle.network(self.client_ip), user=username,
                      seconds=throttle.limits.auth_user_window if scope == USER else throttle.lockout)
            # Same delay and reply for unknown user, wrong password and malformed credentials.
            await asyncio.sleep(self.state.settings.limits.auth_failure_delay)
            await self.reply(replies.AUTH_INVALID)
            return
        self.principal = principal
        metrics.AUTH_ATTEMPTS.labels(mech, "success").inc()
        event(log, "auth", client=self.client_ip, mechanism=mech, result="success", user=principal.username)
        await self.reply(replies.AUTH_OK)

    async def _auth_refused(self, mech: str, username: str, reason: str) -> None:
        """454 4.7.0 without verifying anything: a budget is used up, or too many are pending."""
        result = {BUSY: "busy", UNAVAILABLE: "unavailable"}.get(reason, "locked")
        metrics.AUTH_ATTEMPTS.labels(mech, result).inc()
        event(log, "auth", logging.WARNING if reason != BUSY else logging.INFO, client=self.client_ip,
              mechanism=mech, result=result, scope=reason, user=username or None)
        await self.reply({NETWORK: replies.AUTH_LOCKED, PAIR: replies.AUTH_LOCKED_USER,
                          USER: replies.AUTH_USER_UNDER_ATTACK, BUSY: replies.AUTH_BUSY,
                          UNAVAILABLE: replies.AUTH_UNAVAILABLE}[reason])

    async def _read_auth_response(self, challenge: bytes) -> bytes | None:
        """Send a 334 challenge; the decoded answer, or None after replying to '*' / bad input."""
        await self.push("334 " + challenge.decode("ascii"))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._discard_long_line(exc.consumed)
            await self.reply(replies.LINE_TOO_LONG)
            return None
        line = line.strip()
        if line == b"*":
            await self.reply(replies.AUTH_ABORTED)
            return None
        decoded = b64(line)
        if isinstance(decoded, Reply):
            await self.reply(decoded)
            return None
        return decoded

    async def _auth_plain(self, initial: bytes | None) -> tuple[bytes, bytes] | Reply | None:
        if initial is None:
            blob = await self._read_auth_response(b"")
            if blob is None:
                return None
        else:
            if initial == b"*":
                await self.reply(replies.AUTH_ABORTED)
                return None
            decoded = b64(initial)
            if isinstance(decoded, Reply):
                await self.reply(decoded)
                return None
            blob = decoded
        return decode_plain(blob)

    async def _auth_login(self, initial: bytes | None) -> tuple[bytes, bytes] | None:
        if initial is None:
            user = await self._read_auth_response(b"VXNlcm5hbWU6")  # "Username:"
        else:
            decoded = b64(initial)
            if isinstance(decoded, Reply):
                await self.reply(decoded)
                return None
            user = decoded
        if user is None:
            return None
        password = await self._read_auth_response(b"UGFzc3dvcmQ6")  # "Password:"
        if password is None:
            return None
        return user, password

    # ---------------------------------------------------------------- MAIL / RCPT

    def _principal_for_mail(self) -> Principal | Reply:
        if self.principal is not None:
            return self.principal
        trusted = None if self._proxy_local else self.state.trusted_principal(self.client_ip, self.helo)
        if trusted is not None:
            return trusted
        if not self.tls_active:
            return replies.TLS_REQUIRED
        return replies.AUTH_REQUIRED

    async def smtp_MAIL(self, arg: str | None) -> None:
        if not self.helo:
            await self.reply(replies.NEED_EHLO)
            return
        principal = self._principal_for_mail()
        if isinstance(principal, Reply):
            await self.reply(self._reject("auth_required", principal))
            return
        if self.txn is not None:
            await self.reply(replies.NESTED_MAIL)
            return
        if principal.kind == "auth":
            revoked = await self._revoked(principal)
            if revoked is not None:
                await self.reply(self._reject("credential_revoked", revoked))
                return
        if not arg or arg[:5].upper() != "FROM:":
            await self.reply(replies.MAIL_SYNTAX)
            return
        rest = arg[5:]
        smtputf8 = "SMTPUTF8" in rest.upper().split()
        parsed = policy.parse_path(rest, smtputf8=smtputf8, is_sender=True)
        if isinstance(parsed, Reply):
            await self.reply(self._reject("sender_syntax", parsed))
            return
        sender, param_text = parsed
        if param_text and not self.esmtp:
            await self.reply(replies.MAIL_SYNTAX)
            return
        params = policy.parse_mail_params(param_text, size_limit=self.state.settings.limits.message_size,
                                          requiretls=self.tls_active)
        if isinstance(params, Reply):
            await self.reply(self._reject("size" if params is replies.SIZE_EXCEEDED else "parameter", params))
            return
        refused = policy.check_sender(sender, principal.domains, trusted=principal.kind == "trusted")
        if refused is not None:
            event(log, "sender_refused", client=self.client_ip, user=principal.username, sender=str(sender))
            await self.reply(self._reject("sender_domain", refused))
            return
        if self.state.settings.unverified_domains_refused and self.state.domain_verified is not None:
            # The sending domain this sender belongs to (the longest match: a trusted network may
            # list a domain and its subdomain), not merely the principal's first one.
            assert sender is not None
            domain = max((d for d in principal.domains if policy.domain_allowed(sender.ascii_domain, (d,))), key=len)
            if not await self.state.domain_verified(domain):
                await self.reply(self._reject("domain_unverified", replies.DOMAIN_UNVERIFIED.with_text(
                    f"Sending domain {domain} not verified; run: relay domain verify {domain}")))
                return
        if principal.kind == "trusted" and self.principal is None:
            metrics.SESSIONS_TRUSTED.inc()
            event(log, "trusted_session", client=self.client_ip, network=principal.username)
        assert sender is not None
        self.txn = Transaction(sender, params, principal)
        await self.reply(replies.SENDER_OK)

    async def _revoked(self, principal: Principal) -> Reply | None:
        """Revocation reaches open sessions: each MAIL re-reads the credential's stored hash (one
        indexed read) and compares it with the one this session logged in with. A deleted
        credential or removed domain, or a reset password, ends the login (AUTH may be retried)."""
        current = await self.state.credentials.generation(principal.username)
        if current is not None and current == principal.generation:
            return None
        reply, reason = ((replies.CREDENTIAL_REVOKED, "deleted") if current is None
                         else (replies.CREDENTIAL_CHANGED, "password_changed"))
        self.principal = None
        event(log, "auth_revoked", logging.WARNING, client=self.client_ip, user=principal.username, reason=reason)
        return reply

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self.txn is None:
            if self._principal_for_mail() is not self.principal and self.principal is None \
                    and (self._proxy_local or self.state.trusted_principal(self.client_ip, self.helo) is None):
                await self.reply(self._reject("auth_required", self._principal_for_mail()))
            else:
                await self.reply(replies.NEED_MAIL)
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.reply(replies.RCPT_SYNTAX)
            return
        parsed = policy.parse_path(arg[3:], smtputf8=self.txn.params.smtputf8, is_sender=False)
        if isinstance(parsed, Reply):
            await self.reply(self._reject("recipient_syntax", parsed))
            return
        rcpt, param_text = parsed
        if rcpt is None:
            await self.reply(self._reject("recipient_syntax", replies.BAD_RCPT_ADDRESS))
            return
        if param_text and not self.esmtp:
            await self.reply(replies.RCPT_SYNTAX)
            return
        params = policy.parse_rcpt_params(param_text)
        if isinstance(params, Reply):
            await self.reply(self._reject("parameter", params))
            return
        too_many = policy.check_recipient_count(len(self.txn.recipients), self.state.settings.limits.recipients)
        if too_many is not None:
            await self.reply(self._reject("too_many_recipients", too_many))
            return
        self.txn.recipients.append((rcpt, params))
        await self.reply(replies.RCPT_OK)

    # ---------------------------------------------------------------- DATA

    async def _read_data(self, data: policy.DataState, hard_cap: int, incoming: _Incoming) -> bool:
        """Read DATA up to CRLF "." CRLF into `data`; False if the session was closed for size.

        Reads up to each ".\r\n" (or what the buffer holds) rather than line by line, and hands
        DataState whole runs of lines: a 10 KB message is a few reads, not 200. Only CRLF "." CRLF
        ends DATA: "\n.\n", "\r.\r" and friends are content.
        """
        reader = self._reader
        # A larger reader limit while DATA runs: with the command-line limit (12 KB) a 1 MB body
        # took ~85 LimitOverrunError round trips and as many transport pause/resume pairs. The
        # reader holds at most twice this before it stops reading the socket.
        saved_limit = reader._limit
        reader._limit = max(saved_limit, DATA_READ_LIMIT)
        try:
            return await self._read_data_blocks(reader, data, hard_cap, incoming)
        finally:
            reader._limit = saved_limit

    async def _read_data_blocks(self, reader: asyncio.StreamReader, data: policy.DataState, hard_cap: int,
                                incoming: _Incoming) -> bool:
        # Everything is taken from the reader in whole lines (up to a LF), so each piece goes to
        # DataState as it is, without a copy into a buffer of our own. `prev`: the last two
        # bytes taken, CRLF at the start of DATA: a lone ".\r\n" right after a CRLF ends DATA.
        prev = b"\r\n"
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                # No end within the limit: take the complete lines the reader holds.
                cut = reader._buffer.rfind(b"\n", 0, exc.consumed) + 1
                if cut:
                    chunk = await reader.read(cut)
                    data.feed_block(chunk)
                else:
                    # One line longer than any limit: count it, keep only its end (a CR that a
                    # LF may complete, and what the separator search needs).
                    chunk = await reader.read(exc.consumed)
                    data.size += len(chunk)
                    if data.problem is None:
                        data.problem = replies.DATA_LINE_TOO_LONG
                    data.discard()
                prev = _last_two(prev, chunk)
            else:
                n = len(chunk)
                if (chunk if n >= 5 else prev + chunk)[-5:-3] == b"\r\n":
                    if n > 3:
                        data.feed_block(chunk[:-3])
                    incoming.step_count(data)
                    self._reset_timeout()
                    return True
                # "x.\r\n": a line that ends in a dot, not the end.
                data.feed_block(chunk)
                prev = chunk[-2:]
                # Lines ending in dots would make every read one line (5 us each, ~0.7 s of the
                # shared loop for a full buffer of them): take the complete lines the buffer holds
                # up to the first CRLF "." CRLF (or its last line end) at once. Not when the buffer
                # starts with what may be the end marker's ".\r\n" (its CRLF came with this line).
                buf = reader._buffer
                if buf and not b".\r\n".startswith(bytes(buf[:3])):
                    end = buf.find(b"\r\n.\r\n")
                    take = end + 2 if end >= 0 else buf.rfind(b"\n") + 1
                    if take:
                        more = await reader.read(take)
                        data.feed_block(more)
                        prev = _last_two(prev, more)
            await incoming.step(data)
            if data.size > hard_cap:
                self._close_with(replies.SIZE_EXCEEDED)
                return False

    async def smtp_DATA(self, arg: str | None) -> None:
        if self.txn is None:
            p = self._principal_for_mail()
            await self.reply(self._reject("auth_required", p) if isinstance(p, Reply) else replies.NEED_MAIL)
            return
        if not self.txn.recipients:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.DATA_SYNTAX)
            return
        limits = self.state.settings.limits
        declared = self.txn.params.size or 0
        if self.state.data_in_flight >= limits.max_data_in_flight or \
                self.state.data_in_flight + declared > limits.max_data_in_flight:
            # Before 354: the client has sent nothing yet and simply tries again later.
            event(log, "data_refused", client=self.client_ip, user=self.txn.principal.username, reason="in_flight")
            await self.reply(self._reject("in_flight", replies.DATA_IN_FLIGHT))
            return
        txn = self.txn
        # The queue id and our Received field are known before the first byte: a large message's
        # header block is prepared and written out as soon as it is complete.
        qid = _queue_id()
        hostname = self.state.settings.hostname
        protocol = ("UTF8SMTP" if txn.params.smtputf8 else "ESMTP" if self.esmtp else "SMTP") + \
            ("S" if self.tls_active else "") + ("A" if txn.principal.kind == "auth" else "")
        if protocol == "SMTPS":
            protocol = "SMTP"  # RFC 3848 has no SMTPS; TLS shows in the comment
        received = headers.received_line(
            helo=self.helo or "unknown", client_ip=self.client_ip, hostname=hostname, protocol=protocol,
            queue_id=qid, tls=self.tls_info,
            recipient=str(txn.recipients[0][0]) if len(txn.recipients) == 1 else None)

        def prepare(content: bytes) -> bytes:
            return headers.prepare(content, received=received, hostname=hostname, queue_id=qid)

        incoming = _Incoming(self.state, qid, prepare)
        try:
            await self.push(replies.START_DATA)
            await self._data_transaction(txn, incoming, prepare)
        finally:
            if incoming.counted > incoming.threshold:
                memory.TRIMMER.note(incoming.counted)  # large DATA: its buffers are freed now
            incoming.release()
            await incoming.drop()

    async def _data_transaction(self, txn: Transaction, incoming: _Incoming, prepare: Any) -> None:
        limits = self.state.settings.limits
        qid = incoming.qid
        data = policy.DataState(limits.message_size)
        # Past this much a client is not uploading a message but streaming at us: hang up.
        hard_cap = 2 * limits.message_size + 1_048_576
        self._in_data = True
        try:
            if not await self._read_data(data, hard_cap, incoming):
                return
        finally:
            self._in_data = False
        self.txn = None
        if data.problem is not None:
            reason = {replies.SIZE_EXCEEDED: "size", replies.DATA_LINE_TOO_LONG: "line_length",
                      replies.DATA_IN_FLIGHT: "in_flight", replies.HEADERS_TOO_LARGE: "header_size",
                      replies.STORAGE_FULL: "storage", replies.INTERNAL_ERROR: "spool"}.get(
                data.problem, "bare_line_ending")
            event(log, "data_refused", client=self.client_ip, user=txn.principal.username, reason=reason)
            await self.reply(self._reject(reason, data.problem))
            return
        t0 = time.perf_counter()
        spooled = incoming.file is not None
        if spooled:
            fields = incoming.fields
            content = b""
        else:
            content = data.content()
            data.discard()
            fields = headers.split(content).fields
        if policy.check_received_count(sum(1 for f in fields if headers.field_name(f) == "received"),
                                       limits.max_received_headers):
            await self.reply(self._reject("loop", replies.LOOP_DETECTED))
            return
        refused = policy.check_from_header(headers.from_domains(fields), txn.principal.domains,
                                           self.state.settings.from_header)
        if refused is not None:
            event(log, "data_refused", client=self.client_ip, user=txn.principal.username, reason="from_header")
            await self.reply(self._reject("from_header", refused))
            return
        if spooled:
            await incoming.finish(data)  # the rest written, file and directory fsynced: before the commit
            assert incoming.file is not None
            message, size = incoming.head, incoming.file.size
            metrics.SPOOLED.inc()
        else:
            message = prepare(content)
            size = len(message)
        # DKIM: signed by the delivery process before the first attempt (CPU the acceptance
        # side does not spend while clients wait for 250), for the credential's domain the
        # sender belongs to; the signature is stored, so retries send the same bytes.
        sign_domain = next((d for d in txn.principal.domains if policy.domain_allowed(txn.sender.ascii_domain, (d,))),
                           None)
        new = NewMessage(
            sender=str(txn.sender),
            recipients=tuple(NewRecipient(str(a), a.ascii_domain, p.notify, p.orcpt) for a, p in txn.recipients),
            data=message, auth_user=txn.principal.username, client_ip=self.client_ip,
            ret=txn.params.ret, envid=txn.params.envid, smtputf8=txn.params.smtputf8, queue_id=qid,
            requiretls=txn.params.requiretls,
            dkim_domain=sign_domain, spool_file=incoming.file.name if incoming.file else None,
            spool_size=size if spooled else 0,
            spool_ascii=incoming.ascii)
        await self.state.queue.enqueue(new)
        incoming.enqueued = True
        metrics.MESSAGE_SIZE.observe(size)
        metrics.ACCEPT_LATENCY.observe(time.perf_counter() - t0)
        event(log, "queued", qid=qid, client=self.client_ip, user=txn.principal.username, sender=str(txn.sender),
              rcpts=len(txn.recipients), size=size, spooled=spooled or None)
        await self.reply(replies.QUEUED.with_text(f"{replies.QUEUED.text} {qid}"))
