"""Sending domains: add (with the DKIM key), remove, the records to publish, the DNS check.

What `relay domain ...` did inline, for the CLI, the web pages and the API alike.
"""
from __future__ import annotations

import inspect
import time

from .. import config as config_mod, dkim_keys
from ..config import Config
from ..credentials import CredentialStore, normalize_domain
from ..dkim_keys import DKIMKey, DKIMStore
from ..store.sqlite_queue import QueueStore
from .audit import Audit
from .errors import OperationError, not_found, translated
from .model import Actor, DnsRecord, DomainInfo, RecordCheck

DAY = 86400.0


def _both(*ops):
    """Several extra writes as one `also=`: in order, on SQLite (plain calls) and on PostgreSQL
    (async ops, awaited in order by the store's transaction)."""
    def op(conn):
        pending = []
        for o in ops:
            if o is not None:
                result = o(conn)
                if inspect.isawaitable(result):
                    pending.append(result)
        if pending:
            async def in_order() -> None:
                for p in pending:
                    await p
            return in_order()
        return None
    return op


class Domains:
    def __init__(self, cfg: Config, creds: CredentialStore, dkim: DKIMStore, queue: QueueStore, audit: Audit,
                 clock=time.time):
        self.cfg = cfg
        self._creds = creds
        self._dkim = dkim
        self._queue = queue
        self._audit = audit
        self._clock = clock

    def _normal(self, name: str) -> str:
        with translated():
            return normalize_domain(name)

    async def _existing(self, name: str) -> str:
        d = self._normal(name)
        if not await self._creds.domain_exists(d):
            raise not_found(f"domain {d} not found")
        return d

    # ------------------------------------------------------------ reads

    async def list(self) -> list[DomainInfo]:
        rows = await self._creds.list_domains()
        activity = await self._queue.activity_by_domain(self._clock() - DAY)
        out = []
        for r in rows:
            active = await self._dkim.active(r["domain"])
            out.append(self._info(r, active, activity.get(r["domain"], {})))
        return out

    def _info(self, r: dict, active: DKIMKey | None, act: dict[str, int]) -> DomainInfo:
        return DomainInfo(name=r["domain"], display=r["display"], created_at=r["created_at"],
                          verified_at=r["verified_at"], state=r["state"], credentials=r["credentials"],
                          credential_cap=self.cfg.credentials.per_domain,
                          dkim_selector=active.selector if active else None,
                          sent_24h=act.get("delivered", 0), deferred_24h=act.get("deferred", 0),
                          bounced_24h=act.get("failed", 0) + act.get("expired", 0))

    async def get(self, name: str) -> DomainInfo:
        d = self._normal(name)
        for info in await self.list():
            if info.name == d:
                return info
        raise not_found(f"domain {d} not found")

    async def records(self, name: str) -> list[DnsRecord]:
        d = await self._existing(name)
        return [DnsRecord(r.type, r.name, r.value, r.purpose, r.required) for r in await self._records(d)]

    async def _records(self, d: str) -> list[dkim_keys.Record]:
        cfg = self.cfg
        dm = cfg.domains
        spf = dkim_keys.spf_value(dm.public_addresses, cfg.server.hostname, dm.spf_include,
                                  cfg.delivery.mode == "smarthost")
        if config_mod.spf_relies_on_hostname(cfg) and not config_mod.is_public_name(cfg.server.hostname):
            # 'a:localhost' would publish a record that authorises nothing: print what to fill in.
            spf = "v=spf1 ip4:<PUBLIC-IPv4-OF-THIS-RELAY> ~all"
        return dkim_keys.records(d, await self._dkim.keys(d), spf=spf, dmarc_rua=dm.dmarc_rua,
                                 hostname=cfg.server.hostname, public_addresses=dm.public_addresses)

    async def zone_snippet(self, name: str) -> str:
        d = await self._existing(name)
        return dkim_keys.zone_snippet(await self._records(d))

    # ------------------------------------------------------------ changes

    async def add(self, actor: Actor, name: str, *, dkim: bool = True, algorithm: str | None = None,
                  selector: str | None = None) -> tuple[DomainInfo, DKIMKey | None]:
        """The domain, its first DKIM key (unless `dkim` is false: mail signed further on, or not
        at all) and the audit row, in one transaction."""
        dm = self.cfg.domains
        d = self._normal(name)
        with translated():
            if await self._creds.domain_exists(d):  # before spending seconds on an RSA key
                raise OperationError("conflict", f"domain {d} already exists")
            key, key_op = (None, None)
            if dkim:
                key, key_op = await self._dkim.prepare(d, algorithm=algorithm or dm.dkim_algorithm,
                                                       rsa_bits=dm.dkim_rsa_bits, selector=selector or dm.dkim_selector)
            detail = f"dkim {key.selector} ({key.algorithm})" if key else "no dkim key"
            await self._creds.add_domain(d, also=_both(key_op, self._audit.row(actor, "domain.add", d, detail)))
        return await self.get(d), key

    async def remove(self, actor: Actor, name: str, force: bool = False) -> int:
        """Remove a domain (with its credentials and keys under `force`); how many credentials went."""
        d = self._normal(name)
        with translated():
            queued = await self._queue.count_for_domain(d)
            return await self._creds.remove_domain(
                d, force=force, queued=queued,
                also=self._audit.row(actor, "domain.remove", d, "force" if force else None))

    async def check(self, actor: Actor, name: str) -> list[RecordCheck]:
        """Look the TXT records up through the configured resolver (dns.nameservers); the domain
        counts as verified when every required one is right (DKIM and SPF)."""
        from ..delivery.mx import make_resolver
        d = await self._existing(name)
        recs = [r for r in await self._records(d) if r.type == "TXT"]
        checks = await dkim_keys.verify(make_resolver(self.cfg.dns), recs)
        now = self._clock()
        ok = all(c.status == "ok" for c in checks if c.record.required)
        with translated():
            await self._dkim.mark_verified(d, ok, also=self._audit.row(
                actor, "domain.verify", d, "verified" if ok else "not verified"))
        out = []
        for c in checks:
            if c.status == "ok":
                status = "ok"
            elif not c.record.required:
                status = "optional"
            else:
                status = {"different": "mismatch", "missing": "missing"}.get(c.status, "error")
            out.append(RecordCheck(type=c.record.type, name=c.record.name, purpose=c.record.purpose,
                                   required=c.record.required, expected=c.record.value, found=tuple(c.found),
                                   status=status, lookup=c.status, checked_at=now))
        return out

    # ------------------------------------------------------------ DKIM keys

    async def dkim_keys(self, name: str) -> list[DKIMKey]:
        d = await self._existing(name)
        return await self._dkim.keys(d)

    async def rotate_dkim(self, actor: Actor, name: str, *, algorithm: str | None = None,
                          selector: str | None = None) -> DKIMKey:
        dm = self.cfg.domains
        d = await self._existing(name)
        with translated():
            key, op = await self._dkim.prepare(d, algorithm=algorithm or dm.dkim_algorithm, rsa_bits=dm.dkim_rsa_bits,
                                               selector=selector or "")
            await self._dkim.store_prepared(op, also=self._audit.row(actor, "dkim.rotate", d, key.selector))
        return key

    async def remove_dkim(self, actor: Actor, name: str, selector: str) -> None:
        d = self._normal(name)
        with translated():
            await self._dkim.remove(d, selector, also=self._audit.row(actor, "dkim.remove", d, selector))
