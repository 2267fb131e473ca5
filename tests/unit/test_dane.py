"""DANE matching (RFC 7672 3) on real certificate chains from trustme, and the config of the
validating resolver. Discovery against real DNSSEC is in tests/integration/test_dane.py."""
from __future__ import annotations

import hashlib
import json

import pytest

trustme = pytest.importorskip("trustme")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from relay import config  # noqa: E402
from relay.delivery.dane import (DANE, DANEMismatch, DANEResult, HostTLSA, TLSARecord,  # noqa: E402
                                 match, matches)
from relay.delivery.tls_policy import Level, TLSPolicy  # noqa: E402


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki(d: bytes) -> bytes:
    return x509.load_der_x509_certificate(d).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def chain():
    """leaf (mx.example.test) <- intermediate <- root, as a server sends it: leaf, intermediate."""
    root = trustme.CA()
    inter = root.create_child_ca()
    leaf = inter.issue_cert("mx.example.test")
    return [der(leaf.cert_chain_pems[0].bytes()), der(inter.cert_pem.bytes())]


NAMES = ("example.test", "mx.example.test")


@pytest.mark.parametrize("selector,mtype", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_dane_ee_matches_every_selector_and_matching_type(chain, selector, mtype):
    data = chain[0] if selector == 0 else spki(chain[0])
    data = data if mtype == 0 else hashlib.sha256(data).digest() if mtype == 1 else hashlib.sha512(data).digest()
    rr = TLSARecord(3, selector, mtype, data)
    assert matches(rr, chain[0])
    # DANE-EE: no name checks, so any reference identifiers do.
    assert match((rr,), chain, ("nothing.example",)) == rr


def test_dane_ee_mismatch_and_unusable_records_are_refused(chain):
    wrong = TLSARecord(3, 1, 1, b"\xab" * 32)
    pkix = TLSARecord(1, 1, 1, hashlib.sha256(spki(chain[0])).digest())  # would match, but usage 1 is unusable
    with pytest.raises(DANEMismatch) as e:
        match((wrong, pkix), chain, NAMES)
    assert e.value.result == "tlsa-invalid" and "no TLSA record matches" in e.value.reason
    assert not pkix.usable and not TLSARecord(3, 2, 1, b"").usable and not TLSARecord(3, 1, 3, b"").usable
    with pytest.raises(DANEMismatch, match="no certificate"):
        match((wrong,), [], NAMES)


def test_dane_ta_on_the_intermediate_verifies_chain_and_name(chain):
    rr = TLSARecord(2, 0, 1, hashlib.sha256(chain[1]).digest())
    assert match((rr,), chain, NAMES) == rr
    assert match((TLSARecord(2, 1, 1, hashlib.sha256(spki(chain[1])).digest()),), chain, NAMES)
    with pytest.raises(DANEMismatch) as e:
        match((rr,), chain, ("example.org", "mx.example.org"))
    assert e.value.result == "certificate-host-mismatch"
    # A CA in the sent chain that did not issue the leaf: matched, but the chain does not verify.
    stranger = der(trustme.CA().create_child_ca().cert_pem.bytes())
    with pytest.raises(DANEMismatch) as e:
        match((TLSARecord(2, 0, 1, hashlib.sha256(stranger).digest()),), [chain[0], stranger], NAMES)
    assert e.value.result == "validation-failure" and "does not verify" in e.value.reason
    # A name containing "name" is no name mismatch by itself (the reason text is not guessed at).
    assert match((rr,), chain, ("mailname.example", "mx.example.test")) == rr
    # A DANE-TA record naming the leaf itself is no trust anchor.
    with pytest.raises(DANEMismatch):
        match((TLSARecord(2, 0, 1, hashlib.sha256(chain[0]).digest()),), chain, NAMES)


async def test_dane_only_per_domain_needs_a_resolver_and_usable_records():
    with pytest.raises(config.ConfigError, match="'dane-only' needs DANE"):
        config.from_dict({"delivery": {"tls_policy": {"a.example": "dane-only"}}})
    cfg = config.from_dict({"delivery": {"tls_policy": {"a.example": "dane-only"}},
                            "dns": {"dnssec_resolver": "127.0.0.1"}})
    import dns.asyncresolver
    policy = TLSPolicy(cfg, dns.asyncresolver.Resolver(configure=False))
    policy.dane = _FakeDANE(None)
    d = await policy.decide("a.example")
    assert (d.level, d.source, d.label) == (Level.DANE_ONLY, "config", "dane-only") and d.dane is not None
    usable = DANEResult("a.example", {"mx.a.example": HostTLSA("mx.a.example", (TLSARecord(3, 1, 1, b"x" * 32),))})
    policy.dane = _FakeDANE(usable)
    assert (await policy.decide("a.example")).level is Level.DANE


def test_resolver_must_be_loopback_and_dane_is_off_without_one():
    cfg = config.from_dict({"dns": {"dnssec_resolver": "127.0.0.1:5353"}})
    assert cfg.dns.dnssec_resolver == "127.0.0.1:5353" and DANE.from_config(cfg) is not None
    assert DANE.from_config(config.from_dict({"dns": {"dnssec_resolver": "[::1]:53"}})) is not None
    with pytest.raises(config.ConfigError, match="not a loopback address"):
        config.from_dict({"dns": {"dnssec_resolver": "192.0.2.1"}})
    with pytest.raises(config.ConfigError, match="dns.dnssec_resolver"):
        config.from_dict({"dns": {"dnssec_resolver": "resolver.example"}})
    assert DANE.from_config(config.from_dict({})) is None
    assert DANE.from_config(config.from_dict({"delivery": {"dane": False},
                                              "dns": {"dnssec_resolver": "127.0.0.1"}})) is None


class _FakeDANE:
    def __init__(self, result):
        self.result = result

    async def lookup(self, domain):
        return self.result


async def test_dane_wins_over_everything_but_config_and_unusable_gives_encrypt():
    cfg = config.from_dict({"delivery": {"require_tls_domains": ["a.example"], "mta_sts": False,
                                         "tls_policy": {"b.example": "may"}}})
    import dns.asyncresolver
    policy = TLSPolicy(cfg, dns.asyncresolver.Resolver(configure=False))
    usable = DANEResult("a.example", {"mx.a.example": HostTLSA("mx.a.example", (TLSARecord(3, 1, 1, b"x" * 32),))})
    policy.dane = _FakeDANE(usable)
    d = await policy.decide("a.example")
    assert (d.level, d.source, d.label) == (Level.DANE, "dane", "dane") and d.verify_required
    assert (await policy.decide("b.example")).source == "config"
    policy.dane = _FakeDANE(DANEResult("a.example", {"mx.a.example": HostTLSA("mx.a.example",
                                                                              (TLSARecord(1, 1, 1, b"x"),))}))
    d = await policy.decide("a.example")
    assert (d.level, d.source) == (Level.ENCRYPT, "dane") and d.tls_required and not d.verify_required
    policy.dane = _FakeDANE(DANEResult("a.example", bogus="MX a.example: SERVFAIL"))
    assert (await policy.decide("a.example")).level is Level.DANE
    policy.dane = _FakeDANE(None)  # insecure: what would apply without DANE
    assert (await policy.decide("a.example")).source == "require_tls"


def test_tlsrpt_report_of_a_tlsa_policy_names_its_host():
    from relay.delivery.tlsrpt import CountRow, build_report
    rr = json.dumps(["3 1 1 " + "ab" * 32])
    rows = [CountRow("2026-12-01", "a.example", "tlsa", rr, "mx.a.example", "", 3),
            CountRow("2026-12-01", "a.example", "tlsa", rr, "mx.a.example", "tlsa-invalid", 1),
            CountRow("2026-12-01", "a.example", "tlsa", "[]", "mx2.a.example", "dnssec-invalid", 2)]
    report = build_report(rows, day="2026-12-01", organization="o", contact="c", report_id="r")
    by_string = {json.dumps(p["policy"].get("policy-string", [])): p for p in report["policies"]}
    good = by_string[rr]
    assert good["policy"] == {"policy-type": "tlsa", "policy-domain": "a.example",
                              "policy-string": ["3 1 1 " + "ab" * 32], "mx-host": ["mx.a.example"]}
    assert good["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 1}
    assert good["failure-details"][0]["result-type"] == "tlsa-invalid"
    bogus = by_string["[]"]
    assert bogus["failure-details"][0]["result-type"] == "dnssec-invalid"


# ------------------------------------------------------------------ discovery, against a stub that sets AD

from tests.support.dns_server import DNSServer  # noqa: E402


class ADServer(DNSServer):
    """The test DNS server claiming to validate: AD on every answer except names in `insecure`."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.insecure: set[str] = set()

    def _to_wire(self, query, response, *, tcp):
        import dns.flags as flags
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        if name not in self.insecure:
            response.flags |= flags.AD
        return DNSServer._to_wire(query, response, tcp=tcp)


@pytest.fixture
def ad_server():
    with ADServer({"a.example": [("MX", "10 mx1.a.example."), ("MX", "20 mx2.a.example.")],
                   "mx1.a.example": [("A", "127.0.0.2")], "mx2.a.example": [("A", "127.0.0.3")],
                   "_25._tcp.mx1.a.example": [("TLSA", "3 1 1 " + "ab" * 32)],
                   "_25._tcp.mx2.a.example": [("TLSA", "1 1 1 " + "cd" * 32)]}) as server:
        yield server


def dane_for(server) -> DANE:
    return DANE(config.from_dict({"dns": {"dnssec_resolver": server.address, "timeout": 1}}))


async def test_discovery_per_host_and_the_security_of_mx_and_address(ad_server):
    d = dane_for(ad_server)
    r = await d.lookup("a.example")
    assert r.any_usable and not r.bogus
    assert r.host("mx1.a.example").usable == (TLSARecord(3, 1, 1, b"\xab" * 32),)
    assert r.host("mx2.a.example").records and not r.host("mx2.a.example").usable
    # The address of mx1 is not secure: its TLSA is not even asked (Postfix, maddy).
    ad_server.insecure.add("mx1.a.example")
    ad_server.queries.clear()
    r = await d.lookup("a.example")
    assert r.host("mx1.a.example") is None and not r.any_usable
    assert ("_25._tcp.mx1.a.example", "TLSA") not in ad_server.queries
    # An insecure MX set: no DANE at all (RFC 7672 2.2.1).
    ad_server.insecure.add("a.example")
    assert await d.lookup("a.example") is None


async def test_bogus_and_timeouts_rule_hosts_out_and_a_bogus_mx_defers_the_domain(ad_server):
    d = dane_for(ad_server)
    ad_server.servfail.add("_25._tcp.mx1.a.example")
    ad_server.drop.add("_25._tcp.mx2.a.example")
    r = await d.lookup("a.example")
    assert "SERVFAIL" in r.host("mx1.a.example").bogus and "timed out" in r.host("mx2.a.example").bogus
    assert not r.any_usable and r.bogus is None
    ad_server.servfail.add("a.example")
    r = await d.lookup("a.example")
    assert r.bogus and "SERVFAIL" in r.bogus and not r.hosts


async def test_secure_denial_means_no_dane_for_that_host(ad_server):
    d = dane_for(ad_server)
    ad_server.set("_25._tcp.mx1.a.example", "TLSA", [])     # NODATA, AD set: secure denial
    ad_server.remove("_25._tcp.mx2.a.example")              # NXDOMAIN, AD set
    assert await d.lookup("a.example") is None


async def test_dane_is_decided_before_mta_sts_which_is_not_even_asked():
    import dns.asyncresolver
    policy = TLSPolicy(config.from_dict({}), dns.asyncresolver.Resolver(configure=False))
    policy.dane = _FakeDANE(DANEResult("a.example", {"mx.a.example": HostTLSA(
        "mx.a.example", (TLSARecord(2, 0, 1, b"x" * 32),))}))

    async def no_sts(domain):
        raise AssertionError("MTA-STS asked although DANE applies")
    policy._sts = no_sts
    assert (await policy.decide("a.example")).level is Level.DANE
