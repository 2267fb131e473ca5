"""The TLS a scanner sees on 465 (implicit) and 587 (STARTTLS): protocols, suites, resumption, certificate.

TLS 1.2 offers only ECDHE key exchange with AEAD ciphers (Mozilla "intermediate" without DHE);
the self-signed certificate is valid at most 398 days; resumption is by TLS 1.2 ticket only,
as Postfix's smtpd does by default. testssl.sh (Debian package), when installed, must find no
warning in its protocol, cipher, forward secrecy, server preference and vulnerability sections,
nor in session resumption and certificate validity.
"""
from __future__ import annotations

import datetime
import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.support import tools
from tests.support.relay_instance import RelayInstance

TESTSSL = next((t for t in ("testssl", "testssl.sh") if shutil.which(t)), "testssl")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    with RelayInstance(tmp_path_factory.mktemp("tls") / "relay") as inst:
        yield inst


def tls_connect(inst: RelayInstance, starttls: bool, ctx: ssl.SSLContext,
                session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    """A TLS connection to the implicit port, or to the STARTTLS port after EHLO + STARTTLS."""
    port = inst.ports["starttls" if starttls else "implicit"]
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if starttls:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] != b" ":
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220 ")
    tls = ctx.wrap_socket(raw, session=session)
    if not starttls:
        assert tls.recv(100).startswith(b"220 ")  # reads the banner and, with it, any ticket
    else:
        tls.sendall(b"NOOP\r\n")
        assert tls.recv(100).startswith(b"250 ")
    return tls


def client_ctx(maximum=ssl.TLSVersion.TLSv1_3, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


@pytest.mark.parametrize("starttls", [False, True], ids=["465", "587"])
@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES128-SHA",
                                   "AES128-SHA256", "AES128-GCM-SHA256"])
def test_tls12_refuses_cbc_and_suites_without_forward_secrecy(relay, starttls, suite):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(relay, starttls, client_ctx(ssl.TLSVersion.TLSv1_2, suite)).close()


@pytest.mark.parametrize("starttls", [False, True], ids=["465", "587"])
@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                                   "ECDHE-ECDSA-CHACHA20-POLY1305"])
def test_tls12_offers_ecdhe_with_aead(relay, starttls, suite):
    with tls_connect(relay, starttls, client_ctx(ssl.TLSVersion.TLSv1_2, suite)) as tls:
        assert tls.version() == "TLSv1.2" and tls.cipher()[0] == suite


@pytest.mark.parametrize("starttls", [False, True], ids=["465", "587"])
def test_resumption_by_tls12_ticket_only(relay, starttls):
    ctx = client_ctx(ssl.TLSVersion.TLSv1_2)
    with tls_connect(relay, starttls, ctx) as first:
        session = first.session
    assert session is not None and session.has_ticket
    with tls_connect(relay, starttls, ctx, session) as again:
        assert again.session_reused  # by the ticket
    # Without a ticket (session ID only) nothing is resumed: there is no server-side cache.
    no_ticket = client_ctx(ssl.TLSVersion.TLSv1_2)
    no_ticket.options |= ssl.OP_NO_TICKET
    with tls_connect(relay, starttls, no_ticket) as first:
        session = first.session
    with tls_connect(relay, starttls, no_ticket, session) as again:
        assert not again.session_reused
    # TLS 1.3: no tickets are issued (see relay/tls.py for why).
    with tls_connect(relay, starttls, client_ctx()) as tls13:
        assert tls13.version() == "TLSv1.3" and not tls13.session.has_ticket


def test_self_signed_certificate_is_valid_at_most_398_days(relay):
    cert = x509.load_pem_x509_certificate(Path(relay.config["tls"]["cert"]).read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=398)


# Everything in these sections must be OK or INFO; of the server defaults, these ids. The rest of
# the server defaults judge the self-signed test certificate's trust (chain, name, revocation),
# which no configuration of ours changes.
GATED_SECTIONS = ("protocols", "ciphers", "pfs", "serverPreferences", "vulnerabilities")
GATED_DEFAULTS = ("sessionresumption_ticket", "sessionresumption_ID", "cert_validityPeriod", "cert_expirationStatus",
                  "cert_keySize", "cert_signatureAlgorithm")


@pytest.mark.slow
@pytest.mark.timeout(900)
@tools.needs(TESTSSL, reason="Debian package testssl.sh; CI installs it")
def test_testssl_finds_no_warnings_on_465_and_587(relay, tmp_path):
    scans = {}
    for name, port, extra in (("465", relay.ports["implicit"], []), ("587", relay.ports["starttls"], ["-t", "smtp"])):
        out = tmp_path / f"{name}.json"
        scans[name] = (out, subprocess.Popen(
            [TESTSSL, "--quiet", "--color", "0", "--warnings", "off", "--jsonfile-pretty", str(out), *extra,
             "-p", "-s", "-f", "-P", "-U", "-S", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    problems = []
    for name, (out, proc) in scans.items():
        text, _ = proc.communicate(timeout=800)
        assert out.exists(), text[-2000:]
        report = json.loads(out.read_text())
        # The scanning client's own limits (its OpenSSL lacks GOST engines) say nothing of the relay.
        problems += [f"{name}: scan problem: {p}" for k, v in report.items() if k.startswith("clientProblem")
                     for p in v if p.get("id") != "engine_problem"]
        [result] = report["scanResult"]
        assert result["protocols"] and result["vulnerabilities"] and result["serverDefaults"], text[-2000:]
        for section in GATED_SECTIONS:
            problems += [f"{name}: {section}: {f['id']} {f['severity']}: {f['finding']}" for f in result[section]
                         if f["severity"] not in ("OK", "INFO")]
        found = {f["id"]: f for f in result["serverDefaults"]}
        for fid in GATED_DEFAULTS:
            assert fid in found, (name, fid, sorted(found))
            if found[fid]["severity"] not in ("OK", "INFO"):
                problems.append(f"{name}: {fid} {found[fid]['severity']}: {found[fid]['finding']}")
    assert not problems, "\n".join(problems)
