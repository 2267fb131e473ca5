"""POP3 and IMAP refused by design: listeners that greet in the client's own protocol, refuse, and close.

A mail client pointed at this host for incoming mail then shows its user a clear message
instead of a timeout. Refusals are counted by protocol.
"""
from __future__ import annotations

import asyncio
import logging
import ssl

from .. import metrics
from ..config import RefusalConfig
from ..logs import event
from .listeners import bind_error

log = logging.getLogger("relay.refusal")

TEXT = ("This server only sends mail (SMTP submission); it hosts no mailboxes. "
        "Set up POP3/IMAP with your mailbox provider.")
POP3_GREETING = f"-ERR {TEXT}\r\n".encode()
IMAP_GREETING = f"* BYE {TEXT}\r\n".encode()


class _Refuse(asyncio.Protocol):
    def __init__(self, protocol: str, greeting: bytes):
        self.protocol = protocol
        self.greeting = greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        metrics.REFUSALS.labels(self.protocol).inc()
        peer = transport.get_extra_info("peername") or ("unknown",)
        event(log, "mailbox_refused", protocol=self.protocol, client=peer[0])
        transport.write(self.greeting)  # type: ignore[attr-defined]
        transport.close()


async def start(cfg: RefusalConfig, tls_context: ssl.SSLContext) -> list[asyncio.Server]:
    """Start the refusal listeners; one that cannot bind is a warning, not a failure."""
    loop = asyncio.get_running_loop()
    servers = []
    for port, protocol, greeting, tls in (
            (cfg.pop3_port, "pop3", POP3_GREETING, False), (cfg.imap_port, "imap", IMAP_GREETING, False),
            (cfg.pop3s_port, "pop3", POP3_GREETING, True), (cfg.imaps_port, "imap", IMAP_GREETING, True)):
        if port == 0:
            continue
        try:
            server = await loop.create_server(lambda p=protocol, g=greeting: _Refuse(p, g), host=cfg.address,
                                              port=port, ssl=tls_context if tls else None, reuse_address=True,
                                              ssl_handshake_timeout=10 if tls else None)
        except OSError as exc:
            event(log, "refusal_listener_skipped", logging.WARNING, protocol=protocol, port=port,
                  error=str(bind_error(f"{protocol} refusal listener", cfg.address, port, exc)))
            continue
        bound = server.sockets[0].getsockname()[1]
        event(log, "listening", address=cfg.address, port=bound, tls="implicit" if tls else "none",
              refusal=protocol + ("s" if tls else ""))
        servers.append(server)
    return servers
