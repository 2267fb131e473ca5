"""The store backends the contract tests run against (fixture `store_backend`, tests/conftest.py):
SQLite always, PostgreSQL when it is installed. Each gives fresh stores on one fresh database
and a backend-neutral `rows(sql, *args)` for looking at the tables (SQL written with `?`
placeholders; the PostgreSQL side rewrites them to $1, $2, ...)."""
from __future__ import annotations

import re
from typing import Any


class SQLiteBackend:
    name = "sqlite"

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "queue.db")
        self._conns: list[Any] = []
        self._stores: list[Any] = []

    async def start(self) -> "SQLiteBackend":
        from relay import db
        self.conn = await db.open_async(self.path)
        self._conns.append(self.conn)
        return self

    async def store(self, *, fresh_connection: bool = False, **kw: Any):
        from relay import db
        from relay.store.sqlite_queue import QueueStore
        conn = self.conn
        if fresh_connection:  # as after a restart
            conn = await db.open_async(self.path)
            self._conns.append(conn)
        s = QueueStore(conn, **kw)
        self._stores.append(s)
        return s

    async def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.conn.execute_fetchall(sql, args)]

    async def audit(self, **kw: Any):
        from relay.store.audit import AuditStore
        return AuditStore(self.conn, **kw)

    async def api_keys(self, **kw: Any):
        from relay.store.api_keys import ApiKeyStore
        from relay.store.writer import GroupWriter
        writer = GroupWriter(reader=self.conn)
        self._stores.append(writer)
        return ApiKeyStore(self.conn, writer, **kw)

    async def admin(self, cfg, *, idle_timeout: float, absolute_timeout: float, clock):
        """(admin accounts, sessions) of one node; each call another node with its own connection."""
        from relay import db
        from relay.admin.accounts import AdminAccounts
        from relay.admin.sessions import SessionStore
        from relay.store.writer import GroupWriter
        conn = await db.open_async(self.path)
        self._conns.append(conn)
        writer = GroupWriter(reader=conn)
        self._stores.append(writer)
        return (AdminAccounts(conn, writer, cfg, clock=clock),
                SessionStore(conn, writer, idle_timeout=idle_timeout, absolute_timeout=absolute_timeout, clock=clock))

    async def tls_state(self):
        from relay.store.tls_state import TLSStateStore
        from relay.store.writer import GroupWriter
        writer = GroupWriter(reader=self.conn)
        self._stores.append(writer)
        return TLSStateStore(self.conn, writer)

    async def dkim(self, **kw: Any):
        from relay.dkim_keys import DKIMStore
        s = DKIMStore(self.conn, **kw)
        self._stores.append(s)
        return s

    async def credentials(self, cfg, *, fresh_connection: bool = False, **kw: Any):
        """A credential store (a node of its own with fresh_connection: own connection, own cache)."""
        from relay import db
        from relay.credentials import CredentialStore
        conn = self.conn
        if fresh_connection:
            conn = await db.open_async(self.path)
            self._conns.append(conn)
        s = CredentialStore(conn, cfg, **kw)
        self._stores.append(s)
        return s

    # Shared state between nodes (relay/store/shared_auth.py, slots.py, singleton.py): on SQLite
    # there is one node, so each "node" is the in-process equivalent.
    async def auth_budgets(self):
        return None  # AuthThrottle(shared=None): the in-memory budgets are exact on one node

    async def slots(self, **kw: Any):
        from relay.store.slots import LocalSlots
        return LocalSlots()

    async def job_locks(self, **kw: Any):
        from relay.store.singleton import LocalJobLocks
        return LocalJobLocks(**kw)

    async def close(self) -> None:
        for s in self._stores:
            await s.close()
        for c in self._conns:
            await c.close()


class PostgresBackend:
    name = "postgres"

    def __init__(self, server):
        self.server = server
        self._pools: list[Any] = []
        self._stores: list[Any] = []

    async def start(self) -> "PostgresBackend":
        from relay.store.pg_queue import create_pool
        self.dsn = await self.server.new_database()
        self.pool = await create_pool(self.dsn, size=8, command_timeout=20)
        self._pools.append(self.pool)
        return self

    async def store(self, *, fresh_connection: bool = False, **kw: Any):
        from relay.store.pg_queue import PgQueueStore, create_pool
        pool = self.pool
        if fresh_connection:
            pool = await create_pool(self.dsn, size=4, command_timeout=20)
            self._pools.append(pool)
        return PgQueueStore(pool, **kw)

    async def credentials(self, cfg, *, fresh_connection: bool = False, **kw: Any):
        from relay.store.pg_credentials import PgCredentialStore
        from relay.store.pg_queue import create_pool
        pool = self.pool
        if fresh_connection:
            pool = await create_pool(self.dsn, size=4, command_timeout=20)
            self._pools.append(pool)
        s = PgCredentialStore(pool, cfg, **kw)
        self._stores.append(s)
        return s

    async def audit(self, **kw: Any):
        from relay.store.pg_audit import PgAuditStore
        return PgAuditStore(self.pool, **kw)

    async def api_keys(self, **kw: Any):
        from relay.store.pg_audit import PgApiKeyStore
        return PgApiKeyStore(self.pool, **kw)

    async def admin(self, cfg, *, idle_timeout: float, absolute_timeout: float, clock):
        from relay.store.pg_admin import PgAdminAccounts, PgSessionStore
        from relay.store.pg_queue import create_pool
        pool = await create_pool(self.dsn, size=2, command_timeout=20)
        self._pools.append(pool)
        return (PgAdminAccounts(pool, cfg, clock=clock),
                PgSessionStore(pool, idle_timeout=idle_timeout, absolute_timeout=absolute_timeout, clock=clock))

    async def tls_state(self):
        from relay.store.pg_tls_state import PgTLSStateStore
        return PgTLSStateStore(self.pool)

    async def dkim(self, **kw: Any):
        from relay.store.pg_dkim import PgDKIMStore
        return PgDKIMStore(self.pool, **kw)

    async def _node_pool(self, size: int = 2):
        from relay.store.pg_queue import create_pool
        pool = await create_pool(self.dsn, size=size, command_timeout=20)
        self._pools.append(pool)
        return pool

    async def auth_budgets(self, **kw: Any):
        """One node's shared AUTH budgets (its own pool)."""
        from relay.store.shared_auth import PgAuthBudgets
        s = PgAuthBudgets(await self._node_pool(), **kw)
        self._stores.append(s)
        return s

    async def slots(self, **kw: Any):
        from relay.store.slots import PgSlots
        s = PgSlots(await self._node_pool(), **kw)
        self._stores.append(s)
        return s

    async def job_locks(self, **kw: Any):
        from relay.store.singleton import PgJobLocks
        return PgJobLocks(await self._node_pool(), **kw)

    async def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        n = iter(range(1, 1000))
        sql = re.sub(r"\?", lambda _m: f"${next(n)}", sql)
        async with self.pool.acquire() as conn:
            out = [dict(r) for r in await conn.fetch(sql, *args)]
        for r in out:
            r.pop("seq", None)       # history's row order column (SQLite: rowid)
            r.pop("accepted_by", None)
        return out

    async def close(self) -> None:
        for s in self._stores:
            await s.close()
        for p in self._pools:
            await p.close()
