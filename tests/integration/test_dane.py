"""DANE (RFC 7672) end to end, with real DNSSEC and nothing mocked: a zone signed here with
dnspython (ECDSAP256SHA256) on a loopback authoritative server, Debian's unbound validating it
(trust anchor: our key) as the relay's `dns.dnssec_resolver`, the real relay, and MX sinks with
STARTTLS on 127.0.0.x whose certificates do or do not match the TLSA records.

The relay's ordinary resolver (`dns.nameservers`) is the plain test DNS server, which carries the
same MX and A records; DANE's own lookups (MX security, A security, TLSA) go to unbound. The MX
port is an ephemeral one, so the TLSA records sit at `_<port>._tcp.<mx host>` (RFC 7672 3: the
port of the route).
"""
from __future__ import annotations

import hashlib
import json
import smtplib
import ssl

import pytest

trustme = pytest.importorskip("trustme")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from tests.conftest import PASSWORD, USER  # noqa: E402
from tests.support.dns_server import DNSServer  # noqa: E402
from tests.support.dnssec import SignedZone, SignedZoneServer, Unbound  # noqa: E402
from tests.support.mx_sink import MXSink  # noqa: E402
from tests.support.raw_smtp import metric  # noqa: E402
from tests.support.tools import needs  # noqa: E402

pytestmark = needs("unbound", reason="the DNSSEC-validating resolver for DANE; CI installs it")

SENDER_DOMAIN = USER.rpartition("@")[2]
ZONE = "dane.test"


