"""MX resolution with dnspython's asynchronous resolver (RFC 5321 5.1, RFC 7505 null MX).

Permanent answers (NXDOMAIN, null MX, no address at all) fail the recipient at once;
SERVFAIL and timeouts defer. `order_mx` is pure: preference order, random among equals.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from ..config import DNSConfig, parse_hostport


class DNSFailure(Exception):
    def __init__(self, permanent: bool, reply: str, status: str):
        super().__init__(reply)
        self.permanent = permanent
        self.reply = reply
        self.status = status


@dataclass(frozen=True)
class MXHost:
    preference: int
    name: str


def make_resolver(cfg: DNSConfig) -> dns.asyncresolver.Resolver:
    if cfg.nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(*parse_hostport(ns, 53)) for ns in cfg.nameservers]
    else:
        r = dns.asyncresolver.Resolver()
    r.lifetime = cfg.timeout
    r.timeout = min(cfg.timeout, 3)
    return r


def order_mx(records: list[MXHost], rng: random.Random | None = None) -> list[str]:
    """Hosts by ascending preference, shuffled within equal preference (RFC 5321 5.1)."""
    rng = rng or random
    by_pref: dict[int, list[str]] = {}
    for r in records:
        by_pref.setdefault(r.preference, []).append(r.name)
    out: list[str] = []
    seen: set[str] = set()
    for pref in sorted(by_pref):
        names = by_pref[pref]
        rng.shuffle(names)
        for n in names:
            if n not in seen:  # a host listed twice is tried once, at its best preference
                seen.add(n)
                out.append(n)
    return out


def _transient(domain: str, what: str) -> DNSFailure:
    return DNSFailure(False, f"DNS lookup for {domain} failed: {what}; will retry", "4.4.3")


async def resolve_mx(resolver: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    """Ordered MX host names for a domain; the domain itself when it has no MX (implicit MX)."""
    try:
        answer = await resolver.resolve(domain, "MX", search=False)
    except dns.resolver.NXDOMAIN:
        raise DNSFailure(True, f"550 5.1.2 Domain {domain} does not exist (NXDOMAIN)", "5.1.2") from None
    except dns.resolver.NoAnswer:
        return [domain]
    except dns.resolver.NoNameservers:
        raise _transient(domain, "SERVFAIL") from None
    except dns.exception.Timeout:
        raise _transient(domain, "timeout") from None
    except dns.exception.DNSException as exc:
        raise _transient(domain, type(exc).__name__) from None
    records = [MXHost(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer]
    if any(r.name in ("", ".") for r in records):
        if len(records) == 1:
            raise DNSFailure(True, f"556 5.1.10 Domain {domain} accepts no mail (null MX, RFC 7505)", "5.1.10")
        records = [r for r in records if r.name not in ("", ".")]
    return order_mx(records)


async def resolve_addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """IPv6 then IPv4 addresses of a host; [] when it has none. Transient errors raise."""
    addrs: list[str] = []
    errors = 0
    for rdtype in ("AAAA", "A"):
        try:
            answer = await resolver.resolve(host, rdtype, search=False)
            addrs.extend(r.address for r in answer)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            pass
        except dns.exception.DNSException:
            errors += 1
    if not addrs and errors:
        raise _transient(host, "address lookup failed")
    return addrs
