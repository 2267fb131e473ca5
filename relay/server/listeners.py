"""Bind every configured listener and accept its connections ourselves, in plain TCP.

Every listener, implicit TLS (465, 993/995) included, accepts plain TCP: connection caps are
applied at accept, before any TLS work, and the session starts TLS itself with a handshake
deadline and a cap on handshakes in progress. With asyncio's `create_server(ssl=...)` the
protocol only saw a connection once its handshake finished, so silent connections to 465 were
never counted (420 held from one IP with a cap of 20).

We also run the accept loop ourselves: asyncio's, on EMFILE, logs a traceback and schedules a
retry for every one of up to `backlog` accept() calls in the same tick (tens of thousands of
tracebacks within seconds, burying the auth-failure lines fail2ban reads). Ours pauses the
listener for ACCEPT_PAUSE seconds and logs at most one line per LOG_INTERVAL.

A listener with `proxy_protocol = true` sits behind a load balancer: every connection comes from
one of its trusted_proxies and starts with a PROXY header naming the real client (`ProxyGate`).
There the accept-time per-IP cap would count the load balancer and throttle every client behind
it, so the gate only applies the global cap (header readers included) and a cap on connections
still reading their header; the session counts the real client per IP once the header is read.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ipaddress
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import metrics, replies
from ..config import Listener
from ..logs import event
from .proxy import ProxyError, read_header
from .session import ServerState, Session

log = logging.getLogger("relay.listeners")

# Out of descriptors or kernel memory: accept() fails until some connection closes.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE = 0.5    # seconds a listener stops accepting after a resource error
LOG_INTERVAL = 60.0   # at most one accept_paused line per listener per this many seconds
ACCEPT_BATCH = 128    # accept() calls per readiness event: others' turns come between batches


class ListenError(Exception):
    """Binding failed; str() is the one line for the operator."""


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


class Acceptor:
    """One listening socket: accept() in batches from a reader callback, hand each socket to
    `connect_accepted_socket` with our protocol; on a resource error pause, log rarely."""

    def __init__(self, sock: socket.socket, factory: Callable[..., asyncio.Protocol], name: str,
                 clock: Callable[[], float] = time.monotonic, gate: "ProxyGate | None" = None,
                 handoff: Callable[[socket.socket, str | None, bool], None] | None = None):
        self.sock = sock
        # Several acceptance workers (server/workers.py): (socket, client, local) goes to them.
        self._handoff = handoff
        self._gate = gate
        self._reading: set[asyncio.Task] = set()  # PROXY header reads: cancelled at close
        self.sockets = [sock]
        self.name = name
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._clock = clock
        self._closed = False
        self._paused: asyncio.TimerHandle | None = None
        self._last_log = -LOG_INTERVAL
        self._pauses_unlogged = 0
        self._tasks: set[asyncio.Task] = set()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: next one
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._pause(exc)
                else:
                    event(log, "accept_failed", logging.ERROR, listener=self.name, error=str(exc))
                return
            conn.setblocking(False)
            if self._handoff is not None and self._gate is None:
                self._handoff(conn, None, False)  # no await in between: no task a connection
                continue
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        factory = self._factory
        client: tuple[str | None, bool] = (None, False)
        if self._gate is not None:
            task = asyncio.current_task()
            assert task is not None
            self._reading.add(task)
            try:
                admitted = await self._gate.admit(conn)
            except asyncio.CancelledError:
                conn.close()  # the listener closed (shutdown) while the header was awaited
                return
            finally:
                self._reading.discard(task)
            if admitted is None:
                return  # refused and closed by the gate
            client = admitted

            def factory(client: tuple[str | None, bool] = client) -> asyncio.Protocol:
                return self._factory(*client)
        if self._handoff is not None:
            self._handoff(conn, *client)
            return
        try:
            await self._loop.connect_accepted_socket(factory, conn)
        except OSError:
            conn.close()  # reset before connection_made: nothing was counted yet

    def _pause(self, exc: OSError) -> None:
        """Stop watching the socket (Linux keeps reporting it readable) and try again shortly."""
        metrics.ACCEPT_PAUSES.labels(errno.errorcode.get(exc.errno or 0, "unknown")).inc()
        self._loop.remove_reader(self.sock.fileno())
        self._paused = self._loop.call_later(ACCEPT_PAUSE, self._resume)
        self._pauses_unlogged += 1
        now = self._clock()
        if now - self._last_log >= LOG_INTERVAL:
            event(log, "accept_paused", logging.WARNING, listener=self.name,
                  error=errno.errorcode.get(exc.errno or 0, str(exc)), pause=ACCEPT_PAUSE,
                  pauses=self._pauses_unlogged,
                  hint="out of file descriptors: raise LimitNOFILE or lower limits.connections")
            self._last_log = now
            self._pauses_unlogged = 0

    def _resume(self) -> None:
        self._paused = None
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Stop accepting (open sessions are the drain's business)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._reading):
            task.cancel()
        if self._paused is not None:
            self._paused.cancel()
        else:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class ProxyGate:
    """Admission for a PROXY-protocol listener, before any session exists: the peer must be a
    trusted proxy, the global cap (sessions plus header reads) and the header-read cap must have
    room, and a valid header must arrive within limits.proxy_header_timeout. The answer is the
    client address the session is to use (and whether the header was LOCAL/UNKNOWN: the proxy
    speaking for itself, its health checks), or None after closing the connection."""

    def __init__(self, state: ServerState, listener: str, trusted: tuple[str, ...], implicit: bool):
        self.state = state
        self.listener = listener
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self.implicit = implicit

    def is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)

    def _refuse(self, conn: socket.socket, peer: str, reason: str, reply: Any = None, **fields: Any) -> None:
        metrics.PROXY_REFUSED.labels(reason).inc()
        suppressed = self.state.refusal_logged(peer, f"proxy_{reason}", time.monotonic())
        if suppressed is not None:
            event(log, "proxy_refused", logging.WARNING, reason=reason, peer=peer, listener=self.listener,
                  unlogged_since_last=suppressed or None, **fields)
        if reply is not None and not self.implicit:
            try:
                conn.send(f"{reply}\r\n".encode())
            except OSError:
                pass
        conn.close()

    async def admit(self, conn: socket.socket) -> tuple[str, bool] | None:
        st = self.state
        limits = st.settings.limits
        try:
            peer = _plain(str(conn.getpeername()[0]))
        except (OSError, ValueError):
            conn.close()
            return None
        if not self.is_trusted(peer):
            # A PROXY listener is for the load balancer alone: anyone else could claim any address.
            self._refuse(conn, peer, "untrusted_peer")
            return None
        if st.draining:
            self._refuse(conn, peer, "draining", replies.SHUTTING_DOWN)
            return None
        if len(st.sessions) + st.elsewhere + st.proxy_pending >= limits.connections:
            metrics.CONNECTIONS_REFUSED.labels("global").inc()
            self._refuse(conn, peer, "global", replies.TOO_MANY_CONNECTIONS)
            return None
        if st.proxy_pending >= limits.proxy_headers:
            # Silent or stalled connections from (or through) the proxy hold a slot each until the
            # deadline: past the cap they are closed at once, so they cannot pile up.
            metrics.CONNECTIONS_REFUSED.labels("proxy_headers").inc()
            self._refuse(conn, peer, "proxy_headers", limit=limits.proxy_headers)
            return None
        st.proxy_pending += 1
        metrics.PROXY_HEADERS_IN_PROGRESS.inc()
        try:
            header = await read_header(conn, limits.proxy_header_timeout)
        except ProxyError as exc:
            self._refuse(conn, peer, exc.reason, detail=exc.detail or None)
            return None
        finally:
            st.proxy_pending -= 1
            metrics.PROXY_HEADERS_IN_PROGRESS.dec()
        if header.source is None:
            return peer, True  # LOCAL / UNKNOWN: the proxy's own connection (health checks)
        return _plain(header.source[0]), False


def _plain(ip: str) -> str:
    """::ffff:192.0.2.7 (a dual-stack socket, or a TCP6 header) is 192.0.2.7 for trusted_proxies,
    caps and lockouts."""
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass
class Bound:
    name: str
    address: str
    port: int
    tls: str
    server: Acceptor


def listen_socket(what: str, address: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # socket.create_server sets SO_REUSEADDR: a restart does not wait out TIME_WAIT.
        return socket.create_server((address, port), family=family, backlog=1024, reuse_port=False)
    except OSError as exc:
        raise bind_error(what, address, port, exc) from None


async def start(state: ServerState, listeners: tuple[Listener, ...], workers: Any = None) -> list[Bound]:
    """Bind and start accepting on every listener; sessions take their TLS context from `state`.
    With `workers` (server/workers.AcceptanceWorkers) the sessions run there instead."""
    bound: list[Bound] = []
    try:
        for lst in listeners:
            implicit = lst.tls == "implicit"
            sock = listen_socket("SMTP listener", lst.address, lst.port)
            port = sock.getsockname()[1]
            name = str(port)  # ephemeral (tests) or configured: label by the port we have

            gate = ProxyGate(state, name, lst.trusted_proxies, implicit) if lst.proxy_protocol else None

            def factory(client: str | None = None, local: bool = False, name: str = name,
                        implicit: bool = implicit) -> Session:
                return Session(state, name, implicit, client_ip=client, proxy_local=local)

            handoff = None
            if workers is not None:
                def handoff(conn: socket.socket, client: str | None, local: bool, name: str = name,
                            implicit: bool = implicit) -> None:
                    workers.handoff(conn, name, implicit, client, local)
            b = Bound(name, lst.address, port, lst.tls, Acceptor(sock, factory, name, gate=gate, handoff=handoff))
            bound.append(b)
            event(log, "listening", address=lst.address, port=port, tls=lst.tls,
                  proxy_protocol=True if gate is not None else None)
    except BaseException:
        for b in bound:
            b.server.close()
        raise
    return bound
