"""Outbound TLS policy end to end: the real relay, the loopback DNS, an HTTPS server with a test
CA (trustme) serving MTA-STS policies, and MX sinks on 127.0.0.x with right, wrong and no
certificates, one of which strips STARTTLS.

The relay trusts the test CA through `delivery.tls_ca_file` and reaches the policy host on the
HTTPS server's port through `delivery.mta_sts_port` (RFC 8461 says 443); `mta-sts.<domain>`
resolves through `dns.nameservers` like every other name.
"""
from __future__ import annotations

import json
import smtplib
import ssl

import pytest

trustme = pytest.importorskip("trustme")

from tests.conftest import PASSWORD, USER  # noqa: E402
from tests.support.https_server import PolicyServer  # noqa: E402
from tests.support.mx_sink import MXSink  # noqa: E402
from tests.support.raw_smtp import metric  # noqa: E402
from tests.support.relay_instance import wait_until  # noqa: E402

SENDER_DOMAIN = USER.rpartition("@")[2]


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "version: STSv1\r\n" f"mode: {mode}\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def web(ca):
    cert = ca.issue_cert(*[f"mta-sts.{d}.test" for d in "abcdefghijklmn"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    with PolicyServer(ctx) as server:
        yield server


def sink_for(ca, host_ip: str, port: int, cert_name: str | None, **kw) -> MXSink:
    """A sink on host_ip:port; with cert_name, STARTTLS with a test-CA certificate for that name."""
    ctx = None
    if cert_name:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(cert_name).configure_cert(ctx)
    return MXSink(host=host_ip, port=port, tls_context=ctx, **kw).start()


def start_relay(make_relay, dns_server, base, ca, tmp_path, web=None, **delivery):
    """A relay whose sender domain's MX is `base` (127.0.0.1, plain), trusting the test CA."""
    ca_file = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    dns_server.set("mx.sender.test", "A", ["127.0.0.1"])
    dns_server.set(SENDER_DOMAIN, "MX", ["10 mx.sender.test."])
    d = {"retry_schedule": [3600], "tls_ca_file": str(ca_file), **delivery}
    if web is not None:
        d["mta_sts_port"] = web.port
    relay = make_relay(start=False, dns=dns_server.address, mx_port=base.port, config={"delivery": d})
    relay.add_user(USER, PASSWORD)
    return relay.start()


def sts(dns_server, domain: str, pid: str, web_ip: str = "127.0.0.1") -> None:
    dns_server.set(f"_mta-sts.{domain}", "TXT", [f"v=STSv1; id={pid};"])
    dns_server.set(f"mta-sts.{domain}", "A", [web_ip])


def mx(dns_server, domain: str, host: str, ip: str) -> None:
    dns_server.set(domain, "MX", [f"10 {host}."])
    dns_server.set(host, "A", [ip])


def send(relay, rcpt: str, subject: str = "hello", mail_options=()) -> str:
    s = relay.smtp()
    try:
        s.login(USER, PASSWORD)
        data = f"From: {USER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nbody\r\n"
        code, msg = s.mail(USER, list(mail_options))
        assert code == 250, msg
        code, msg = s.rcpt(rcpt)
        assert code == 250, msg
        code, msg = s.data(data.encode())
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


def idle(sink):
    """The relay keeps an idle connection ~2 s for the next message; wait until it is gone."""
    wait_until(lambda: not sink._transports, timeout=10, what="the relay's idle connection to close")


# ------------------------------------------------------------------ MTA-STS enforce and testing

def test_enforce_with_a_matching_mx_delivers_over_verified_tls(make_relay, dns_server, ca, web, tmp_path):
    with MXSink() as base:
        good = sink_for(ca, "127.0.0.2", base.port, "mx.a.test")
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, web)
            sts(dns_server, "a.test", "20261201")
            web.policies["mta-sts.a.test"] = policy("enforce", "mx.a.test", "*.backup.a.test")
            mx(dns_server, "a.test", "mx.a.test", "127.0.0.2")
            qid = send(relay, "bob@a.test")
            e = delivery(relay, qid, result="delivered")
            assert e["tls_policy"] == "sts-enforce" and e["tls_verified"] is True and e["tls"].startswith("TLSv1.")
            assert e["tls_cipher"] and good.messages[0].tls
            attempt = [a for a in show(relay, qid)["history"] if a["event"] == "delivered"][0]
            assert attempt["tls_policy"] == "sts-enforce" and attempt["tls_verified"] == 1
            assert attempt["tls_cipher"] == e["tls_cipher"] and attempt["host"] == "mx.a.test"
            text = relay.cli("queue", "show", qid, check=True).stdout
            assert "verified, policy sts-enforce]" in text
            assert metric(relay, "relay_delivery_tls_total", policy="sts-enforce", result="verified") == 1
            assert relay.events_named("mta_sts_policy", domain="a.test")[0]["mode"] == "enforce"
            # A second message: the policy is cached (same TXT id), not fetched again.
            delivery(relay, send(relay, "bob@a.test", "second"), result="delivered")
            assert web.requests["mta-sts.a.test"] == 1
        finally:
            good.stop()


def test_enforce_defers_a_non_matching_mx_or_a_bad_certificate(make_relay, dns_server, ca, web, tmp_path):
    with MXSink() as base:
        wrong = sink_for(ca, "127.0.0.3", base.port, "someone-else.test")
        plain = sink_for(ca, "127.0.0.4", base.port, None)
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, web)
            # b.test: the MX (in plain text, accepting everything) is not in the policy.
            sts(dns_server, "b.test", "1")
            web.policies["mta-sts.b.test"] = policy("enforce", "mx.b.test")
            mx(dns_server, "b.test", "rogue.example.test", "127.0.0.4")
            # c.test: the MX matches, but its certificate names another host.
            sts(dns_server, "c.test", "1")
            web.policies["mta-sts.c.test"] = policy("enforce", "mx.c.test")
            mx(dns_server, "c.test", "mx.c.test", "127.0.0.3")
            # d.test: the MX matches, offers no STARTTLS at all.
            sts(dns_server, "d.test", "1")
            web.policies["mta-sts.d.test"] = policy("enforce", "*.d.test")
            mx(dns_server, "d.test", "mx.d.test", "127.0.0.4")
            q_b, q_c, q_d = send(relay, "bob@b.test"), send(relay, "bob@c.test"), send(relay, "bob@d.test")
            e_b = delivery(relay, q_b, result="deferred")
            assert "not a mail host allowed by the MTA-STS policy" in e_b["reply"]
            assert e_b["tls_result"] == "mx-mismatch" and e_b["tls_policy"] == "sts-enforce"
            e_c = delivery(relay, q_c, result="deferred")
            assert e_c["tls_result"] == "certificate-host-mismatch" and e_c["tls"] == "failed"
            e_d = delivery(relay, q_d, result="deferred")
            assert e_d["tls_result"] == "starttls-not-supported" and "STARTTLS" in e_d["reply"]
            for q in (q_b, q_c, q_d):
                assert {r["state"] for r in show(relay, q)["recipients"]} == {"deferred"}  # never a bounce
            assert not wrong.messages and not plain.messages and not base.messages  # nothing in the clear
            assert relay.events_named("tls_policy_failure", domain="b.test", result="mx-mismatch")
            assert metric(relay, "relay_tls_policy_failures_total", policy="sts-enforce") >= 3
            # TLSRPT (RFC 8460) session counts, added to the store at stop at the latest.
            relay.stop()
            db = relay.db()
            try:
                rows = db.execute("SELECT policy_domain, policy_type, mx_host, result FROM tlsrpt_counts").fetchall()
            finally:
                db.close()
            got = {tuple(r) for r in rows}
            assert ("b.test", "sts", "rogue.example.test", "mx-mismatch") in got
            assert ("c.test", "sts", "mx.c.test", "certificate-host-mismatch") in got
            assert ("d.test", "sts", "mx.d.test", "starttls-not-supported") in got
        finally:
            wrong.stop()
            plain.stop()


