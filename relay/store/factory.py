"""The one place that builds the stores from the config: `relay serve`, the delivery process and
the CLI all get theirs here, so they share one writer per process and take the same
cross-process write turn (`db.WriterLock`) on the same file."""
from __future__ import annotations

import secrets
import socket
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import aiosqlite

from .. import db
from ..config import Config, ConfigError
from ..credentials import CredentialStore
from ..dkim_keys import DKIMStore
from .api_keys import ApiKeyStore
from .audit import AuditStore
from .contract import LeaseOwner
from .sqlite_queue import QueueStore
from .tls_state import TLSStateStore
from .writer import GroupWriter


def lease_owner(cfg: Config) -> LeaseOwner:
    """This process's identity in leases: the node (config or host name) and a fresh incarnation."""
    return LeaseOwner(cfg.server.node_id or socket.gethostname(), secrets.token_hex(4))


@dataclass
class Stores:
    writer: GroupWriter
    queue: QueueStore
    credentials: CredentialStore
    dkim: DKIMStore
    lock: db.WriterLock
    audit: AuditStore | None = None        # the operations layer's audit rows (issue 14)
    api_keys: ApiKeyStore | None = None    # HTTP API keys (issue 14)
    tls_state: TLSStateStore | None = None  # MTA-STS cache and downgrade memory (issue 15)
    _conns: list[aiosqlite.Connection] = field(default_factory=list)

    async def close(self) -> None:
        await self.credentials.close()  # LAST LOGIN times still in memory go first
        await self.writer.close()
        # An open aiosqlite connection keeps its thread, and the process, alive.
        for conn in self._conns:
            await conn.close()
        self.lock.close()


async def open_stores(cfg: Config, *, role: str, executor: Executor | None = None,
                      on_enqueue: Callable[[], None] | None = None) -> Stores:
    """role: "serve" (acceptance: synchronous commits, its 250 promises the disk), "delivery"
    (bookkeeping: commits without their own fsync, see below) or "cli"."""
    if cfg.storage.backend != "sqlite":
        # config.load refuses this already; a Config built in code must not reach SQLite instead.
        raise ConfigError("storage.backend", f"{cfg.storage.backend!r}: only the queue store exists on it so far "
                          "(relay.store.pg_queue); relay runs on 'sqlite' (issue 17)")
    # Reads go through aiosqlite; the queue and the credential side get a connection each so a
    # long queue listing never delays an AUTH lookup.
    queue_conn = await db.open_async(cfg.storage.path)
    conns = [queue_conn]
    try:
        cred_conn = await db.open_async(cfg.storage.path) if role == "serve" else queue_conn
        if cred_conn is not queue_conn:
            conns.append(cred_conn)
        lock = db.WriterLock(cfg.storage.path)
        # Delivery bookkeeping commits without its own fsync: what power loss could take back is
        # a settle, and a settle lost means a retry (at worst a duplicate, as SMTP allows), never
        # a lost message. Acceptance and the CLI keep synchronous=FULL.
        writer = GroupWriter(cfg.storage.path, writer_lock=lock, sync_commits=role != "delivery")
        queue = QueueStore(queue_conn, lease_seconds=cfg.delivery.lease_seconds, on_enqueue=on_enqueue,
                           writer=writer, owner=lease_owner(cfg),
                           spool_dir=cfg.storage.resolved_spool_dir())
        creds = CredentialStore(cred_conn, cfg.credentials, executor, writer=writer)
        dkim = DKIMStore(cred_conn, writer=writer)
        audit = AuditStore(cred_conn)
        api_keys = ApiKeyStore(cred_conn, writer)
        tls_state = TLSStateStore(queue_conn, writer)
    except BaseException:
        for conn in conns:
            await conn.close()
        raise
    return Stores(writer, queue, creds, dkim, lock, audit, api_keys, tls_state, conns)
