"""The durable queue on PostgreSQL (asyncpg): the same `contract.QueueStore` as sqlite_queue.

Work is shared between nodes with leases: `claim` picks due recipients with `FOR UPDATE OF r
SKIP LOCKED` (concurrent claimers on other nodes skip each other's rows instead of waiting),
sets `next_attempt_at` to the lease's end (so one partial index serves "due" and "lease ran
out", with no reaper), counts the attempt, and writes a fresh `lease_token` and the owner
("node/incarnation"). Every later write about the job (renew, holds, settle, release) matches
on the token: a node frozen past its lease that wakes changes nothing and, because `holds`
before DATA is a fenced lease extension, sends nothing either.

Commits: enqueue is one autocommit statement per message (data-modifying CTEs insert the
message, body, recipients and history in one round trip); PostgreSQL's own group commit
shares the WAL flush between concurrent sessions, so no application batching is needed (see
docs/architecture.md for the figures). There is no NOTIFY anywhere: the accepting node wakes its
own runner (`on_enqueue`) and other nodes poll.

Bodies are in `bodies.data` (bytea, stored out of line): any node can deliver any message and a
standby holds them with the envelope. A body the SMTP side spooled to a file (per node) is read
into the row at enqueue and its file removed after the commit.

Errors: a lost connection, a timeout (statement or COMMIT, `commit_timeout`), a server shutting
down or refusing connections -> StoreUnavailable; disk full -> StorageFull; a COMMIT whose
synchronous-replication wait was cancelled (PostgreSQL warns "the transaction has already
committed locally, but might not have been replicated") -> StoreUnavailable, so the client gets
451 4.3.0 and may send again (a duplicate, never a loss on failover).

Times are epoch seconds from the store's clock (as in SQLite): nodes must keep their clocks in
sync (NTP); a lease is minutes long, so seconds of skew do not matter.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import secrets
import socket
import time
from typing import Any, Awaitable, Callable, Iterable

import asyncpg

from .. import metrics, spool
from ..logs import event
from .contract import (ACTIVE, FINAL, ClaimedRecipient, Job, LeaseLost, LeaseOwner, NewMessage, RecipientUpdate,
                       StorageFull, StoreUnavailable, new_queue_id)
from ..policy import unstuff
from .pg_schema import migrate
from .sqlite_queue import _like_escape, _message_state

log = logging.getLogger("relay.queue")

_ACTIVE = "state IN ('pending', 'deferred')"
# SQLSTATE classes that mean "the database cannot do it now": connection exception (08),
# insufficient resources (53, 53100 disk full is StorageFull), operator intervention (57: admin
# shutdown, cannot connect now, query cancelled), transaction rollback (40: serialization,
# deadlock), system error (58).
_UNAVAILABLE_CLASSES = ("08", "53", "57", "40", "58")
_REPLICATION_WARNING = "might not have been replicated"

Tx = Callable[[asyncpg.Connection], Awaitable[Any]]

# A spooled body's rows in body_chunks: 1 MiB each (what delivery reads at a time from a file).
PIECE = 1024 * 1024


async def _run_also(also: Any, conn: asyncpg.Connection) -> None:
    """A change's extra write (the audit row: an async op(conn)), in the change's transaction."""
    if also is not None:
        result = also(conn)
        if inspect.isawaitable(result):
            await result


def _unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The contract's exception for a driver or server error, or None for a real bug / refusal."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state == "53100":
            return StorageFull(f"database disk full: {exc}")
        if state[:2] in _UNAVAILABLE_CLASSES:
            return StoreUnavailable(f"database: {exc}")
        return None
    if isinstance(exc, (asyncpg.InterfaceError, OSError, ConnectionError, asyncio.TimeoutError, EOFError)):
        return StoreUnavailable(f"database unreachable: {exc.__class__.__name__}: {exc}")
    return None


class _Connection(asyncpg.Connection):
    """A pooled connection released without the reset query (`SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`): one round trip per statement we run, ~10 % of the
    delivery process's CPU on PostgreSQL. Nothing here leaves session state behind: settings are
    `SET LOCAL`, no LISTEN, no cursors, and a session advisory lock is taken on a connection held
    for as long as the lock (never released to the pool with it). An open transaction is still
    rolled back by asyncpg on release."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(dsn: str, *, password: str | None = None, size: int = 10,
                      command_timeout: float = 20.0, **kw: Any) -> asyncpg.Pool:
    """A connection pool; migrates the schema first (once per cluster, under an advisory lock)."""
    try:
        conn = await asyncpg.connect(dsn, password=password, timeout=command_timeout, **kw)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return await asyncpg.create_pool(dsn, password=password, min_size=1, max_size=size,
                                         command_timeout=command_timeout, timeout=command_timeout,
                                         connection_class=_Connection, **kw)
    except BaseException as exc:
        mapped = _unavailable(exc)
        if mapped is not None:
            raise mapped from exc
        raise