def test_testing_mode_delivers_and_records_the_failure(make_relay, dns_server, ca, web, tmp_path):
    with MXSink() as base:
        wrong = sink_for(ca, "127.0.0.3", base.port, "someone-else.test")
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, web)
            sts(dns_server, "e.test", "1")
            web.policies["mta-sts.e.test"] = policy("testing", "mx.e.test")
            mx(dns_server, "e.test", "mx.e.test", "127.0.0.3")
            qid = send(relay, "bob@e.test")
            e = delivery(relay, qid, result="delivered")
            assert e["tls_policy"] == "sts-testing" and e["tls_verified"] is False and e["tls"].startswith("TLSv1.")
            f = relay.events_named("tls_policy_failure", domain="e.test")[0]
            assert f["result"] == "certificate-host-mismatch" and f["enforced"] is False
            assert wrong.messages and wrong.messages[0].tls
            assert metric(relay, "relay_delivery_tls_total", policy="sts-testing", result="encrypted") == 1
        finally:
            wrong.stop()


# ------------------------------------------------------------------ fetching and caching

def test_bad_policy_fetches_are_refused(make_relay, dns_server, ca, web, tmp_path):
    """Redirect, wrong media type, oversized, invalid: no policy (the MX gets the mail as `may`)."""
    with MXSink() as base:
        relay = start_relay(make_relay, dns_server, base, ca, tmp_path, web)
        cases = {
            "f": ((302, "text/plain", b"", {"Location": "https://mta-sts.a.test/.well-known/mta-sts.txt"}),
                  "sts-policy-fetch-error"),
            "g": ((200, "text/html", policy("enforce", "mx.g.test").encode(), {}), "sts-policy-invalid"),
            "h": ((200, "text/plain", policy("enforce", "mx.h.test").encode() + b"#" * 70000, {}),
                  "sts-policy-invalid"),
            "i": ((200, "text/plain", b"version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\n", {}),
                  "sts-policy-invalid"),
        }
        qids = {}
        for d, (resp, _) in cases.items():
            sts(dns_server, f"{d}.test", "1")
            web.responses[f"mta-sts.{d}.test"] = resp
            mx(dns_server, f"{d}.test", f"mx.{d}.test", "127.0.0.1")  # the plain base sink: delivered as `may`
            qids[d] = send(relay, f"bob@{d}.test")
        for d, (_, result) in cases.items():
            e = delivery(relay, qids[d], result="delivered")
            assert e["tls_policy"] == "may", e
            failed = relay.events_named("mta_sts_fetch_failed", domain=f"{d}.test")
            assert failed and failed[0]["result"] == result, (d, failed)
        assert "larger than 65536" in relay.events_named("mta_sts_fetch_failed", domain="h.test")[0]["error"]
        assert web.requests["mta-sts.a.test"] == 0  # the redirect was not followed


