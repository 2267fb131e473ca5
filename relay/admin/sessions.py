"""Server-side admin sessions (table admin_sessions): the cookie carries 32 random bytes, the
database only their SHA-256, so a copy of the database opens no session. Idle and absolute
timeouts are checked at every request; logout, a password change and the sessions page delete
rows, which ends those sessions at their next request."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass

import aiosqlite

from ..store.writer import GroupWriter

COOKIE = "__Host-relay_admin"
# last_seen_at is written at most this often per session: a page reload every second must not
# become a write transaction every second (it shares the writer with SMTP acceptance).
TOUCH_EVERY = 30.0


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    token_hash: str
    username: str
    created_at: float
    last_seen_at: float
    ip: str | None
    user_agent: str | None

    def csrf_token(self, key: bytes) -> str:
        """The hidden form field: bound to this session, useless in another."""
        return hmac.new(key, b"csrf:" + self.token_hash.encode(), hashlib.sha256).hexdigest()


class SessionStore:
    def __init__(self, reader: aiosqlite.Connection, writer: GroupWriter, *, idle_timeout: float,
                 absolute_timeout: float, clock=time.time):
        self._conn = reader
        self._writer = writer
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self._clock = clock

    def configure(self, idle_timeout: float, absolute_timeout: float) -> None:
        self.idle_timeout, self.absolute_timeout = idle_timeout, absolute_timeout

    async def create(self, username: str, ip: str | None, user_agent: str | None) -> str:
        """A fresh token (never one the browser brought: no session fixation)."""
        token = secrets.token_urlsafe(32)
        th, now = token_hash(token), self._clock()
        ua = (user_agent or "")[:200]

        def op(c: sqlite3.Connection) -> None:
            # Expired rows of anyone go here, rather than in a timer of their own.
            c.execute("DELETE FROM admin_sessions WHERE last_seen_at < ? OR created_at < ?",
                      (now - self.idle_timeout, now - self.absolute_timeout))
            c.execute("INSERT INTO admin_sessions (token_hash, username, created_at, last_seen_at, ip, user_agent) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (th, username, now, now, ip, ua))
        await self._writer.write(op)
        return token

    async def lookup(self, token: str | None) -> Session | None:
        """The live session for a cookie value, or None (unknown, expired, or its admin disabled)."""
        if not token or len(token) > 100:
            return None
        th = token_hash(token)
        rows = await self._conn.execute_fetchall(
            "SELECT s.token_hash, s.username, s.created_at, s.last_seen_at, s.ip, s.user_agent "
            "FROM admin_sessions s JOIN admin_users u ON u.username = s.username "
            "WHERE s.token_hash = ? AND u.disabled = 0", (th,))
        if not rows:
            return None
        r = rows[0]
        s = Session(r["token_hash"], r["username"], r["created_at"], r["last_seen_at"], r["ip"], r["user_agent"])
        now = self._clock()
        if now - s.last_seen_at > self.idle_timeout or now - s.created_at > self.absolute_timeout:
            await self.delete_hash(th)
            return None
        if now - s.last_seen_at >= min(TOUCH_EVERY, self.idle_timeout / 4):
            await self._writer.write(lambda c: c.execute(
                "UPDATE admin_sessions SET last_seen_at = ? WHERE token_hash = ?", (now, th)))
        return s

    async def delete_hash(self, th: str, username: str | None = None) -> bool:
        """End one session (by its stored hash); with `username`, only if it is that admin's."""
        def op(c: sqlite3.Connection) -> int:
            if username is None:
                return c.execute("DELETE FROM admin_sessions WHERE token_hash = ?", (th,)).rowcount
            return c.execute("DELETE FROM admin_sessions WHERE token_hash = ? AND username = ?",
                             (th, username)).rowcount
        return bool(await self._writer.write(op))

    async def list(self, username: str | None = None) -> list[Session]:
        now = self._clock()
        sql = ("SELECT token_hash, username, created_at, last_seen_at, ip, user_agent FROM admin_sessions "
               "WHERE last_seen_at >= ? AND created_at >= ?")
        args: list = [now - self.idle_timeout, now - self.absolute_timeout]
        if username is not None:
            sql += " AND username = ?"
            args.append(username)
        rows = await self._conn.execute_fetchall(sql + " ORDER BY created_at DESC LIMIT 200", args)
        return [Session(r["token_hash"], r["username"], r["created_at"], r["last_seen_at"], r["ip"],
                        r["user_agent"]) for r in rows]
