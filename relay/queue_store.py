"""The durable queue: enqueue (group commit) -> queue id; claim due work with a lease; settle outcomes.

All writes go through one writer task that folds whatever is waiting into a single transaction
(one fsync under synchronous=FULL), each operation inside its own SAVEPOINT so one bad operation
fails alone. A caller's future resolves only after the COMMIT that holds its work: the session
sends 250 only then. Rows are shaped for a later `FOR UPDATE SKIP LOCKED` backend: per-recipient
state, `next_attempt_at` doubling as the lease expiry, and a lease token that fences settles.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import aiosqlite

from . import db, metrics
from .db import WriterLock

ACTIVE = ("pending", "deferred")
FINAL = ("delivered", "failed")


class StoreUnavailable(Exception):
    """The queue could not commit: the client must get a transient reply."""


class StorageFull(StoreUnavailable):
    pass


class LeaseLost(Exception):
    """Another worker took over this lease; the settle changed nothing."""


def new_queue_id() -> str:
    # Time prefix keeps ids roughly sortable for humans; 40 random bits make them unguessable.
    return f"{int(time.time()):08X}"[-8:] + secrets.token_hex(5).upper()


@dataclass(frozen=True)
class NewRecipient:
    address: str
    route: str                     # destination domain, or "smarthost"
    notify: str | None = None      # RFC 3461 NOTIFY value, e.g. "FAILURE,DELAY" or "NEVER"
    orcpt: str | None = None


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: tuple[NewRecipient, ...]
    data: bytes
    auth_user: str | None = None
    client_ip: str | None = None
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False
    queue_id: str | None = None    # preassigned so the Received header can carry it
    dkim_domain: str | None = None  # sign for this domain before the first delivery attempt


@dataclass
class ClaimedRecipient:
    id: int
    address: str
    attempts: int                  # including the attempt this claim starts
    notify: str | None
    orcpt: str | None


@dataclass
class Job:
    """Due recipients of one message for one route, under one lease token."""
    msg_id: str
    route: str
    token: str
    sender: str
    created_at: float
    size: int
    ret: str | None
    envid: str | None
    smtputf8: bool
    warned: bool
    leased_until: float = 0.0      # the lease's expiry (= the rows' next_attempt_at while leased)
    recipients: list[ClaimedRecipient] = field(default_factory=list)


@dataclass(frozen=True)
class RecipientUpdate:
    id: int
    state: str                     # deferred | delivered | failed
    next_attempt_at: float
    error: str | None = None
    remote_mta: str | None = None


_Op = Callable[[sqlite3.Connection], Any]  # runs in the writer thread, inside the batch's transaction


def classify_error(exc: BaseException) -> StoreUnavailable:
    if isinstance(exc, StoreUnavailable):
        return exc
    text = str(exc).lower()
    if isinstance(exc, sqlite3.Error) and ("full" in text or getattr(exc, "sqlite_errorcode", None) == 13):
        metrics.STORE_ERRORS.labels("full").inc()
        return StorageFull(str(exc))
    metrics.STORE_ERRORS.labels("unavailable").inc()
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")


class _Turn:
    """A batch's hand-over between the event loop and the writer thread: exactly one of
    `start` (thread, about to begin the transaction) and `give_up` (loop, tired of waiting) wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "waiting"

    def start(self) -> bool:
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "started"
            return True

    def give_up(self) -> bool:
        with self._lock:
            if self._state == "started":
                return False
            self._state = "abandoned"
            return True