def test_policy_cache_survives_a_restart_and_follows_the_id(make_relay, dns_server, ca, web, tmp_path):
    with MXSink() as base:
        good = sink_for(ca, "127.0.0.2", base.port, "mx.j.test")
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, web)
            sts(dns_server, "j.test", "one")
            web.policies["mta-sts.j.test"] = policy("enforce", "mx.j.test")
            mx(dns_server, "j.test", "mx.j.test", "127.0.0.2")
            delivery(relay, send(relay, "bob@j.test"), result="delivered")
            assert web.requests["mta-sts.j.test"] == 1
            relay.stop()
            relay.start()
            # Same id after a restart: the stored policy is used, no fetch.
            delivery(relay, send(relay, "bob@j.test", "2"), result="delivered", tls_policy="sts-enforce")
            assert web.requests["mta-sts.j.test"] == 1
            # The TXT vanishes: the cached enforce policy still holds until its max_age (RFC 8461 5.1).
            dns_server.set("_mta-sts.j.test", "TXT", [])
            relay.stop()
            relay.start()
            delivery(relay, send(relay, "bob@j.test", "3"), result="delivered", tls_policy="sts-enforce")
            # A new id: fetched again.
            sts(dns_server, "j.test", "two")
            relay.stop()
            relay.start()
            delivery(relay, send(relay, "bob@j.test", "4"), result="delivered", tls_policy="sts-enforce")
            assert web.requests["mta-sts.j.test"] == 2
            assert relay.events_named("mta_sts_policy", domain="j.test")[-1]["previous"] == "one"
        finally:
            good.stop()


