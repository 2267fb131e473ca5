"""The nodes seen (`nodes`): each `relay serve` writes a heartbeat every HEARTBEAT seconds and a
stop time at a clean stop; `relay node list` reads them beside the leases each node holds. One
class for both backends: the SQL is the same but for placeholders, and the writes are single
statements (SQLite through the GroupWriter, PostgreSQL through the pool)."""
from __future__ import annotations

import re
from typing import Any

# Seconds between heartbeats; a node silent for STALE_AFTER is shown as "silent" (killed, frozen
# or cut off from the database: its leases run out by themselves, see the queue store).
HEARTBEAT = 10.0
STALE_AFTER = 3 * HEARTBEAT

_UPSERT = ("INSERT INTO nodes(node_id, incarnation, hostname, pid, version, started_at, heartbeat_at, stopped_at) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, NULL) ON CONFLICT(node_id) DO UPDATE SET incarnation = excluded.incarnation, "
           "hostname = excluded.hostname, pid = excluded.pid, version = excluded.version, "
           "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, stopped_at = NULL")
_STOPPED = "UPDATE nodes SET stopped_at = ?, heartbeat_at = ? WHERE node_id = ? AND incarnation = ?"
# Leases are held by a node's delivery process (owner "node/incarnation"): counted per node.
_LEASES = ("SELECT lease_owner, COUNT(*) AS leased, MAX(next_attempt_at) AS until FROM recipients "
           "WHERE lease_token IS NOT NULL AND state IN ('pending', 'deferred') GROUP BY lease_owner")


def _pg(sql: str) -> str:
    n = iter(range(1, 100))
    return re.sub(r"\?", lambda _m: f"${next(n)}", sql)


class NodeStore:
    def __init__(self, *, conn: Any = None, writer: Any = None, pool: Any = None, timeout: float = 20.0):
        self._conn, self._writer, self._pool, self._timeout = conn, writer, pool, timeout

    async def _write(self, sql: str, *args: Any) -> None:
        if self._pool is not None:
            async with self._pool.acquire(timeout=self._timeout) as c:
                await c.execute(_pg(sql), *args, timeout=self._timeout)
        else:
            await self._writer.write(lambda c: c.execute(sql, args))

    async def _rows(self, sql: str) -> list[dict[str, Any]]:
        if self._pool is not None:
            async with self._pool.acquire(timeout=self._timeout) as c:
                return [dict(r) for r in await c.fetch(sql, timeout=self._timeout)]
        return [dict(r) for r in await self._conn.execute_fetchall(sql)]

    async def beat(self, node_id: str, incarnation: str, hostname: str, pid: int, version: str,
                   started_at: float, now: float) -> None:
        await self._write(_UPSERT, node_id, incarnation, hostname, pid, version, started_at, now)

    async def stopped(self, node_id: str, incarnation: str, now: float) -> None:
        await self._write(_STOPPED, now, now, node_id, incarnation)

    async def list(self, now: float) -> list[dict[str, Any]]:
        """Every node seen, with its state (up / silent / stopped) and the leases it holds; a lease
        owner with no row (a node from before the table, or one never started here) is listed too."""
        nodes = {r["node_id"]: {**r, "leased": 0, "lease_until": None}
                 for r in await self._rows("SELECT node_id, incarnation, hostname, pid, version, started_at, "
                                           "heartbeat_at, stopped_at FROM nodes")}
        for r in await self._rows(_LEASES):
            node = str(r["lease_owner"] or "").split("/", 1)[0]
            n = nodes.setdefault(node, {"node_id": node, "incarnation": None, "hostname": None, "pid": None,
                                        "version": None, "started_at": None, "heartbeat_at": None,
                                        "stopped_at": None, "leased": 0, "lease_until": None})
            n["leased"] += int(r["leased"])
            until = float(r["until"]) if r["until"] is not None else None
            if until is not None and (n["lease_until"] is None or until > n["lease_until"]):
                n["lease_until"] = until
        for n in nodes.values():
            if n["stopped_at"] is not None:
                n["state"] = "stopped"
            elif n["heartbeat_at"] is not None and now - float(n["heartbeat_at"]) <= STALE_AFTER:
                n["state"] = "up"
            else:
                n["state"] = "silent"
        return sorted(nodes.values(), key=lambda n: n["node_id"])
