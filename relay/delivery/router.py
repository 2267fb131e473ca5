"""Routes: each destination (a recipient domain's MX set, or the smarthost) as a reusable connection.

Both routes honour the same contract: `send(envelope) -> {recipient: RcptOutcome}`; a
connection reconnects on its own when the previous session broke.
"""
from __future__ import annotations

import logging

from ..config import Config
from ..logs import event
from ..tls import client_context
from . import PERMANENT, TRANSIENT, Envelope, RcptOutcome, all_same
from .mx import DNSFailure, make_resolver, resolve_addresses, resolve_mx
from .outbound import ConnectFailure, Session, StaleSession

log = logging.getLogger("relay.delivery")


class _Route:
    """Common part: keep one live session, open a new one when needed, retire it after N messages."""

    def __init__(self, router: "Router"):
        self.router = router
        self.session: Session | None = None

    async def _connect(self) -> Session:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def reusable(self) -> bool:
        """An open session worth keeping for the next message to this destination."""
        cfg = self.router.cfg.delivery
        return self.session is not None and self.session.alive and \
            self.session.messages < cfg.max_messages_per_connection

    async def send(self, env: Envelope) -> dict[str, RcptOutcome]:
        for _ in range(2):
            if self.session is not None and not self.reusable:
                await self.session.close()
                self.session = None
            if self.session is None:
                try:
                    self.session = await self._connect()
                except DNSFailure as exc:
                    return all_same(env, RcptOutcome(PERMANENT if exc.permanent else TRANSIENT, exc.reply, exc.status))
                except ConnectFailure as exc:
                    return all_same(env, RcptOutcome(PERMANENT if exc.permanent else TRANSIENT, exc.reply, exc.status,
                                                     exc.host, exc.tls))
            try:
                return await self.session.send(env)
            except StaleSession:
                # A cached session died while idle; nothing was sent, so one fresh connection is safe.
                await self.session.close()
                self.session = None
        return all_same(env, RcptOutcome(TRANSIENT, "connection lost twice before MAIL FROM", "4.4.2"))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def abort(self) -> None:
        """Drop the connection at once (cancelled mid-command: the session state is unknown)."""
        if self.session is not None:
            self.session.abort()
            self.session = None


class MXRoute(_Route):
    def __init__(self, router: "Router", domain: str):
        super().__init__(router)
        self.domain = domain
        d = router.cfg.delivery
        self.require_tls = d.require_tls or domain in d.require_tls_domains

    async def _connect(self) -> Session:
        r = self.router
        d = r.cfg.delivery
        hosts = await resolve_mx(r.resolver, self.domain)
        last: ConnectFailure | None = None
        any_address = False
        for host in hosts:
            try:
                addresses = await resolve_addresses(r.resolver, host)
            except DNSFailure as exc:
                last = ConnectFailure(exc.reply, exc.status)
                continue
            any_address = any_address or bool(addresses)
            for address in addresses:
                for tls in ("required",) if self.require_tls else ("opportunistic", "none"):
                    try:
                        s = await Session.open(
                            address=address, port=d.mx_port, host=host, helo=r.cfg.helo_hostname,
                            connect_timeout=d.connect_timeout, command_timeout=d.command_timeout, tls=tls,
                            verify=self.require_tls, tls_context=r.verified_tls if self.require_tls else r.opportunistic_tls)
                        event(log, "outbound_connected", domain=self.domain, mx=host, address=address, tls=s.tls)
                        return s
                    except ConnectFailure as exc:
                        last = exc
                        event(log, "outbound_connect_failed", logging.WARNING, domain=self.domain, mx=host,
                              address=address, error=exc.reply)
                        # Opportunistic TLS that fails its handshake: retry the same host in plain text.
                        if not exc.tls_failed:
                            break
        if not any_address and last is None:
            raise DNSFailure(True, f"550 5.1.2 No address records for the mail hosts of {self.domain}", "5.1.2")
        assert last is not None
        raise last


class SmarthostRoute(_Route):
    async def _connect(self) -> Session:
        r = self.router
        d = r.cfg.delivery
        sh = d.smarthost
        ctx = r.verified_tls if sh.verify_cert else r.opportunistic_tls
        s = await Session.open(address=sh.host, port=sh.port, host=sh.host, helo=r.cfg.helo_hostname,
                               connect_timeout=d.connect_timeout, command_timeout=d.command_timeout,
                               tls=sh.tls, verify=sh.verify_cert, username=sh.username,
                               password=sh.resolved_password(), tls_context=ctx)
        event(log, "outbound_connected", smarthost=sh.host, port=sh.port, tls=s.tls)
        return s


class Router:
    def __init__(self, cfg: Config):
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.resolver = make_resolver(cfg.dns)
        # Built once: loading the system CA store costs milliseconds per connection otherwise.
        self.opportunistic_tls = client_context(verify=False)
        self.verified_tls = client_context(verify=True)

    @property
    def mode(self) -> str:
        return self.cfg.delivery.mode

    def destination(self, route: str) -> str:
        """Connection-sharing key: everything shares the smarthost; otherwise per recipient domain."""
        return "smarthost" if self.mode == "smarthost" else route

    def open(self, destination: str) -> _Route:
        if destination == "smarthost" and self.mode == "smarthost":
            return SmarthostRoute(self)
        return MXRoute(self, destination)