def test_an_expired_policy_is_fetched_again(make_relay, dns_server, ca, web, tmp_path):
    with MXSink() as base:
        good = sink_for(ca, "127.0.0.2", base.port, "mx.k.test")
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, web)
            sts(dns_server, "k.test", "1")
            web.policies["mta-sts.k.test"] = policy("enforce", "mx.k.test", max_age=2)
            mx(dns_server, "k.test", "mx.k.test", "127.0.0.2")
            delivery(relay, send(relay, "bob@k.test"), result="delivered", tls_policy="sts-enforce")
            assert web.requests["mta-sts.k.test"] == 1
            # A session is reused for ~2 s (and decided once); the next one, past max_age/2, refetches.
            idle(good)
            delivery(relay, send(relay, "bob@k.test", "again"), result="delivered", tls_policy="sts-enforce")
            assert web.requests["mta-sts.k.test"] == 2
        finally:
            good.stop()


# ------------------------------------------------------------------ config levels and the downgrade memory

def test_per_domain_levels_from_config(make_relay, dns_server, ca, tmp_path):
    with MXSink() as base:
        right = sink_for(ca, "127.0.0.2", base.port, "mx.l.test")
        wrong = sink_for(ca, "127.0.0.3", base.port, "someone-else.test")
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, mta_sts=False, tls_policy={
                "l.test": "verify", "m.test": "verify", "n.test": "encrypt", "o.test": "none"})
            mx(dns_server, "l.test", "mx.l.test", "127.0.0.2")
            mx(dns_server, "m.test", "mx.m.test", "127.0.0.3")
            mx(dns_server, "n.test", "mx.n.test", "127.0.0.3")
            mx(dns_server, "o.test", "mx.o.test", "127.0.0.2")
            ql, qm, qn, qo = (send(relay, f"bob@{d}.test") for d in "lmno")
            e = delivery(relay, ql, result="delivered")
            assert e["tls_policy"] == "verify" and e["tls_verified"] is True
            e = delivery(relay, qm, result="deferred")
            assert e["tls_result"] == "certificate-host-mismatch"
            e = delivery(relay, qn, result="delivered")
            assert e["tls_policy"] == "encrypt" and e["tls_verified"] is False and e["tls"].startswith("TLSv1.")
            e = delivery(relay, qo, result="delivered")
            assert e["tls_policy"] == "none" and e["tls"] == "plain"
            assert len(wrong.messages) == 1 and len(right.messages) == 2
        finally:
            right.stop()
            wrong.stop()


def test_a_starttls_stripping_receiver_gets_a_deferral_not_the_mail(make_relay, dns_server, ca, tmp_path):
    with MXSink() as base:
        mx_sink = sink_for(ca, "127.0.0.2", base.port, "mx.p.test")
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, mta_sts=False)
            mx(dns_server, "p.test", "mx.p.test", "127.0.0.2")
            q1 = send(relay, "bob@p.test")
            e = delivery(relay, q1, result="delivered")
            assert e["tls_policy"] == "may" and e["tls_verified"] is True
            assert relay.wait_event("tls_memory", domain="p.test", best="verified")
            idle(mx_sink)
            mx_sink.strip_starttls = True  # the attacker in the middle
            q2 = send(relay, "bob@p.test", "second")
            e = delivery(relay, q2, result="deferred")
            assert e["tls_policy"] == "verify" and e["tls_result"] == "downgrade-refused"
            assert e["reply"].endswith("(downgrade protection); will retry") and e["reply"].startswith("mx.p.test")
            refused = relay.events_named("tls_downgrade_refused", domain="p.test")
            assert refused and refused[0]["seen"] == "verified" and refused[0]["got"] == "starttls-not-supported"
            assert len(mx_sink.messages) == 1  # the second message never went in the clear
            assert metric(relay, "relay_tls_downgrade_refused_total") >= 1
            assert {r["state"] for r in show(relay, q2)["recipients"]} == {"deferred"}
            # The stripping ends: the retry goes over verified TLS.
            mx_sink.strip_starttls = False
            relay.cli("queue", "retry", q2, check=True)
            assert delivery(relay, q2, result="delivered")["tls_verified"] is True
        finally:
            mx_sink.stop()


