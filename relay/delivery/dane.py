"""DANE for SMTP (RFC 7672): TLSA discovery through a DNSSEC-validating resolver, and matching
the peer's certificate chain after the STARTTLS handshake.

Discovery (`DANE.lookup`), per destination domain:
  * the MX RRset is looked up at the validating resolver (`dns.dnssec_resolver`, loopback only:
    the AD bit is trusted from nowhere else). Not secure (no AD) = no DANE for the domain
    (RFC 7672 2.2.1); SERVFAIL (bogus) or a timeout = the whole attempt defers;
  * per MX host, its address (A) must be secure too (Postfix and maddy do not even ask for TLSA
    otherwise), then TLSA at `_<port>._tcp.<host>`. Secure TLSA: the host is DANE; secure
    denial (NXDOMAIN/NODATA) or insecure: the host is not; any other error (SERVFAIL = bogus,
    timeout): the host is "bogus" and is never used (RFC 7672 2.1.1).
  * Usable records: DANE-TA(2) and DANE-EE(3), selector 0/1, matching 0/1/2. PKIX-TA/EE (0/1)
    are unusable for SMTP: a host with only those gets mandatory unauthenticated TLS.

Matching (`match`), with the chain from `peer_chain` (leaf first):
  * DANE-EE(3): the leaf (its DER, or its SPKI) matches; no name, no expiry checks (RFC 7672 3.1.1);
  * DANE-TA(2): a certificate of the chain above the leaf matches, and the chain from the leaf up
    to it verifies with that certificate as the trust anchor, for a reference identifier of the
    next-hop domain or the MX host name (RFC 7672 3.2.2, Postfix "nexthop, hostname"), with
    cryptography's X.509 verifier under a relaxed end-entity profile (real SMTP certificates
    are not all Web-PKI tidy; design 2.4). A trust anchor published only as a SPKI and not sent
    by the server in its chain is not supported (the server must send it; most do).

Python 3.11 has no public way to get the peer's chain: `peer_chain` uses the public method from
3.13 and the private `_sslobj.get_unverified_chain()` before (measured on 3.11.7, design 2.4).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from ..config import Config, parse_hostport
from ..logs import event

log = logging.getLogger("relay.delivery")

DANE_TA, DANE_EE = 2, 3
USABLE_USAGES = (DANE_TA, DANE_EE)
SELECTORS = (0, 1)
MATCHING_TYPES = (0, 1, 2)


@dataclass(frozen=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in USABLE_USAGES and self.selector in SELECTORS and self.mtype in MATCHING_TYPES

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}"


@dataclass(frozen=True)
class HostTLSA:
    """What DNS said about one MX host."""
    host: str
    records: tuple[TLSARecord, ...] = ()   # secure TLSA records (usable or not)
    bogus: str | None = None               # the lookup failed (SERVFAIL/timeout): never use this host

    @property
    def usable(self) -> tuple[TLSARecord, ...]:
        return tuple(r for r in self.records if r.usable)


@dataclass(frozen=True)
class DANEResult:
    """DANE for one destination domain: per MX host, only hosts with secure TLSA or a bogus lookup."""
    domain: str
    hosts: dict[str, HostTLSA] = field(default_factory=dict)
    bogus: str | None = None               # the MX lookup itself was bogus: defer the whole domain

    @property
    def any_usable(self) -> bool:
        return any(h.usable for h in self.hosts.values())

    def host(self, name: str) -> HostTLSA | None:
        return self.hosts.get(name.lower().rstrip("."))


class DANEMismatch(Exception):
    def __init__(self, reason: str, result: str = "tlsa-invalid"):
        super().__init__(reason)
        self.reason = reason
        self.result = result    # the TLSRPT result type (RFC 8460 4.3): tlsa-invalid, certificate-host-mismatch


# ------------------------------------------------------------------ matching (pure)

def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == 0:
        return data
    if mtype == 1:
        return hashlib.sha256(data).digest()
    return hashlib.sha512(data).digest()


def _selected(cert_der: bytes, selector: int) -> bytes:
    if selector == 0:
        return cert_der
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def matches(rr: TLSARecord, cert_der: bytes) -> bool:
    try:
        return _digest(rr.mtype, _selected(cert_der, rr.selector)) == rr.data
    except ValueError:
        return False


def _verify_ta(chain: list[bytes], anchor_index: int, names: tuple[str, ...]) -> tuple[str, str] | None:
    """None when chain[0] verifies up to chain[anchor_index] (the trust anchor) for one of `names`;
    else (why not, the TLSRPT result type)."""
    from cryptography import x509
    from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store

    certs = [x509.load_der_x509_certificate(c) for c in chain[:anchor_index + 1]]
    leaf, intermediates, anchor = certs[0], certs[1:anchor_index], certs[anchor_index]
    ee = ExtensionPolicy.permit_all().require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    last = ("no reference identifier", "validation-failure")
    for name in names:
        try:
            verifier = (PolicyBuilder().store(Store([anchor]))
                        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
                        .build_server_verifier(x509.DNSName(name)))
            verifier.verify(leaf, intermediates)
            return None
        except Exception as exc:  # noqa: BLE001 - cryptography's VerificationError and bad names alike
            text = str(exc).split(" (encountered", 1)[0]
            kind = "certificate-host-mismatch" if "no matching subjectaltname" in text.lower() else "validation-failure"
            # The name that does match the leaf says what is really wrong with the chain; a name
            # mismatch is the answer only when no reference identifier matched.
            if kind == "validation-failure" or last[0] == "no reference identifier":
                last = (f"{name}: {text}", kind)
    return last


def match(records: tuple[TLSARecord, ...], chain: list[bytes], names: tuple[str, ...]) -> TLSARecord:
    """The record that authenticates the chain (leaf first), or DANEMismatch saying why none does."""
    if not chain:
        raise DANEMismatch("the server sent no certificate")
    ta_failure = None
    for rr in records:
        if not rr.usable:
            continue
        if rr.usage == DANE_EE:
            if matches(rr, chain[0]):
                return rr
            continue
        for i in range(1, len(chain)):
            if matches(rr, chain[i]):
                why = _verify_ta(chain, i, names)
                if why is None:
                    return rr
                ta_failure = why
    if ta_failure is not None:
        raise DANEMismatch(f"the chain matches a DANE-TA record but does not verify ({ta_failure[0]})",
                           ta_failure[1])
    shown = ", ".join(str(r) for r in records if r.usable)
    raise DANEMismatch(f"no TLSA record matches the certificate chain (records: {shown})")


def peer_chain(ssl_object) -> list[bytes]:
    """The peer's certificates as sent (leaf first), DER. Unverified: we verify them ourselves."""
    import _ssl
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:                       # Python 3.13+
        return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in (public() or [])]
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    chain = inner.get_unverified_chain() or []   # 3.10-3.12: private, but there
    if not chain:
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    return [c.public_bytes(_ssl.ENCODING_DER) for c in chain]


