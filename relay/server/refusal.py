"""POP3 and IMAP refused by design: listeners that greet in the client's own protocol, refuse, and close.

A mail client pointed at this host for incoming mail then shows its user a clear message
instead of a timeout. Refusals are counted by protocol. The TLS ports (993/995) accept plain
TCP like every listener (see listeners.py): a per-IP cap at accept, then `loop.start_tls` under
the shared handshake cap and deadline, so silent connections cannot pile up here either.
"""
from __future__ import annotations

import asyncio
import logging
import ssl

from asyncio import sslproto

from .. import metrics
from ..tls import take_over
from ..config import RefusalConfig
from ..logs import event
from .listeners import Acceptor, ListenError, listen_socket
from .session import ServerState

log = logging.getLogger("relay.refusal")

TEXT = ("This server only sends mail (SMTP submission); it hosts no mailboxes. "
        "Set up POP3/IMAP with your mailbox provider.")
POP3_GREETING = f"-ERR {TEXT}\r\n".encode()
IMAP_GREETING = f"* BYE {TEXT}\r\n".encode()


class _Refuse(asyncio.Protocol):
    def __init__(self, state: ServerState, counts: dict[str, int], protocol: str, greeting: bytes, tls: bool):
        self.state = state
        self.counts = counts
        self.protocol = protocol
        self.greeting = greeting
        self.tls = tls
        self.client = "unknown"
        self.counted = False
        self.task: asyncio.Task | None = None
        self.early = bytearray()  # read before the TLS protocol took over (tls.take_over)

    def data_received(self, data: bytes) -> None:
        if self.tls and len(self.early) < 65536:
            self.early += data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.counted:  # the TLS app transport's connection_made (start_tls does not call it)
            return
        peer = transport.get_extra_info("peername") or ("unknown",)
        self.client = str(peer[0])
        limits = self.state.settings.limits
        if self.counts.get(self.client, 0) >= limits.connections_per_ip:
            metrics.CONNECTIONS_REFUSED.labels("per_ip").inc()
            transport.close()
            return
        self.counted = True
        self.counts[self.client] = self.counts.get(self.client, 0) + 1
        if not self.tls:
            self._refuse(transport)
            return
        self.task = asyncio.get_running_loop().create_task(self._tls_then_refuse(transport))

    async def _tls_then_refuse(self, transport: asyncio.BaseTransport) -> None:
        st = self.state
        limits = st.settings.limits
        if st.handshakes >= limits.tls_handshakes:
            metrics.TLS_HANDSHAKES.labels("implicit", "refused").inc()
            metrics.CONNECTIONS_REFUSED.labels("tls_handshakes").inc()
            transport.close()
            return
        st.handshakes += 1
        metrics.TLS_HANDSHAKES_IN_PROGRESS.inc()
        try:
            # asyncio's SSLProtocol directly, not loop.start_tls: the bytes already read (uvloop
            # reads before this task runs) must reach the handshake.
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            tls = sslproto.SSLProtocol(loop, self, st.tls_context, waiter, server_side=True,
                                       ssl_handshake_timeout=limits.tls_handshake_timeout)
            early, self.early = bytes(self.early), bytearray()
            take_over(transport, tls, early)
            await waiter
            tls_transport = tls._app_transport
            if transport.is_closing():
                raise ConnectionResetError("closed during the TLS handshake")
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError):
            # Deadline passed, bad ClientHello, or the client left.
            metrics.TLS_HANDSHAKES.labels("implicit", "failed").inc()
            transport.close()
            self.connection_lost(None)  # frees the slot whether or not SSLProtocol reports the loss
            return
        finally:
            st.handshakes -= 1
            metrics.TLS_HANDSHAKES_IN_PROGRESS.dec()
        metrics.TLS_HANDSHAKES.labels("implicit", "ok").inc()
        self._refuse(tls_transport)

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        metrics.REFUSALS.labels(self.protocol).inc()
        event(log, "mailbox_refused", protocol=self.protocol, client=self.client)
        transport.write(self.greeting)  # type: ignore[attr-defined]
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.counted = False
            n = self.counts.get(self.client, 1) - 1
            if n <= 0:
                self.counts.pop(self.client, None)
            else:
                self.counts[self.client] = n


async def start(cfg: RefusalConfig, state: ServerState) -> list[Acceptor]:
    """Start the refusal listeners; one that cannot bind is a warning, not a failure."""
    servers = []
    counts: dict[str, int] = {}  # per client IP, across the four refusal listeners
    for port, protocol, greeting, tls in (
            (cfg.pop3_port, "pop3", POP3_GREETING, False), (cfg.imap_port, "imap", IMAP_GREETING, False),
            (cfg.pop3s_port, "pop3", POP3_GREETING, True), (cfg.imaps_port, "imap", IMAP_GREETING, True)):
        if port == 0:
            continue
        try:
            sock = listen_socket(f"{protocol} refusal listener", cfg.address, port)
        except ListenError as exc:
            event(log, "refusal_listener_skipped", logging.WARNING, protocol=protocol, port=port, error=str(exc))
            continue
        bound = sock.getsockname()[1]
        factory = (lambda p=protocol, g=greeting, t=tls: _Refuse(state, counts, p, g, t))
        servers.append(Acceptor(sock, factory, f"{protocol}{'s' if tls else ''}"))
        event(log, "listening", address=cfg.address, port=bound, tls="implicit" if tls else "none",
              refusal=protocol + ("s" if tls else ""))
    return servers
