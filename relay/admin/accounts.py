"""Admin accounts (table admin_users): created, listed, removed and re-passworded from the CLI
only; verified at the web login with argon2id in the thread pool, one verification per attempt
(a dummy hash for unknown names, so the answer's timing says nothing about who exists)."""
from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import aiosqlite
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..config import CredentialsConfig
from ..store.writer import GroupWriter

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class AccountError(Exception):
    """A refusal to show as is (unknown name, already exists, bad name)."""


@dataclass(frozen=True)
class AdminUser:
    username: str
    created_at: float
    last_login_at: float | None
    disabled: bool


def name_problem(name: str) -> str | None:
    if not NAME_RE.fullmatch(name):
        return "admin name: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
    return None


class AdminAccounts:
    def __init__(self, reader: aiosqlite.Connection, writer: GroupWriter, cfg: CredentialsConfig,
                 executor: Executor | None = None, clock=time.time):
        self._conn = reader
        self._writer = writer
        self._executor = executor
        self._clock = clock
        self._hasher = PasswordHasher(time_cost=cfg.argon2_time_cost, memory_cost=cfg.argon2_memory_cost,
                                      parallelism=cfg.argon2_parallelism)
        self._dummy: str | None = None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def count(self) -> int:
        rows = await self._conn.execute_fetchall("SELECT COUNT(*) AS n FROM admin_users WHERE disabled = 0")
        return rows[0]["n"]

    async def list(self) -> list[AdminUser]:
        rows = await self._conn.execute_fetchall(
            "SELECT username, created_at, last_login_at, disabled FROM admin_users ORDER BY username")
        return [AdminUser(r["username"], r["created_at"], r["last_login_at"], bool(r["disabled"])) for r in rows]

    async def add(self, name: str, password: str) -> None:
        problem = name_problem(name)
        if problem:
            raise AccountError(problem)
        hashed = await self._run(self._hasher.hash, password)
        now = self._clock()

        def op(c: sqlite3.Connection) -> None:
            if c.execute("SELECT 1 FROM admin_users WHERE username = ?", (name,)).fetchone():
                raise ValueError(f"admin {name} already exists")
            c.execute("INSERT INTO admin_users (username, hash, created_at) VALUES (?, ?, ?)", (name, hashed, now))
        try:
            await self._writer.write(op)
        except ValueError as exc:
            raise AccountError(str(exc)) from None

    async def remove(self, name: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM admin_sessions WHERE username = ?", (name,))
            if c.execute("DELETE FROM admin_users WHERE username = ?", (name,)).rowcount == 0:
                raise KeyError(name)
        try:
            await self._writer.write(op)
        except KeyError:
            raise AccountError(f"no admin named {name}") from None

    async def set_password(self, name: str, password: str, keep_session: str | None = None) -> int:
        """New hash; every session of that admin ends (but `keep_session`, a token hash: the
        browser that changed it). Returns how many sessions were revoked."""
        hashed = await self._run(self._hasher.hash, password)

        def op(c: sqlite3.Connection) -> int:
            if c.execute("UPDATE admin_users SET hash = ? WHERE username = ?", (hashed, name)).rowcount == 0:
                raise KeyError(name)
            return c.execute("DELETE FROM admin_sessions WHERE username = ? AND token_hash IS NOT ?",
                             (name, keep_session)).rowcount
        try:
            return await self._writer.write(op)
        except KeyError:
            raise AccountError(f"no admin named {name}") from None

    async def verify(self, name: str, password: str) -> bool:
        rows = await self._conn.execute_fetchall(
            "SELECT hash, disabled FROM admin_users WHERE username = ?", (name,))
        stored = rows[0]["hash"] if rows and not rows[0]["disabled"] else None
        if stored is None and self._dummy is None:
            self._dummy = await self._run(self._hasher.hash, "no such admin: dummy password")
        ok = await self._run(self._verify_blocking, stored or self._dummy, password)
        return ok and stored is not None

    def _verify_blocking(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    async def record_login(self, name: str) -> None:
        now = self._clock()
        await self._writer.write(lambda c: c.execute(
            "UPDATE admin_users SET last_login_at = ? WHERE username = ?", (now, name)))