@dataclass(frozen=True)
class DANECheck:
    """What the outbound session checks after STARTTLS, before the second EHLO."""
    records: tuple[TLSARecord, ...]
    names: tuple[str, ...]                    # DANE-TA reference identifiers: next-hop domain, MX host

    def verify(self, ssl_object) -> TLSARecord:
        return match(self.records, peer_chain(ssl_object), self.names)


# ------------------------------------------------------------------ discovery

def make_validating_resolver(address: str, timeout: float) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(*parse_hostport(address, 53))]
    r.use_edns(0, dns.flags.DO, 1232)
    r.lifetime = timeout
    r.timeout = min(timeout, 3)
    r.retry_servfail = False
    return r


class _Bogus(Exception):
    pass


class DANE:
    """TLSA discovery through the configured validating resolver (None when there is none)."""

    def __init__(self, cfg: Config):
        self.port = cfg.delivery.mx_port
        self.resolver = make_validating_resolver(cfg.dns.dnssec_resolver, cfg.dns.timeout)

    @classmethod
    def from_config(cls, cfg: Config) -> "DANE | None":
        if not cfg.delivery.dane or not cfg.dns.dnssec_resolver:
            return None
        return cls(cfg)

    async def _query(self, name: str, rdtype: str) -> tuple[list, bool]:
        """(rdata, secure). Secure denial gives ([], True); SERVFAIL/timeouts raise _Bogus."""
        try:
            answer = await self.resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            return [], any(bool(r.flags & dns.flags.AD) for r in exc.responses().values())
        except dns.resolver.NoNameservers:
            raise _Bogus(f"{rdtype} {name}: SERVFAIL from the validating resolver (bogus DNSSEC?)") from None
        except dns.exception.Timeout:
            raise _Bogus(f"{rdtype} {name}: the validating resolver timed out") from None
        except dns.exception.DNSException as exc:
            raise _Bogus(f"{rdtype} {name}: {type(exc).__name__}") from None
        secure = bool(answer.response.flags & dns.flags.AD)
        return (list(answer.rrset) if answer.rrset is not None else []), secure

    async def lookup(self, domain: str) -> DANEResult | None:
        """DANE for a domain; None when DANE does not apply (MX set insecure, no secure TLSA)."""
        if domain.startswith("["):
            return None
        try:
            mx, secure = await self._query(domain, "MX")
        except _Bogus as exc:
            event(log, "dane_bogus", logging.WARNING, domain=domain, error=str(exc))
            return DANEResult(domain, bogus=str(exc))
        if not secure:
            return None
        hosts = [r.exchange.to_text(omit_final_dot=True).lower() for r in mx] if mx else [domain]
        found: dict[str, HostTLSA] = {}
        for host in hosts:
            if host in ("", ".") or host in found:
                continue
            try:
                _, addr_secure = await self._query(host, "A")
                if not addr_secure:
                    continue
                tlsa, tlsa_secure = await self._query(f"_{self.port}._tcp.{host}", "TLSA")
            except _Bogus as exc:
                event(log, "dane_bogus", logging.WARNING, domain=domain, mx=host, error=str(exc))
                found[host] = HostTLSA(host, bogus=str(exc))
                continue
            if tlsa_secure and tlsa:
                found[host] = HostTLSA(host, tuple(TLSARecord(r.usage, r.selector, r.mtype, bytes(r.cert))
                                                   for r in tlsa))
        if not found:
            return None
        return DANEResult(domain, found)
