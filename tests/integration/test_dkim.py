"""Sending domains receivers trust: DKIM keys from the CLI, records to publish, verify, signatures at the MX."""
from __future__ import annotations

import json
import time

import dkim
import dns.message
import dns.query
import dns.rdatatype
import dns.zone
import pytest

from tests.conftest import PASSWORD, USER

DOMAIN = "mg.example.com"


def dnsfunc_for(dns_server):
    """dkimpy's TXT lookup, answered by the loopback DNS server (what a receiving MX would do)."""
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        q = dns.message.make_query(name.decode().rstrip("."), "TXT")
        resp = dns.query.tcp(q, "127.0.0.1", port=dns_server.port, timeout=timeout)
        for rrset in resp.answer:
            for rd in rrset:
                return b"".join(rd.strings)
        return None
    return lookup


def publish(dns_server, relay, domain: str = DOMAIN) -> list[dict]:
    """Publish exactly what `relay domain dns --json` says."""
    recs = json.loads(relay.cli("domain", "dns", domain, "--json", check=True).stdout)
    by_name: dict[tuple[str, str], list[str]] = {}
    for r in recs:
        if r["type"] == "TXT":
            by_name.setdefault((r["name"], r["type"]), []).append(r["value"])
    for (name, rdtype), values in by_name.items():
        dns_server.set(name, rdtype, values)
    return recs


def _relay(make_relay, dns_server, mx_sink, **config):
    dns_server.set("example.net", "MX", ["10 mx.example.net."])
    dns_server.set("mx.example.net", "A", ["127.0.0.1"])
    relay = make_relay(start=False, dns=dns_server.address, mx_port=mx_sink.port,
                       config={"domains": {"public_addresses": ["192.0.2.10"]}, **config})
    relay.add_user(USER, PASSWORD)
    return relay


@pytest.fixture
def setup(make_relay, dns_server, mx_sink):
    return _relay(make_relay, dns_server, mx_sink)


@pytest.fixture
def retrying(make_relay, dns_server, mx_sink):
    """Started, its key published, a deferred recipient retried after 1 s."""
    relay = _relay(make_relay, dns_server, mx_sink, delivery={"retry_schedule": [1]})
    relay.start()
    publish(dns_server, relay)
    return relay


def test_domain_add_creates_a_key_and_dns_prints_every_record(setup):
    relay = setup
    keys = json.loads(relay.cli("domain", "dkim", "list", DOMAIN, "--json", check=True).stdout)
    assert len(keys) == 1 and keys[0]["active"] and keys[0]["algorithm"] == "rsa"
    sel = keys[0]["selector"]
    # The private key is never printed by any command.
    for argv in (["domain", "dns", DOMAIN], ["domain", "dns", DOMAIN, "--json"], ["domain", "list", "--json"],
                 ["domain", "dkim", "list", DOMAIN, "--json"]):
        assert "PRIVATE KEY" not in relay.cli(*argv, check=True).stdout
    zone_text = relay.cli("domain", "dns", DOMAIN, "--zone", check=True).stdout
    zone = dns.zone.from_text("@ 3600 IN SOA ns. h. 1 1 1 1 1\n@ 3600 IN NS ns.\n" + zone_text, origin=".",
                              relativize=False)
    dkim_txt = b"".join(next(iter(zone.find_rdataset(f"{sel}._domainkey.{DOMAIN}.", "TXT"))).strings).decode()
    assert dkim_txt.startswith("v=DKIM1; k=rsa; p=MII")
    spf = b"".join(next(iter(zone.find_rdataset(f"{DOMAIN}.", "TXT"))).strings).decode()
    assert spf == "v=spf1 ip4:192.0.2.10 ~all"
    assert zone.find_rdataset(f"_dmarc.{DOMAIN}.", "TXT")
    assert next(iter(zone.find_rdataset("10.2.0.192.in-addr.arpa.", "PTR"))).target.to_text() == "relay.test."
    table = relay.cli("domain", "dns", DOMAIN, check=True).stdout
    assert "DKIM (active)" in table and "SPF" in table and "DMARC" in table


