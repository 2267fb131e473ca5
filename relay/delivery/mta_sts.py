"""MTA-STS (RFC 8461): the `_mta-sts` TXT record, the HTTPS policy, its cache, MX matching.

Pure parts (`parse_txt`, `parse_policy`, `mx_matches`) raise only `STSError`; `Fetcher` does
the I/O (dnspython against `dns.nameservers`, aiohttp resolving through the same DNS, a
verifying TLS context); `MTASTS` keeps policies in the store (`TLSStateStore`) and decides
when to look again: the TXT record at most every `TXT_RECHECK` seconds, the policy only when
its id changed or it is near expiry (RFC 8461 3.3, 5.1). A cached policy outlives a vanished
TXT record until its max_age (RFC 8461 5.1: stripping DNS must not downgrade).
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Callable

import dns.asyncresolver
import dns.exception
import dns.resolver

from .. import metrics
from ..logs import event

log = logging.getLogger("relay.delivery")

MAX_POLICY_BYTES = 64 * 1024       # postfix-mta-sts-resolver's limit; RFC 8461 3.3 says "limit"
MAX_AGE_LIMIT = 31_557_600         # RFC 8461 3.2: max_age at most a year
FETCH_TIMEOUT = 10.0               # RFC 8461 3.3: time out the fetch (a minute at most)
TXT_RECHECK = 3600                 # seconds between TXT look-ups while a policy is cached
REFRESH_BEFORE = 86400             # refetch a policy this close to its expiry, even with the same id
FAILED_RETRY = 300                 # a failed look-up is retried after this long, not at every message

_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")  # RFC 8461 3.2 sts-policy-ext-name
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN_RE = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})+$")


class STSError(Exception):
    """A record or policy that is not a valid MTA-STS one; `result` is the TLSRPT result type."""

    def __init__(self, message: str, result: str = "sts-policy-invalid"):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Policy:
    id: str                      # the TXT id it was fetched under
    mode: str                    # enforce | testing | none
    mx: tuple[str, ...]          # patterns, lower case, no trailing dot
    max_age: int
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    @property
    def refresh_at(self) -> float:
        """Refetch from here on even under the same id (ahead of expiry, while there is traffic)."""
        return self.expires_at - min(REFRESH_BEFORE, self.max_age // 2)

    def allows(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


# ------------------------------------------------------------------ pure parts

def parse_txt(records: list[str]) -> str | None:
    """The policy id from the TXT strings at `_mta-sts.<domain>`, or None when there is no
    policy. RFC 8461 3.1: records not starting with "v=STSv1" are ignored; more than one that
    does means no policy; a malformed one raises STSError."""
    ours = [r for r in records if r.startswith("v=STSv1")]
    if not ours:
        return None
    if len(ours) > 1:
        raise STSError("more than one v=STSv1 TXT record")
    fields: dict[str, str] = {}
    for part in ours[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise STSError(f"malformed TXT field {part[:40]!r}")
        fields.setdefault(key.strip(" \t"), value.strip(" \t"))
    if fields.get("v") != "STSv1":
        raise STSError("TXT record does not start with v=STSv1")
    pid = fields.get("id", "")
    if not _ID_RE.match(pid):
        raise STSError(f"TXT record id {pid[:40]!r} is not 1-32 letters and digits")
    return pid


def parse_policy(text: str | bytes, policy_id: str = "", fetched_at: float = 0.0) -> Policy:
    """A policy file (RFC 8461 3.2): `key: value` lines, CRLF or LF. Unknown keys are ignored;
    version, mode and max_age must each appear once (the first is used, as RFC 8461 allows no
    repetition of these, we refuse it), mx at least once unless mode is none."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise STSError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not sep or not _KEY_RE.match(key):
            raise STSError(f"malformed policy line {line[:40]!r}")
        if key == "mx":
            p = value.lower().rstrip(".")
            if not _MX_PATTERN_RE.match(p):
                raise STSError(f"bad mx pattern {value[:60]!r}")
            mx.append(p)
        elif key in ("version", "mode", "max_age"):
            if key in fields:
                raise STSError(f"{key} given twice")
            fields[key] = value
    if fields.get("version") != "STSv1":
        raise STSError("policy version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise STSError(f"policy mode {str(mode)[:20]!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit()) or len(age) > 10:
        raise STSError(f"policy max_age {age[:20]!r} is not a number")
    max_age = int(age)
    # chasquid refuses 0 too: a policy that expires at once protects nothing and costs a fetch a message.
    if not 0 < max_age <= MAX_AGE_LIMIT:
        raise STSError(f"policy max_age {max_age} outside 1..{MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise STSError("policy lists no mx")
    return Policy(policy_id, mode, tuple(dict.fromkeys(mx)), max_age, fetched_at)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: case-insensitive, trailing dot ignored; "*.example.com" stands for exactly
    one extra leftmost label (a.example.com, not example.com nor a.b.example.com)."""
    p, h = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if not p or not h:
        return False
    if p.startswith("*."):
        first, dot, rest = h.partition(".")
        return bool(first) and bool(dot) and rest == p[2:]
    return p == h


# ------------------------------------------------------------------ I/O

class DnsPythonResolver:
    """aiohttp's resolver interface over our dnspython resolver, so `mta-sts.<domain>` is found
    through `dns.nameservers` like every other name the relay looks up."""

    def __init__(self, resolver: dns.asyncresolver.Resolver):
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for rdtype, fam in (("AAAA", socket.AF_INET6), ("A", socket.AF_INET)):
            try:
                answer = await self._resolver.resolve(host, rdtype, search=False)
            except dns.exception.DNSException:
                continue
            out.extend({"hostname": host, "host": r.address, "port": port, "family": fam, "proto": 0,
                        "flags": socket.AI_NUMERICHOST} for r in answer)
        if not out:
            raise OSError(f"no address for {host}")
        return out

    async def close(self) -> None:
        pass


class Fetcher:
    """TXT look-up and HTTPS policy fetch for one domain."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, ssl_context: ssl.SSLContext, port: int = 443,
                 timeout: float = FETCH_TIMEOUT):
        self.resolver = resolver
        self.ssl_context = ssl_context
        self.port = port
        self.timeout = timeout

    async def txt_id(self, domain: str) -> str | None:
        """The TXT policy id; None when the domain publishes none. A DNS failure (other than
        "no such record") raises STSError(result="sts-policy-fetch-error")."""
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            raise STSError(f"TXT look-up failed: {type(exc).__name__}", "sts-policy-fetch-error") from None
        records = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        return parse_txt(records)

    async def fetch(self, domain: str, policy_id: str, now: float) -> Policy:
        """GET https://mta-sts.<domain>/.well-known/mta-sts.txt (RFC 8461 3.3): no redirects,
        200 only, text/plain only, at most MAX_POLICY_BYTES, verified for mta-sts.<domain>."""
        import aiohttp  # here: the queue runner's import stays light where MTA-STS is off

        host = f"mta-sts.{domain}"
        url = f"https://{host}{'' if self.port == 443 else f':{self.port}'}/.well-known/mta-sts.txt"
        connector = aiohttp.TCPConnector(resolver=DnsPythonResolver(self.resolver), ssl=self.ssl_context,
                                         use_dns_cache=False, force_close=True)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                             auto_decompress=False, trust_env=False) as http:
                async with http.get(url, allow_redirects=False, headers={"Accept": "text/plain"}) as resp:
                    if resp.status != 200:
                        raise STSError(f"policy fetch answered HTTP {resp.status}", "sts-policy-fetch-error")
                    if resp.content_type != "text/plain":
                        raise STSError(f"policy has media type {resp.content_type[:40]!r}, not text/plain",
                                       "sts-policy-invalid")
                    body = await resp.content.read(MAX_POLICY_BYTES + 1)
                    if len(body) > MAX_POLICY_BYTES:
                        raise STSError(f"policy larger than {MAX_POLICY_BYTES} bytes", "sts-policy-invalid")
        except STSError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise STSError(f"policy host certificate: {exc.certificate_error}", "sts-webpki-invalid") from None
        except aiohttp.ClientSSLError as exc:
            raise STSError(f"policy host TLS: {exc}", "sts-webpki-invalid") from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise STSError(f"policy fetch failed: {type(exc).__name__} {exc}"[:200], "sts-policy-fetch-error") from None
        return parse_policy(body, policy_id, now)


