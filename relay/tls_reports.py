"""TLSRPT sending (RFC 8460 3, 5): once a day, for each policy domain with sessions counted the
day before, the `rua` of `_smtp._tls.<domain>` gets the day's report (JSON, gzip):
`mailto:` as a multipart/report message enqueued in our own queue (DKIM-signed by the runner
like any mail from a sending domain), `https:` by POST (`application/tlsrpt+gzip`).

Runs in the delivery process when `delivery.tlsrpt_from` is set. What was sent is recorded
(`tlsrpt_sent`), so a restart does not send a day twice; a domain whose rua failed is tried
again at the next run (the day after at the latest), as tlsrpt-reporter does.

Several nodes (PostgreSQL): every node's delivery process runs a reporter; each day's run goes
through `singleton.run_once("tlsrpt", day)`, so one node sends that day's reports and the others,
waking later, find the day done (store/singleton.py; LocalJobLocks on one node).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import random
import secrets
import ssl
import time
from email.utils import formatdate, make_msgid
from typing import Any, Callable

import dns.asyncresolver
import dns.exception
import dns.resolver

from .config import Config
from .delivery.tlsrpt import CountRow, build_report, gzip_report
from .logs import event
from .store.contract import NewMessage, NewRecipient
from .store.singleton import JobLocks, LocalJobLocks

log = logging.getLogger("relay.tlsrpt")

MAX_RUA = 5                 # destinations per domain we send to
POST_TIMEOUT = 30.0


def parse_rua(records: list[str]) -> list[str]:
    """The rua URIs of `_smtp._tls` TXT strings (RFC 8460 3): exactly one v=TLSRPTv1 record;
    mailto: and https: only; anything malformed means no reporting."""
    ours = [r for r in records if r.startswith("v=TLSRPTv1")]
    if len(ours) != 1:
        return []
    fields = {}
    for part in ours[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields.setdefault(k.strip(), v.strip())
    if fields.get("v") != "TLSRPTv1":
        return []
    out = []
    for uri in fields.get("rua", "").split(","):
        uri = uri.strip()
        if (uri.startswith("mailto:") and "@" in uri and len(uri) < 300 and uri.isprintable()) or \
                uri.startswith("https://") and len(uri) < 2000 and uri.isprintable() and " " not in uri:
            out.append(uri)
    return out[:MAX_RUA]


def report_message(report: dict[str, Any], gz: bytes, *, sender: str, to: str, domain: str,
                   organization: str) -> bytes:
    """RFC 8460 5.3: multipart/report; report-type="tlsrpt", with TLS-Report-Domain/-Submitter."""
    start = report["date-range"]["start-datetime"]
    end = report["date-range"]["end-datetime"]
    name = f"{organization}!{domain}!{start}!{end}!{report['report-id']}.json.gz".replace(":", "")
    boundary = "tlsrpt-" + secrets.token_hex(12)
    b64 = base64.encodebytes(gz).decode().replace("\n", "\r\n")
    lines = [
        f"From: <{sender}>", f"To: <{to}>",
        f"Subject: Report Domain: {domain} Submitter: {organization} Report-ID: <{report['report-id']}>",
        f"Date: {formatdate(usegmt=True)}", f"Message-ID: {make_msgid(domain=sender.rpartition('@')[2])}",
        f"TLS-Report-Domain: {domain}", f"TLS-Report-Submitter: {organization}", "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"', "",
        f"--{boundary}", "Content-Type: text/plain; charset=us-ascii", "",
        f"This is an aggregate TLS report from {organization} for {domain}, {start[:10]}.", "",
        f"--{boundary}", "Content-Type: application/tlsrpt+gzip", "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"', "", b64.rstrip("\r\n"), "",
        f"--{boundary}--", "",
    ]
    return "\r\n".join(lines).encode("ascii")


class TLSReporter:
    def __init__(self, cfg: Config, tls_state: Any, queue: Any, resolver: dns.asyncresolver.Resolver,
                 ssl_context: ssl.SSLContext, clock: Callable[[], float] = time.time,
                 singleton: JobLocks | None = None):
        self.cfg = cfg
        self.singleton: JobLocks = singleton or LocalJobLocks()
        self.state = tls_state
        self.queue = queue
        self.resolver = resolver
        self.ssl_context = ssl_context
        self.clock = clock

    @property
    def organization(self) -> str:
        return self.cfg.delivery.tlsrpt_organization or self.cfg.server.hostname

    async def run(self) -> None:
        """Yesterday's reports, at a random time in the first hours after 00:00 UTC, every day."""
        while True:
            now = self.clock()
            next_midnight = (now // 86400 + 1) * 86400
            await asyncio.sleep(max(1.0, next_midnight - now + random.uniform(60, 4 * 3600)))
            day = time.strftime("%Y-%m-%d", time.gmtime(self.clock() - 86400))
            try:
                await self.run_day(day)
            except Exception:  # noqa: BLE001 - tomorrow is another run
                log.exception("TLSRPT reports for %s failed", day)

    async def run_day(self, day: str) -> bool:
        """`day`'s reports on one node of all: False when another node sent them or is sending."""
        return await self.singleton.run_once("tlsrpt", day, lambda: self.send_day(day))

    async def send_day(self, day: str) -> dict[str, str]:
        """Send `day`'s reports; {policy domain: "sent" | "no-rua" | "failed" | "already"}."""
        rows = [CountRow(**r) for r in await self.state.tlsrpt_rows(day)]
        sent = set(await self.state.tlsrpt_sent(day))
        out: dict[str, str] = {}
        for domain in sorted({r.policy_domain for r in rows}):
            if domain in sent:
                out[domain] = "already"
                continue
            rua = await self._rua(domain)
            if not rua:
                out[domain] = "no-rua"
                await self.state.mark_tlsrpt_sent(day, domain, self.clock())
                continue
            report_id = f"{day}.{domain}.{secrets.token_hex(4)}@{self.cfg.server.hostname}"
            report = build_report([r for r in rows if r.policy_domain == domain], day=day,
                                  organization=self.organization, contact=self.cfg.delivery.tlsrpt_from,
                                  report_id=report_id)
            gz = gzip_report(report)
            ok = False
            for uri in rua:
                try:
                    if uri.startswith("mailto:"):
                        await self._mail(uri[len("mailto:"):].split("?")[0], domain, report, gz)
                    else:
                        await self._post(uri, gz)
                    ok = True
                    event(log, "tlsrpt_sent", domain=domain, day=day, to=uri, report_id=report_id)
                except Exception as exc:  # noqa: BLE001 - one rua failing does not stop the others
                    event(log, "tlsrpt_failed", logging.WARNING, domain=domain, day=day, to=uri,
                          error=f"{type(exc).__name__}: {exc}"[:300])
            out[domain] = "sent" if ok else "failed"
            if ok:
                await self.state.mark_tlsrpt_sent(day, domain, self.clock())
        return out

    async def _rua(self, domain: str) -> list[str]:
        try:
            answer = await self.resolver.resolve(f"_smtp._tls.{domain}", "TXT", search=False)
        except dns.exception.DNSException:
            return []
        return parse_rua([b"".join(r.strings).decode("utf-8", "replace") for r in answer])

    async def _mail(self, to: str, domain: str, report: dict[str, Any], gz: bytes) -> None:
        from .queue_runner import route_of

        sender = self.cfg.delivery.tlsrpt_from
        data = report_message(report, gz, sender=sender, to=to, domain=domain, organization=self.organization)
        await self.queue.enqueue(NewMessage(sender=sender, recipients=(NewRecipient(to, route_of(to)),), data=data,
                                            dkim_domain=sender.rpartition("@")[2].lower()))

    async def _post(self, uri: str, gz: bytes) -> None:
        import aiohttp

        from .delivery.mta_sts import DnsPythonResolver

        connector = aiohttp.TCPConnector(resolver=DnsPythonResolver(self.resolver), ssl=self.ssl_context,
                                         force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT),
                                         trust_env=False) as http:
            async with http.post(uri, data=gz, headers={"Content-Type": "application/tlsrpt+gzip"},
                                 allow_redirects=False) as resp:
                if not 200 <= resp.status < 300:
                    raise RuntimeError(f"HTTP {resp.status}")
