"""API keys for the HTTP API (`api_keys`): created from the CLI, scoped read or write, revocable.

Only a SHA-256 of the secret is stored (the secret is 256 random bits, so a slow hash adds
nothing). The token a client sends is `rk_<id>_<secret>`: the id finds the row, the hash of the
secret is compared in constant time. Owned here.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from typing import Any, Callable

import aiosqlite

from ..credentials import Also, NotFound, StoreError
from .writer import GroupWriter

SCOPES = ("read", "write")
PREFIX = "rk_"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX):].partition("_")
    if not sep or len(key_id) != 12 or not all(c in "0123456789abcdef" for c in key_id) or not secret:
        return None
    return key_id, secret


class ApiKeyStore:
    def __init__(self, conn: aiosqlite.Connection, writer: GroupWriter, clock: Callable[[], float] = time.time):
        self._conn = conn
        self._writer = writer
        self._clock = clock
        # Any failed lookup still hashes and compares against this, so a bad id costs the same.
        self._dummy = secret_hash(secrets.token_urlsafe(32))

    async def add(self, name: str, scope: str, *, also: Callable[[str], Also] | None = None) -> tuple[dict[str, Any], str]:
        """A new key: (its row, the token, to be shown once). `also(key_id)` -> the audit write."""
        name = " ".join(name.split())
        if not name or len(name) > 100 or not name.isprintable():
            raise StoreError("API key name: 1 to 100 printable characters")
        if scope not in SCOPES:
            raise StoreError(f"API key scope must be read or write, not {scope!r}")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        now = self._clock()
        extra = also(key_id) if also is not None else None

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO api_keys(id, name, key_hash, scope, created_at) VALUES (?, ?, ?, ?, ?)",
                         (key_id, name, secret_hash(secret), scope, now))
            if extra is not None:
                extra(conn)

        await self._writer.write(op)
        row = {"id": key_id, "name": name, "scope": scope, "created_at": now, "last_used_at": None,
               "revoked_at": None}
        return row, f"{PREFIX}{key_id}_{secret}"

    async def list(self) -> list[dict[str, Any]]:
        rows = await self._conn.execute_fetchall(
            "SELECT id, name, scope, created_at, last_used_at, revoked_at FROM api_keys ORDER BY created_at, id")
        return [dict(r) for r in rows]

    async def revoke(self, key_id: str, *, also: Also = None) -> None:
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            rows = conn.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchall()
            if not rows:
                raise NotFound(f"API key {key_id} not found")
            if rows[0][0] is not None:
                raise StoreError(f"API key {key_id} is already revoked", "conflict")
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (now, key_id))
            if also is not None:
                also(conn)

        await self._writer.write(op)

    async def authenticate(self, token: str) -> dict[str, Any] | None:
        """The key's row when the token is one of ours (revoked ones included: the caller tells
        them apart by `revoked_at`), else None. Constant-time comparison of the hashes."""
        parts = split_token(token)
        rows = await self._conn.execute_fetchall(
            "SELECT id, name, key_hash, scope, created_at, last_used_at, revoked_at FROM api_keys WHERE id = ?",
            (parts[0],)) if parts else []
        stored = rows[0]["key_hash"] if rows else self._dummy
        given = secret_hash(parts[1] if parts else token)
        if not hmac.compare_digest(stored, given) or not rows:
            return None
        row = dict(rows[0])
        row.pop("key_hash")
        return row

    async def touch(self, key_id: str, when: float) -> None:
        """Bookkeeping (last_used_at); the caller writes it at most once a minute per key."""
        await self._writer.write(lambda conn: conn.execute(
            "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?", (when, key_id)))
