"""The outbound TLS policy: per destination domain, one decision (a Postfix level) that the
router and the outbound session follow, instead of loose tls/verify flags.

Levels (Postfix TLS_README): none, may, encrypt, verify, dane, dane-only. Where a level comes
from, the operator's word last:
  1. `[delivery.tls_policy]` per-domain overrides (config) - final, the downgrade memory too;
  2. DANE (RFC 7672, `dane.py`), with `dns.dnssec_resolver` set: a DNSSEC-secure MX set whose
     hosts have secure usable TLSA records = dane (TLS required, the certificate must match;
     wins over MTA-STS, RFC 8461 2); only unusable records = encrypt; a bogus MX lookup = dane
     with `dane.bogus` (the router defers); per host, `Decision.dane` says how each is tried;
  3. MTA-STS (RFC 8461): "enforce" = verify, and only MX hosts matching the policy;
     "testing" = may, with failures logged and counted (for TLSRPT, RFC 8460);
  4. `delivery.require_tls` / `require_tls_domains` = verify (what they always meant here);
  5. may.
Then the downgrade memory (what chasquid does): the best security seen for the domain
(verified > tls > plain), kept in the store, raises the level to verify or encrypt, so an
attacker who strips STARTTLS or swaps the certificate gets a deferral, not the mail.

A policy failure is transient (4.7.x, retried): RFC 8461 5.1 says a policy failure must not
become a bounce without a fresh look at the policy (`MTASTS.forget` forces it).
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import dns.asyncresolver

from .. import metrics
from ..config import Config
from ..logs import event
from .dane import DANE, DANEResult
from .mta_sts import MTASTS, Fetcher, Policy
from .tlsrpt import policy_lines

log = logging.getLogger("relay.delivery")


class Level(str, enum.Enum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"
    DANE = "dane"            # from DNSSEC-secure usable TLSA records (dane.py)
    DANE_ONLY = "dane-only"  # [delivery.tls_policy] only: DANE required, else deferred (dane-required)

    def __str__(self) -> str:
        return self.value


# Security actually seen on a session, ordered.
PLAIN, TLS, VERIFIED = "plain", "tls", "verified"
RANK = {PLAIN: 0, TLS: 1, VERIFIED: 2}
_FLOOR = {VERIFIED: Level.VERIFY, TLS: Level.ENCRYPT}
_STRENGTH = {Level.NONE: 0, Level.MAY: 1, Level.ENCRYPT: 2, Level.VERIFY: 3, Level.DANE: 3, Level.DANE_ONLY: 4}

# How often the memory's "last seen" is refreshed in the store for a domain seen at its best.
SEEN_REFRESH = 3600
# A host whose certificate did not verify is not tried with verification again (under may or
# encrypt, where verification is only learnt, not required) for this long.
UNVERIFIABLE_FOR = 3600
# TLSRPT session counts are kept in memory and added to the store at most this often (and at stop).
COUNTS_FLUSH = 60.0


@dataclass(frozen=True)
class Decision:
    domain: str
    level: Level
    source: str                     # config | mta-sts | require_tls | default | downgrade | smarthost
    sts: Policy | None = None       # the MTA-STS policy in force (enforce or testing)
    floor: str | None = None        # the remembered security that raised the level
    dane: DANEResult | None = None  # the TLSA records per MX host (source "dane")

    @property
    def label(self) -> str:
        """Low-cardinality name for logs and metrics: the level, or the MTA-STS mode."""
        if self.sts is not None and self.source == "mta-sts":
            return f"sts-{self.sts.mode}"
        return str(self.level)

    @property
    def enforce_mx(self) -> bool:
        return self.sts is not None and self.sts.mode == "enforce" and self.level is Level.VERIFY

    @property
    def report(self) -> bool:
        """Failures are worth recording even when the mail goes (MTA-STS testing)."""
        return self.sts is not None and self.sts.mode == "testing"

    @property
    def tls_required(self) -> bool:
        return _STRENGTH[self.level] >= _STRENGTH[Level.ENCRYPT]

    @property
    def verify_required(self) -> bool:
        return _STRENGTH[self.level] >= _STRENGTH[Level.VERIFY]

    def mx_allowed(self, host: str) -> bool:
        """RFC 8461 4.1, 5: under enforce, only MX hosts matching a policy pattern are used."""
        return not self.enforce_mx or self.sts is None or self.sts.allows(host)

    def steps(self, verify_known_bad: bool) -> tuple[tuple[str, bool], ...]:
        """(Session tls mode, verify) to try in order on one address; the next step only after a
        TLS failure of the previous one. Under may/encrypt verification is tried first to learn
        whether the host verifies (for the downgrade memory), except where it just failed."""
        if self.level is Level.NONE:
            return (("none", False),)
        if self.verify_required:
            return (("required", True),)
        first = () if verify_known_bad else ((("required" if self.tls_required else "opportunistic"), True),)
        if self.tls_required:
            return first + (("required", False),)
        return first + (("opportunistic", False), ("none", False))


def tls_result_of(exc: BaseException | None) -> str:
    """The TLSRPT result type (RFC 8460 4.3; design 2.5) of a failed TLS handshake."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError):
            code = getattr(exc, "verify_code", None)
            if code == 62:
                return "certificate-host-mismatch"
            if code == 10:
                return "certificate-expired"
            if code in (18, 19, 20, 21):
                return "certificate-not-trusted"
            return "validation-failure"
        exc = exc.__cause__ or exc.__context__
    return "validation-failure"


