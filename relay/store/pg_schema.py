"""The PostgreSQL schema (storage.backend = "postgres"), as a versioned list like `relay.db`'s.

Column names and meanings match the SQLite schema (relay/db.py) so both backends answer the
store contract with the same rows: times are epoch seconds (double precision) from the store's
clock, states are the same words, `lease_token` is the fencing token. What differs: bytea for
BLOB, bigint identity for the recipients' INTEGER PRIMARY KEY, foreign keys that cascade, and no
`bodies.path` (there are no spool files: bodies live in `bodies.data`, see pg_queue.py).

Migrations run under `pg_advisory_xact_lock`, in one transaction per version: two nodes starting
at once migrate once, the second waits and then finds the work done.
"""
from __future__ import annotations

import asyncpg

# A fixed key for the migration lock (the ASCII of "relaymig" as an int64).
MIGRATION_LOCK = 0x72656C61796D6967

MIGRATIONS: list[str] = [
    # 1: the queue (messages, their bodies, per-recipient state, history)
    """
    CREATE TABLE messages (
        id          text PRIMARY KEY,
        sender      text NOT NULL,             -- '' for the null sender (bounces)
        created_at  double precision NOT NULL,
        size        bigint NOT NULL,
        auth_user   text,
        client_ip   text,
        ret         text,
        envid       text,
        smtputf8    smallint NOT NULL DEFAULT 0,
        warned      smallint NOT NULL DEFAULT 0,
        dkim_domain text,
        finished_at double precision,
        accepted_by text                       -- the node that answered 250
    );
    CREATE INDEX messages_finished ON messages(finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX messages_created ON messages(created_at, id);
    CREATE TABLE bodies (
        id      text PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        data    bytea NOT NULL,
        prefix  bytea                          -- the DKIM-Signature field, sent before data
    );
    -- Out of line and uncompressed: mail rarely compresses cheaply, and pglz on every insert
    -- costs the acceptance path CPU.
    ALTER TABLE bodies ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE recipients (
        id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        msg_id          text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        rcpt            text NOT NULL,
        route           text NOT NULL,
        state           text NOT NULL CHECK (state IN ('pending', 'deferred', 'delivered', 'failed')),
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,  -- due time; while leased, the lease's end
        lease_token     text,
        lease_owner     text,                       -- node/incarnation
        last_error      text,
        remote_mta      text,
        notify          text,
        orcpt           text,
        updated_at      double precision NOT NULL
    );
    CREATE INDEX recipients_msg ON recipients(msg_id);
    CREATE INDEX recipients_due ON recipients(next_attempt_at) WHERE state IN ('pending', 'deferred');
    CREATE TABLE history (
        seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- SQLite's rowid order
        msg_id  text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        ts      double precision NOT NULL,
        rcpt    text,
        event   text NOT NULL,
        detail  text,
        host    text,
        tls     text
    );
    CREATE INDEX history_msg ON history(msg_id);
    """,
    # 2: sending domains, their credentials (the verify cache is bound to `hash`, so a reset or
    # delete on one node applies on every node at the next AUTH), and the DKIM keys table (so a
    # domain's removal takes its keys in the same transaction; the DKIM store itself is not on
    # PostgreSQL yet)
    """
    CREATE TABLE domains (
        name        text PRIMARY KEY,
        created_at  double precision NOT NULL,
        verified_at double precision
    );
    CREATE TABLE credentials (
        username          text PRIMARY KEY,
        domain            text NOT NULL REFERENCES domains(name),
        hash              text NOT NULL,
        created_at        double precision NOT NULL,
        updated_at        double precision NOT NULL,
        last_login        double precision,
        last_failed_login double precision
    );
    CREATE INDEX credentials_domain ON credentials(domain);
    CREATE TABLE dkim_keys (
        domain      text NOT NULL REFERENCES domains(name),
        selector    text NOT NULL,
        algorithm   text NOT NULL,
        private_key text NOT NULL,
        public_key  text NOT NULL,
        created_at  double precision NOT NULL,
        active      smallint NOT NULL DEFAULT 1,
        PRIMARY KEY (domain, selector)
    );
    """,
    # 3: HTTP API keys (only a SHA-256 of the secret) and the audit log
    """
    CREATE TABLE api_keys (
        id           text PRIMARY KEY,
        name         text NOT NULL,
        key_hash     text NOT NULL UNIQUE,
        scope        text NOT NULL CHECK (scope IN ('read', 'write')),
        created_at   double precision NOT NULL,
        last_used_at double precision,
        revoked_at   double precision
    );
    CREATE TABLE audit_log (
        id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts      double precision NOT NULL,
        actor   text NOT NULL,
        via     text NOT NULL,
        ip      text,
        action  text NOT NULL,
        target  text,
        detail  text
    );
    CREATE INDEX audit_ts ON audit_log(ts);
    """,
    # 4: web admin accounts (created from the CLI only) and their server-side sessions (only a
    # SHA-256 of the cookie is stored)
    """
    CREATE TABLE admin_users (
        username      text PRIMARY KEY,
        hash          text NOT NULL,
        created_at    double precision NOT NULL,
        last_login_at double precision,
        disabled      smallint NOT NULL DEFAULT 0
    );
    CREATE TABLE admin_sessions (
        token_hash   text PRIMARY KEY,
        username     text NOT NULL REFERENCES admin_users(username) ON DELETE CASCADE,
        created_at   double precision NOT NULL,
        last_seen_at double precision NOT NULL,
        ip           text,
        user_agent   text
    );
    CREATE INDEX admin_sessions_user ON admin_sessions(username);
    """,
    # 5: what SQLite's schema 9 added to the queue (issue 15): per attempt the outbound TLS
    # policy applied, the cipher and whether the certificate was verified; RFC 8689 REQUIRETLS
    # per message.
    """
    ALTER TABLE history ADD COLUMN tls_policy text;
    ALTER TABLE history ADD COLUMN tls_cipher text;
    ALTER TABLE history ADD COLUMN tls_verified smallint;
    ALTER TABLE messages ADD COLUMN requiretls smallint NOT NULL DEFAULT 0;
    """,
    # 6: the TLS state store (issue 15's tables, shared by every node): the MTA-STS cache, the
    # downgrade memory and the TLSRPT counts. One node learning that a domain offers verified TLS
    # protects every node's next delivery there.
    """
    CREATE TABLE mta_sts_policies (
        domain         text PRIMARY KEY,
        policy_id      text NOT NULL,
        mode           text NOT NULL CHECK (mode IN ('enforce', 'testing', 'none')),
        mx_json        text NOT NULL,
        max_age        bigint NOT NULL,
        fetched_at     double precision NOT NULL,
        expires_at     double precision NOT NULL,
        txt_checked_at double precision NOT NULL
    );
    CREATE TABLE tls_security (
        domain     text PRIMARY KEY,
        best       text NOT NULL CHECK (best IN ('plain', 'tls', 'verified')),
        first_at   double precision NOT NULL,
        seen_at    double precision NOT NULL
    );
    CREATE TABLE tlsrpt_counts (
        day           text NOT NULL,
        policy_domain text NOT NULL,
        policy_type   text NOT NULL,
        policy_string text NOT NULL,
        mx_host       text NOT NULL,
        result        text NOT NULL,
        count         bigint NOT NULL,
        PRIMARY KEY (day, policy_domain, policy_type, policy_string, mx_host, result)
    );
    CREATE TABLE tlsrpt_sent (
        day           text NOT NULL,
        policy_domain text NOT NULL,
        sent_at       double precision NOT NULL,
        PRIMARY KEY (day, policy_domain)
    );
    """,
    # 7: the nodes seen (SQLite's schema 10): each `relay serve` beats here while it runs.
    """
    CREATE TABLE nodes (
        node_id      text PRIMARY KEY,
        incarnation  text NOT NULL,
        hostname     text NOT NULL,
        pid          integer NOT NULL,
        version      text NOT NULL,
        started_at   double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        stopped_at   double precision
    );
    """,
    # 8: large bodies in pieces (a spooled body's wire form, 1 MiB a row), written and read one
    # piece at a time, so a node's memory does not grow with message size; bodies.chunks counts
    # them (0: the body is bodies.data, as before).
    """
    CREATE TABLE body_chunks (
        id   text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        seq  integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (id, seq)
    );
    ALTER TABLE bodies ADD COLUMN chunks integer NOT NULL DEFAULT 0;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    pass


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; returns how many migrations this call applied."""
    applied = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS relay_schema (version integer NOT NULL, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM relay_schema")
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"database schema version {version} is newer than this relay ({SCHEMA_VERSION}); "
                               "upgrade relay on this node")
        for n in range(version, SCHEMA_VERSION):
            await conn.execute(MIGRATIONS[n])
            await conn.execute("INSERT INTO relay_schema(version) VALUES ($1)", n + 1)
            applied += 1
    return applied
