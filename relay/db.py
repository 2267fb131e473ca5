"""The SQLite database: open it safely (WAL, synchronous=FULL), and migrate the schema forward.

One file holds credentials and the queue. Migrations are applied in order at open time and
recorded in `PRAGMA user_version`, so an old database is upgraded by simply starting.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import aiosqlite

MIGRATIONS: list[str] = [
    # 1: domains, credentials, queue
    """
    CREATE TABLE domains (
        name        TEXT PRIMARY KEY,          -- ASCII (IDNA) form, lower case
        created_at  REAL NOT NULL,
        verified_at REAL
    );
    CREATE TABLE credentials (
        username    TEXT PRIMARY KEY,          -- lower-cased full address, domain in ASCII form
        domain      TEXT NOT NULL REFERENCES domains(name),
        hash        TEXT NOT NULL,             -- argon2id encoded hash
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        last_login  REAL
    );
    CREATE INDEX credentials_domain ON credentials(domain);
    CREATE TABLE messages (
        id          TEXT PRIMARY KEY,
        sender      TEXT NOT NULL,             -- '' for the null sender (bounces)
        created_at  REAL NOT NULL,
        size        INTEGER NOT NULL,
        auth_user   TEXT,
        client_ip   TEXT,
        ret         TEXT,                      -- RFC 3461 RET=FULL|HDRS
        envid       TEXT,                      -- RFC 3461 ENVID (xtext-decoded)
        smtputf8    INTEGER NOT NULL DEFAULT 0,
        warned      INTEGER NOT NULL DEFAULT 0 -- delay warning sent
    );
    CREATE TABLE bodies (
        id          TEXT PRIMARY KEY REFERENCES messages(id),
        data        BLOB NOT NULL
    );
    CREATE TABLE recipients (
        id              INTEGER PRIMARY KEY,
        msg_id          TEXT NOT NULL REFERENCES messages(id),
        rcpt            TEXT NOT NULL,
        route           TEXT NOT NULL,         -- destination domain, or 'smarthost'
        state           TEXT NOT NULL,         -- pending | deferred | delivered | failed
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,         -- due time; while leased, the lease expiry
        lease_token     TEXT,
        last_error      TEXT,
        remote_mta      TEXT,
        notify          TEXT,                  -- RFC 3461 NOTIFY list, e.g. 'FAILURE,DELAY'
        orcpt           TEXT,
        updated_at      REAL NOT NULL
    );
    CREATE INDEX recipients_msg ON recipients(msg_id);
    CREATE INDEX recipients_due ON recipients(next_attempt_at) WHERE state IN ('pending', 'deferred');
    CREATE TABLE history (
        msg_id  TEXT NOT NULL,
        ts      REAL NOT NULL,
        rcpt    TEXT,
        event   TEXT NOT NULL,
        detail  TEXT
    );
    CREATE INDEX history_msg ON history(msg_id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def _prepare(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so a 250 after commit survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"database schema version {version} is newer than this relay ({SCHEMA_VERSION})")
    for i in range(version, SCHEMA_VERSION):
        conn.executescript("BEGIN;" + MIGRATIONS[i] + f"; PRAGMA user_version={i + 1}; COMMIT;")


def ensure_parent(path: str) -> None:
    parent = Path(path).parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True, mode=0o750)


def open_sync(path: str) -> sqlite3.Connection:
    """Blocking connection for the CLI (short-lived, one command)."""
    ensure_parent(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    conn.row_factory = sqlite3.Row
    _prepare(conn)
    _migrate(conn)
    _restrict_mode(path)
    return conn


async def open_async(path: str) -> aiosqlite.Connection:
    """Connection for the daemon: all its I/O runs on aiosqlite's own thread."""
    ensure_parent(path)
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
    conn.row_factory = sqlite3.Row
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("PRAGMA synchronous=FULL")
    await conn.execute("PRAGMA foreign_keys=ON")
    await conn.execute("PRAGMA busy_timeout=5000")
    version = (await (await conn.execute("PRAGMA user_version")).fetchone())[0]
    if version < SCHEMA_VERSION:
        for i in range(version, SCHEMA_VERSION):
            await conn.executescript("BEGIN;" + MIGRATIONS[i] + f"; PRAGMA user_version={i + 1}; COMMIT;")
    elif version > SCHEMA_VERSION:
        await conn.close()
        raise RuntimeError(f"database schema version {version} is newer than this relay ({SCHEMA_VERSION})")
    _restrict_mode(path)
    return conn


def _restrict_mode(path: str) -> None:
    # Credentials hashes and queued mail: readable by the relay user only.
    for p in (path, path + "-wal", path + "-shm"):
        try:
            os.chmod(p, 0o600)
        except OSError:
            pass