class TLSPolicy:
    """Decides per domain (`decide`), learns from sessions (`observe`), says no (`refused`)."""

    def __init__(self, cfg: Config, resolver: dns.asyncresolver.Resolver, state: Any = None,
                 clock: Callable[[], float] = time.time, verified_context: ssl.SSLContext | None = None):
        self.state = state              # store.contract.TLSState, or None (no memory, no cache)
        self.clock = clock
        self._memory: dict[str, tuple[str, float, float]] = {}   # domain -> (best, seen_at, written_at)
        self._unverifiable: dict[str, float] = {}                 # MX host -> until
        self._counts: Counter[tuple[str, str, str, str, str, str]] = Counter()
        self._flushed_at = clock()
        self._flush_task: asyncio.Task | None = None
        self.configure(cfg, resolver, verified_context)

    def configure(self, cfg: Config, resolver: dns.asyncresolver.Resolver,
                  verified_context: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        d = cfg.delivery
        self.overrides = {k: Level(v) for k, v in d.tls_policy.items()}
        ctx = verified_context or ssl.create_default_context()
        self.mta_sts = MTASTS(Fetcher(resolver, ctx, d.mta_sts_port), self.state, self.clock) if d.mta_sts else None
        self.dane = DANE.from_config(cfg)

    # ------------------------------------------------------------ deciding

    async def decide(self, domain: str) -> Decision:
        d = self.cfg.delivery
        domain = domain.lower().rstrip(".")
        level = self.overrides.get(domain)
        if level is Level.DANE_ONLY:
            found = await self._dane(domain)
            if found is not None and found.level is Level.DANE:
                return found
            # No usable TLSA (insecure, or only unusable records): every host fails dane-required.
            return Decision(domain, Level.DANE_ONLY, "config",
                            dane=found.dane if found is not None else DANEResult(domain))
        if level is not None:
            return Decision(domain, level, "config")
        decision = await self._dane(domain)
        if decision is not None:
            return decision  # DANE says what is allowed: the downgrade memory does not raise it
        decision = await self._sts(domain)
        if decision is None:
            if d.require_tls or domain in d.require_tls_domains:
                decision = Decision(domain, Level.VERIFY, "require_tls")
            else:
                decision = Decision(domain, Level.MAY, "default")
        if d.downgrade_protection:
            best = await self._best(domain)
            floor = _FLOOR.get(best) if best else None
            if floor is not None and _STRENGTH[floor] > _STRENGTH[decision.level]:
                decision = Decision(domain, floor, "downgrade", decision.sts, best)
        return decision

    async def _dane(self, domain: str) -> Decision | None:
        """DANE (RFC 7672): usable TLSA records for the MX hosts give `dane` (and win over
        MTA-STS, RFC 8461 2); only unusable ones give `encrypt`; a bogus lookup gives `dane` with
        the failure, so nothing is sent. None: DANE does not apply (no resolver, insecure)."""
        if self.dane is None:
            return None
        result = await self.dane.lookup(domain)
        if result is None:
            metrics.DANE_LOOKUPS.labels("insecure").inc()
            return None
        if result.bogus or all(h.bogus for h in result.hosts.values()):
            metrics.DANE_LOOKUPS.labels("bogus").inc()
            return Decision(domain, Level.DANE, "dane", dane=result)
        if result.any_usable:
            metrics.DANE_LOOKUPS.labels("dane").inc()
            return Decision(domain, Level.DANE, "dane", dane=result)
        metrics.DANE_LOOKUPS.labels("encrypt").inc()
        return Decision(domain, Level.ENCRYPT, "dane", dane=result)

    async def _sts(self, domain: str) -> Decision | None:
        if self.mta_sts is None or domain.startswith("["):
            return None
        policy = await self.mta_sts.policy(domain)
        if policy is None or policy.mode == "none":
            return None
        if policy.mode == "enforce":
            return Decision(domain, Level.VERIFY, "mta-sts", policy)
        return Decision(domain, Level.MAY, "mta-sts", policy)

    # ------------------------------------------------------------ the downgrade memory

    async def _best(self, domain: str) -> str | None:
        now = self.clock()
        mem = self._memory.get(domain)
        if mem is None and self.state is not None:
            try:
                row = await self.state.get_security(domain)
            except Exception as exc:  # noqa: BLE001 - no memory this time; the next look asks again
                event(log, "tls_memory_unavailable", logging.WARNING, domain=domain, error=f"{type(exc).__name__}: {exc}")
                return None
            mem = (row[0], row[1], row[1]) if row else (PLAIN, 0.0, 0.0)
            self._remember(domain, mem)
        if mem is None or now - mem[1] > self.cfg.delivery.downgrade_memory:
            return None
        return mem[0]

    def _remember(self, domain: str, mem: tuple[str, float, float]) -> None:
        if len(self._memory) > 50000:
            self._memory.clear()
        self._memory[domain] = mem

    async def observe(self, decision: Decision, seen: str) -> None:
        """A session was established with `seen` security: raise or refresh the memory."""
        if not self.cfg.delivery.downgrade_protection or decision.source == "smarthost":
            return
        domain, now = decision.domain, self.clock()
        await self._best(domain)  # loads the row once
        best, seen_at, written = self._memory.get(domain, (PLAIN, 0.0, 0.0))
        expired = now - seen_at > self.cfg.delivery.downgrade_memory
        if RANK[seen] > RANK[best] or (expired and seen != PLAIN and seen != best):
            write = "reset" if expired else "note"
        elif seen == best and seen != PLAIN and now - written > SEEN_REFRESH:
            write = "note"
        else:
            return
        self._remember(domain, (seen, now, now))
        if best != seen:
            event(log, "tls_memory", domain=domain, best=seen, previous=best)
        if self.state is None:
            return
        try:
            if write == "reset":
                await self.state.reset_security(domain, seen, now)
            else:
                await self.state.note_security(domain, seen, now)
        except Exception as exc:  # noqa: BLE001 - memory is kept in this process meanwhile
            event(log, "tls_memory_unavailable", logging.WARNING, domain=domain, error=f"{type(exc).__name__}: {exc}")

    def refused(self, decision: Decision, host: str, got: str, qid: str | None = None) -> None:
        """The one line (and metric) for a downgrade the memory refused."""
        metrics.TLS_DOWNGRADE_REFUSED.inc()
        event(log, "tls_downgrade_refused", logging.WARNING, qid=qid, domain=decision.domain, mx=host,
              seen=decision.floor, got=got)

    # ------------------------------------------------------------ verification learnt, not required

    def verify_known_bad(self, host: str) -> bool:
        until = self._unverifiable.get(host)
        return until is not None and self.clock() < until

    def note_unverifiable(self, host: str) -> None:
        if len(self._unverifiable) > 50000:
            self._unverifiable.clear()
        self._unverifiable[host] = self.clock() + UNVERIFIABLE_FOR

    # ------------------------------------------------------------ TLSRPT counts (RFC 8460)

    def count(self, decision: Decision, host: str, result: str = "") -> None:
        """One session (RFC 8460 counts sessions) to `host`: "" a success, else its result type."""
        if decision.source == "smarthost" or decision.level is Level.NONE and decision.source == "config":
            return
        now = self.clock()
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        dane_host = decision.dane.host(host) if decision.dane is not None else None
        if dane_host is not None and dane_host.records:
            # RFC 8460 4.4: policy-type tlsa, the policy-string the TLSA RRset in presentation form.
            lines = sorted(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in dane_host.records)
            key = (day, decision.domain, "tlsa", json.dumps(lines), host, result)
        elif decision.dane is not None and (decision.dane.bogus or dane_host is not None
                                            or decision.level is Level.DANE_ONLY):
            # A bogus lookup (dnssec-invalid): a DANE policy whose records could not be had.
            key = (day, decision.domain, "tlsa", "[]", host, result)
        elif decision.sts is not None:
            p = decision.sts
            key = (day, decision.domain, "sts", json.dumps(policy_lines(p.mode, p.mx, p.max_age)), host, result)
        else:
            key = (day, decision.domain, "no-policy-found", "[]", host, result)
        self._counts[key] += 1
        if now - self._flushed_at >= COUNTS_FLUSH and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Add the counts held in memory to the store (one transaction)."""
        self._flushed_at = self.clock()
        if not self._counts or self.state is None:
            return
        counts, self._counts = self._counts, Counter()
        try:
            await self.state.add_tlsrpt([(*k, n) for k, n in counts.items()])
        except Exception as exc:  # noqa: BLE001 - kept for the next flush
            self._counts.update(counts)
            event(log, "tlsrpt_counts_unsaved", logging.WARNING, error=f"{type(exc).__name__}: {exc}")

    def failed(self, decision: Decision, host: str, result: str, detail: str) -> None:
        """A policy failure (enforce: the MX is skipped; testing: the mail goes all the same)."""
        metrics.TLS_POLICY_FAILURES.labels(decision.label, result).inc()
        event(log, "tls_policy_failure", logging.WARNING, domain=decision.domain, mx=host, policy=decision.label,
              result=result, enforced=not decision.report, detail=detail)
        if decision.sts is not None and decision.enforce_mx and self.mta_sts is not None:
            self.mta_sts.forget(decision.domain)
