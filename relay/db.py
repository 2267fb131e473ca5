"""The SQLite database: open it safely (WAL, synchronous=FULL), and migrate the schema forward.

One file holds credentials and the queue. Migrations are applied in order at open time and
recorded in `PRAGMA user_version`, so an old database is upgraded by simply starting.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
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
    # 2: DKIM keys per sending domain (private halves never leave the database)
    """
    CREATE TABLE dkim_keys (
        domain      TEXT NOT NULL REFERENCES domains(name),
        selector    TEXT NOT NULL,
        algorithm   TEXT NOT NULL,             -- rsa | ed25519
        private_key TEXT NOT NULL,
        public_key  TEXT NOT NULL,             -- the p= value
        created_at  REAL NOT NULL,
        active      INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (domain, selector)
    );
    """,
    # 3: DKIM signing moves from acceptance to the delivery process: the domain to sign for,
    # until the signed copy is stored (then NULL)
    """
    ALTER TABLE messages ADD COLUMN dkim_domain TEXT;
    """,
    # 4: leases have an owner ("node/incarnation"): recovery takes back only its own node's
    """
    ALTER TABLE recipients ADD COLUMN lease_owner TEXT;
    """,
    # 5: finished messages stay, headers only, for `relay queue history` until
    # storage.finished_retention has passed; unfinished ones have finished_at NULL
    """
    ALTER TABLE messages ADD COLUMN finished_at REAL;
    CREATE INDEX messages_finished ON messages(finished_at) WHERE finished_at IS NOT NULL;
    """,
    # 6: large bodies live in files in the spool directory (path: the file's name there; data
    # then holds only the header block, for `queue show` and DSNs); the DKIM-Signature field is
    # kept apart (prefix) and sent before the content, so signing never rewrites the body
    """
    ALTER TABLE bodies ADD COLUMN path TEXT;
    ALTER TABLE bodies ADD COLUMN prefix BLOB;
    ALTER TABLE bodies ADD COLUMN ascii INTEGER;               -- spooled content all ASCII (1), or 0
    """,
    # 7: the web admin and HTTP API: admin accounts (created from the CLI only), their
    # server-side sessions (only a SHA-256 of the cookie is stored), API keys (hashed, scoped,
    # revocable), an audit row for every change made through the operations layer, and the
    # time of a credential's last failed login (shown next to last_login)
    """
    CREATE TABLE admin_users (
        username      TEXT PRIMARY KEY,
        hash          TEXT NOT NULL,             -- argon2id encoded hash
        created_at    REAL NOT NULL,
        last_login_at REAL,
        disabled      INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE admin_sessions (
        token_hash   TEXT PRIMARY KEY,           -- hex SHA-256 of the cookie value
        username     TEXT NOT NULL REFERENCES admin_users(username) ON DELETE CASCADE,
        created_at   REAL NOT NULL,
        last_seen_at REAL NOT NULL,
        ip           TEXT,
        user_agent   TEXT
    );
    CREATE INDEX admin_sessions_user ON admin_sessions(username);
    CREATE TABLE api_keys (
        id           TEXT PRIMARY KEY,           -- public part shown in listings
        name         TEXT NOT NULL,
        key_hash     TEXT NOT NULL UNIQUE,       -- hex SHA-256 of the secret token
        scope        TEXT NOT NULL CHECK (scope IN ('read', 'write')),
        created_at   REAL NOT NULL,
        last_used_at REAL,
        revoked_at   REAL
    );
    CREATE TABLE audit_log (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        ts      REAL NOT NULL,
        actor   TEXT NOT NULL,                   -- admin username, api key id, or the CLI's OS user
        via     TEXT NOT NULL,                   -- cli | web | api
        ip      TEXT,
        action  TEXT NOT NULL,                   -- e.g. credential.create, queue.retry
        target  TEXT,
        detail  TEXT
    );
    CREATE INDEX audit_ts ON audit_log(ts);
    ALTER TABLE credentials ADD COLUMN last_failed_login REAL;
    """,
    # 8: the queue pages of the web admin and API page by keyset (created_at, id), never
    # OFFSET; each attempt's history row keeps the host that answered and the TLS in use
    # (the message page shows them per attempt)
    """
    CREATE INDEX messages_created ON messages(created_at, id);
    ALTER TABLE history ADD COLUMN host TEXT;
    ALTER TABLE history ADD COLUMN tls TEXT;
    """,
    # 9: outbound TLS policy (issue 15): MTA-STS policies cached (RFC 8461 3.3), the best TLS
    # seen per destination domain (downgrade memory), and per attempt the policy applied and
    # the TLS outcome. Owned by store/tls_state.py (the first two) and the queue (history).
    """
    CREATE TABLE mta_sts_policies (
        domain         TEXT PRIMARY KEY,
        policy_id      TEXT NOT NULL,            -- the TXT record's id it was fetched under
        mode           TEXT NOT NULL CHECK (mode IN ('enforce', 'testing', 'none')),
        mx_json        TEXT NOT NULL,            -- JSON list of mx patterns
        max_age        INTEGER NOT NULL,
        fetched_at     REAL NOT NULL,
        expires_at     REAL NOT NULL,            -- fetched_at + max_age
        txt_checked_at REAL NOT NULL             -- last TXT look-up that found the same id
    );
    CREATE TABLE tls_security (
        domain     TEXT PRIMARY KEY,
        best       TEXT NOT NULL CHECK (best IN ('plain', 'tls', 'verified')),
        first_at   REAL NOT NULL,                -- when `best` was first seen
        seen_at    REAL NOT NULL                 -- when `best` was last seen (refreshed hourly)
    );
    ALTER TABLE history ADD COLUMN tls_policy TEXT;
    ALTER TABLE history ADD COLUMN tls_cipher TEXT;
    ALTER TABLE history ADD COLUMN tls_verified INTEGER;
    ALTER TABLE messages ADD COLUMN requiretls INTEGER NOT NULL DEFAULT 0;  -- RFC 8689 MAIL parameter
    CREATE TABLE tlsrpt_counts (                 -- RFC 8460: sessions per UTC day and policy
        day           TEXT NOT NULL,             -- YYYY-MM-DD
        policy_domain TEXT NOT NULL,
        policy_type   TEXT NOT NULL,             -- sts | no-policy-found
        policy_string TEXT NOT NULL,             -- JSON list of the policy's lines
        mx_host       TEXT NOT NULL,
        result        TEXT NOT NULL,             -- '' = success, else the result type
        count         INTEGER NOT NULL,
        PRIMARY KEY (day, policy_domain, policy_type, policy_string, mx_host, result)
    );
    CREATE TABLE tlsrpt_sent (                   -- a day's report done for a policy domain
        day           TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        sent_at       REAL NOT NULL,
        PRIMARY KEY (day, policy_domain)
    );
    """,
    # 10: the nodes seen (issue 17): each `relay serve` beats here while it runs, so `relay node
    # list` can say which nodes are up, which went quiet, and what leases each holds.
    """
    CREATE TABLE nodes (
        node_id      TEXT PRIMARY KEY,           -- server.node_id (default: the host name)
        incarnation  TEXT NOT NULL,              -- new at every start
        hostname     TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        version      TEXT NOT NULL,
        started_at   REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped_at   REAL                        -- set by a clean stop; NULL while up (or killed)
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseError(RuntimeError):
    """The database cannot be opened or migrated; str() names the file (one line for the operator)."""


def _statements(script: str) -> list[str]:
    # Split a migration into statements so it can run inside OUR transaction: executescript()
    # would first COMMIT any open transaction, losing the lock that makes migrating race-free.
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


BUSY_TIMEOUT = 5.0


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is
    # locked" at once, without its busy handler, while another connection is doing the same
    # (daemon and CLI starting together): retry for as long as busy_timeout would wait.
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _prepare(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    _enable_wal(conn)
    # FULL: the WAL is fsynced at every commit, so a 250 after commit survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")


def _too_new(version: int) -> DatabaseError:
    return DatabaseError(f"database schema version {version} is newer than this relay ({SCHEMA_VERSION}); "
                         "run a newer relay")


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise _too_new(version)
    # Two processes may open a fresh file at once (daemon and CLI): the write lock is taken
    # first and the version read again under it, so exactly one of them migrates.
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise _too_new(version)
        for i in range(version, SCHEMA_VERSION):
            for stmt in _statements(MIGRATIONS[i]):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={i + 1}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # some errors already rolled back inside SQLite
            conn.execute("ROLLBACK")
        raise


def ensure_parent(path: str) -> None:
    parent = Path(path).parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True, mode=0o750)


def _create_private(path: str) -> None:
    # Create the file 0600 before SQLite does (it would use the umask, typically 0644, and the
    # file would be readable until the chmod below); SQLite gives -wal/-shm the same mode.
    # O_EXCL matters: closing ANY descriptor of a file drops every POSIX lock this process holds
    # on it, so opening an existing database here would silently unlock the daemon's other
    # connection, and another process could then delete the WAL under it (stale reads forever).
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if os.path.isdir(path):
            raise DatabaseError(f"database {path}: is a directory (storage.path)") from None
    except OSError as exc:
        raise DatabaseError(f"database {path}: cannot create: {exc.strerror}") from None


def _init_file(path: str) -> None:
    """Create, switch to WAL (persistent in the file) and migrate; then close."""
    if path == ":memory:":
        # Each connection would get its own empty database, and queued mail must survive restarts.
        raise DatabaseError("database :memory:: storage.path must be a file")
    try:
        ensure_parent(path)
    except OSError as exc:
        raise DatabaseError(f"database {path}: cannot create its directory: {exc.strerror}") from None
    _create_private(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        _prepare(conn)
        _migrate(conn)
    except sqlite3.Error as exc:
        raise DatabaseError(f"database {path}: {exc}") from None
    finally:
        conn.close()
    _restrict_mode(path)


def open_sync(path: str) -> sqlite3.Connection:
    """Blocking connection for the CLI (short-lived, one command)."""
    _init_file(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        _prepare(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseError(f"database {path}: {exc}") from None
    return conn


async def open_async(path: str) -> aiosqlite.Connection:
    """Connection for the daemon: all its I/O runs on aiosqlite's own thread."""
    # One migration code path (the sync one), run off the event loop.
    await asyncio.to_thread(_init_file, path)
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        # Per-connection settings (journal_mode=WAL is already persistent in the file).
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA foreign_keys=ON")
    except BaseException as exc:
        # aiosqlite runs a non-daemon thread per connection: an unclosed one keeps the
        # process alive forever after the error.
        await conn.close()
        if isinstance(exc, sqlite3.Error):
            raise DatabaseError(f"database {path}: {exc}") from None
        raise
    return conn


def _restrict_mode(path: str) -> None:
    # Credentials hashes and queued mail: readable by the relay user only (also fixes files
    # created by older versions).
    for p in (path, path + "-wal", path + "-shm"):
        try:
            os.chmod(p, 0o600)
        except OSError:
            pass


class WriterLock:
    """Turn-taking for queue writers in different processes (acceptance and delivery).

    SQLite's busy handler sleeps 1, 2, 5 ... 100 ms between tries: a writer that commits
    back to back (group commit under load) starves the other process for seconds. A blocking
    flock() wakes the waiter the moment the holder lets go, so the two alternate instead.
    """

    def __init__(self, db_path: str):
        self.path = db_path + ".writer-lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire_blocking(self) -> None:
        """From the queue's writer thread (never the event loop): wait for our turn."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)
