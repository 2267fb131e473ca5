"""The operations layer: every change an operator can make, for the CLI, the web pages and the
HTTP API alike. Built from the stores a process already has (`store.factory.open_stores`) and
the Config. No caller above it touches SQL or SMTP internals; every change writes its audit
row in the same transaction, through the store's group-commit writer.

    ops = Operations(stores, cfg)
    info, password = await ops.create_credential(Actor("alice", "web", ip), "app@mg.example.com")

Refusals are `OperationError(code, message, status)` (errors.py).
"""
from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

from ..config import Config
from .api_keys import ApiKeys
from .audit import Audit
from .credentials import Credentials
from .domains import Domains
from .errors import OperationError
from .model import (Actor, ApiKeyInfo, ApiPrincipal, Attempt, AuditEntry, CredentialInfo, DnsRecord, DomainInfo,
                    MessageDetail, QueueFilter, QueueItem, QueuePage, RecipientInfo, RecordCheck, as_dict)
from .queue_ops import Queue

__all__ = ["Operations", "OperationError", "Actor", "ApiKeyInfo", "ApiPrincipal", "Attempt", "AuditEntry",
           "CredentialInfo", "DnsRecord", "DomainInfo", "MessageDetail", "QueueFilter", "QueueItem", "QueuePage",
           "RecipientInfo", "RecordCheck", "as_dict"]


class Operations:
    def __init__(self, stores, cfg: Config, clock=time.time):
        self.cfg = cfg
        self.audit = Audit(stores.audit)
        self.domains = Domains(cfg, stores.credentials, stores.dkim, stores.queue, self.audit, clock)
        self.credentials = Credentials(stores.credentials, self.audit)
        self.queue = Queue(cfg, stores.queue, self.audit)
        self.api_keys = ApiKeys(stores.api_keys, self.audit, clock)
        self._nodes = getattr(stores, "nodes", None)
        self._clock = clock

    @classmethod
    @contextlib.asynccontextmanager
    async def opened(cls, cfg: Config, role: str = "cli") -> AsyncIterator["Operations"]:
        """Stores of our own (a CLI command, a test), closed on the way out."""
        from ..store.factory import open_stores
        stores = await open_stores(cfg, role=role)
        try:
            yield cls(stores, cfg)
        finally:
            await stores.close()

    def configure(self, cfg: Config) -> None:
        """SIGHUP: the new Config (cap, DNS resolver, records)."""
        self.cfg = self.domains.cfg = self.queue.cfg = cfg

    # ------------------------------------------------------------ nodes (issue 17)

    async def list_nodes(self) -> list[dict]:
        """The nodes seen on this database: state (up / silent / stopped), last heartbeat,
        the leases each holds (store/nodes.py)."""
        if self._nodes is None:
            return []
        return await self._nodes.list(self._clock())

    # ------------------------------------------------------------ domains

    async def list_domains(self) -> list[DomainInfo]:
        return await self.domains.list()

    async def get_domain(self, name: str) -> DomainInfo:
        return await self.domains.get(name)

    async def add_domain(self, actor: Actor, name: str, *, dkim: bool = True, algorithm: str | None = None,
                         selector: str | None = None) -> DomainInfo:
        info, _key = await self.domains.add(actor, name, dkim=dkim, algorithm=algorithm, selector=selector)
        return info

    async def remove_domain(self, actor: Actor, name: str, force: bool = False) -> int:
        return await self.domains.remove(actor, name, force)

    async def domain_records(self, name: str) -> list[DnsRecord]:
        return await self.domains.records(name)

    async def check_domain(self, actor: Actor, name: str) -> list[RecordCheck]:
        return await self.domains.check(actor, name)

    async def zone_snippet(self, name: str) -> str:
        return await self.domains.zone_snippet(name)

    # ------------------------------------------------------------ credentials

    async def list_credentials(self, domain: str | None) -> list[CredentialInfo]:
        return await self.credentials.list(domain)

    async def create_credential(self, actor: Actor, username: str,
                                password: str | None = None) -> tuple[CredentialInfo, str]:
        return await self.credentials.create(actor, username, password)

    async def reset_credential(self, actor: Actor, username: str, password: str | None = None) -> str:
        return await self.credentials.reset(actor, username, password)

    async def delete_credential(self, actor: Actor, username: str) -> None:
        await self.credentials.delete(actor, username)

    # ------------------------------------------------------------ queue

    async def list_queue(self, filter: QueueFilter = QueueFilter(), after: str | None = None,
                         limit: int = 50) -> QueuePage:
        return await self.queue.list(filter, after, limit)

    async def show_message(self, qid: str) -> MessageDetail:
        return await self.queue.show(qid)

    async def retry(self, actor: Actor, qid: str | None) -> int:
        return await self.queue.retry(actor, qid)

    async def delete_message(self, actor: Actor, qid: str, bounce: bool = False) -> bool:
        return await self.queue.delete(actor, qid, bounce)

    # ------------------------------------------------------------ audit, API keys

    async def list_audit(self, before: int | None = None, limit: int = 50) -> list[AuditEntry]:
        return await self.audit.list(before, limit)

    async def add_api_key(self, actor: Actor, name: str, scope: str) -> tuple[ApiKeyInfo, str]:
        return await self.api_keys.add(actor, name, scope)

    async def list_api_keys(self) -> list[ApiKeyInfo]:
        return await self.api_keys.list()

    async def revoke_api_key(self, actor: Actor, key_id: str) -> None:
        await self.api_keys.revoke(actor, key_id)

    async def authenticate_api_key(self, token: str) -> tuple[ApiPrincipal | None, bool]:
        return await self.api_keys.authenticate(token)