class QueueStore:
    def __init__(self, conn: aiosqlite.Connection, *, clock: Callable[[], float] = time.time,
                 lease_seconds: float = 600, on_enqueue: Callable[[], None] | None = None,
                 crash_point: str | None = None, writer_lock: WriterLock | None = None,
                 sync_commits: bool = True):
        self._conn = conn          # reads (aiosqlite's thread)
        self._lock = writer_lock
        # Writes: a connection of their own, used only from this one thread.
        self._wexec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-writer")
        self._wconn: sqlite3.Connection | None = None
        self._sync_commits = sync_commits
        self._clock = clock
        self.lease_seconds = lease_seconds
        self._on_enqueue = on_enqueue
        self._pending: list[tuple[_Op, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing = False
        # Test hook (RELAY_CRASH_POINT): die at a named point to prove recovery.
        self._crash_point = crash_point if crash_point is not None else os.environ.get("RELAY_CRASH_POINT")

    # ------------------------------------------------------------ writer

    async def _write(self, op: _Op) -> Any:
        if self._closing:
            raise StoreUnavailable("queue is closing")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        self._wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._writer_loop(), name="queue-writer")
        return await fut

    async def _writer_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            batch, self._pending = self._pending, []
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[_Op, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._wconn is None:
                rows = await self._conn.execute_fetchall("PRAGMA database_list")
                path = next(r["file"] for r in rows if r["name"] == "main")
                self._wconn = await loop.run_in_executor(self._wexec, self._open_writer, path)
            # The whole batch is one hop to the writer thread: no await per statement while
            # the write lock is held (the other process is waiting for it).
            turn = _Turn()
            work = loop.run_in_executor(self._wexec, self._run_batch_sync, [op for op, _ in batch], turn)
            try:
                # Only the cross-process turn can wait without bound; SQLite's busy_timeout bounds the rest.
                failed, results = await asyncio.wait_for(asyncio.shield(work),
                                                         db.BUSY_TIMEOUT if self._lock is not None else None)
            except asyncio.TimeoutError:
                if turn.give_up():
                    # Still waiting for the other process's turn (stopped, frozen): answer 4xx now;
                    # the writer thread drops this batch when its turn comes, so nothing commits
                    # behind the clients' backs.
                    failed, results = StoreUnavailable("queue busy: no write turn within "
                                                       f"{db.BUSY_TIMEOUT:g}s"), []
                else:
                    failed, results = await work  # committing now: its outcome is the answer
        except Exception as exc:  # noqa: BLE001 - every failure becomes a transient reply
            failed, results = exc, []
        if failed is not None:
            err = classify_error(failed)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        metrics.STORE_COMMITS.inc()
        for (_, fut), (value, exc) in zip(batch, results):
            if fut.done():
                continue
            if exc is None:
                fut.set_result(value)
            elif isinstance(exc, (LeaseLost, KeyError, ValueError)):
                fut.set_exception(exc)
            else:
                fut.set_exception(classify_error(exc))

    def _open_writer(self, path: str) -> sqlite3.Connection:
        conn = db.open_sync(path)
        if not self._sync_commits:
            # WAL without an fsync per commit: a commit survives a crash of the process, and
            # the next synchronous commit on the file (any acceptance) makes it durable too.
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _run_batch_sync(self, ops: list[_Op], turn: "_Turn") -> tuple[BaseException | None,
                                                                     list[tuple[Any, BaseException | None]]]:
        """In the writer thread: (error that sank the whole batch, or None; per-op (value, error))."""
        if self._lock is not None:
            self._lock.acquire_blocking()
        try:
            if not turn.start():
                return StoreUnavailable("abandoned"), []  # its callers were answered already
            return self._transaction(ops)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _transaction(self, ops: list[_Op]) -> tuple[BaseException | None, list[tuple[Any, BaseException | None]]]:
        conn = self._wconn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:  # noqa: BLE001
            return exc, []
        results: list[tuple[Any, BaseException | None]] = []
        for i, op in enumerate(ops):
            try:
                conn.execute(f"SAVEPOINT op{i}")
                value = op(conn)
                conn.execute(f"RELEASE op{i}")
                results.append((value, None))
            except Exception as exc:  # noqa: BLE001
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (SQLITE_FULL, IOERR, NOMEM may): the
                    # earlier operations' work is gone too, and nothing after may run outside it.
                    return exc, []
                try:
                    conn.execute(f"ROLLBACK TO op{i}")
                    conn.execute(f"RELEASE op{i}")
                except Exception:  # noqa: BLE001
                    pass
                results.append((None, exc))
        try:
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001
            try:
                conn.execute("ROLLBACK")
            except Exception:  # noqa: BLE001
                pass
            return exc, []
        return None, results

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        if self._wconn is not None:
            await asyncio.get_running_loop().run_in_executor(self._wexec, self._wconn.close)
            self._wconn = None
        self._wexec.shutdown(wait=False)

    # ------------------------------------------------------------ enqueue

    async def enqueue(self, msg: NewMessage) -> str:
        """Commit a message and its recipients; returns the queue id once durable."""
        qid = msg.queue_id or new_queue_id()
        now = self._clock()

        def op(conn: sqlite3.Connection) -> str:
            self._insert(conn, qid, msg, now)
            return qid

        result = await self._write(op)
        if self._crash_point == "after_commit":
            os._exit(75)  # test hook: committed, but the client never sees 250
        metrics.MESSAGES_ACCEPTED.labels("bounce" if not msg.sender else "submission").inc()
        if self._on_enqueue:
            self._on_enqueue()
        return result

    def _insert(self, conn: sqlite3.Connection, qid: str, msg: NewMessage, now: float) -> None:
        conn.execute(
            "INSERT INTO messages(id, sender, created_at, size, auth_user, client_ip, ret, envid, smtputf8, "
            "dkim_domain) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (qid, msg.sender, now, len(msg.data), msg.auth_user, msg.client_ip, msg.ret, msg.envid, int(msg.smtputf8),
             msg.dkim_domain))
        conn.execute("INSERT INTO bodies(id, data) VALUES (?, ?)", (qid, msg.data))
        conn.executemany(
            "INSERT INTO recipients(msg_id, rcpt, route, state, next_attempt_at, notify, orcpt, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)",
            [(qid, r.address, r.route, now, r.notify, r.orcpt, now) for r in msg.recipients])
        conn.execute("INSERT INTO history(msg_id, ts, event, detail) VALUES (?, ?, 'queued', ?)",
                           (qid, now, f"from=<{msg.sender}> rcpts={len(msg.recipients)} size={len(msg.data)}"))

    # ------------------------------------------------------------ claim / settle

    async def claim(self, limit: int, now: float | None = None,
                    destination: Callable[[str], str] | None = None) -> list[Job]:
        """Lease up to `limit` due recipients, grouped into jobs by (message, destination).

        `destination` maps a route to what shares a transaction: with a smarthost every domain
        of a message goes in one transaction, not one per recipient domain.
        """
        t = self._clock() if now is None else now
        dest = destination or (lambda route: route)
        # Look before taking the write lock: the runner polls, and an empty claim need not be a transaction.
        if not await self._conn.execute_fetchall(
                "SELECT 1 FROM recipients WHERE state IN ('pending', 'deferred') AND next_attempt_at <= ? LIMIT 1",
                (t,)):
            return []

        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                "SELECT r.id, r.msg_id, r.rcpt, r.route, r.attempts, r.notify, r.orcpt, "
                "m.sender, m.created_at, m.size, m.ret, m.envid, m.smtputf8, m.warned "
                "FROM recipients r JOIN messages m ON m.id = r.msg_id "
                "WHERE r.state IN ('pending', 'deferred') AND r.next_attempt_at <= ? "
                "ORDER BY r.next_attempt_at LIMIT ?", (t, limit)).fetchall()
            jobs: dict[tuple[str, str], Job] = {}
            updates = []
            for r in rows:
                key = (r["msg_id"], dest(r["route"]))
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = Job(r["msg_id"], key[1], secrets.token_hex(8), r["sender"], r["created_at"],
                                          r["size"], r["ret"], r["envid"], bool(r["smtputf8"]), bool(r["warned"]),
                                          t + self.lease_seconds)
                job.recipients.append(ClaimedRecipient(r["id"], r["rcpt"], r["attempts"] + 1, r["notify"], r["orcpt"]))
                # The lease is the due time: a crashed worker's rows come due again by themselves.
                updates.append((t + self.lease_seconds, job.token, r["id"]))
            conn.executemany(
                "UPDATE recipients SET next_attempt_at = ?, attempts = attempts + 1, lease_token = ? WHERE id = ?",
                updates)
            return list(jobs.values())

        return await self._write(op)

    async def renew(self, job: Job) -> None:
        """Extend a job's lease before starting it; raises LeaseLost (changing nothing) if it was taken over.

        A job can wait in the runner's backlog behind a slow destination; once its lease has run
        out, another claim may hold the same rows, and delivering both would send the mail twice.
        """
        until = self._clock() + self.lease_seconds

        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE recipients SET next_attempt_at = ? WHERE lease_token = ? AND state IN ('pending', 'deferred')",
                (until, job.token))
            if cur.rowcount != len(job.recipients):
                raise LeaseLost(job.msg_id)

        await self._write(op)
        job.leased_until = until

    async def store_signed(self, msg_id: str, data: bytes) -> None:
        """Keep the signed copy (`data`; unchanged when there was no key), so retries send the
        same bytes; the first job of a message to get here wins, a later one changes nothing."""
        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute("UPDATE messages SET dkim_domain = NULL, size = ? WHERE id = ? "
                               "AND dkim_domain IS NOT NULL", (len(data), msg_id))
            if cur.rowcount:
                conn.execute("UPDATE bodies SET data = ? WHERE id = ?", (data, msg_id))

        await self._write(op)

    async def next_due(self) -> float | None:
        rows = await self._conn.execute_fetchall(
            "SELECT MIN(next_attempt_at) AS t FROM recipients WHERE state IN ('pending', 'deferred')")
        return rows[0]["t"] if rows else None

    async def body(self, msg_id: str) -> bytes | None:
        rows = await self._conn.execute_fetchall("SELECT data FROM bodies WHERE id = ?", (msg_id,))
        return bytes(rows[0]["data"]) if rows else None

    async def body_to_send(self, msg_id: str) -> tuple[bytes | None, str | None]:
        """(body, domain to DKIM-sign for if it is still unsigned), read together: a job of the same
        message for another destination may have stored the signed copy since this job's claim."""
        rows = await self._conn.execute_fetchall(
            "SELECT b.data, m.dkim_domain FROM bodies b JOIN messages m ON m.id = b.id WHERE b.id = ?", (msg_id,))
        return (bytes(rows[0]["data"]), rows[0]["dkim_domain"]) if rows else (None, None)

    async def settle(self, job: Job, updates: list[RecipientUpdate], *, bounces: tuple[NewMessage, ...] = (),
                     history: list[tuple[str | None, str, str]] = (), mark_warned: bool = False) -> list[str]:
        """Apply outcomes for a job's recipients and queue its DSNs, atomically. Returns DSN queue ids.

        Raises LeaseLost (and changes nothing) if another worker holds the lease now.
        """
        now = self._clock()
        bounce_ids = [b.queue_id or new_queue_id() for b in bounces]

        def op(conn: sqlite3.Connection) -> list[str]:
            for u in updates:
                cur = conn.execute(
                    "UPDATE recipients SET state = ?, next_attempt_at = ?, lease_token = NULL, last_error = ?, "
                    "remote_mta = ?, updated_at = ? WHERE id = ? AND lease_token = ?",
                    (u.state, u.next_attempt_at, u.error, u.remote_mta, now, u.id, job.token))
                if cur.rowcount != 1:
                    raise LeaseLost(job.msg_id)
            if history:
                conn.executemany("INSERT INTO history(msg_id, ts, rcpt, event, detail) VALUES (?, ?, ?, ?, ?)",
                                       [(job.msg_id, now, rcpt, ev, detail) for rcpt, ev, detail in history])
            if mark_warned:
                conn.execute("UPDATE messages SET warned = 1 WHERE id = ?", (job.msg_id,))
            for qid, b in zip(bounce_ids, bounces):
                self._insert(conn, qid, b, now)
            # What became of the failure report belongs to the message's story (queue show).
            notes = [(job.msg_id, now, None, "bounce", f"report {qid} queued to <{b.recipients[0].address}>")
                     for qid, b in zip(bounce_ids, bounces)]
            if not job.sender and any(u.state == "failed" for u in updates):
                notes.append((job.msg_id, now, None, "dropped", "a bounce that failed: no bounce for a bounce"))
            conn.executemany("INSERT INTO history(msg_id, ts, rcpt, event, detail) VALUES (?, ?, ?, ?, ?)", notes)
            self._finish_if_final(conn, job.msg_id, now)
            return bounce_ids

        result = await self._write(op)
        if bounces and self._on_enqueue:
            self._on_enqueue()
        return result

    def _finish_if_final(self, conn: sqlite3.Connection, msg_id: str, now: float) -> bool:
        rows = conn.execute(
            "SELECT COUNT(*) AS n FROM recipients WHERE msg_id = ? AND state NOT IN ('delivered', 'failed')", (msg_id,)).fetchall()
        if rows[0]["n"]:
            return False
        # Every recipient is final: the message leaves the queue but stays in its history
        # (`relay queue history`, `queue show`) until purge_finished(); of the body only the
        # header block is kept (what `queue show` prints), so retention costs little space.
        conn.execute("UPDATE messages SET finished_at = ? WHERE id = ?", (now, msg_id))
        conn.execute("UPDATE bodies SET data = CASE WHEN instr(data, X'0D0A0D0A') > 0 "
                     "THEN substr(data, 1, instr(data, X'0D0A0D0A') + 3) ELSE substr(data, 1, 8192) END "
                     "WHERE id = ?", (msg_id,))
        return True

    async def purge_finished(self, before: float, limit: int = 1000) -> int:
        """Delete up to `limit` messages finished before `before` (storage.finished_retention);
        bounded, so a sweep after a busy day is several short transactions, not one long one."""
        def op(conn: sqlite3.Connection) -> int:
            ids = [(r[0],) for r in conn.execute(
                "SELECT id FROM messages WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?", (before, limit))]
            for table, col in (("history", "msg_id"), ("recipients", "msg_id"), ("bodies", "id"), ("messages", "id")):
                conn.executemany(f"DELETE FROM {table} WHERE {col} = ?", ids)
            return len(ids)

        return await self._write(op)

    async def release(self, job: Job) -> None:
        """Give a lease back unattempted (shutdown): due now, attempt not counted."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE recipients SET next_attempt_at = ?, lease_token = NULL, attempts = MAX(attempts - 1, 0) "
                "WHERE lease_token = ?", (now, job.token))

        await self._write(op)

    async def recover(self) -> int:
        """At startup this node holds no leases: anything left in flight by a crash is due now."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE recipients SET next_attempt_at = ?, lease_token = NULL "
                "WHERE lease_token IS NOT NULL AND state IN ('pending', 'deferred')", (now,))
            return cur.rowcount

        return await self._write(op)

    # ------------------------------------------------------------ operations (CLI)

    async def stats(self) -> dict[str, Any]:
        # The queue is what is unfinished; finished messages kept for history are not in it.
        rows = await self._conn.execute_fetchall(
            "SELECT state, COUNT(*) AS n FROM recipients WHERE msg_id IN "
            "(SELECT id FROM messages WHERE finished_at IS NULL) GROUP BY state")
        by_state = {s: 0 for s in ACTIVE + FINAL}
        by_state.update({r["state"]: r["n"] for r in rows})
        m = (await self._conn.execute_fetchall(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM messages WHERE finished_at IS NULL"))[0]
        return {"recipients": by_state, "messages": m["n"], "oldest": m["oldest"]}

    async def list(self, limit: int = 1000, *, finished: bool = False) -> list[dict[str, Any]]:
        """Queued messages, oldest first; with `finished`, the finished ones kept for history,
        most recent first, each with its outcome."""
        if finished:
            msgs = await self._conn.execute_fetchall(
                "SELECT id, sender, created_at, size, finished_at FROM messages WHERE finished_at IS NOT NULL "
                "ORDER BY finished_at DESC LIMIT ?", (limit,))
        else:
            msgs = await self._conn.execute_fetchall(
                "SELECT id, sender, created_at, size, finished_at FROM messages WHERE finished_at IS NULL "
                "ORDER BY created_at LIMIT ?", (limit,))
        out = []
        for m in msgs:
            rcpts = await self._conn.execute_fetchall(
                "SELECT rcpt, state, attempts, next_attempt_at, last_error, lease_token, notify FROM recipients "
                "WHERE msg_id = ? ORDER BY id", (m["id"],))
            active = [r for r in rcpts if r["state"] in ACTIVE]
            errors = [r["last_error"] for r in rcpts if r["last_error"]]
            out.append({
                "id": m["id"], "sender": m["sender"], "created_at": m["created_at"], "size": m["size"],
                "recipients": [r["rcpt"] for r in rcpts],
                "state": _message_state(rcpts, m["sender"], m["finished_at"]),
                "next_attempt_at": min((r["next_attempt_at"] for r in active), default=None),
                "last_error": errors[-1] if errors else None,
                "finished_at": m["finished_at"],
            })
        return out

    async def show(self, msg_id: str) -> dict[str, Any] | None:
        rows = await self._conn.execute_fetchall("SELECT * FROM messages WHERE id = ?", (msg_id,))
        if not rows:
            return None
        m = dict(rows[0])
        rcpts = await self._conn.execute_fetchall(
            "SELECT rcpt, route, state, attempts, next_attempt_at, last_error, remote_mta, notify, orcpt, lease_token "
            "FROM recipients WHERE msg_id = ? ORDER BY id", (msg_id,))
        hist = await self._conn.execute_fetchall(
            "SELECT ts, rcpt, event, detail FROM history WHERE msg_id = ? ORDER BY ts, rowid", (msg_id,))
        body = await self.body(msg_id) or b""
        head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        m["recipients"] = [{**dict(r), "in_flight": r["lease_token"] is not None} for r in rcpts]
        for r in m["recipients"]:
            r.pop("lease_token")
        m["history"] = [dict(h) for h in hist]
        m["headers"] = head
        m["state"] = _message_state(rcpts, m["sender"], m["finished_at"])
        return m

    async def retry(self, msg_id: str | None) -> int:
        """Make active recipients (of one message, or all) due now. Returns how many."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> int:
            if msg_id is None:
                cur = conn.execute("UPDATE recipients SET next_attempt_at = ? "
                                         "WHERE state IN ('pending', 'deferred') AND lease_token IS NULL", (now,))
            else:
                cur = conn.execute("UPDATE recipients SET next_attempt_at = ? WHERE msg_id = ? "
                                         "AND state IN ('pending', 'deferred') AND lease_token IS NULL", (now, msg_id))
            return cur.rowcount

        n = await self._write(op)
        if n and self._on_enqueue:
            self._on_enqueue()
        return n

    async def delete(self, msg_id: str, *, bounce: NewMessage | None = None) -> bool:
        now = self._clock()

        def op(conn: sqlite3.Connection) -> bool:
            rows = conn.execute("SELECT finished_at FROM messages WHERE id = ?", (msg_id,)).fetchall()
            if not rows:
                return False
            if rows[0][0] is not None:  # finished: deleting it removes it from the history
                for table, col in (("history", "msg_id"), ("recipients", "msg_id"), ("bodies", "id"), ("messages", "id")):
                    conn.execute(f"DELETE FROM {table} WHERE {col} = ?", (msg_id,))
                return True
            conn.execute("UPDATE recipients SET state = 'failed', lease_token = NULL, "
                               "last_error = 'deleted by the administrator' WHERE msg_id = ? "
                               "AND state IN ('pending', 'deferred')", (msg_id,))
            if bounce is not None:
                self._insert(conn, bounce.queue_id or new_queue_id(), bounce, now)
            self._finish_if_final(conn, msg_id, now)
            return True

        return await self._write(op)

    async def count_for_domain(self, domain: str) -> int:
        rows = await self._conn.execute_fetchall(
            "SELECT COUNT(*) AS n FROM messages WHERE finished_at IS NULL "
            "AND (sender LIKE ? ESCAPE '\\' OR auth_user LIKE ? ESCAPE '\\')",
            (f"%@{_like_escape(domain)}", f"%@{_like_escape(domain)}"))
        return rows[0]["n"]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _outcome(rcpts: list[Any], sender: str) -> str:
    """A finished message in a word or two: delivered, bounced, dropped bounce, failed, deleted."""
    failed = [r for r in rcpts if r["state"] == "failed"]
    if not failed:
        return "delivered"
    if all(r["last_error"] == "deleted by the administrator" for r in failed):
        what = "deleted"
    elif not sender:
        what = "dropped bounce"  # it was a bounce itself: none is sent for it (RFC 5321 3.6.3)
    elif any("NEVER" not in (r["notify"] or "").upper().split(",") for r in failed):
        what = "bounced"
    else:
        what = "failed"  # NOTIFY=NEVER: the sender asked for no report
    return what if len(failed) == len(rcpts) else f"partly delivered, {what}"


def _message_state(rcpts: list[Any], sender: str = "", finished_at: float | None = None) -> str:
    if finished_at is not None:
        return _outcome(rcpts, sender)
    states = {r["state"] for r in rcpts}
    if any(r["lease_token"] for r in rcpts if r["state"] in ACTIVE):
        return "in-flight"
    if "deferred" in states:
        return "deferred"
    if "pending" in states:
        return "pending"
    return "final"