class MTASTS:
    """The cache and refresh rules over a Fetcher and the store (RFC 8461 3.3, 5.1)."""

    def __init__(self, fetcher: Fetcher, store: Any, clock: Callable[[], float]):
        self.fetcher = fetcher
        self.store = store           # TLSStateStore (get_sts / put_sts / sts_checked), may be None
        self.clock = clock
        self._memo: dict[str, tuple[Policy | None, float]] = {}  # domain -> (policy, next TXT check)
        self._locks: dict[str, asyncio.Lock] = {}

    async def policy(self, domain: str) -> Policy | None:
        """The policy in force for `domain` (None: none). Never raises: a failed look-up keeps
        a cached policy until it expires (RFC 8461 5.1) and is logged."""
        if len(self._locks) > 10000:
            self._locks = {d: lk for d, lk in self._locks.items() if lk.locked()}
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one look-up per domain at a time, however many workers wait
            return await self._policy(domain)

    async def _policy(self, domain: str) -> Policy | None:
        now = self.clock()
        memo = self._memo.get(domain)
        if memo is not None and now < memo[1] and (memo[0] is None or now < memo[0].refresh_at):
            return memo[0]
        cached = await self._load(domain, now)
        try:
            pid = await self.fetcher.txt_id(domain)
        except STSError as exc:
            self._failed(domain, exc, cached)
            return self._remember(domain, cached, now + FAILED_RETRY)
        if pid is None:
            # No TXT (any more): a cached policy still holds until its max_age (RFC 8461 5.1).
            return self._remember(domain, cached, now + TXT_RECHECK)
        if cached is not None and cached.id == pid and now < cached.refresh_at:
            await self._touch(domain, now)
            return self._remember(domain, cached, now + TXT_RECHECK)
        try:
            fresh = await self.fetcher.fetch(domain, pid, now)
        except STSError as exc:
            self._failed(domain, exc, cached)
            return self._remember(domain, cached, now + FAILED_RETRY)
        metrics.MTA_STS_FETCHES.labels("ok").inc()
        event(log, "mta_sts_policy", domain=domain, id=pid, mode=fresh.mode, max_age=fresh.max_age,
              mx=",".join(fresh.mx), previous=cached.id if cached else None)
        if self.store is not None:
            try:
                await self.store.put_sts(domain, fresh, now)
            except Exception as exc:  # noqa: BLE001 - the policy still applies from memory
                event(log, "mta_sts_store_failed", logging.WARNING, domain=domain, error=f"{type(exc).__name__}: {exc}")
        return self._remember(domain, fresh, now + TXT_RECHECK)

    def _remember(self, domain: str, policy: Policy | None, recheck_at: float) -> Policy | None:
        if policy is not None and self.clock() >= policy.expires_at:
            policy = None
        if len(self._memo) > 10000:
            self._memo.clear()
        self._memo[domain] = (policy, recheck_at)
        return policy

    def forget(self, domain: str) -> None:
        """Look again at the next message (after an enforce failure: RFC 8461 5.1 says re-check
        before treating a policy failure as final)."""
        memo = self._memo.get(domain)
        if memo is not None:
            self._memo[domain] = (memo[0], 0.0)

    async def _load(self, domain: str, now: float) -> Policy | None:
        memo = self._memo.get(domain)
        if memo is not None and memo[0] is not None:
            return memo[0] if now < memo[0].expires_at else None
        if self.store is None:
            return None
        try:
            row = await self.store.get_sts(domain)
        except Exception as exc:  # noqa: BLE001
            event(log, "mta_sts_store_failed", logging.WARNING, domain=domain, error=f"{type(exc).__name__}: {exc}")
            return None
        if row is None:
            return None
        p = Policy(row["id"], row["mode"], tuple(row["mx"]), row["max_age"], row["fetched_at"])
        return p if now < p.expires_at else None

    async def _touch(self, domain: str, now: float) -> None:
        if self.store is not None:
            try:
                await self.store.sts_checked(domain, now)
            except Exception:  # noqa: BLE001 - bookkeeping only
                pass

    def _failed(self, domain: str, exc: STSError, cached: Policy | None) -> None:
        metrics.MTA_STS_FETCHES.labels(exc.result).inc()
        event(log, "mta_sts_fetch_failed", logging.WARNING, domain=domain, result=exc.result, error=str(exc),
              cached=cached.id if cached else None)