def test_verify_reports_each_outcome_and_sets_state(setup, dns_server):
    relay = setup
    cp = relay.cli("domain", "verify", DOMAIN, "--json")
    assert cp.returncode == 1
    assert {r["purpose"]: r["status"] for r in json.loads(cp.stdout)["records"]}["SPF"] == "missing"
    recs = publish(dns_server, relay)
    cp = relay.cli("domain", "verify", DOMAIN)
    assert cp.returncode == 0, cp.stdout
    assert "verified" in cp.stdout
    rows = json.loads(relay.cli("domain", "list", "--json", check=True).stdout)
    assert rows[0]["state"] == "verified" and rows[0]["verified_at"]
    # A wrong SPF record: found but different, both shown; the domain goes back to unverified.
    dns_server.set(DOMAIN, "TXT", ["v=spf1 ip4:198.51.100.7 -all"])
    cp = relay.cli("domain", "verify", DOMAIN)
    assert cp.returncode == 1
    assert "found but different" in cp.stdout and "198.51.100.7" in cp.stdout and "192.0.2.10" in cp.stdout
    assert json.loads(relay.cli("domain", "list", "--json", check=True).stdout)[0]["state"] == "unverified"
    # A DKIM record with another key is "different" too.
    dkim_name = next(r["name"] for r in recs if r["purpose"] == "DKIM (active)")
    dns_server.set(DOMAIN, "TXT", ["v=spf1 ip4:192.0.2.10 ~all"])
    dns_server.set(dkim_name, "TXT", ["v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwrong"])
    out = json.loads(relay.cli("domain", "verify", DOMAIN, "--json").stdout)
    assert {r["purpose"]: r["status"] for r in out["records"]}["DKIM (active)"] == "different"


def test_delivered_mail_carries_a_signature_that_verifies(setup, dns_server, mx_sink):
    relay = setup.start()
    publish(dns_server, relay)
    relay.submit(USER, PASSWORD, USER, ["bob@example.net"],
                 f"From: App <{USER}>\r\nTo: bob@example.net\r\nSubject: signed\r\n\r\nbody\r\n".encode())
    assert mx_sink.wait_for(1, timeout=15)
    data = mx_sink.messages[0].data
    assert data.startswith(b"DKIM-Signature:")
    # Verified as a receiver would: key from DNS, after our Received/Message-ID/Date were added.
    assert dkim.verify(data, dnsfunc=dnsfunc_for(dns_server))
    assert b"Message-ID: <" in data and b"\r\nDate: " in data
    # Tampering is detected.
    assert not dkim.verify(data.replace(b"Subject: signed", b"Subject: changed"), dnsfunc=dnsfunc_for(dns_server))


def test_a_retry_sends_the_signature_the_first_attempt_sent(retrying, dns_server, mx_sink):
    """Signed once: the settle that makes the retry due stores the signature first, so the retry
    carries the same bytes."""
    relay = retrying
    mx_sink.data_reply = "451 4.3.0 try again later"
    relay.submit(USER, PASSWORD, USER, ["bob@example.net"], b"From: a@mg.example.com\r\nSubject: once\r\n\r\nx\r\n")
    deadline = time.monotonic() + 15
    while not mx_sink.rejected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mx_sink.rejected, "the first attempt never came"
    mx_sink.data_reply = None
    assert mx_sink.wait_for(1, timeout=20)
    first, retry = mx_sink.rejected[0].data, mx_sink.messages[0].data
    assert first.startswith(b"DKIM-Signature:")
    assert first == retry  # the same signature (t= included), the same bytes
    assert dkim.verify(retry, dnsfunc=dnsfunc_for(dns_server))


