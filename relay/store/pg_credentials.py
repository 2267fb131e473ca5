"""Sending domains and SMTP credentials on PostgreSQL: `relay.credentials.CredentialStore` with
its SQL replaced, the rules (normalisation, password checks, argon2 off the loop, the
per-domain limit, the verify cache, LAST LOGIN batches) inherited unchanged.

Across nodes: every AUTH reads the stored hash (one indexed read) and the verify cache is keyed
on (stored hash, keyed password digest), so a reset or delete on any node refuses the old
password on every other node at its next AUTH, and `generation()` at each MAIL FROM reaches
sessions already open. The per-domain limit is enforced inside the INSERT after locking the
domain row, so concurrent adds on several nodes cannot exceed it.

`also=` (the operations layer's audit row) is an async `op(conn)` here (store/pg_audit.py),
run inside the change's transaction.
"""
from __future__ import annotations

import time
from concurrent.futures import Executor
from typing import Any

import asyncpg

from ..config import CredentialsConfig
from ..credentials import CredentialStore, NotFound, StoreError, normalize_domain, normalize_username
from .contract import StoreUnavailable
from .pg_audit import run_also
from .pg_queue import _unavailable


class PgCredentialStore(CredentialStore):
    def __init__(self, pool: asyncpg.Pool, cfg: CredentialsConfig, executor: Executor | None = None,
                 clock=time.time, timeout: float = 20.0):
        super().__init__(None, cfg, executor, clock, writer=_NoWriter())  # type: ignore[arg-type]
        self._own_writer = False
        self._pool = pool
        self._timeout = timeout

    async def _do(self, fn, *, transaction: bool = True) -> Any:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                if not transaction:
                    return await fn(conn)
                async with conn.transaction():
                    return await fn(conn)
        except (StoreError, StoreUnavailable):
            raise
        except BaseException as exc:
            mapped = _unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._do(lambda conn: conn.fetch(sql, *args, timeout=self._timeout), transaction=False)

    # ------------------------------------------------------------ domains

    async def add_domain(self, domain: str, *, also: Any = None) -> str:
        d = normalize_domain(domain)
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> None:
            if not await conn.fetchval("INSERT INTO domains(name, created_at) VALUES ($1, $2) "
                                       "ON CONFLICT DO NOTHING RETURNING 1", d, now):
                raise StoreError(f"domain {d} already exists", "conflict")
            await run_also(also, conn)

        await self._do(op)
        return d

    async def list_domains(self) -> list[dict]:
        rows = await self._fetch(
            "SELECT d.name, d.created_at, d.verified_at, COUNT(c.username) AS credentials "
            "FROM domains d LEFT JOIN credentials c ON c.domain = d.name GROUP BY d.name ORDER BY d.name")
        from ..credentials import display_domain
        return [{"domain": r["name"], "display": display_domain(r["name"]), "credentials": r["credentials"],
                 "created_at": r["created_at"], "verified_at": r["verified_at"],
                 "state": "verified" if r["verified_at"] else "unverified"} for r in rows]

    async def domain_exists(self, domain: str) -> bool:
        return bool(await self._fetch("SELECT 1 FROM domains WHERE name = $1", normalize_domain(domain)))

    async def remove_domain(self, domain: str, *, force: bool = False, queued: int = 0, also: Any = None) -> int:
        d = normalize_domain(domain)

        async def op(conn: asyncpg.Connection) -> int:
            if not await conn.fetchval("SELECT 1 FROM domains WHERE name = $1 FOR UPDATE", d):
                raise NotFound(f"domain {d} not found")
            n = await conn.fetchval("SELECT COUNT(*) FROM credentials WHERE domain = $1", d)
            if not force and (n or queued):
                raise StoreError(f"domain {d} still has {n} credential(s) and {queued} queued message(s); "
                                 "use --force to remove it anyway", "conflict")
            await conn.execute("DELETE FROM credentials WHERE domain = $1", d)
            await conn.execute("DELETE FROM dkim_keys WHERE domain = $1", d)
            await conn.execute("DELETE FROM domains WHERE name = $1", d)
            await run_also(also, conn)
            return n

        creds = await self._do(op)
        self._cache.clear()
        return creds

    # ------------------------------------------------------------ credentials

    async def _count(self, domain: str) -> int:
        return (await self._fetch("SELECT COUNT(*) AS n FROM credentials WHERE domain = $1", domain))[0]["n"]

    async def add_user(self, username: str, password: str, *, also: Any = None) -> str:
        user, domain = await self.check_can_add(username)
        self._check_password(user, password)
        hashed = await self._hash(password)
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> str:
            # The domain row's lock makes concurrent adds (any node) take turns, so the count
            # below is the count the INSERT lands on.
            if not await conn.fetchval("SELECT 1 FROM domains WHERE name = $1 FOR UPDATE", domain):
                raise NotFound(f"domain {domain} not found")
            n = await conn.fetchval("SELECT COUNT(*) FROM credentials WHERE domain = $1", domain)
            if n >= self._cfg.per_domain:
                raise self._limit_error(domain, n)
            if not await conn.fetchval(
                    "INSERT INTO credentials(username, domain, hash, created_at, updated_at) "
                    "VALUES ($1, $2, $3, $4, $4) ON CONFLICT DO NOTHING RETURNING 1", user, domain, hashed, now):
                raise StoreError(f"credential {user} already exists; use reset-password", "conflict")
            await run_also(also, conn)
            return user

        return await self._do(op)

    async def list_users(self, domain: str | None = None) -> list[dict]:
        cols = "username, domain, created_at, updated_at, last_login, last_failed_login"
        if domain:
            d = normalize_domain(domain)
            if not await self.domain_exists(d):
                raise NotFound(f"domain {d} not found")
            rows = await self._fetch(f"SELECT {cols} FROM credentials WHERE domain = $1 ORDER BY username", d)
        else:
            rows = await self._fetch(f"SELECT {cols} FROM credentials ORDER BY domain, username")
        return [dict(r) for r in rows]

    async def reset_password(self, username: str, password: str, *, also: Any = None) -> str:
        user, _ = normalize_username(username)
        if await self.lookup(user) is None:
            raise NotFound(f"credential {user} not found")
        self._check_password(user, password)
        hashed = await self._hash(password)
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> None:
            if not await conn.fetchval("UPDATE credentials SET hash = $1, updated_at = $2 WHERE username = $3 "
                                       "RETURNING 1", hashed, now, user):
                raise NotFound(f"credential {user} not found")
            await run_also(also, conn)

        await self._do(op)
        return user

    async def delete_user(self, username: str, *, also: Any = None) -> str:
        user, _ = normalize_username(username)

        async def op(conn: asyncpg.Connection) -> list:
            rows = await conn.fetch("DELETE FROM credentials WHERE username = $1 RETURNING 1", user)
            if rows:
                await run_also(also, conn)
            return rows

        rows = await self._do(op)
        if not rows:
            raise NotFound(f"credential {user} not found")
        self._cache.pop(user, None)
        return user

    async def lookup(self, username: str) -> str | None:
        try:
            user, _ = normalize_username(username)
        except StoreError:
            return None
        rows = await self._fetch("SELECT hash FROM credentials WHERE username = $1", user)
        return rows[0]["hash"] if rows else None

    async def _after_login(self, user: str, stored: str, password: str) -> str:
        if not self._hasher.check_needs_rehash(stored):
            return stored
        try:
            new = await self._hash(password)
            changed = await self._do(lambda conn: conn.fetch(
                "UPDATE credentials SET hash = $1 WHERE username = $2 AND hash = $3 RETURNING 1", new, user, stored))
            self._cache.pop(user, None)
            return new if changed else stored
        except StoreUnavailable:
            return stored

    async def generation(self, username: str) -> str | None:
        rows = await self._fetch(
            "SELECT c.hash FROM credentials c JOIN domains d ON d.name = c.domain WHERE c.username = $1", username)
        return rows[0]["hash"] if rows else None

    async def flush_logins(self, final: bool = False) -> None:
        import asyncio
        if final and self._login_flush is not None and self._login_flush is not asyncio.current_task():
            self._login_flush.cancel()
        batch, self._logins = self._logins, {}
        failed, self._failed_logins = self._failed_logins, {}
        if not batch and not failed:
            return

        async def op(conn: asyncpg.Connection) -> None:
            # GREATEST: a slower batch from another node never moves a login back in time.
            for col, items in (("last_login", batch), ("last_failed_login", failed)):
                if items:
                    await conn.execute(
                        f"UPDATE credentials c SET {col} = GREATEST(COALESCE(c.{col}, 0), u.t) "
                        "FROM unnest($1::text[], $2::float8[]) AS u(name, t) WHERE c.username = u.name",
                        list(items), list(items.values()))

        try:
            await self._do(op)
        except StoreUnavailable:
            pass  # bookkeeping only


class _NoWriter:
    """CredentialStore's SQLite writer slot: nothing on this backend writes through it."""

    async def write(self, op: Any) -> Any:  # pragma: no cover - every writing method is overridden
        raise RuntimeError("PgCredentialStore has no SQLite writer")

    async def close(self) -> None:
        pass
