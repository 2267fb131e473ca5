"""DKIM keys on PostgreSQL: `relay.dkim_keys.DKIMStore` with its SQL replaced (selector choice,
key generation in a thread and the DKIMKey shape are inherited). `prepare()` returns an async
write (`op(conn)`) for `store_prepared`, where SQLite's returns a sqlite3 one.

`also=` (an audit row) is an async `op(conn)` run in the same transaction (store/pg_audit.py).
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import asyncpg

from ..credentials import NotFound, StoreError, normalize_domain
from ..dkim_keys import DKIMKey, DKIMStore, _row
from .pg_audit import run_also
from .pg_queue import _unavailable
from .contract import StoreUnavailable

PgOp = Callable[[asyncpg.Connection], Awaitable[None]]


class PgDKIMStore(DKIMStore):
    def __init__(self, pool: asyncpg.Pool, clock=time.time, timeout: float = 20.0):
        self._pool = pool
        self._own_writer = False
        self._clock = clock
        self._timeout = timeout
        self._active_cache: dict[str, tuple[float, DKIMKey | None]] = {}

    async def close(self) -> None:
        pass

    async def _do(self, fn: PgOp) -> Any:
        self._active_cache.clear()  # every change goes through here: this node sees it at once
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
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
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                return await conn.fetch(sql, *args, timeout=self._timeout)
        except BaseException as exc:
            mapped = _unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise

    async def store_prepared(self, op: PgOp, *, also: Any = None) -> None:  # type: ignore[override]
        async def both(conn: asyncpg.Connection) -> None:
            await op(conn)
            await run_also(also, conn)

        await self._do(both)

    async def create(self, domain: str, *, algorithm: str = "rsa", rsa_bits: int = 2048,
                     selector: str = "", also: Any = None) -> DKIMKey:
        return await super().create(domain, algorithm=algorithm, rsa_bits=rsa_bits, selector=selector, also=also)

    async def prepare(self, domain: str, *, algorithm: str = "rsa", rsa_bits: int = 2048,
                      selector: str = "") -> tuple[DKIMKey, PgOp]:  # type: ignore[override]
        key, _sqlite_op = await super().prepare(domain, algorithm=algorithm, rsa_bits=rsa_bits, selector=selector)

        async def op(conn: asyncpg.Connection) -> None:
            if not await conn.fetchval("SELECT 1 FROM domains WHERE name = $1 FOR UPDATE", key.domain):
                raise NotFound(f"domain {key.domain} not found")
            await conn.execute("UPDATE dkim_keys SET active = 0 WHERE domain = $1", key.domain)
            await conn.execute(
                "INSERT INTO dkim_keys(domain, selector, algorithm, private_key, public_key, created_at, active) "
                "VALUES ($1, $2, $3, $4, $5, $6, 1)", key.domain, key.selector, key.algorithm, key.private_key,
                key.public_key, key.created_at)
            # A new key must be published and verified again before mail relies on it.
            await conn.execute("UPDATE domains SET verified_at = NULL WHERE name = $1", key.domain)

        return key, op

    async def keys(self, domain: str) -> list[DKIMKey]:
        rows = await self._fetch("SELECT * FROM dkim_keys WHERE domain = $1 ORDER BY created_at DESC, selector DESC",
                                 normalize_domain(domain))
        return [_row(r) for r in rows]

    # Seconds a domain's active key (or its absence) is kept: the signer asks for every message,
    # and on PostgreSQL that is a round trip. A key made or rotated on another node is used here
    # within this time; a change made through this store applies at once.
    ACTIVE_TTL = 5.0

    async def active(self, domain: str) -> DKIMKey | None:
        cache = self._active_cache
        hit = cache.get(domain)
        now = time.monotonic()
        if hit is not None and now < hit[0]:
            return hit[1]
        rows = await self._fetch("SELECT * FROM dkim_keys WHERE domain = $1 AND active = 1", domain)
        key = _row(rows[0]) if rows else None
        if len(cache) > 10_000:
            cache.clear()
        cache[domain] = (now + self.ACTIVE_TTL, key)
        return key

    async def remove(self, domain: str, selector: str, *, also: Any = None) -> None:
        d = normalize_domain(domain)

        async def op(conn: asyncpg.Connection) -> None:
            active = await conn.fetchval("SELECT active FROM dkim_keys WHERE domain = $1 AND selector = $2 "
                                         "FOR UPDATE", d, selector)
            if active is None:
                raise NotFound(f"no DKIM key {selector} for {d}")
            if active:
                raise StoreError(f"{selector} is the active key of {d}; rotate first: relay domain dkim rotate {d}")
            await conn.execute("DELETE FROM dkim_keys WHERE domain = $1 AND selector = $2", d, selector)
            await run_also(also, conn)

        await self._do(op)

    async def mark_verified(self, domain: str, verified: bool, *, also: Any = None) -> None:
        when, d = (self._clock() if verified else None), normalize_domain(domain)

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute("UPDATE domains SET verified_at = $1 WHERE name = $2", when, d)
            await run_also(also, conn)

        await self._do(op)

    async def verified_at(self, domain: str) -> float | None:
        rows = await self._fetch("SELECT verified_at FROM domains WHERE name = $1", domain)
        return rows[0]["verified_at"] if rows else None

    async def is_verified(self, domain: str) -> bool:
        return bool(await self.verified_at(domain))
