"""DKIM keys, signatures and the records to publish (no sockets; the DNS tests are integration)."""
from __future__ import annotations

import base64

import dkim
import dns.rdatatype
from hypothesis import given, settings, strategies as st
import dns.zone
import pytest

from relay.dkim_keys import DKIMKey, Record, generate, records, spf_value, txt_chunks, zone_snippet
from relay.signing import sign

MSG = (b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (relay) with ESMTPSA id ABC; Thu, 26 Nov 2026 04:00:00 +0000\r\n"
       b"From: App <app@mg.example.com>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
       b"Message-ID: <1@relay.test>\r\nDate: Thu, 26 Nov 2026 04:00:00 +0000\r\n\r\nhello\r\n")


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def key(request) -> DKIMKey:
    private, public = generate(request.param, 2048)
    return DKIMKey("mg.example.com", "sel1", request.param, private, public, 0.0, True)


def test_public_key_format(key):
    raw = base64.b64decode(key.public_key)
    if key.algorithm == "ed25519":
        assert len(raw) == 32  # RFC 8463 3: the raw key, not SubjectPublicKeyInfo
    else:
        from cryptography.hazmat.primitives.serialization import load_der_public_key
        assert load_der_public_key(raw).key_size == 2048
    assert key.txt == f"v=DKIM1; k={key.algorithm}; p={key.public_key}"


def test_signature_verifies_and_oversigns_from(key):
    signed = sign(MSG, key)
    assert signed.endswith(MSG)
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: key.txt.encode())
    sig = signed.split(b"\r\n\r\n")[0].decode()
    assert "c=relaxed/relaxed" in sig and "d=mg.example.com" in sig and "s=sel1" in sig
    h = sig.split("h=")[1].split(";")[0].replace(" ", "").replace("\r\n", "")
    assert h.split(":").count("from") == 2
    # A second From added in transit breaks it; a changed body too.
    assert not dkim.verify(b"From: evil@example.org\r\n" + signed, dnsfunc=lambda n, timeout=5: key.txt.encode())
    assert not dkim.verify(signed.replace(b"hello\r\n", b"HELLO\r\n"), dnsfunc=lambda n, timeout=5: key.txt.encode())


def test_relaxed_canonicalization_survives_header_refolding(key):
    signed = sign(MSG, key)
    refolded = signed.replace(b"Subject: hello", b"Subject:   hello ")
    assert dkim.verify(refolded, dnsfunc=lambda name, timeout=5: key.txt.encode())


def test_spf_value():
    assert spf_value(("192.0.2.1", "2001:db8::1"), "relay.example.com", "", False) == \
        "v=spf1 ip4:192.0.2.1 ip6:2001:db8::1 ~all"
    assert spf_value((), "relay.example.com", "", False) == "v=spf1 a:relay.example.com ~all"
    assert spf_value((), "relay.example.com", "_spf.provider.net", True) == "v=spf1 include:_spf.provider.net ~all"


def test_zone_snippet_parses_with_dnspython(key):
    recs = records("mg.example.com", [key], spf=spf_value(("192.0.2.1",), "relay.example.com", "", False),
                   dmarc_rua="", hostname="relay.example.com", public_addresses=("192.0.2.1",))
    text = "$ORIGIN .\n@ 3600 IN SOA ns. host. 1 3600 600 86400 3600\n@ 3600 IN NS ns.\n" + zone_snippet(recs)
    zone = dns.zone.from_text(text, origin=".", relativize=False, check_origin=False)
    dkim_txt = zone.find_rdataset("sel1._domainkey.mg.example.com.", dns.rdatatype.TXT)
    assert b"".join(next(iter(dkim_txt)).strings).decode() == key.txt
    spf = zone.find_rdataset("mg.example.com.", dns.rdatatype.TXT)
    assert b"".join(next(iter(spf)).strings).decode() == "v=spf1 ip4:192.0.2.1 ~all"
    dmarc = zone.find_rdataset("_dmarc.mg.example.com.", dns.rdatatype.TXT)
    assert b"".join(next(iter(dmarc)).strings).decode().startswith("v=DMARC1; p=none; rua=mailto:postmaster@")
    ptr = zone.find_rdataset("1.2.0.192.in-addr.arpa.", dns.rdatatype.PTR)
    assert next(iter(ptr)).target.to_text() == "relay.example.com."


def test_txt_chunks_split_at_255():
    value = "p=" + "A" * 600
    chunks = txt_chunks(value)
    parts = [p.strip('"') for p in chunks.split(" ")]
    assert "".join(parts) == value and max(len(p) for p in parts) == 255


def test_openssl_rsa_primitive_is_byte_identical_to_dkimpys():
    import hashlib

    import dkim.crypto

    from relay import signing
    private, public = generate("rsa", 2048)
    parsed = dkim.crypto.parse_pem_private_key(private.encode())
    signing._register(DKIMKey("mg.example.com", "s", "rsa", private, public, 0.0, True))
    assert parsed["modulus"] in signing._OPENSSL_KEYS
    fast = signing._rsa_sign(hashlib.sha256(b"header hash input"), parsed)
    pure = signing._PURE_RSA_SIGN(hashlib.sha256(b"header hash input"), parsed)
    assert fast == pure
    # A key we never registered still signs, through dkimpy's own code.
    other, _ = generate("rsa", 1024)
    other_parsed = dkim.crypto.parse_pem_private_key(other.encode())
    assert signing._rsa_sign(hashlib.sha256(b"x"), other_parsed) == \
        signing._PURE_RSA_SIGN(hashlib.sha256(b"x"), other_parsed)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b c", b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n", b".", b" \r\n",
                                 b"\t\r\n", b"x" * 50]), max_size=40).map(b"".join))
def test_relaxed_body_fast_path_matches_dkimpy(body):
    from relay import signing
    assert signing._relaxed_body(body) == signing._RELAXED_BODY(body)