def spki_sha256(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(pem: bytes) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


class World:
    """The signed zone, its server, unbound, the plain DNS server, the MX sinks."""

    def __init__(self, dns_server: DNSServer, port: int):
        self.dns = dns_server
        self.port = port
        self.records: dict[str, list[tuple[str, str]]] = {}
        self.sinks: list[MXSink] = []

    def mx(self, domain: str, host: str, ip: str, tlsa: list[str] = ()) -> None:
        """domain's MX is host (at ip), in the signed zone when under dane.test, and in the plain server."""
        self.dns.set(domain, "MX", [f"10 {host}."])
        self.dns.set(host, "A", [ip])
        if domain.endswith(ZONE):
            self.records[domain] = [("MX", f"10 {host}.")]
            self.records[host] = [("A", ip)]
            if tlsa:
                self.records[f"_{self.port}._tcp.{host}"] = [("TLSA", t) for t in tlsa]

    def sink(self, ip: str, cert=None) -> MXSink:
        ctx = None
        if cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert.configure_cert(ctx)
        s = MXSink(host=ip, port=self.port, tls_context=ctx).start()
        self.sinks.append(s)
        return s


@pytest.fixture
def world(dns_server):
    with MXSink() as base:
        dns_server.set("mx.sender.test", "A", ["127.0.0.1"])
        dns_server.set(SENDER_DOMAIN, "MX", ["10 mx.sender.test."])
        w = World(dns_server, base.port)
        w.base = base
        try:
            yield w
        finally:
            for s in w.sinks:
                s.stop()
            for p in getattr(w, "procs", []):
                p.close()


def serve(w: World, make_relay, **delivery):
    """Sign the zone, start its server and unbound, then the relay. Returns (relay, zone)."""
    zone = SignedZone(ZONE, w.records)
    auth = SignedZoneServer(zone).start()
    w.procs = [_Stopper(auth)]
    unbound = Unbound({ZONE: auth.address, "plain.test": w.dns.address}, anchors=[zone.trust_anchor()]).start()
    w.procs.append(unbound)
    w.unbound = unbound
    relay = make_relay(start=False, dns=w.dns.address, mx_port=w.port,
                       config={"delivery": {"retry_schedule": [3600], **delivery},
                               "dns": {"dnssec_resolver": unbound.address}})
    relay.add_user(USER, PASSWORD)
    return relay.start(), zone


class _Stopper:
    def __init__(self, server):
        self.server = server

    def close(self):
        self.server.stop()


def send(relay, rcpt: str) -> str:
    s = relay.smtp()
    try:
        s.login(USER, PASSWORD)
        code, msg = s.mail(USER)
        assert code == 250, msg
        code, msg = s.rcpt(rcpt)
        assert code == 250, msg
        code, msg = s.data(f"From: {USER}\r\nTo: {rcpt}\r\nSubject: dane\r\n\r\nbody\r\n".encode())
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[-1]
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            pass


def delivery(relay, qid, **match):
    assert relay.wait_event("delivery", qid=qid, timeout=20, **match), relay.events_named("delivery", qid=qid)
    return relay.events_named("delivery", qid=qid)[-1]


def show(relay, qid):
    return json.loads(relay.cli("queue", "show", qid, "--json", check=True).stdout)


# ------------------------------------------------------------------ DANE-EE and DANE-TA that match

def test_dane_ee_and_dane_ta_deliver_authenticated(make_relay, world, ca):
    # DANE-EE 3 1 1: the leaf's SPKI; the CA is not trusted by the relay at all (no tls_ca_file),
    # and the name on the certificate does not matter (RFC 7672 3.1.1).
    ee_cert = ca.issue_cert("not-the-mx-name.example")
    ee = world.sink("127.0.0.2", ee_cert)
    world.mx("ee.dane.test", "mx.ee.dane.test", "127.0.0.2",
             tlsa=[f"3 1 1 {spki_sha256(ee_cert.cert_chain_pems[0].bytes())}"])
    # DANE-TA 2 0 1: the intermediate CA the server sends; the leaf names the MX host.
    inter = ca.create_child_ca()
    ta_cert = inter.issue_cert("mx.ta.dane.test")
    ta = world.sink("127.0.0.3", ta_cert)
    world.mx("ta.dane.test", "mx.ta.dane.test", "127.0.0.3",
             tlsa=[f"2 0 1 {cert_sha256(inter.cert_pem.bytes())}", "0 0 1 " + "00" * 32])
    relay, _ = serve(world, make_relay)

    q_ee, q_ta = send(relay, "bob@ee.dane.test"), send(relay, "bob@ta.dane.test")
    for qid, sink in ((q_ee, ee), (q_ta, ta)):
        e = delivery(relay, qid, result="delivered")
        assert e["tls_policy"] == "dane" and e["tls_verified"] is True and e["tls"].startswith("TLSv1."), e
        assert sink.messages and sink.messages[0].tls
        attempt = [a for a in show(relay, qid)["history"] if a["event"] == "delivered"][0]
        assert attempt["tls_policy"] == "dane" and attempt["tls_verified"] == 1
    connected = relay.events_named("outbound_connected", domain="ee.dane.test")[0]
    assert connected["dane"].startswith("3 1 1 ")
    assert relay.events_named("outbound_connected", domain="ta.dane.test")[0]["dane"].startswith("2 0 1 ")
    assert metric(relay, "relay_delivery_tls_total", policy="dane", result="verified") == 2
    assert metric(relay, "relay_dane_lookups_total", result="dane") >= 2
    relay.stop()
    db = relay.db()
    try:
        rows = db.execute("SELECT policy_domain, policy_type, result FROM tlsrpt_counts").fetchall()
    finally:
        db.close()
    assert {("ee.dane.test", "tlsa", ""), ("ta.dane.test", "tlsa", "")} <= {tuple(r) for r in rows}


# ------------------------------------------------------------------ failures defer, nothing is sent

def test_mismatch_tampered_and_ta_name_failures_defer(make_relay, world, ca):
    cert = ca.issue_cert("mx.wrong.dane.test")
    wrong = world.sink("127.0.0.4", cert)
    # A well-signed TLSA record that matches nothing the server sends.
    world.mx("wrong.dane.test", "mx.wrong.dane.test", "127.0.0.4", tlsa=["3 1 1 " + "ab" * 32])
    # A TLSA record changed after signing: its RRSIG no longer verifies, unbound says SERVFAIL.
    good_cert = ca.issue_cert("mx.bogus.dane.test")
    bogus = world.sink("127.0.0.5", good_cert)
    world.mx("bogus.dane.test", "mx.bogus.dane.test", "127.0.0.5",
             tlsa=["3 1 1 " + "cd" * 32])
    # DANE-TA: the chain leads to the published CA, but the leaf names neither the domain nor the MX.
    inter = ca.create_child_ca()
    ta = world.sink("127.0.0.6", inter.issue_cert("somebody-else.example"))
    world.mx("taname.dane.test", "mx.taname.dane.test", "127.0.0.6",
             tlsa=[f"2 0 1 {cert_sha256(inter.cert_pem.bytes())}"])
    relay, zone = serve(world, make_relay)
    # The right digest goes in behind the signature: only a validator can tell.
    zone.tamper(f"_{world.port}._tcp.mx.bogus.dane.test", "TLSA",
                f"3 1 1 {spki_sha256(good_cert.cert_chain_pems[0].bytes())}")

    q_wrong, q_bogus, q_ta = (send(relay, "bob@wrong.dane.test"), send(relay, "bob@bogus.dane.test"),
                              send(relay, "bob@taname.dane.test"))
    e = delivery(relay, q_wrong, result="deferred")
    assert e["tls_policy"] == "dane" and e["tls_result"] == "tlsa-invalid", e
    assert "DANE authentication failed: no TLSA record matches" in e["reply"]
    assert relay.events_named("dane_failure", domain="wrong.dane.test", result="tlsa-invalid")
    e = delivery(relay, q_bogus, result="deferred")
    assert e["tls_policy"] == "dane" and e["tls_result"] == "dnssec-invalid", e
    assert "DANE TLSA lookup failed" in e["reply"] and "SERVFAIL" in e["reply"]
    assert bogus.connections == 0  # never even connected
    assert relay.events_named("dane_bogus", domain="bogus.dane.test")
    assert "validation failure" in world.unbound.log()
    e = delivery(relay, q_ta, result="deferred")
    assert e["tls_policy"] == "dane" and e["tls_result"] == "certificate-host-mismatch", e
    for q in (q_wrong, q_bogus, q_ta):
        assert {r["state"] for r in show(relay, q)["recipients"]} == {"deferred"}  # never a bounce
    assert not wrong.messages and not bogus.messages and not ta.messages
    assert metric(relay, "relay_tls_policy_failures_total", policy="dane") >= 3
    assert metric(relay, "relay_delivery_tls_total", policy="dane", result="tlsa-invalid") == 1
    assert metric(relay, "relay_dane_lookups_total", result="bogus") >= 1
    # TLSRPT (RFC 8460) session counts: policy-type tlsa, the TLSA RRset as the policy string.
    relay.stop()
    db = relay.db()
    try:
        rows = db.execute("SELECT policy_domain, policy_type, policy_string, mx_host, result "
                          "FROM tlsrpt_counts").fetchall()
    finally:
        db.close()
    got = {(d, t, mx, r): json.loads(ps) for d, t, ps, mx, r in rows}
    assert got[("wrong.dane.test", "tlsa", "mx.wrong.dane.test", "tlsa-invalid")] == ["3 1 1 " + "ab" * 32]
    assert ("bogus.dane.test", "tlsa", "mx.bogus.dane.test", "dnssec-invalid") in got
    assert ("taname.dane.test", "tlsa", "mx.taname.dane.test", "certificate-host-mismatch") in got


# ------------------------------------------------------------------ no DANE: unusable, unsigned

def test_unusable_records_mean_encrypt_and_an_unsigned_zone_falls_back(make_relay, world, ca):
    # Only PKIX-EE (1): unusable for SMTP, so TLS is mandatory but not authenticated.
    enc = world.sink("127.0.0.7", ca.issue_cert("whatever.example"))
    world.mx("pkix.dane.test", "mx.pkix.dane.test", "127.0.0.7", tlsa=["1 1 1 " + "ef" * 32])
    plain_tls = world.sink("127.0.0.8")  # no STARTTLS at all
    world.mx("plain.test", "mx.plain.test", "127.0.0.8")
    # An unusable-only host that offers no STARTTLS: deferred, not sent in the clear.
    world.sink("127.0.0.9")
    world.mx("nostarttls.dane.test", "mx.nostarttls.dane.test", "127.0.0.9", tlsa=["0 0 1 " + "12" * 32])
    # dane-only (config) for a domain in the unsigned zone, and for one with usable TLSA.
    world.mx("only.plain.test", "mx.plain.test", "127.0.0.8")
    only_cert = ca.issue_cert("mx.only.dane.test")
    only = world.sink("127.0.0.10", only_cert)
    world.mx("only.dane.test", "mx.only.dane.test", "127.0.0.10",
             tlsa=[f"3 1 1 {spki_sha256(only_cert.cert_chain_pems[0].bytes())}"])
    relay, _ = serve(world, make_relay, tls_policy={"only.plain.test": "dane-only", "only.dane.test": "dane-only"})
    e = delivery(relay, send(relay, "bob@pkix.dane.test"), result="delivered")
    assert e["tls_policy"] == "encrypt" and e["tls_verified"] is False and e["tls"].startswith("TLSv1."), e
    # plain.test is not signed (no trust anchor): insecure, so no DANE; the default applies.
    e = delivery(relay, send(relay, "bob@plain.test"), result="delivered")
    assert e["tls_policy"] == "may" and e["tls"] == "plain", e
    assert plain_tls.messages
    assert metric(relay, "relay_dane_lookups_total", result="insecure") >= 1
    assert metric(relay, "relay_dane_lookups_total", result="encrypt") >= 1
    e = delivery(relay, send(relay, "bob@nostarttls.dane.test"), result="deferred")
    assert e["tls_policy"] == "encrypt" and e["tls_result"] == "starttls-not-supported", e
    before = len(plain_tls.messages)
    e = delivery(relay, send(relay, "bob@only.plain.test"), result="deferred")
    assert e["tls_policy"] == "dane-only" and e["tls_result"] == "dane-required", e
    assert "requires DANE" in e["reply"] and len(plain_tls.messages) == before
    e = delivery(relay, send(relay, "bob@only.dane.test"), result="delivered")
    assert e["tls_policy"] == "dane" and e["tls_verified"] is True and only.messages, e
