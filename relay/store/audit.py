"""The audit log (`audit_log`): who changed what, when, from where. Owned here.

An audit row is never written on its own: `record()` returns the write, and the operations
layer hands it to the store making the change, which runs it inside the same transaction (and
SAVEPOINT), so a change and its row commit together or not at all.
"""
from __future__ import annotations

import sqlite3
import time
from typing import Any, Callable

import aiosqlite

Op = Callable[[sqlite3.Connection], None]


class AuditStore:
    def __init__(self, conn: aiosqlite.Connection, clock: Callable[[], float] = time.time):
        self._conn = conn  # reads
        self._clock = clock

    def record(self, *, actor: str, via: str, ip: str | None, action: str, target: str | None = None,
               detail: str | None = None) -> Op:
        """The INSERT for one audit row, to run inside the transaction of the change it records."""
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO audit_log(ts, actor, via, ip, action, target, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (self._clock(), actor, via, ip, action, target, detail))
        return op

    async def list(self, before: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first; `before`: an id from the previous page (keyset)."""
        if before is None:
            rows = await self._conn.execute_fetchall(
                "SELECT id, ts, actor, via, ip, action, target, detail FROM audit_log ORDER BY id DESC LIMIT ?",
                (limit,))
        else:
            rows = await self._conn.execute_fetchall(
                "SELECT id, ts, actor, via, ip, action, target, detail FROM audit_log WHERE id < ? "
                "ORDER BY id DESC LIMIT ?", (before, limit))
        return [dict(r) for r in rows]
