"""TLSRPT sending (RFC 8460), in process against real parts: the SQLite stores, the loopback DNS
answering `_smtp._tls.<domain>`, an HTTPS receiver with a test CA for the https: rua, and our
own queue for the mailto: rua."""
from __future__ import annotations

import email
import email.policy
import gzip
import json
import ssl

import pytest
from aiohttp import web

trustme = pytest.importorskip("trustme")

from relay import config  # noqa: E402
from relay.delivery.mx import make_resolver  # noqa: E402
from relay.store.factory import open_stores  # noqa: E402
from relay.tls_reports import TLSReporter, parse_rua  # noqa: E402


def test_parse_rua():
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@b.example,https://r.example/x"]) == [
        "mailto:a@b.example", "https://r.example/x"]
    assert parse_rua(["v=TLSRPTv1;rua=http://insecure.example/"]) == []
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@b.example", "v=TLSRPTv1; rua=mailto:c@d.example"]) == []
    assert parse_rua(["v=spf1 -all"]) == [] and parse_rua([]) == []


async def test_a_days_reports_go_by_mail_through_our_queue_and_by_https_post(tmp_path, dns_server):
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("reports.a.test").configure_cert(server_ctx)
    got: list[tuple[str, bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        got.append((request.content_type, await request.read()))
        return web.Response(status=201)

    app = web.Application()
    app.router.add_post("/tlsrpt", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    dns_server.set("_smtp._tls.a.test", "TXT",
                   [f"v=TLSRPTv1; rua=mailto:tls-reports@a.test,https://reports.a.test:{port}/tlsrpt"])
    dns_server.set("reports.a.test", "A", ["127.0.0.1"])
    cfg = config.from_dict({"storage": {"path": str(tmp_path / "relay.db")}, "dns": {"nameservers": [dns_server.address]},
                            "server": {"hostname": "relay.test"},
                            "delivery": {"tlsrpt_from": "tlsrpt@sender.test"}})
    stores = await open_stores(cfg, role="delivery")
    try:
        state = stores.tls_state
        await state.add_tlsrpt([
            ("2026-12-01", "a.test", "sts", json.dumps(["version: STSv1", "mode: enforce", "mx: mx.a.test",
                                                        "max_age: 86400"]), "mx.a.test", "", 7),
            ("2026-12-01", "a.test", "sts", json.dumps(["version: STSv1", "mode: enforce", "mx: mx.a.test",
                                                        "max_age: 86400"]), "mx.a.test",
             "certificate-expired", 2),
            ("2026-12-01", "b.test", "no-policy-found", "[]", "mx.b.test", "", 1),   # no rua: nothing sent
        ])
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        reporter = TLSReporter(cfg, state, stores.queue, make_resolver(cfg.dns), client_ctx)
        assert await reporter.send_day("2026-12-01") == {"a.test": "sent", "b.test": "no-rua"}
        # https: one POST of the gzip'd JSON
        (ctype, body), = got
        report = json.loads(gzip.decompress(body))
        assert ctype == "application/tlsrpt+gzip"
        assert report["organization-name"] == "relay.test" and report["contact-info"] == "tlsrpt@sender.test"
        (entry,) = report["policies"]
        assert entry["policy"]["policy-domain"] == "a.test" and entry["policy"]["mx-host"] == ["mx.a.test"]
        assert entry["summary"] == {"total-successful-session-count": 7, "total-failure-session-count": 2}
        assert entry["failure-details"][0]["result-type"] == "certificate-expired"
        # mailto: a message in our own queue, to be DKIM-signed for the sender's domain
        (queued,) = await stores.queue.list()
        m = await stores.queue.show(queued["id"])
        assert m["sender"] == "tlsrpt@sender.test" and m["dkim_domain"] == "sender.test"
        assert [r["rcpt"] for r in m["recipients"]] == ["tls-reports@a.test"]
        raw = await stores.queue.body(queued["id"])
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg["TLS-Report-Domain"] == "a.test" and msg["TLS-Report-Submitter"] == "relay.test"
        assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
        part = [p for p in msg.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"][0]
        assert json.loads(gzip.decompress(part.get_content())) == report
        # Sent is remembered: the same day is not sent twice.
        assert await reporter.send_day("2026-12-01") == {"a.test": "already", "b.test": "already"}
        assert len(got) == 1
    finally:
        await stores.close()
        await runner.cleanup()