class PgQueueStore:
    # The runner asks `holds` before the DATA of every attempt: several nodes share these rows.
    fence_each_attempt = True

    def __init__(self, pool: asyncpg.Pool, *, clock: Callable[[], float] = time.time,
                 lease_seconds: float = 600, on_enqueue: Callable[[], None] | None = None,
                 owner: LeaseOwner | None = None, spool_dir: str | None = None,
                 commit_timeout: float = 20.0, crash_point: str | None = None,
                 relaxed_pool: asyncpg.Pool | None = None):
        self._pool = pool
        # Connections with synchronous_commit = off for the single-statement writes a database
        # crash may take back harmlessly (lease extensions, the stored DKIM signature): one round
        # trip each instead of BEGIN / SET LOCAL / statement / COMMIT.
        self._relaxed = relaxed_pool
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.owner = owner or LeaseOwner(socket.gethostname(), secrets.token_hex(4))
        self._on_enqueue = on_enqueue
        self.spool_dir = spool_dir      # where the SMTP side spooled large bodies (read at enqueue)
        self.commit_timeout = commit_timeout
        self._crash_point = crash_point if crash_point is not None else os.environ.get("RELAY_CRASH_POINT")

    async def close(self) -> None:
        pass  # the pool belongs to whoever made it (the factory closes it)

    # ------------------------------------------------------------ transactions

    async def _run(self, fn: Tx, *, transaction: bool = True, synchronous: bool = True) -> Any:
        """Run `fn(conn)` in one transaction (or, with transaction=False, as the single
        autocommit statement it issues), mapping failures to the contract's exceptions."""
        warnings: list[str] = []

        def on_log(_conn: Any, message: Any) -> None:
            # PostgreSQL: WARNING "canceling wait for synchronous replication ...", DETAIL "The
            # transaction has already committed locally, but might not have been replicated ..."
            warnings.append(f"{getattr(message, 'message', message)} {getattr(message, 'detail', '') or ''}")

        pool = self._relaxed if (not synchronous and not transaction and self._relaxed is not None) else self._pool
        try:
            async with pool.acquire(timeout=self.commit_timeout) as conn:
                conn.add_log_listener(on_log)
                try:
                    if not transaction:
                        result = await fn(conn)
                    else:
                        await conn.execute("BEGIN")
                        try:
                            if not synchronous:
                                # A renewal lost in a database crash only makes rows due again.
                                await conn.execute("SET LOCAL synchronous_commit = off")
                            result = await fn(conn)
                        except BaseException:
                            if not conn.is_closed():
                                try:
                                    await conn.execute("ROLLBACK", timeout=self.commit_timeout)
                                except Exception:  # noqa: BLE001 (the original error is what matters)
                                    conn.terminate()
                            raise
                        await conn.execute("COMMIT", timeout=self.commit_timeout)
                    await asyncio.sleep(0)  # let a notice that came with the reply reach on_log
                finally:
                    if not conn.is_closed():
                        conn.remove_log_listener(on_log)
        except (LeaseLost, StoreUnavailable):
            raise
        except BaseException as exc:
            mapped = _unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise
        if any(_REPLICATION_WARNING in w for w in warnings):
            # Committed here, maybe not on the standby: a failover now could lose it. Say "not
            # stored" (the client retries; at worst a duplicate).
            event(log, "commit_not_replicated", logging.WARNING)
            raise StoreUnavailable("the commit's synchronous-replication wait was cancelled")
        return result

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A read outside any transaction."""
        try:
            async with self._pool.acquire(timeout=self.commit_timeout) as conn:
                return await conn.fetch(sql, *args)
        except BaseException as exc:
            mapped = _unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise

    # ------------------------------------------------------------ enqueue

    async def enqueue(self, msg: NewMessage) -> str:
        qid = msg.queue_id or new_queue_id()
        now = self._clock()
        if msg.spool_file and msg.spool_file.endswith(spool.WIRE_SUFFIX) and self.spool_dir:
            result = await self._enqueue_pieces(qid, msg, now)
        else:
            data = await self._content(msg)

            async def op(conn: asyncpg.Connection) -> str:
                await self._insert(conn, qid, msg, now, data)
                return qid

            result = await self._run(op, transaction=False)
        if msg.spool_file and self.spool_dir:
            await asyncio.to_thread(spool.unlink_all, [os.path.join(self.spool_dir, msg.spool_file)])
        if self._crash_point == "after_commit":
            os._exit(75)
        metrics.MESSAGES_ACCEPTED.labels("bounce" if not msg.sender else "submission").inc()
        if self._on_enqueue:
            self._on_enqueue()
        return result

    async def _enqueue_pieces(self, qid: str, msg: NewMessage, now: float) -> str:
        """A spooled (large) body: its wire form into body_chunks a piece at a time, in the same
        transaction as the message's rows, so memory holds one piece, never the message."""
        assert self.spool_dir is not None and msg.spool_file
        body = spool.Body(b"", None, os.path.join(self.spool_dir, msg.spool_file), msg.spool_size, wire=True)

        async def op(conn: asyncpg.Connection) -> str:
            await self._insert(conn, qid, msg, now, b"")
            seq = 0
            async for piece in body.wire_chunks(PIECE):
                await conn.execute("INSERT INTO body_chunks(id, seq, data) VALUES ($1, $2, $3)", qid, seq, piece)
                seq += 1
            await conn.execute("UPDATE bodies SET chunks = $2 WHERE id = $1", qid, seq)
            return qid

        return await self._run(op)

    def _pieces(self, msg_id: str, count: int) -> Callable[[int], Any]:
        """spool.Body's block source for a body in pieces: one row a read, in order."""
        async def blocks(_size: int):
            for seq in range(count):
                rows = await self._fetch("SELECT data FROM body_chunks WHERE id = $1 AND seq = $2", msg_id, seq)
                if not rows:  # finished or deleted meanwhile: the attempt stops before its end of data
                    raise StoreUnavailable(f"piece {seq} of the body of {msg_id} is gone")
                yield bytes(rows[0]["data"])
        return blocks

    async def _content(self, msg: NewMessage) -> bytes:
        if not msg.spool_file:
            return msg.data
        if self.spool_dir is None:
            raise StoreUnavailable("a spooled body, but this store has no spool directory")
        path = os.path.join(self.spool_dir, msg.spool_file)
        body = spool.Body(b"", None, path, msg.spool_size, wire=msg.spool_file.endswith(spool.WIRE_SUFFIX))
        return await body.read_all()

    async def _insert(self, conn: asyncpg.Connection, qid: str, msg: NewMessage, now: float,
                      data: bytes | None = None) -> None:
        # One statement: the foreign keys are checked at its end, when all four rows exist.
        rcpts = msg.recipients
        await conn.execute(
            "WITH m AS (INSERT INTO messages(id, sender, created_at, size, auth_user, client_ip, ret, envid, "
            "  smtputf8, dkim_domain, accepted_by, requiretls) "
            "  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $18)), "
            "b AS (INSERT INTO bodies(id, data) VALUES ($1, $12)), "
            "r AS (INSERT INTO recipients(msg_id, rcpt, route, state, next_attempt_at, notify, orcpt, updated_at) "
            "  SELECT $1, a, rt, 'pending', $3, n, o, $3 FROM unnest($13::text[], $14::text[], $15::text[], "
            "  $16::text[]) AS u(a, rt, n, o)) "
            "INSERT INTO history(msg_id, ts, event, detail) VALUES ($1, $3, 'queued', $17)",
            qid, msg.sender, now, msg.size, msg.auth_user, msg.client_ip, msg.ret, msg.envid, int(msg.smtputf8),
            msg.dkim_domain, self.owner.node, msg.data if data is None else data,
            [r.address for r in rcpts], [r.route for r in rcpts], [r.notify for r in rcpts],
            [r.orcpt for r in rcpts],
            f"from=<{msg.sender}> rcpts={len(rcpts)} size={msg.size}", int(msg.requiretls),
            timeout=self.commit_timeout)

    # ------------------------------------------------------------ claim / renew / holds

    async def claim(self, limit: int, now: float | None = None,
                    destination: Callable[[str], str] | None = None,
                    exclude_routes: Iterable[str] = ()) -> list[Job]:
        t = self._clock() if now is None else now
        dest = destination or (lambda route: route)
        excluded = list(exclude_routes)
        until = t + self.lease_seconds
        owner = str(self.owner)

        async def op(conn: asyncpg.Connection) -> list[Job]:
            rows = await conn.fetch(
                "SELECT r.id, r.msg_id, r.rcpt, r.route, r.attempts, r.notify, r.orcpt, "
                "m.sender, m.created_at, m.size, m.ret, m.envid, m.smtputf8, m.warned, m.requiretls "
                "FROM recipients r JOIN messages m ON m.id = r.msg_id "
                "WHERE r.state IN ('pending', 'deferred') AND r.next_attempt_at <= $1 "
                "AND NOT (r.route = ANY($2::text[])) "
                "ORDER BY r.next_attempt_at LIMIT $3 FOR UPDATE OF r SKIP LOCKED",
                t, excluded, limit)
            if not rows:
                return []
            jobs: dict[tuple[str, str], Job] = {}
            ids, tokens = [], []
            for r in rows:
                key = (r["msg_id"], dest(r["route"]))
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = Job(r["msg_id"], key[1], secrets.token_hex(8), r["sender"], r["created_at"],
                                          r["size"], r["ret"], r["envid"], bool(r["smtputf8"]), bool(r["warned"]),
                                          until, confirmed_at=t, requiretls=bool(r["requiretls"]))
                job.recipients.append(ClaimedRecipient(r["id"], r["rcpt"], r["attempts"] + 1, r["notify"],
                                                       r["orcpt"]))
                ids.append(r["id"])
                tokens.append(job.token)
            # The lease is the due time; the attempt counts now (a message that kills its node
            # each time still runs into the attempt limit and expiry).
            await conn.execute(
                "UPDATE recipients r SET next_attempt_at = $1, attempts = r.attempts + 1, lease_token = u.token, "
                "lease_owner = $2 FROM unnest($3::bigint[], $4::text[]) AS u(id, token) WHERE r.id = u.id",
                until, owner, ids, tokens)
            return list(jobs.values())

        return await self._run(op)

    async def renew(self, job: Job) -> None:
        if await self.renew_many([job]):
            raise LeaseLost(job.msg_id)

    async def _extend(self, jobs: list[Job], until: float, synchronous: bool) -> set[tuple[int, str]]:
        """Extend the leases of `jobs` where their tokens still hold; returns the (id, token)
        pairs extended."""
        ids = [r.id for j in jobs for r in j.recipients]
        tokens = [j.token for j in jobs for _ in j.recipients]

        async def op(conn: asyncpg.Connection) -> set[tuple[int, str]]:
            rows = await conn.fetch(
                "UPDATE recipients r SET next_attempt_at = $1 FROM unnest($2::bigint[], $3::text[]) AS u(id, token) "
                f"WHERE r.id = u.id AND r.lease_token = u.token AND r.{_ACTIVE} RETURNING r.id, r.lease_token",
                until, ids, tokens)
            return {(r["id"], r["lease_token"]) for r in rows}

        # One statement: autocommit on the relaxed pool when not synchronous (see __init__).
        return await self._run(op, transaction=synchronous, synchronous=synchronous)

    async def renew_many(self, jobs: list[Job]) -> list[Job]:
        if not jobs:
            return []
        now = self._clock()
        until = now + self.lease_seconds
        kept = await self._extend(jobs, until, synchronous=False)
        lost = []
        for job in jobs:
            if all((r.id, job.token) in kept for r in job.recipients):
                job.leased_until, job.confirmed_at = until, now
            else:
                job.lost = True
                lost.append(job)
        return lost

    async def holds(self, job: Job) -> bool:
        """The fence before DATA: whether this job's rows are still under its token, and if so
        the lease is extended in the same statement, so no other node can claim them while
        this attempt's DATA is under way (a plain read would leave that window open when the
        lease had run out just before)."""
        now = self._clock()
        until = now + self.lease_seconds
        # Without waiting for the WAL flush: the claim that gave the token was durable, and an
        # extension lost in a database crash only ends the lease at the claim's own due time.
        kept = await self._extend([job], until, synchronous=False)
        held = all((r.id, job.token) in kept for r in job.recipients)
        if held:
            job.leased_until, job.confirmed_at = until, now
        else:
            job.lost = True
        return held

    # ------------------------------------------------------------ bodies

    @staticmethod
    async def _keep_signature(conn: asyncpg.Connection, msg_id: str, prefix: bytes) -> None:
        """The DKIM-Signature field sent before the content from now on; the first job of a
        message to get here wins (SQLite's twin says more)."""
        await conn.execute(
            "WITH m AS (UPDATE messages SET dkim_domain = NULL, size = size + $1 WHERE id = $2 "
            "AND dkim_domain IS NOT NULL RETURNING id) "
            "UPDATE bodies SET prefix = $3 FROM m WHERE bodies.id = m.id", len(prefix), msg_id, prefix)

    async def body(self, msg_id: str, limit: int = 1_048_576) -> bytes | None:
        rows = await self._fetch("SELECT b.data, b.prefix, b.chunks FROM bodies b WHERE b.id = $1", msg_id)
        if not rows:
            return None
        r = rows[0]
        if r["chunks"]:
            return await self._body_from_pieces(msg_id, bytes(r["prefix"] or b""), r["chunks"], limit)
        data = bytes(r["prefix"] or b"") + bytes(r["data"])
        if len(data) > limit:
            end = data.find(b"\r\n\r\n")
            return data[:end + 4] if end >= 0 else data[:8192]
        return data

    async def _body_from_pieces(self, msg_id: str, prefix: bytes, count: int, limit: int) -> bytes:
        """Content (dots removed) of a body in pieces, read only as far as `limit` needs: past
        it, the header block (as for a body in one piece)."""
        parts, total, complete = [], 0, True
        blocks = self._pieces(msg_id, count)(PIECE)
        async for block in blocks:
            parts.append(block)
            total += len(block)
            # Wire bytes: the content is smaller (dots), never by half, so past twice the limit
            # the content is surely past it too.
            if total > 2 * limit:
                complete = len(parts) == count
                break
        raw = b"".join(parts)
        if not complete:
            raw = raw[:raw.rfind(b"\n") + 1]  # whole lines only: the dots are removed by line
        data = prefix + unstuff(raw)
        if len(data) > limit or not complete:
            end = data.find(b"\r\n\r\n")
            return data[:end + 4] if end >= 0 else data[:8192]
        return data

    async def body_to_send(self, msg_id: str) -> tuple[spool.Body | None, str | None]:
        rows = await self._fetch(
            "SELECT b.data, b.prefix, b.chunks, m.dkim_domain, m.size FROM bodies b JOIN messages m ON m.id = b.id "
            "WHERE b.id = $1 AND m.finished_at IS NULL", msg_id)
        if not rows:
            return None, None
        if rows[0]["chunks"]:
            prefix = bytes(rows[0]["prefix"] or b"")
            return (spool.Body(prefix, None, None, max(0, rows[0]["size"] - len(prefix)), wire=True,
                               source=self._pieces(msg_id, rows[0]["chunks"])), rows[0]["dkim_domain"])
        data = bytes(rows[0]["data"])
        return spool.Body(bytes(rows[0]["prefix"] or b""), data, None, len(data)), rows[0]["dkim_domain"]

    async def remove_orphan_files(self) -> int:
        return 0  # no spool files outlive their enqueue on this backend

    async def next_due(self, exclude_routes: Iterable[str] = ()) -> float | None:
        rows = await self._fetch(
            f"SELECT MIN(next_attempt_at) AS t FROM recipients WHERE {_ACTIVE} AND NOT (route = ANY($1::text[]))",
            list(exclude_routes))
        return rows[0]["t"] if rows else None

    # ------------------------------------------------------------ settle / release / recover

    async def settle(self, job: Job, updates: list[RecipientUpdate], *, bounces: tuple[NewMessage, ...] = (),
                     history: list[tuple] = (), mark_warned: bool = False,
                     signature: bytes | None = None) -> list[str]:
        """Outcomes, history, the DSNs and the DKIM signature the attempt sent (`signature`, kept
        by _keep_signature) in one transaction; LeaseLost (nothing changed) if the token is no
        longer this job's."""
        now = self._clock()
        bounce_ids = [b.queue_id or new_queue_id() for b in bounces]

        async def op(conn: asyncpg.Connection) -> list[str]:
            # Settles of one message (jobs for different destinations) take turns on the message
            # row (locked in the same statement: one round trip), so the last one's count below,
            # a later statement, sees the others' outcomes and finishes the message.
            changed = await conn.fetch(
                "WITH lk AS (SELECT id FROM messages WHERE id = $8 FOR UPDATE) "
                "UPDATE recipients r SET state = u.state, next_attempt_at = u.next, lease_token = NULL, "
                "lease_owner = NULL, last_error = u.error, remote_mta = u.mta, updated_at = $1 "
                "FROM unnest($2::bigint[], $3::text[], $4::float8[], $5::text[], $6::text[]) "
                "AS u(id, state, next, error, mta), lk WHERE r.id = u.id AND r.lease_token = $7 RETURNING r.id",
                now, [u.id for u in updates], [u.state for u in updates], [u.next_attempt_at for u in updates],
                [u.error for u in updates], [u.remote_mta for u in updates], job.token, job.msg_id)
            if len(changed) != len(updates):
                raise LeaseLost(job.msg_id)  # rolls back: nothing of this settle remains
            # (rcpt, event, detail[, host, tls[, tls_policy, tls_cipher, tls_verified]])
            notes = [(tuple(h) + (None,) * 5)[:8] for h in history]
            notes += [(None, "bounce", f"report {qid} queued to <{b.recipients[0].address}>") + (None,) * 5
                      for qid, b in zip(bounce_ids, bounces)]
            if not job.sender and any(u.state == "failed" for u in updates):
                notes.append((None, "dropped", "a bounce that failed: no bounce for a bounce") + (None,) * 5)
            if notes:
                await self._history(conn, job.msg_id, now, notes)
            if mark_warned:
                await conn.execute("UPDATE messages SET warned = 1 WHERE id = $1", job.msg_id)
            for qid, b in zip(bounce_ids, bounces):
                await self._insert(conn, qid, b, now)
            if signature is not None:
                await self._keep_signature(conn, job.msg_id, signature)
            await self._finish_if_final(conn, job.msg_id, now)
            return bounce_ids

        result = await self._run(op)
        if bounces and self._on_enqueue:
            self._on_enqueue()
        return result

    @staticmethod
    async def _history(conn: asyncpg.Connection, msg_id: str, now: float, notes: list[tuple]) -> None:
        cols = [list(col) for col in zip(*notes)]
        cols[7] = [None if v is None else int(v) for v in cols[7]]  # tls_verified: a bool or None
        await conn.execute(
            "INSERT INTO history(msg_id, ts, rcpt, event, detail, host, tls, tls_policy, tls_cipher, tls_verified) "
            "SELECT $1, $2, a, e, d, h, t, p, c, v FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], "
            "$7::text[], $8::text[], $9::text[], $10::smallint[]) AS u(a, e, d, h, t, p, c, v)",
            msg_id, now, *cols)

    @staticmethod
    async def _finish_if_final(conn: asyncpg.Connection, msg_id: str, now: float) -> bool:
        """Finish the message when no recipient is open, in one statement (it sees this
        transaction's earlier updates). Of a finished message's body only the header block stays
        (what `queue show` prints)."""
        done = await conn.fetchval(
            "WITH m AS (UPDATE messages SET finished_at = $2 WHERE id = $1 AND NOT EXISTS ("
            "  SELECT 1 FROM recipients WHERE msg_id = $1 AND state NOT IN ('delivered', 'failed')) RETURNING id), "
            "b AS (UPDATE bodies SET data = CASE WHEN position('\\x0d0a0d0a'::bytea IN data) > 0 "
            "  THEN substring(data FROM 1 FOR position('\\x0d0a0d0a'::bytea IN data) + 3) "
            "  ELSE substring(data FROM 1 FOR 8192) END, chunks = LEAST(chunks, 1) "
            "  FROM m WHERE bodies.id = m.id RETURNING 1), "
            # A body in pieces keeps its first piece's header block only (the same rule).
            "c0 AS (UPDATE body_chunks SET data = CASE WHEN position('\\x0d0a0d0a'::bytea IN data) > 0 "
            "  THEN substring(data FROM 1 FOR position('\\x0d0a0d0a'::bytea IN data) + 3) "
            "  ELSE substring(data FROM 1 FOR 8192) END FROM m WHERE body_chunks.id = m.id AND seq = 0 RETURNING 1), "
            "cd AS (DELETE FROM body_chunks USING m WHERE body_chunks.id = m.id AND seq > 0 RETURNING 1) "
            "SELECT COUNT(*) FROM m", msg_id, now)
        return bool(done)

    async def purge_finished(self, before: float, limit: int = 1000) -> int:
        async def op(conn: asyncpg.Connection) -> int:
            rows = await conn.fetch(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE finished_at IS NOT NULL "
                "AND finished_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id", before, limit)
            return len(rows)  # bodies, recipients and history go with them (ON DELETE CASCADE)

        return await self._run(op)

    async def release(self, job: Job) -> None:
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "UPDATE recipients SET next_attempt_at = $1, lease_token = NULL, lease_owner = NULL, "
                "attempts = GREATEST(attempts - 1, 0) WHERE id = ANY($2::bigint[]) AND lease_token = $3",
                now, [r.id for r in job.recipients], job.token)

        await self._run(op)

    async def recover(self) -> int:
        """Take back this node's leases (its earlier incarnations'); other nodes' leases come
        due by themselves when they run out."""
        now = self._clock()
        node = self.owner.node

        async def op(conn: asyncpg.Connection) -> int:
            rows = await conn.fetch(
                "UPDATE recipients SET next_attempt_at = $1, lease_token = NULL, lease_owner = NULL "
                f"WHERE lease_token IS NOT NULL AND {_ACTIVE} AND lease_owner LIKE $2 RETURNING id",
                now, _like_escape(node + "/") + "%")
            return len(rows)

        return await self._run(op)

    # ------------------------------------------------------------ operations (CLI)

    async def stats(self) -> dict[str, Any]:
        rows = await self._fetch(
            "SELECT state, COUNT(*) AS n FROM recipients WHERE msg_id IN "
            "(SELECT id FROM messages WHERE finished_at IS NULL) GROUP BY state")
        by_state = {s: 0 for s in ACTIVE + FINAL}
        by_state.update({r["state"]: r["n"] for r in rows})
        m = (await self._fetch("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM messages "
                               "WHERE finished_at IS NULL"))[0]
        return {"recipients": by_state, "messages": m["n"], "oldest": m["oldest"]}

    async def list(self, limit: int = 1000, *, finished: bool = False) -> list[dict[str, Any]]:
        if finished:
            msgs = await self._fetch(
                "SELECT id, sender, created_at, size, finished_at FROM messages WHERE finished_at IS NOT NULL "
                "ORDER BY finished_at DESC LIMIT $1", limit)
        else:
            msgs = await self._fetch(
                "SELECT id, sender, created_at, size, finished_at FROM messages WHERE finished_at IS NULL "
                "ORDER BY created_at, id LIMIT $1", limit)
        return await self._summaries(msgs)

    async def _summaries(self, msgs: list[Any]) -> list[dict[str, Any]]:
        if not msgs:
            return []
        rcpts = await self._fetch(
            "SELECT msg_id, rcpt, state, attempts, next_attempt_at, last_error, lease_token, notify FROM recipients "
            "WHERE msg_id = ANY($1::text[]) ORDER BY id", [m["id"] for m in msgs])
        by_msg: dict[str, list[Any]] = {}
        for r in rcpts:
            by_msg.setdefault(r["msg_id"], []).append(r)
        out = []
        for m in msgs:
            rs = by_msg.get(m["id"], [])
            active = [r for r in rs if r["state"] in ACTIVE]
            errors = [r["last_error"] for r in rs if r["last_error"]]
            out.append({
                "id": m["id"], "sender": m["sender"], "created_at": m["created_at"], "size": m["size"],
                "recipients": [r["rcpt"] for r in rs],
                "state": _message_state(rs, m["sender"], m["finished_at"]),
                "next_attempt_at": min((r["next_attempt_at"] for r in active), default=None),
                "last_error": errors[-1] if errors else None,
                "finished_at": m["finished_at"],
            })
        return out

    async def show(self, msg_id: str) -> dict[str, Any] | None:
        rows = await self._fetch("SELECT * FROM messages WHERE id = $1", msg_id)
        if not rows:
            return None
        m = dict(rows[0])
        m.pop("accepted_by", None)
        rcpts = await self._fetch(
            "SELECT rcpt, route, state, attempts, next_attempt_at, last_error, remote_mta, notify, orcpt, lease_token, "
            "lease_owner FROM recipients WHERE msg_id = $1 ORDER BY id", msg_id)
        hist = await self._fetch(
            "SELECT ts, rcpt, event, detail, host, tls, tls_policy, tls_cipher, tls_verified FROM history "
            "WHERE msg_id = $1 ORDER BY ts, seq", msg_id)
        body = await self.body(msg_id, limit=0) or b""
        head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        now = self._clock()
        m["recipients"] = [{**dict(r), "in_flight": r["lease_token"] is not None and r["next_attempt_at"] > now,
                            "leased_by": r["lease_owner"] if r["lease_token"] is not None else None} for r in rcpts]
        for r in m["recipients"]:
            r.pop("lease_token")
            r.pop("lease_owner")
        m["history"] = [dict(h) for h in hist]
        m["headers"] = head
        m["state"] = _message_state(rcpts, m["sender"], m["finished_at"])
        return m

    async def retry(self, msg_id: str | None, *, also: Any = None) -> int:
        """`also`: an async op(conn) run in the same transaction (the audit row, store/pg_audit.py)."""
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> int:
            rows = await conn.fetch(
                f"UPDATE recipients SET next_attempt_at = $1 WHERE {_ACTIVE} AND lease_token IS NULL "
                "AND ($2::text IS NULL OR msg_id = $2) RETURNING id", now, msg_id)
            await _run_also(also, conn)
            return len(rows)

        n = await self._run(op)
        if n and self._on_enqueue:
            self._on_enqueue()
        return n

    async def delete(self, msg_id: str, *, bounce: NewMessage | None = None, also: Any = None) -> bool:
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> bool:
            rows = await conn.fetch("SELECT finished_at FROM messages WHERE id = $1 FOR UPDATE", msg_id)
            if not rows:
                return False
            if rows[0]["finished_at"] is not None:  # finished: deleting removes it from the history
                await conn.execute("DELETE FROM messages WHERE id = $1", msg_id)
                await _run_also(also, conn)
                return True
            await conn.execute(
                "UPDATE recipients SET state = 'failed', lease_token = NULL, lease_owner = NULL, "
                f"last_error = 'deleted by the administrator' WHERE msg_id = $1 AND {_ACTIVE}", msg_id)
            if bounce is not None:
                await self._insert(conn, bounce.queue_id or new_queue_id(), bounce, now)
            await self._finish_if_final(conn, msg_id, now)
            await _run_also(also, conn)
            return True

        result = await self._run(op)
        if result and bounce is not None and self._on_enqueue:
            self._on_enqueue()
        return result

    PAGE_STATES = ("active", "pending", "deferred", "finished", "delivered", "failed", "all")

    async def page(self, *, state: str = "active", domain: str | None = None, sender: str | None = None,
                   recipient: str | None = None, qid: str | None = None,
                   after: tuple[float, str] | None = None, limit: int = 50) -> tuple[list[dict[str, Any]], bool]:
        """One keyset page in (created_at, id) order, filtered, and whether more follow (as SQLite's)."""
        if state not in self.PAGE_STATES:
            raise ValueError(f"unknown state {state!r}")
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if state in ("active", "pending", "deferred"):
            where.append("m.finished_at IS NULL")
        elif state in ("finished", "delivered", "failed"):
            where.append("m.finished_at IS NOT NULL")
        if state in ("pending", "deferred", "delivered", "failed"):
            where.append(f"EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND r.state = {arg(state)})")
        if domain:
            p = arg(f"%@{_like_escape(domain)}")
            where.append(f"(m.sender LIKE {p} OR m.auth_user LIKE {p})")
        if sender:
            where.append(f"m.sender LIKE {arg(f'%{_like_escape(sender)}%')}")
        if recipient:
            where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND r.rcpt LIKE "
                         f"{arg(f'%{_like_escape(recipient)}%')})")
        if qid:
            where.append(f"m.id LIKE {arg(_like_escape(qid.upper()) + '%')}")
        if after is not None:
            where.append(f"(m.created_at, m.id) > ({arg(float(after[0]))}::float8, {arg(after[1])}::text)")
        sql = ("SELECT m.id, m.sender, m.created_at, m.size, m.finished_at, m.auth_user FROM messages m"
               + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY m.created_at, m.id LIMIT {arg(limit + 1)}")
        msgs = list(await self._fetch(sql, *args))
        more = len(msgs) > limit
        return await self._summaries(msgs[:limit]), more

    async def activity_by_domain(self, since: float) -> dict[str, dict[str, int]]:
        rows = await self._fetch(
            "SELECT lower(split_part(a.addr, '@', 2)) AS domain, a.event, COUNT(*) AS n FROM "
            "(SELECT COALESCE(NULLIF(m.auth_user, ''), m.sender) AS addr, h.event FROM history h "
            " JOIN messages m ON m.id = h.msg_id WHERE h.ts >= $1 AND h.rcpt IS NOT NULL) a "
            "GROUP BY 1, a.event", since)
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["domain"], {})[r["event"]] = r["n"]
        return out

    async def count_for_domain(self, domain: str) -> int:
        pat = f"%@{_like_escape(domain)}"
        rows = await self._fetch(
            "SELECT COUNT(*) AS n FROM messages WHERE finished_at IS NULL "
            "AND (sender LIKE $1 OR auth_user LIKE $1)", pat)
        return rows[0]["n"]

    async def nodes(self) -> list[dict[str, Any]]:
        """Per lease owner (node/incarnation): how many recipients it holds and until when
        (the data behind a later `relay node list`)."""
        rows = await self._fetch(
            f"SELECT lease_owner, COUNT(*) AS leased, MAX(next_attempt_at) AS until FROM recipients "
            f"WHERE lease_token IS NOT NULL AND {_ACTIVE} GROUP BY lease_owner ORDER BY lease_owner")
        return [dict(r) for r in rows]
