"""The TLS state store on PostgreSQL (sibling of store/tls_state.py: same rows, same rules),
shared by every node: the MTA-STS cache, the downgrade memory and the TLSRPT counts."""
from __future__ import annotations

import json
import time
from typing import Any

import asyncpg

from .pg_audit import _PgBase
from .tls_state import SECURITY_RANK, sts_from_row


def _week_before(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now - 7 * 86400))


class PgTLSStateStore(_PgBase):
    # ------------------------------------------------------------ MTA-STS

    async def get_sts(self, domain: str) -> dict[str, Any] | None:
        rows = await self._fetch("SELECT policy_id, mode, mx_json, max_age, fetched_at FROM mta_sts_policies "
                                 "WHERE domain = $1", domain)
        return sts_from_row(rows[0]) if rows else None

    async def put_sts(self, domain: str, policy: Any, now: float) -> None:
        await self._do(lambda conn: conn.execute(
            "INSERT INTO mta_sts_policies(domain, policy_id, mode, mx_json, max_age, fetched_at, expires_at, "
            "txt_checked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT(domain) DO UPDATE SET "
            "policy_id = excluded.policy_id, mode = excluded.mode, mx_json = excluded.mx_json, "
            "max_age = excluded.max_age, fetched_at = excluded.fetched_at, expires_at = excluded.expires_at, "
            "txt_checked_at = excluded.txt_checked_at",
            domain, policy.id, policy.mode, json.dumps(list(policy.mx)), int(policy.max_age),
            float(policy.fetched_at), float(policy.expires_at), float(now)), transaction=False)

    async def sts_checked(self, domain: str, now: float) -> None:
        await self._do(lambda conn: conn.execute(
            "UPDATE mta_sts_policies SET txt_checked_at = $1 WHERE domain = $2", float(now), domain),
            transaction=False)

    async def list_sts(self) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT domain, policy_id, mode, mx_json, max_age, fetched_at, expires_at, "
                                 "txt_checked_at FROM mta_sts_policies ORDER BY domain")
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ TLSRPT counts (RFC 8460)

    async def add_tlsrpt(self, rows: list[tuple[str, str, str, str, str, str, int]]) -> None:
        if not rows:
            return
        await self._do(lambda conn: conn.executemany(
            "INSERT INTO tlsrpt_counts(day, policy_domain, policy_type, policy_string, mx_host, result, count) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT(day, policy_domain, policy_type, policy_string, "
            "mx_host, result) DO UPDATE SET count = tlsrpt_counts.count + excluded.count", rows))

    async def tlsrpt_rows(self, day: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT day, policy_domain, policy_type, policy_string, mx_host, result, count FROM tlsrpt_counts "
            "WHERE day = $1 ORDER BY policy_domain, policy_type, policy_string, mx_host, result", day)
        return [dict(r) for r in rows]

    async def tlsrpt_sent(self, day: str) -> list[str]:
        rows = await self._fetch("SELECT policy_domain FROM tlsrpt_sent WHERE day = $1", day)
        return [r[0] for r in rows]

    async def mark_tlsrpt_sent(self, day: str, domain: str, now: float) -> None:
        cutoff = _week_before(now)

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute("INSERT INTO tlsrpt_sent(day, policy_domain, sent_at) VALUES ($1, $2, $3) "
                               "ON CONFLICT DO NOTHING", day, domain, float(now))
            # Counts older than a week have been reported (or never will be).
            await conn.execute("DELETE FROM tlsrpt_counts WHERE day < $1", cutoff)
            await conn.execute("DELETE FROM tlsrpt_sent WHERE day < $1", cutoff)
        await self._do(op)

    # ------------------------------------------------------------ downgrade memory

    async def get_security(self, domain: str) -> tuple[str, float] | None:
        rows = await self._fetch("SELECT best, seen_at FROM tls_security WHERE domain = $1", domain)
        return (rows[0][0], float(rows[0][1])) if rows else None

    async def note_security(self, domain: str, seen: str, now: float) -> None:
        """Raise the memory to `seen` when better, refresh it when equal, never lower it: one
        statement, so two nodes noting at once cannot lower what the other raised."""
        rank = SECURITY_RANK[seen]
        await self._do(lambda conn: conn.execute(
            "INSERT INTO tls_security(domain, best, first_at, seen_at) VALUES ($1, $2, $3, $3) "
            "ON CONFLICT(domain) DO UPDATE SET "
            "best = CASE WHEN $4 > (CASE tls_security.best WHEN 'verified' THEN 2 WHEN 'tls' THEN 1 ELSE 0 END) "
            "            THEN excluded.best ELSE tls_security.best END, "
            "first_at = CASE WHEN $4 > (CASE tls_security.best WHEN 'verified' THEN 2 WHEN 'tls' THEN 1 ELSE 0 END) "
            "            THEN excluded.first_at ELSE tls_security.first_at END, "
            "seen_at = CASE WHEN $4 >= (CASE tls_security.best WHEN 'verified' THEN 2 WHEN 'tls' THEN 1 ELSE 0 END) "
            "            THEN excluded.seen_at ELSE tls_security.seen_at END",
            domain, seen, float(now), rank), transaction=False)

    async def reset_security(self, domain: str, seen: str, now: float) -> None:
        await self._do(lambda conn: conn.execute(
            "INSERT INTO tls_security(domain, best, first_at, seen_at) VALUES ($1, $2, $3, $3) "
            "ON CONFLICT(domain) DO UPDATE SET best = excluded.best, first_at = excluded.first_at, "
            "seen_at = excluded.seen_at", domain, seen, float(now)), transaction=False)
