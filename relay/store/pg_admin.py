"""Web admin accounts and sessions on PostgreSQL: `admin.accounts.AdminAccounts` and
`admin.sessions.SessionStore` with their SQL replaced (name rules, argon2 with a dummy hash for
unknown names, token hashing, idle and absolute timeouts are inherited). A session lives in the
shared database, so a browser's login works on whichever node HAProxy sends the next request to,
and a logout or password change on one node ends the session on all of them."""
from __future__ import annotations

import secrets
import time
from concurrent.futures import Executor

import asyncpg

from ..admin.accounts import AccountError, AdminAccounts, AdminUser, name_problem
from ..admin.sessions import TOUCH_EVERY, Session, SessionStore, token_hash
from ..config import CredentialsConfig
from .pg_audit import _PgBase


class PgAdminAccounts(AdminAccounts):
    def __init__(self, pool: asyncpg.Pool, cfg: CredentialsConfig, executor: Executor | None = None,
                 clock=time.time, timeout: float = 20.0):
        super().__init__(None, None, cfg, executor, clock)  # type: ignore[arg-type]
        self._db = _PgBase(pool, clock, timeout)

    async def count(self) -> int:
        return (await self._db._fetch("SELECT COUNT(*) AS n FROM admin_users WHERE disabled = 0"))[0]["n"]

    async def list(self) -> list[AdminUser]:
        rows = await self._db._fetch(
            "SELECT username, created_at, last_login_at, disabled FROM admin_users ORDER BY username")
        return [AdminUser(r["username"], r["created_at"], r["last_login_at"], bool(r["disabled"])) for r in rows]

    async def add(self, name: str, password: str) -> None:
        problem = name_problem(name)
        if problem:
            raise AccountError(problem)
        hashed = await self._run(self._hasher.hash, password)
        now = self._clock()
        added = await self._db._do(lambda c: c.fetchval(
            "INSERT INTO admin_users (username, hash, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING "
            "RETURNING 1", name, hashed, now))
        if not added:
            raise AccountError(f"admin {name} already exists")

    async def remove(self, name: str) -> None:
        # Sessions go with the account (ON DELETE CASCADE).
        if not await self._db._do(lambda c: c.fetchval("DELETE FROM admin_users WHERE username = $1 RETURNING 1",
                                                       name)):
            raise AccountError(f"no admin named {name}")

    async def set_password(self, name: str, password: str, keep_session: str | None = None) -> int:
        hashed = await self._run(self._hasher.hash, password)

        async def op(c: asyncpg.Connection) -> int:
            if not await c.fetchval("UPDATE admin_users SET hash = $1 WHERE username = $2 RETURNING 1", hashed, name):
                raise AccountError(f"no admin named {name}")
            rows = await c.fetch("DELETE FROM admin_sessions WHERE username = $1 AND token_hash IS DISTINCT FROM $2 "
                                 "RETURNING 1", name, keep_session)
            return len(rows)

        return await self._db._do(op)

    async def verify(self, name: str, password: str) -> bool:
        rows = await self._db._fetch("SELECT hash, disabled FROM admin_users WHERE username = $1", name)
        stored = rows[0]["hash"] if rows and not rows[0]["disabled"] else None
        if stored is None and self._dummy is None:
            self._dummy = await self._run(self._hasher.hash, "no such admin: dummy password")
        ok = await self._run(self._verify_blocking, stored or self._dummy, password)
        return ok and stored is not None

    async def record_login(self, name: str) -> None:
        now = self._clock()
        await self._db._do(lambda c: c.execute("UPDATE admin_users SET last_login_at = $1 WHERE username = $2",
                                               now, name))


class PgSessionStore(SessionStore):
    def __init__(self, pool: asyncpg.Pool, *, idle_timeout: float, absolute_timeout: float, clock=time.time,
                 timeout: float = 20.0):
        super().__init__(None, None, idle_timeout=idle_timeout, absolute_timeout=absolute_timeout,  # type: ignore[arg-type]
                         clock=clock)
        self._db = _PgBase(pool, clock, timeout)

    async def create(self, username: str, ip: str | None, user_agent: str | None) -> str:
        token = secrets.token_urlsafe(32)
        th, now = token_hash(token), self._clock()
        ua = (user_agent or "")[:200]

        async def op(c: asyncpg.Connection) -> None:
            await c.execute("DELETE FROM admin_sessions WHERE last_seen_at < $1 OR created_at < $2",
                            now - self.idle_timeout, now - self.absolute_timeout)
            await c.execute("INSERT INTO admin_sessions (token_hash, username, created_at, last_seen_at, ip, "
                            "user_agent) VALUES ($1, $2, $3, $3, $4, $5)", th, username, now, ip, ua)

        await self._db._do(op)
        return token

    async def lookup(self, token: str | None) -> Session | None:
        if not token or len(token) > 100:
            return None
        th = token_hash(token)
        rows = await self._db._fetch(
            "SELECT s.token_hash, s.username, s.created_at, s.last_seen_at, s.ip, s.user_agent "
            "FROM admin_sessions s JOIN admin_users u ON u.username = s.username "
            "WHERE s.token_hash = $1 AND u.disabled = 0", th)
        if not rows:
            return None
        r = rows[0]
        s = Session(r["token_hash"], r["username"], r["created_at"], r["last_seen_at"], r["ip"], r["user_agent"])
        now = self._clock()
        if now - s.last_seen_at > self.idle_timeout or now - s.created_at > self.absolute_timeout:
            await self.delete_hash(th)
            return None
        if now - s.last_seen_at >= min(TOUCH_EVERY, self.idle_timeout / 4):
            await self._db._do(lambda c: c.execute(
                "UPDATE admin_sessions SET last_seen_at = $1 WHERE token_hash = $2", now, th))
        return s

    async def delete_hash(self, th: str, username: str | None = None) -> bool:
        rows = await self._db._do(lambda c: c.fetch(
            "DELETE FROM admin_sessions WHERE token_hash = $1 AND ($2::text IS NULL OR username = $2) RETURNING 1",
            th, username))
        return bool(rows)

    async def list(self, username: str | None = None) -> list[Session]:
        now = self._clock()
        rows = await self._db._fetch(
            "SELECT token_hash, username, created_at, last_seen_at, ip, user_agent FROM admin_sessions "
            "WHERE last_seen_at >= $1 AND created_at >= $2 AND ($3::text IS NULL OR username = $3) "
            "ORDER BY created_at DESC LIMIT 200", now - self.idle_timeout, now - self.absolute_timeout, username)
        return [Session(r["token_hash"], r["username"], r["created_at"], r["last_seen_at"], r["ip"],
                        r["user_agent"]) for r in rows]
