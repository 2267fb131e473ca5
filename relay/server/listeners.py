"""Bind every configured SMTP listener on the daemon's loop (implicit TLS wraps from the first byte)."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from dataclasses import dataclass

from ..config import Listener
from ..logs import event
from .session import ServerState, Session

log = logging.getLogger("relay.listeners")


class ListenError(Exception):
    """Binding failed; str() is the one line for the operator."""


@dataclass
class Bound:
    name: str
    address: str
    port: int
    tls: str
    server: asyncio.Server


def bind_error(what: str, address: str, port: int, exc: OSError) -> ListenError:
    if exc.errno == errno.EACCES:
        return ListenError(
            f"cannot bind {what} {address}:{port}: permission denied. Ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE: run under systemd/relay.service (AmbientCapabilities=CAP_NET_BIND_SERVICE) "
            "or `setcap cap_net_bind_service=+ep` on the Python binary, or use ports >= 1024 in [[listeners]]")
    if exc.errno == errno.EADDRINUSE:
        return ListenError(f"cannot bind {what} {address}:{port}: address already in use (another MTA running?)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"cannot bind {what} {address}:{port}: address not available on this host")
    return ListenError(f"cannot bind {what} {address}:{port}: {exc.strerror or exc}")


async def start(state: ServerState, listeners: tuple[Listener, ...], tls_context: ssl.SSLContext) -> list[Bound]:
    loop = asyncio.get_running_loop()
    bound: list[Bound] = []
    try:
        for lst in listeners:
            implicit = lst.tls == "implicit"
            # A client that never sends its ClientHello is idle like any other (bound at bind time).
            handshake = min(30, state.settings.limits.idle_timeout) if implicit else None
            name = str(lst.port)
            if lst.port == 0:  # ephemeral (tests): label by the port we get
                sock = socket.create_server((lst.address, 0), reuse_port=False)
                name = str(sock.getsockname()[1])
            else:
                sock = None

            def factory(name: str = name, implicit: bool = implicit) -> Session:
                return Session(state, name, implicit)

            try:
                if sock is not None:
                    server = await loop.create_server(factory, sock=sock, ssl=tls_context if implicit else None,
                                                      backlog=1024, ssl_handshake_timeout=handshake)
                else:
                    server = await loop.create_server(
                        factory, host=lst.address, port=lst.port, ssl=tls_context if implicit else None,
                        reuse_address=True, backlog=1024, ssl_handshake_timeout=handshake)
            except OSError as exc:
                raise bind_error("SMTP listener", lst.address, lst.port, exc) from None
            port = server.sockets[0].getsockname()[1]
            b = Bound(name, lst.address, port, lst.tls, server)
            bound.append(b)
            event(log, "listening", address=lst.address, port=port, tls=lst.tls)
    except BaseException:
        for b in bound:
            b.server.close()
        raise
    return bound
