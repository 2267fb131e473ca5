"""Routes: each destination (a recipient domain's MX set, or the smarthost) as a reusable connection.

Both routes honour the same contract: `send(envelope) -> {recipient: RcptOutcome}`; a
connection reconnects on its own when the previous session broke.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING, Callable

from .. import metrics
from ..config import Config
from ..logs import event
from ..tls import client_context
from . import PERMANENT, TRANSIENT, Envelope, RcptOutcome, all_same
from .mx import DNSFailure, make_resolver, resolve_addresses, resolve_mx
from .dane import DANECheck
from .outbound import ConnectFailure, Session, StaleSession
from .tls_policy import VERIFIED, Decision, Level, TLSPolicy

if TYPE_CHECKING:
    from ..store.contract import TLSState

log = logging.getLogger("relay.delivery")


class _Route:
    """Common part: keep one live session, open a new one when needed, retire it after N messages."""

    def __init__(self, router: "Router"):
        self.router = router
        self.session: Session | None = None
        self.decision: Decision | None = None   # the TLS policy of the current (or last) connection

    async def _connect(self) -> Session:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def reusable(self) -> bool:
        """An open session worth keeping for the next message to this destination."""
        cfg = self.router.cfg.delivery
        return self.session is not None and self.session.alive and \
            self.session.messages < cfg.max_messages_per_connection

    async def send(self, env: Envelope, fence=None) -> dict[str, RcptOutcome]:
        d = self.router.cfg.delivery
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
                    label = self.decision.label if self.decision else None
                    if exc.tls_result and label:
                        metrics.DELIVERY_TLS.labels(label, exc.tls_result).inc()
                    # A TLS policy failure is not a dead host: it answered, and must not suspend the destination.
                    return all_same(env, RcptOutcome(PERMANENT if exc.permanent else TRANSIENT, exc.reply, exc.status,
                                                     exc.host, exc.tls, connection_failed=not exc.permanent
                                                     and not exc.tls_result, tls_policy=label,
                                                     tls_result=exc.tls_result))
            try:
                outcomes = await self.session.send(env, xfer_timeout=d.data_xfer_timeout,
                                                   done_timeout=d.data_done_timeout, fence=fence)
                return self._with_tls(outcomes)
            except StaleSession:
                # A cached session died while idle; nothing was sent, so one fresh connection is safe.
                await self.session.close()
                self.session = None
        return all_same(env, RcptOutcome(TRANSIENT, "connection lost twice before MAIL FROM", "4.4.2",
                                         connection_failed=True))

    def _with_tls(self, outcomes: dict[str, RcptOutcome]) -> dict[str, RcptOutcome]:
        """Each outcome carries the policy applied and the session's TLS (RFC 8460 counts sessions;
        we count attempts: one per message sent over the session)."""
        s, dec = self.session, self.decision
        if s is None or dec is None:
            return outcomes
        label = dec.label
        result = "verified" if s.verified else "encrypted" if s.tls != "plain" else "plain"
        metrics.DELIVERY_TLS.labels(label, result).inc()
        return {a: dataclasses.replace(o, tls_policy=label, tls_cipher=s.cipher, tls_verified=s.verified)
                for a, o in outcomes.items()}

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

    async def _connect(self) -> Session:
        """Try the MX hosts in order (RFC 5321 5.1), within the attempt's limits: at most
        max_mx_addresses addresses and max_mx_sessions sessions that got past the greeting
        (Postfix's smtp_mx_address_limit and smtp_mx_session_limit: a domain with 25 MX records
        must not cost 25 connection timeouts per attempt). The TLS policy decides per domain
        which hosts may be used (MTA-STS enforce) and how each one is tried (`Decision.steps`)."""
        r = self.router
        d = r.cfg.delivery
        policy = r.tls_policy
        decision = self.decision = await policy.decide(self.domain)
        if decision.dane is not None and decision.dane.bogus:
            # RFC 7672 2.2.1: a bogus MX set under DNSSEC defers the whole domain; nothing is sent.
            policy.failed(decision, self.domain, "dnssec-invalid", decision.dane.bogus)
            policy.count(decision, self.domain, "dnssec-invalid")
            raise ConnectFailure(f"DNSSEC validation failed for the mail hosts of {self.domain} "
                                 f"({decision.dane.bogus}); will retry", "4.7.5", tls_result="dnssec-invalid")
        hosts = await resolve_mx(r.resolver, self.domain)
        last: ConnectFailure | None = None
        any_address = False
        addresses_tried = sessions = 0
        for host in hosts:
            if decision.sts is not None and not decision.sts.allows(host):
                patterns = ",".join(decision.sts.mx)
                policy.failed(decision, host, "mx-mismatch", f"{host} matches none of {patterns}")
                policy.count(decision, host, "mx-mismatch")
                if decision.enforce_mx:
                    # RFC 8461 5: an MX host the policy does not list is not used. Transient (4.7.x):
                    # the policy may change, and RFC 8461 5.1 wants a fresh look before giving up.
                    last = ConnectFailure(f"{host} is not a mail host allowed by the MTA-STS policy of "
                                          f"{self.domain} (mx: {patterns}); will retry", "4.7.5", host=host,
                                          tls_result="mx-mismatch")
                    continue
            dane_host = decision.dane.host(host) if decision.dane is not None else None
            if dane_host is not None and dane_host.bogus:
                # RFC 7672 2.1.1: a TLSA lookup that failed (SERVFAIL: bogus) rules the host out.
                policy.failed(decision, host, "dnssec-invalid", dane_host.bogus)
                policy.count(decision, host, "dnssec-invalid")
                last = ConnectFailure(f"{host}: DANE TLSA lookup failed ({dane_host.bogus}); not used; "
                                      "will retry", "4.7.5", host=host, tls_result="dnssec-invalid")
                continue
            if decision.level is Level.DANE_ONLY and (dane_host is None or not dane_host.usable):
                # [delivery.tls_policy] says dane-only: without usable, DNSSEC-validated TLSA, no mail.
                policy.failed(decision, host, "dane-required", "no usable DNSSEC-validated TLSA records")
                policy.count(decision, host, "dane-required")
                last = ConnectFailure(f"{host} has no usable DNSSEC-validated TLSA records and {self.domain} "
                                      "requires DANE (delivery.tls_policy dane-only); will retry", "4.7.5",
                                      host=host, tls_result="dane-required")
                continue
            steps = self._steps(decision, host, dane_host)
            try:
                addresses = await resolve_addresses(r.resolver, host)
            except DNSFailure as exc:
                last = ConnectFailure(exc.reply, exc.status)
                continue
            any_address = any_address or bool(addresses)
            for address in addresses:
                if r.is_self(address, d.mx_port):
                    # RFC 5321 5.1: MX hosts preferred less than ourselves are not to be used. When
                    # we are the best one, the mail would only come back to us: that is a loop.
                    if last is None:
                        metrics.MAIL_LOOPS.inc()
                        event(log, "mail_loop", logging.WARNING, domain=self.domain, mx=host, address=address)
                        raise ConnectFailure(f"550 5.4.6 mail for {self.domain} loops back to myself "
                                             f"({host}[{address}]:{d.mx_port} is this relay)", "5.4.6",
                                             permanent=True, host=host)
                    raise last
                if addresses_tried >= d.max_mx_addresses or sessions >= d.max_mx_sessions:
                    assert last is not None
                    event(log, "mx_limit_reached", logging.WARNING, domain=self.domain, addresses=addresses_tried,
                          sessions=sessions)
                    raise last
                addresses_tried += 1
                verified_failed = ""
                for tls, verify in steps:
                    check = verify if isinstance(verify, DANECheck) else None
                    verify = bool(verify) and check is None
                    try:
                        s = await Session.open(
                            address=address, port=d.mx_port, host=host, helo=r.cfg.helo_hostname,
                            connect_timeout=d.connect_timeout, command_timeout=d.command_timeout, tls=tls,
                            verify=verify, tls_context=r.verified_tls if verify else r.opportunistic_tls,
                            own_hostname=r.own_hostname, dane=check)
                    except ConnectFailure as exc:
                        if exc.permanent and exc.status == "5.4.6":
                            metrics.MAIL_LOOPS.inc()
                            raise ConnectFailure(f"550 5.4.6 mail for {self.domain} loops back to myself "
                                                 f"({exc.reply})", "5.4.6", permanent=True, host=host) from None
                        last = exc
                        sessions += exc.greeted
                        # A verification only being learnt (may, encrypt) failing is news, not trouble.
                        learning = verify and not decision.verify_required and exc.tls_failed
                        event(log, "outbound_connect_failed", logging.INFO if learning else logging.WARNING,
                              domain=self.domain, mx=host,
                              address=address, error=exc.reply, tls_policy=decision.label,
                              tls_result=exc.tls_result)
                        if check is not None and exc.tls_result:
                            event(log, "dane_failure", logging.WARNING, domain=self.domain, mx=host,
                                  address=address, result=exc.tls_result, error=exc.reply)
                        if exc.tls_result:
                            last = self._tls_failure(decision, host, exc, verify)
                            if decision.report and verify:
                                verified_failed = exc.tls_result  # counted with the session that follows
                        # A failed handshake: try the next step of the policy on the same host
                        # (without verification, then in plain text, where the level allows).
                        if not exc.tls_failed:
                            break
                        continue
                    if decision.report and s.tls == "plain":
                        policy.failed(decision, host, "starttls-not-supported", "delivered without TLS (testing)")
                        policy.count(decision, host, "starttls-not-supported")
                    elif decision.report and verified_failed:
                        policy.count(decision, host, verified_failed)  # testing: would have failed
                    else:
                        policy.count(decision, host)
                    await policy.observe(decision, s.security)
                    event(log, "outbound_connected", domain=self.domain, mx=host, address=address, tls=s.tls,
                          tls_cipher=s.cipher, tls_verified=s.verified, tls_policy=decision.label,
                          **({"dane": s.dane} if s.dane else {}))
                    return s
        if not any_address and last is None:
            raise DNSFailure(True, f"550 5.1.2 No address records for the mail hosts of {self.domain}", "5.1.2")
        assert last is not None
        raise last

    def _steps(self, decision: Decision, host: str, dane_host) -> tuple:
        """How `host` is tried: under DANE per its own TLSA records (RFC 7672 2.2: usable ones =
        authenticated TLS, only unusable ones = mandatory TLS, none = opportunistic)."""
        policy = self.router.tls_policy
        known_bad = policy.verify_known_bad(host) and not decision.report
        if decision.dane is None:
            return decision.steps(known_bad)
        if dane_host is None:
            return Decision(self.domain, Level.MAY, "dane").steps(known_bad)
        if dane_host.usable:
            return (("required", DANECheck(dane_host.usable, (self.domain, host))),)
        return (("required", False),)

    def _tls_failure(self, decision: Decision, host: str, exc: ConnectFailure, verify: bool) -> ConnectFailure:
        """Account for a TLS failure on `host`; the failure to carry on with (maybe reworded)."""
        policy = self.router.tls_policy
        result = exc.tls_result or "validation-failure"
        if verify and not decision.verify_required and result != "starttls-not-supported":
            policy.note_unverifiable(host)  # learnt, not required: not tried verified for a while
        # A failed session for TLSRPT: where the policy required what failed. (A testing policy's
        # failure is counted with the session that follows; under may, a verification that was
        # only being learnt is no failure.)
        if not decision.report and (decision.verify_required or (decision.tls_required and
                                                                 result == "starttls-not-supported")):
            policy.count(decision, host, result)
        if decision.source == "downgrade" and (decision.verify_required or result == "starttls-not-supported"):
            # Less than this domain had before, and no policy says that is fine: a stripping attacker?
            policy.refused(decision, host, result)
            what = "verified TLS" if decision.floor == VERIFIED else "TLS"
            return ConnectFailure(f"{exc.reply}; refused: {self.domain} was reached with {what} before "
                                  "(downgrade protection); will retry", "4.7.5", host=host, tls=exc.tls,
                                  greeted=exc.greeted, tls_result="downgrade-refused", tls_failed=exc.tls_failed)
        if decision.verify_required or decision.report or (decision.tls_required and
                                                           result == "starttls-not-supported"):
            policy.failed(decision, host, result, exc.reply)
        return exc


class SmarthostRoute(_Route):
    async def _connect(self) -> Session:
        r = self.router
        d = r.cfg.delivery
        sh = d.smarthost
        ctx = r.verified_tls if sh.verify_cert else r.opportunistic_tls
        # Smarthost deliveries follow the smarthost's own settings, not recipient policies (design 2.1).
        level = Level.NONE if sh.tls == "none" else Level.VERIFY if sh.verify_cert else Level.ENCRYPT
        self.decision = Decision("smarthost", level, "smarthost")
        s = await Session.open(address=sh.host, port=sh.port, host=sh.host, helo=r.cfg.helo_hostname,
                               connect_timeout=d.connect_timeout, command_timeout=d.command_timeout,
                               tls=sh.tls, verify=sh.verify_cert, username=sh.username,
                               password=sh.resolved_password(), tls_context=ctx)
        event(log, "outbound_connected", smarthost=sh.host, port=sh.port, tls=s.tls)
        return s


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        return address


class Router:
    def __init__(self, cfg: Config, tls_state: TLSState | None = None, clock: Callable[[], float] = time.time):
        self.own_listeners: set[tuple[str, int]] = set()
        self._local_cache: dict[str, bool] = {}
        self.tls_state = tls_state
        self.clock = clock
        self.tls_policy: TLSPolicy | None = None
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.resolver = make_resolver(cfg.dns)
        # Built once: loading the system CA store costs milliseconds per connection otherwise.
        self.opportunistic_tls = client_context(verify=False)
        self.verified_tls = client_context(verify=True)
        if cfg.delivery.tls_ca_file:
            self.verified_tls.load_verify_locations(cafile=cfg.delivery.tls_ca_file)
        if self.tls_policy is None:
            self.tls_policy = TLSPolicy(cfg, self.resolver, self.tls_state, self.clock, self.verified_tls)
        else:
            self.tls_policy.configure(cfg, self.resolver, self.verified_tls)
        # A greeting naming us is a loop only when our name is a real one: every box is "localhost".
        names = {n.lower().rstrip(".") for n in (cfg.server.hostname, cfg.helo_hostname)}
        self.own_hostname = frozenset(n for n in names if "." in n and n != "localhost")

    def set_own_listeners(self, endpoints: list[tuple[str, int]]) -> None:
        """The relay's own bound (address, port) pairs: delivering to one of them is a loop."""
        self.own_listeners = {(_normal(a), p) for a, p in endpoints}
        self._local_cache: dict[str, bool] = {}

    def is_self(self, address: str, port: int) -> bool:
        own = self.own_listeners
        if not own:
            return False
        addr = _normal(address)
        if (addr, port) in own:
            return True
        wildcard = any(p == port and a in ("0.0.0.0", "::", "") for a, p in own)
        return wildcard and self._is_local(addr)

    def _is_local(self, address: str) -> bool:
        """Whether an address is one of this machine's: only a local address can be bound."""
        cached = self._local_cache.get(address)
        if cached is None:
            try:
                ip = ipaddress.ip_address(address)
                if ip.is_loopback or ip.is_unspecified:
                    cached = True
                else:
                    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                                       socket.SOCK_STREAM) as sock:
                        sock.bind((address, 0))
                    cached = True
            except (ValueError, OSError):
                cached = False
            self._local_cache[address] = cached
        return cached

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