def test_a_recipient_deferred_beside_a_delivered_one_gets_the_same_signature(retrying, dns_server, mx_sink):
    """One recipient taken, one deferred at RCPT: the message is not done, so its signature is
    kept, and the deferred recipient's retry sends what the delivered one got."""
    relay = retrying
    mx_sink.rcpt_replies["carol@example.net"] = "450 4.2.0 mailbox busy"
    relay.submit(USER, PASSWORD, USER, ["bob@example.net", "carol@example.net"],
                 b"From: a@mg.example.com\r\nSubject: split\r\n\r\nx\r\n")
    assert mx_sink.wait_for(1, timeout=15)
    assert mx_sink.messages[0].rcpt_tos == ["bob@example.net"]
    del mx_sink.rcpt_replies["carol@example.net"]
    assert mx_sink.wait_for(2, timeout=20)
    first, retry = mx_sink.messages[0], mx_sink.messages[1]
    assert retry.rcpt_tos == ["carol@example.net"]
    assert first.data.startswith(b"DKIM-Signature:")
    assert first.data == retry.data
    assert dkim.verify(retry.data, dnsfunc=dnsfunc_for(dns_server))


def test_rotation_keeps_old_signatures_verifiable_while_published(setup, dns_server, mx_sink):
    relay = setup.start()
    publish(dns_server, relay)
    relay.submit(USER, PASSWORD, USER, ["bob@example.net"], b"From: a@mg.example.com\r\nSubject: one\r\n\r\nx\r\n")
    assert mx_sink.wait_for(1, timeout=15)
    out = json.loads(relay.cli("domain", "dkim", "rotate", DOMAIN, "--dkim-algorithm", "ed25519", "--json",
                               check=True).stdout)
    assert out["algorithm"] == "ed25519"
    keys = json.loads(relay.cli("domain", "dkim", "list", DOMAIN, "--json", check=True).stdout)
    assert [k["active"] for k in keys].count(True) == 1 and len(keys) == 2
    old = next(k for k in keys if not k["active"])
    publish(dns_server, relay)  # both records published
    relay.submit(USER, PASSWORD, USER, ["bob@example.net"], b"From: a@mg.example.com\r\nSubject: two\r\n\r\nx\r\n")
    assert mx_sink.wait_for(2, timeout=15)
    first, second = mx_sink.messages[0].data, mx_sink.messages[1].data
    assert f"s={old['selector']};".encode() in first.replace(b"\r\n ", b" ")
    assert f"s={out['selector']};".encode() in second.replace(b"\r\n ", b" ")
    assert b"a=ed25519-sha256" in second
    assert dkim.verify(first, dnsfunc=dnsfunc_for(dns_server))
    assert dkim.verify(second, dnsfunc=dnsfunc_for(dns_server))
    # The active key cannot be removed; the retired one can, and then its signatures no longer verify.
    assert relay.cli("domain", "dkim", "remove", DOMAIN, out["selector"]).returncode == 1
    assert relay.cli("domain", "dkim", "remove", DOMAIN, old["selector"]).returncode == 0
    dns_server.remove(f"{old['selector']}._domainkey.{DOMAIN}")
    assert not dkim.verify(first, dnsfunc=dnsfunc_for(dns_server))


def test_require_verified_refuses_until_verify_passes(make_relay, dns_server):
    relay = make_relay(start=False, dns=dns_server.address, config={"domains": {"require_verified": True}})
    relay.add_user(USER, PASSWORD)
    relay.start()
    s = relay.smtp()
    s.login(USER, PASSWORD)
    code, msg = s.mail(USER)
    assert code == 550 and msg.startswith(b"5.7.1") and f"relay domain verify {DOMAIN}".encode() in msg
    publish(dns_server, relay)
    assert relay.cli("domain", "verify", DOMAIN).returncode == 0
    code, _ = s.mail(USER)
    assert code == 250
    s.quit()


def test_domain_remove_takes_its_keys(setup):
    relay = setup
    assert relay.cli("domain", "remove", DOMAIN, "--force").returncode == 0
    assert relay.cli("domain", "dkim", "list", DOMAIN).returncode == 1
    assert relay.cli("domain", "add", DOMAIN).returncode == 0
    keys = json.loads(relay.cli("domain", "dkim", "list", DOMAIN, "--json", check=True).stdout)
    assert len(keys) == 1