def test_downgrade_protection_can_be_turned_off(make_relay, dns_server, ca, tmp_path):
    with MXSink() as base:
        mx_sink = sink_for(ca, "127.0.0.2", base.port, "mx.q.test")
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, mta_sts=False,
                                downgrade_protection=False)
            mx(dns_server, "q.test", "mx.q.test", "127.0.0.2")
            delivery(relay, send(relay, "bob@q.test"), result="delivered", tls_verified=True)
            idle(mx_sink)
            mx_sink.strip_starttls = True
            e = delivery(relay, send(relay, "bob@q.test", "2"), result="delivered")
            assert e["tls"] == "plain" and not relay.events_named("tls_downgrade_refused")
        finally:
            mx_sink.stop()


# ------------------------------------------------------------------ REQUIRETLS (RFC 8689)

def test_requiretls_is_offered_only_over_tls(make_relay, dns_server, ca, tmp_path):
    with MXSink() as base:
        relay = start_relay(make_relay, dns_server, base, ca, tmp_path, mta_sts=False)
        s = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        try:
            s.ehlo("client.test")
            assert not s.has_extn("requiretls")
            code, msg = s.mail(USER, ["REQUIRETLS"])
            assert code in (530, 555), (code, msg)  # AUTH first, and the parameter is not offered here
        finally:
            s.close()
        s = relay.smtp()
        try:
            assert s.has_extn("requiretls")
            s.login(USER, PASSWORD)
            assert s.mail(USER, ["REQUIRETLS=yes"])[0] == 501
            assert s.mail(USER, ["REQUIRETLS"])[0] == 250
        finally:
            s.close()


def test_requiretls_mail_goes_only_over_verified_tls_to_a_requiretls_server(make_relay, dns_server, ca, tmp_path):
    with MXSink() as base:
        able = sink_for(ca, "127.0.0.2", base.port, "mx.r1.test")
        able.advertise_requiretls = True
        unable = sink_for(ca, "127.0.0.3", base.port, "mx.r2.test")  # verified TLS, no REQUIRETLS
        wrong = sink_for(ca, "127.0.0.4", base.port, "someone-else.test")
        wrong.advertise_requiretls = True
        try:
            relay = start_relay(make_relay, dns_server, base, ca, tmp_path, mta_sts=False)
            mx(dns_server, "r1.test", "mx.r1.test", "127.0.0.2")
            mx(dns_server, "r2.test", "mx.r2.test", "127.0.0.3")
            mx(dns_server, "r3.test", "mx.r3.test", "127.0.0.4")
            q1, q2, q3 = (send(relay, f"bob@r{i}.test", mail_options=["REQUIRETLS"]) for i in (1, 2, 3))
            e = delivery(relay, q1, result="delivered")
            assert e["tls_verified"] is True
            assert "REQUIRETLS" in able.messages[0].mail_options  # passed on
            for q, why in ((q2, "does not support REQUIRETLS"), (q3, "could not be reached over verified TLS")):
                e = delivery(relay, q, result="failed")
                assert why in e["reply"], e
                assert [r["state"] for r in show(relay, q)["recipients"]] == ["failed"]
            assert not unable.messages and not wrong.messages
            # The sender hears of it (RFC 8689 4.2.1: a permanent failure, 5.7.30).
            wait_until(lambda: len([m for m in base.messages if m.mail_from in ("", "<>")]) == 2, timeout=20,
                       what="two bounces")
            assert all(b"5.7.30" in m.data for m in base.messages if m.mail_from in ("", "<>"))
            # Mail without REQUIRETLS to the same host goes as before.
            delivery(relay, send(relay, "bob@r2.test", "plain old"), result="delivered")
        finally:
            able.stop()
            unable.stop()
            wrong.stop()
