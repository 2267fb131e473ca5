"""The audit log and the HTTP API keys on PostgreSQL (siblings of store/audit.py and
store/api_keys.py; same rows, same rules).

On this backend a change's extra write (`also=`, the audit row) is an async callable
`op(conn)` run inside the change's transaction: `PgAuditStore.record()` returns one, and every
PostgreSQL store awaits what `also(conn)` returns (`run_also`).
"""
from __future__ import annotations

import hmac
import inspect
import secrets
import time
from typing import Any, Awaitable, Callable

import asyncpg

from ..credentials import NotFound, StoreError
from .api_keys import PREFIX, SCOPES, secret_hash, split_token
from .contract import StoreUnavailable
from .pg_queue import _unavailable

PgOp = Callable[[asyncpg.Connection], Awaitable[None]]


async def run_also(also: Any, conn: asyncpg.Connection) -> None:
    """Run a change's extra write (an audit row) in the change's own transaction."""
    if also is None:
        return
    result = also(conn)
    if inspect.isawaitable(result):
        await result


class _PgBase:
    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float] = time.time, timeout: float = 20.0):
        self._pool = pool
        self._clock = clock
        self._timeout = timeout

    async def _do(self, fn: Callable[[asyncpg.Connection], Awaitable[Any]], *, transaction: bool = True) -> Any:
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


class PgAuditStore(_PgBase):
    def record(self, *, actor: str, via: str, ip: str | None, action: str, target: str | None = None,
               detail: str | None = None) -> PgOp:
        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute("INSERT INTO audit_log(ts, actor, via, ip, action, target, detail) "
                               "VALUES ($1, $2, $3, $4, $5, $6, $7)", self._clock(), actor, via, ip, action, target,
                               detail)
        return op

    async def list(self, before: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT id, ts, actor, via, ip, action, target, detail FROM audit_log "
            "WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2", before, limit)
        return [dict(r) for r in rows]


class PgApiKeyStore(_PgBase):
    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float] = time.time, timeout: float = 20.0):
        super().__init__(pool, clock, timeout)
        self._dummy = secret_hash(secrets.token_urlsafe(32))

    async def add(self, name: str, scope: str, *, also: Callable[[str], Any] | None = None) -> tuple[dict[str, Any], str]:
        name = " ".join(name.split())
        if not name or len(name) > 100 or not name.isprintable():
            raise StoreError("API key name: 1 to 100 printable characters")
        if scope not in SCOPES:
            raise StoreError(f"API key scope must be read or write, not {scope!r}")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = self._clock()
        extra = also(key_id) if also is not None else None

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute("INSERT INTO api_keys(id, name, key_hash, scope, created_at) VALUES ($1, $2, $3, $4, $5)",
                               key_id, name, secret_hash(secret), scope, now)
            await run_also(extra, conn)

        await self._do(op)
        row = {"id": key_id, "name": name, "scope": scope, "created_at": now, "last_used_at": None,
               "revoked_at": None}
        return row, f"{PREFIX}{key_id}_{secret}"

    async def list(self) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT id, name, scope, created_at, last_used_at, revoked_at FROM api_keys ORDER BY created_at, id")
        return [dict(r) for r in rows]

    async def revoke(self, key_id: str, *, also: Any = None) -> None:
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> None:
            rows = await conn.fetch("SELECT revoked_at FROM api_keys WHERE id = $1 FOR UPDATE", key_id)
            if not rows:
                raise NotFound(f"API key {key_id} not found")
            if rows[0]["revoked_at"] is not None:
                raise StoreError(f"API key {key_id} is already revoked", "conflict")
            await conn.execute("UPDATE api_keys SET revoked_at = $1 WHERE id = $2", now, key_id)
            await run_also(also, conn)

        await self._do(op)

    async def authenticate(self, token: str) -> dict[str, Any] | None:
        parts = split_token(token)
        rows = await self._fetch(
            "SELECT id, name, key_hash, scope, created_at, last_used_at, revoked_at FROM api_keys WHERE id = $1",
            parts[0]) if parts else []
        stored = rows[0]["key_hash"] if rows else self._dummy
        given = secret_hash(parts[1] if parts else token)
        if not hmac.compare_digest(stored, given) or not rows:
            return None
        row = dict(rows[0])
        row.pop("key_hash")
        return row

    async def touch(self, key_id: str, when: float) -> None:
        await self._do(lambda conn: conn.execute(
            "UPDATE api_keys SET last_used_at = GREATEST(COALESCE(last_used_at, 0), $1) WHERE id = $2", when, key_id))
