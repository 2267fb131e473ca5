"""The one place that builds the stores from the config: `relay serve`, the delivery process and
the CLI all get theirs here, so they share one writer per process and take the same
cross-process write turn (`db.WriterLock`) on the same file."""
from __future__ import annotations

import os
import secrets
import socket
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable

import aiosqlite

from .. import db
from ..config import Config, ConfigError
from ..credentials import CredentialStore
from ..dkim_keys import DKIMStore
from .contract import LeaseOwner
from .api_keys import ApiKeyStore
from .nodes import NodeStore
from .audit import AuditStore
from .sqlite_queue import QueueStore
from .tls_state import TLSStateStore
from .writer import GroupWriter


def lease_owner(cfg: Config) -> LeaseOwner:
    """This process's identity in leases: the node (config or host name) and a fresh incarnation."""
    return LeaseOwner(cfg.server.node_id or socket.gethostname(), secrets.token_hex(4))


def storage_identity(cfg: Config) -> str:
    """What the stores of this config are, as said at start and checked between `relay serve` and
    its delivery process: the SQLite file's real path, or the PostgreSQL DSN (it holds no
    password: config.load refuses one)."""
    if cfg.storage.backend == "postgres":
        return f"postgres {cfg.storage.dsn}"
    return os.path.realpath(cfg.storage.path)


@dataclass
class Stores:
    writer: GroupWriter | None          # SQLite only: PostgreSQL stores write through their pool
    queue: Any
    credentials: CredentialStore
    dkim: DKIMStore
    lock: db.WriterLock | None          # SQLite only: the cross-process write turn
    audit: Any = None                   # the operations layer's audit rows (issue 14)
    api_keys: Any = None                # HTTP API keys (issue 14)
    tls_state: Any = None               # MTA-STS cache and downgrade memory (issue 15)
    _conns: list[aiosqlite.Connection] = field(default_factory=list)
    pool: Any = None                    # PostgreSQL: the asyncpg pool every store here shares
    cfg: Config | None = None
    nodes: NodeStore | None = None      # the nodes seen and their heartbeats (issue 17)
    _pools: list[Any] = field(default_factory=list)  # PostgreSQL: other pools of this process

    @property
    def shared(self) -> bool:
        """True when other nodes may share these rows (PostgreSQL)."""
        return self.pool is not None

    async def admin_stores(self, executor: Executor | None = None) -> tuple[Any, Any, Callable[[], Any]]:
        """(admin accounts, admin sessions, close) for the web admin and `relay admin`: on SQLite
        over a reading connection of their own, on PostgreSQL over the shared pool."""
        assert self.cfg is not None
        a, creds = self.cfg.admin, self.cfg.credentials
        if self.pool is not None:
            from .pg_admin import PgAdminAccounts, PgSessionStore
            t = self.cfg.storage.commit_timeout

            async def nothing() -> None:
                return None
            return (PgAdminAccounts(self.pool, creds, executor, timeout=t),
                    PgSessionStore(self.pool, idle_timeout=a.session_idle_timeout,
                                   absolute_timeout=a.session_absolute_timeout, timeout=t), nothing)
        from ..admin.accounts import AdminAccounts
        from ..admin.sessions import SessionStore
        conn = await db.open_async(self.cfg.storage.path)
        assert self.writer is not None
        return (AdminAccounts(conn, self.writer, creds, executor),
                SessionStore(conn, self.writer, idle_timeout=a.session_idle_timeout,
                             absolute_timeout=a.session_absolute_timeout), conn.close)

    async def close(self) -> None:
        await self.credentials.close()  # LAST LOGIN times still in memory go first
        if self.writer is not None:
            await self.writer.close()
        # An open aiosqlite connection keeps its thread, and the process, alive.
        for conn in self._conns:
            await conn.close()
        if self.lock is not None:
            self.lock.close()
        if self.pool is not None:
            await self.pool.close()
        for pool in self._pools:
            await pool.close()


async def open_stores(cfg: Config, *, role: str, executor: Executor | None = None,
                      on_enqueue: Callable[[], None] | None = None) -> Stores:
    """role: "serve" (acceptance: synchronous commits, its 250 promises the disk), "delivery"
    (bookkeeping: commits without their own fsync, see below) or "cli"."""
    if cfg.storage.backend == "postgres":
        return await _open_postgres(cfg, role=role, executor=executor, on_enqueue=on_enqueue)
    if cfg.storage.backend != "sqlite":
        raise ConfigError("storage.backend", f"{cfg.storage.backend!r}: must be 'sqlite' or 'postgres'")
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
    return Stores(writer, queue, creds, dkim, lock, audit, api_keys, tls_state, conns, cfg=cfg,
                  nodes=NodeStore(conn=queue_conn, writer=writer))


# Connections per role: acceptance holds one per concurrent commit and AUTH lookup; delivery one
# per worker's claim/renew/settle; a CLI command needs two at most.
def _pool_size(cfg: Config, role: str) -> int:
    return 2 if role == "cli" else cfg.storage.pool_size


async def _open_postgres(cfg: Config, *, role: str, executor: Executor | None,
                         on_enqueue: Callable[[], None] | None) -> Stores:
    from .contract import StoreUnavailable
    from .pg_audit import PgApiKeyStore, PgAuditStore
    from .pg_credentials import PgCredentialStore
    from .pg_dkim import PgDKIMStore
    from .pg_queue import PgQueueStore, create_pool
    from .pg_schema import SchemaTooNew
    from .pg_tls_state import PgTLSStateStore
    st = cfg.storage
    try:
        pool = await create_pool(st.dsn, password=st.resolved_password(), size=_pool_size(cfg, role),
                                 command_timeout=st.commit_timeout)
    except StoreUnavailable as exc:
        # One line naming where it tried (the DSN has no password in it) and why.
        raise db.DatabaseError(f"cannot open the PostgreSQL database {st.dsn} (storage.dsn): {exc}") from None
    except SchemaTooNew as exc:
        raise db.DatabaseError(str(exc)) from None
    t = st.commit_timeout
    relaxed = None
    if role == "delivery":
        # Lease extensions and stored signatures without waiting for the WAL flush (pg_queue).
        relaxed = await create_pool(st.dsn, password=st.resolved_password(), size=4, command_timeout=t,
                                    server_settings={"synchronous_commit": "off"})
    queue = PgQueueStore(pool, lease_seconds=cfg.delivery.lease_seconds, on_enqueue=on_enqueue,
                         owner=lease_owner(cfg), spool_dir=st.resolved_spool_dir(), commit_timeout=t,
                         relaxed_pool=relaxed)
    return Stores(None, queue, PgCredentialStore(pool, cfg.credentials, executor, timeout=t),
                  PgDKIMStore(pool, timeout=t), None, PgAuditStore(pool, timeout=t),
                  PgApiKeyStore(pool, timeout=t), PgTLSStateStore(pool, timeout=t), [], pool=pool, cfg=cfg,
                  nodes=NodeStore(pool=pool, timeout=t), _pools=[relaxed] if relaxed else [])
