"""Outbound TLS state (issue 15): cached MTA-STS policies (`mta_sts_policies`) and the best TLS
seen per destination domain (`tls_security`, the downgrade memory). Owned here; every write
goes through the GroupWriter. Reads are one indexed row; the policy object keeps its own
in-memory copy, so the store is asked at most once per domain per TXT re-check.
"""
from __future__ import annotations

import json
import sqlite3
from typing import Any

import aiosqlite

from .writer import GroupWriter

SECURITY_RANK = {"plain": 0, "tls": 1, "verified": 2}


def sts_from_row(r: Any) -> dict[str, Any] | None:
    """A cached policy row (policy_id, mode, mx_json, max_age, fetched_at), on either backend, as
    the policy object reads it; None when the stored mx list does not parse."""
    try:
        mx = [str(x) for x in json.loads(r[2])]
    except (ValueError, TypeError):
        return None
    return {"id": r[0], "mode": r[1], "mx": mx, "max_age": int(r[3]), "fetched_at": float(r[4])}


class TLSStateStore:
    def __init__(self, conn: aiosqlite.Connection, writer: GroupWriter):
        self._conn = conn
        self._writer = writer

    # ------------------------------------------------------------ MTA-STS

    async def get_sts(self, domain: str) -> dict[str, Any] | None:
        """The cached policy as stored: id, mode, mx (list), max_age, fetched_at; or None."""
        rows = await self._conn.execute_fetchall(
            "SELECT policy_id, mode, mx_json, max_age, fetched_at FROM mta_sts_policies WHERE domain = ?", (domain,))
        return sts_from_row(rows[0]) if rows else None

    async def put_sts(self, domain: str, policy: Any, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO mta_sts_policies(domain, policy_id, mode, mx_json, max_age, fetched_at, expires_at, "
                "txt_checked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(domain) DO UPDATE SET "
                "policy_id = excluded.policy_id, mode = excluded.mode, mx_json = excluded.mx_json, "
                "max_age = excluded.max_age, fetched_at = excluded.fetched_at, expires_at = excluded.expires_at, "
                "txt_checked_at = excluded.txt_checked_at",
                (domain, policy.id, policy.mode, json.dumps(list(policy.mx)), policy.max_age, policy.fetched_at,
                 policy.expires_at, now))
        await self._writer.write(op)

    async def sts_checked(self, domain: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE mta_sts_policies SET txt_checked_at = ? WHERE domain = ?", (now, domain))
        await self._writer.write(op)

    async def list_sts(self) -> list[dict[str, Any]]:
        rows = await self._conn.execute_fetchall(
            "SELECT domain, policy_id, mode, mx_json, max_age, fetched_at, expires_at, txt_checked_at "
            "FROM mta_sts_policies ORDER BY domain")
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ TLSRPT counts (RFC 8460)

    async def add_tlsrpt(self, rows: list[tuple[str, str, str, str, str, str, int]]) -> None:
        """Add (day, policy_domain, policy_type, policy_string, mx_host, result, count) rows."""
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO tlsrpt_counts(day, policy_domain, policy_type, policy_string, mx_host, result, count) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(day, policy_domain, policy_type, policy_string, mx_host, "
                "result) DO UPDATE SET count = count + excluded.count", rows)
        await self._writer.write(op)

    async def tlsrpt_rows(self, day: str) -> list[dict[str, Any]]:
        rows = await self._conn.execute_fetchall(
            "SELECT day, policy_domain, policy_type, policy_string, mx_host, result, count FROM tlsrpt_counts "
            "WHERE day = ? ORDER BY policy_domain, policy_type, policy_string, mx_host, result", (day,))
        return [dict(r) for r in rows]

    async def tlsrpt_sent(self, day: str) -> list[str]:
        rows = await self._conn.execute_fetchall("SELECT policy_domain FROM tlsrpt_sent WHERE day = ?", (day,))
        return [r[0] for r in rows]

    async def mark_tlsrpt_sent(self, day: str, domain: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO tlsrpt_sent(day, policy_domain, sent_at) VALUES (?, ?, ?)",
                         (day, domain, now))
            # Counts older than a week have been reported (or never will be).
            conn.execute("DELETE FROM tlsrpt_counts WHERE day < date(?, 'unixepoch', '-7 days')", (now,))
            conn.execute("DELETE FROM tlsrpt_sent WHERE day < date(?, 'unixepoch', '-7 days')", (now,))
        await self._writer.write(op)

    # ------------------------------------------------------------ downgrade memory

    async def get_security(self, domain: str) -> tuple[str, float] | None:
        """(best security seen, when it was last seen) or None."""
        rows = await self._conn.execute_fetchall("SELECT best, seen_at FROM tls_security WHERE domain = ?", (domain,))
        return (rows[0][0], float(rows[0][1])) if rows else None

    async def note_security(self, domain: str, seen: str, now: float) -> None:
        """Raise the memory to `seen` when better; refresh seen_at when equal; never lower it
        (only an expired memory is replaced, by the policy object's decision)."""
        rank = SECURITY_RANK[seen]

        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT best FROM tls_security WHERE domain = ?", (domain,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO tls_security(domain, best, first_at, seen_at) VALUES (?, ?, ?, ?)",
                             (domain, seen, now, now))
            elif SECURITY_RANK.get(row[0], 0) < rank:
                conn.execute("UPDATE tls_security SET best = ?, first_at = ?, seen_at = ? WHERE domain = ?",
                             (seen, now, now, domain))
            elif SECURITY_RANK.get(row[0], 0) == rank:
                conn.execute("UPDATE tls_security SET seen_at = ? WHERE domain = ?", (now, domain))
        await self._writer.write(op)

    async def reset_security(self, domain: str, seen: str, now: float) -> None:
        """Replace an expired memory by what is seen now."""
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO tls_security(domain, best, first_at, seen_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(domain) DO UPDATE SET best = excluded.best, first_at = excluded.first_at, "
                         "seen_at = excluded.seen_at", (domain, seen, now, now))
        await self._writer.write(op)
