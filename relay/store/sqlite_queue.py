"""The durable queue on SQLite: enqueue -> queue id; claim due work under an owned lease; settle.

Implements `contract.QueueStore`. Every write goes through the shared group-commit writer
(`writer.GroupWriter`): the session's 250 waits for the COMMIT that holds its message. Rows
are shaped for a later `FOR UPDATE SKIP LOCKED` backend: per-recipient state,
`next_attempt_at` doubling as the lease's end, a lease token that fences every later write,
and the lease's owner so that recovery takes back only this node's leases.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sqlite3
import time
from typing import Any, Callable, Iterable

import aiosqlite

from .. import metrics, spool
from ..logs import event
from ..db import WriterLock
from .contract import (ACTIVE, FINAL, ClaimedRecipient, Job, LeaseLost, LeaseOwner, NewMessage, NewRecipient,
                       RecipientUpdate, StorageFull, StoreUnavailable, new_queue_id)
from .writer import GroupWriter, Op

log = logging.getLogger("relay.queue")

__all__ = ["QueueStore", "new_queue_id", "ACTIVE", "FINAL", "ClaimedRecipient", "Job", "LeaseLost", "LeaseOwner",
           "NewMessage", "NewRecipient", "RecipientUpdate", "StorageFull", "StoreUnavailable"]

class QueueStore:
    fence_each_attempt = False  # one node: the heartbeat's recent confirmation is enough (contract.py)

    def __init__(self, conn: aiosqlite.Connection, *, clock: Callable[[], float] = time.time,
                 lease_seconds: float = 600, on_enqueue: Callable[[], None] | None = None,
                 crash_point: str | None = None, writer: GroupWriter | None = None,
                 writer_lock: WriterLock | None = None, sync_commits: bool = True,
                 owner: LeaseOwner | None = None, spool_dir: str | None = None):
        self._conn = conn          # reads (aiosqlite's thread)
        # Writes: the process's shared writer (the factory passes it); a store built on its own
        # (tests) gets a private one.
        self._own_writer = writer is None
        self._writer = writer or GroupWriter(reader=conn, writer_lock=writer_lock, sync_commits=sync_commits)
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.owner = owner or LeaseOwner(socket.gethostname(), secrets.token_hex(4))
        self._on_enqueue = on_enqueue
        self._woken_at = -1  # the writer's commit count at the last wake after an enqueue
        # body_to_send requests waiting for the next read (one query and one hop for all of them).
        self._bodies_wanted: list[tuple[str, asyncio.Future]] = []
        self._body_reader: asyncio.Task | None = None
        # Where spooled bodies (bodies.path) live; a store without one (tests) keeps every body in rows.
        self.spool_dir = spool_dir
        self._to_unlink: list[str] = []
        self._unlinker: asyncio.Task | None = None
        # Test hook (RELAY_CRASH_POINT): die at a named point to prove recovery.
        self._crash_point = crash_point if crash_point is not None else os.environ.get("RELAY_CRASH_POINT")

    async def _write(self, op: Op) -> Any:
        return await self._writer.write(op)

    async def close(self) -> None:
        if self._unlinker is not None:
            await asyncio.gather(self._unlinker, return_exceptions=True)
        if self._own_writer:
            await self._writer.close()

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
            # One wake per group commit, not per message: the enqueues of one batch resume
            # together, and the first one's wake came after the commit that holds them all.
            commits = getattr(self._writer, "commits", None)
            if commits is None or commits != self._woken_at:
                self._woken_at = -1 if commits is None else commits
                self._on_enqueue()
        return result

    def _insert(self, conn: sqlite3.Connection, qid: str, msg: NewMessage, now: float) -> None:
        conn.execute(
            "INSERT INTO messages(id, sender, created_at, size, auth_user, client_ip, ret, envid, smtputf8, "
            "dkim_domain, requiretls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (qid, msg.sender, now, msg.size, msg.auth_user, msg.client_ip, msg.ret, msg.envid, int(msg.smtputf8),
             msg.dkim_domain, int(msg.requiretls)))
        conn.execute("INSERT INTO bodies(id, data, path, ascii) VALUES (?, ?, ?, ?)",
                     (qid, msg.data, msg.spool_file, int(msg.spool_ascii) if msg.spool_file else None))
        conn.executemany(
            "INSERT INTO recipients(msg_id, rcpt, route, state, next_attempt_at, notify, orcpt, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)",
            [(qid, r.address, r.route, now, r.notify, r.orcpt, now) for r in msg.recipients])
        conn.execute("INSERT INTO history(msg_id, ts, event, detail) VALUES (?, ?, 'queued', ?)",
                           (qid, now, f"from=<{msg.sender}> rcpts={len(msg.recipients)} size={msg.size}"))

    # ------------------------------------------------------------ claim / settle

    async def claim(self, limit: int, now: float | None = None,
                    destination: Callable[[str], str] | None = None,
                    exclude_routes: Iterable[str] = ()) -> list[Job]:
        """Lease up to `limit` due recipients, grouped into jobs by (message, destination).

        `destination` maps a route to what shares a transaction: with a smarthost every domain
        of a message goes in one transaction, not one per recipient domain. `exclude_routes`
        are skipped (the scheduler's saturated destinations: their backlog is full already).
        """
        t = self._clock() if now is None else now
        dest = destination or (lambda route: route)
        excluded = tuple(exclude_routes)
        skip = f" AND route NOT IN ({','.join('?' * len(excluded))})" if excluded else ""
        # Look before taking the write lock: the runner polls, and an empty claim need not be a transaction.
        if not await self._conn.execute_fetchall(
                "SELECT 1 FROM recipients WHERE state IN ('pending', 'deferred') AND next_attempt_at <= ?"
                f"{skip} LIMIT 1", (t, *excluded)):
            return []
        owner = str(self.owner)
        until = t + self.lease_seconds

        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                "SELECT r.id, r.msg_id, r.rcpt, r.route, r.attempts, r.notify, r.orcpt, "
                "m.sender, m.created_at, m.size, m.ret, m.envid, m.smtputf8, m.warned, m.requiretls "
                "FROM recipients r JOIN messages m ON m.id = r.msg_id "
                "WHERE r.state IN ('pending', 'deferred') AND r.next_attempt_at <= ?"
                f"{skip.replace('route', 'r.route')} ORDER BY r.next_attempt_at LIMIT ?",
                (t, *excluded, limit)).fetchall()
            jobs: dict[tuple[str, str], Job] = {}
            updates = []
            for r in rows:
                key = (r["msg_id"], dest(r["route"]))
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = Job(r["msg_id"], key[1], secrets.token_hex(8), r["sender"], r["created_at"],
                                          r["size"], r["ret"], r["envid"], bool(r["smtputf8"]), bool(r["warned"]),
                                          until, confirmed_at=t, requiretls=bool(r["requiretls"]))
                job.recipients.append(ClaimedRecipient(r["id"], r["rcpt"], r["attempts"] + 1, r["notify"], r["orcpt"]))
                # The lease is the due time: a crashed worker's rows come due again by themselves.
                updates.append((until, job.token, owner, r["id"]))
            conn.executemany(
                "UPDATE recipients SET next_attempt_at = ?, attempts = attempts + 1, lease_token = ?, lease_owner = ? "
                "WHERE id = ?", updates)
            return list(jobs.values())

        return await self._write(op)

    async def renew(self, job: Job) -> None:
        """Extend one job's lease; raises LeaseLost (changing nothing) if it was taken over."""
        if await self.renew_many([job]):
            raise LeaseLost(job.msg_id)

    async def renew_many(self, jobs: list[Job]) -> list[Job]:
        """The heartbeat: extend the leases of every job this runner holds, in one transaction.
        Returns the jobs whose lease is no longer ours (their tokens were replaced: a claim after
        the lease ran out); those are marked `lost` and must be neither sent nor settled."""
        if not jobs:
            return []
        now = self._clock()
        until = now + self.lease_seconds

        def op(conn: sqlite3.Connection) -> list[Job]:
            lost = []
            for job in jobs:
                # By primary key (no index on the token): a heartbeat over 2,000 held jobs must not
                # scan the table 2,000 times while it holds the write turn.
                renewed = sum(conn.execute(
                    "UPDATE recipients SET next_attempt_at = ? WHERE id = ? AND lease_token = ? "
                    "AND state IN ('pending', 'deferred')", (until, r.id, job.token)).rowcount
                    for r in job.recipients)
                if renewed != len(job.recipients):
                    lost.append(job)
            return lost

        lost = await self._write(op)
        gone = {id(j) for j in lost}
        for job in jobs:
            if id(job) in gone:
                job.lost = True
            else:
                job.leased_until, job.confirmed_at = until, now
        return lost

    async def holds(self, job: Job) -> bool:
        """Whether the store still has this job's rows under its token (the fence before DATA)."""
        ids = [r.id for r in job.recipients]
        rows = await self._conn.execute_fetchall(
            f"SELECT COUNT(*) AS n FROM recipients WHERE id IN ({','.join('?' * len(ids))}) AND lease_token = ? "
            "AND state IN ('pending', 'deferred')", (*ids, job.token))
        held = rows[0]["n"] == len(ids)
        if held:
            job.confirmed_at = self._clock()
        else:
            job.lost = True
        return held

    @staticmethod
    def _keep_signature(conn: sqlite3.Connection, msg_id: str, prefix: bytes) -> None:
        """Keep the DKIM-Signature field (`prefix`; empty when there was no key), sent before the
        content from now on, so retries send the same bytes; the body itself is never rewritten
        (a spooled one stays where it is). The first job of a message to get here wins."""
        cur = conn.execute("UPDATE messages SET dkim_domain = NULL, size = size + ? WHERE id = ? "
                           "AND dkim_domain IS NOT NULL", (len(prefix), msg_id))
        if cur.rowcount:
            conn.execute("UPDATE bodies SET prefix = ? WHERE id = ?", (prefix, msg_id))

    async def next_due(self, exclude_routes: Iterable[str] = ()) -> float | None:
        excluded = tuple(exclude_routes)
        skip = f" AND route NOT IN ({','.join('?' * len(excluded))})" if excluded else ""
        rows = await self._conn.execute_fetchall(
            f"SELECT MIN(next_attempt_at) AS t FROM recipients WHERE state IN ('pending', 'deferred'){skip}", excluded)
        return rows[0]["t"] if rows else None

    def _body_of(self, row: Any) -> spool.Body:
        prefix = bytes(row["prefix"] or b"")
        if row["path"] is None:
            data = bytes(row["data"])
            return spool.Body(prefix, data, None, len(data))
        if self.spool_dir is None:
            raise StoreUnavailable("a spooled body, but this store has no spool directory")
        return spool.Body(prefix, None, os.path.join(self.spool_dir, row["path"]), row["size"] - len(prefix),
                          ascii=bool(row["ascii"]) if row["ascii"] is not None else None,
                          wire=row["path"].endswith(spool.WIRE_SUFFIX))

    async def body(self, msg_id: str, limit: int = 1_048_576) -> bytes | None:
        """The message as sent (signature included): whole when at most `limit` bytes (or held in
        the row), else the header block only (what `queue show` and a DSN's RET=HDRS need)."""
        rows = await self._conn.execute_fetchall(
            "SELECT b.data, b.path, b.prefix, b.ascii, m.size FROM bodies b JOIN messages m ON m.id = b.id "
            "WHERE b.id = ?",
            (msg_id,))
        if not rows:
            return None
        r = rows[0]
        prefix = bytes(r["prefix"] or b"")
        if r["path"] is None or r["size"] > limit or self.spool_dir is None:
            return prefix + bytes(r["data"])
        try:
            return await self._body_of(r).read_all()
        except FileNotFoundError:  # finished meanwhile: the row keeps the header block
            return prefix + bytes(r["data"])

    _BODY_BATCH = 32  # rows hold at most limits.data_in_memory bytes each (larger bodies are files)

    async def body_to_send(self, msg_id: str) -> tuple[spool.Body | None, str | None]:
        """(body, domain to DKIM-sign for if it is still unsigned), read together: a job of the same
        message for another destination may have stored the signature since this job's claim.

        The deliveries that start in the same pass of the loop are read with one query (one
        thread hop to the reader, not one each)."""
        fut = asyncio.get_running_loop().create_future()
        self._bodies_wanted.append((msg_id, fut))
        if self._body_reader is None or self._body_reader.done():
            self._body_reader = asyncio.create_task(self._read_bodies(), name="body-reader")
        return await fut

    async def _read_bodies(self) -> None:
        while self._bodies_wanted:
            batch = self._bodies_wanted[:self._BODY_BATCH]
            del self._bodies_wanted[:len(batch)]
            ids = list(dict.fromkeys(m for m, _ in batch))
            try:
                rows = await self._conn.execute_fetchall(
                    "SELECT b.id, b.data, b.path, b.prefix, b.ascii, m.size, m.dkim_domain FROM bodies b "
                    f"JOIN messages m ON m.id = b.id WHERE b.id IN ({','.join('?' * len(ids))}) "
                    "AND m.finished_at IS NULL", ids)
                found = {r["id"]: r for r in rows}
            except asyncio.CancelledError:
                for _, fut in batch + self._bodies_wanted:
                    fut.cancel()
                self._bodies_wanted.clear()
                raise
            except Exception as exc:  # noqa: BLE001 - each waiter gets the failure
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for msg_id, fut in batch:
                if fut.done():
                    continue
                r = found.get(msg_id)
                try:
                    fut.set_result((self._body_of(r), r["dkim_domain"]) if r is not None else (None, None))
                except Exception as exc:  # noqa: BLE001 - e.g. a spooled body without a spool directory
                    fut.set_exception(exc)

    async def _unlink(self, names: list[str]) -> None:
        """Remove finished bodies' files, after the commit that let them go (a crash in between
        leaves an orphan, which the next start removes). Not waited for: files freed while a
        removal runs go with the next one, so under load many messages' files go in one thread
        hop, not one each; `close` waits for the last."""
        if not names or self.spool_dir is None:
            return
        self._to_unlink.extend(os.path.join(self.spool_dir, n) for n in names)
        if self._unlinker is None or self._unlinker.done():
            self._unlinker = asyncio.create_task(self._unlink_pending(), name="spool-unlink")

    async def _unlink_pending(self) -> None:
        while self._to_unlink:
            paths, self._to_unlink = self._to_unlink, []
            try:
                await asyncio.to_thread(spool.unlink_all, paths)
            except OSError as exc:  # an orphan then, removed at the next start
                event(log, "spool_unlink_failed", logging.WARNING, files=len(paths), error=str(exc))

    async def spooled_names(self) -> set[str]:
        rows = await self._conn.execute_fetchall("SELECT path FROM bodies WHERE path IS NOT NULL")
        return {r["path"] for r in rows}

    async def remove_orphan_files(self) -> int:
        """At start, before any session: spool files without a row (see spool.remove_orphans)."""
        if self.spool_dir is None:
            return 0
        keep = await self.spooled_names()
        return await asyncio.to_thread(spool.remove_orphans, self.spool_dir, keep)

    async def settle(self, job: Job, updates: list[RecipientUpdate], *, bounces: tuple[NewMessage, ...] = (),
                     history: list[tuple] = (), mark_warned: bool = False,
                     signature: bytes | None = None) -> list[str]:
        """Apply outcomes for a job's recipients and queue its DSNs, atomically. Returns DSN queue ids.
        `signature`: the DKIM-Signature field the attempt sent, kept by _keep_signature (in
        the same transaction: the body's row is rewritten here anyway when the message finishes).

        Raises LeaseLost (and changes nothing) if another worker holds the lease now.
        """
        now = self._clock()
        bounce_ids = [b.queue_id or new_queue_id() for b in bounces]
        freed: list[str] = []

        def op(conn: sqlite3.Connection) -> list[str]:
            freed.clear()  # a batch that failed and is retried starts over
            for u in updates:
                cur = conn.execute(
                    "UPDATE recipients SET state = ?, next_attempt_at = ?, lease_token = NULL, lease_owner = NULL, "
                "last_error = ?, "
                    "remote_mta = ?, updated_at = ? WHERE id = ? AND lease_token = ?",
                    (u.state, u.next_attempt_at, u.error, u.remote_mta, now, u.id, job.token))
                if cur.rowcount != 1:
                    raise LeaseLost(job.msg_id)
            if history:
                # (rcpt, event, detail[, host, tls[, tls_policy, tls_cipher, tls_verified]]): the
                # attempt's remote host, its TLS, and the outbound TLS policy applied (issue 15)
                conn.executemany("INSERT INTO history(msg_id, ts, rcpt, event, detail, host, tls, tls_policy, "
                                 "tls_cipher, tls_verified) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [(job.msg_id, now, *(tuple(h) + (None,) * 5)[:8]) for h in history])
            if mark_warned:
                conn.execute("UPDATE messages SET warned = 1 WHERE id = ?", (job.msg_id,))
            for qid, b in zip(bounce_ids, bounces):
                self._insert(conn, qid, b, now)
            if signature is not None:
                self._keep_signature(conn, job.msg_id, signature)
            # What became of the failure report belongs to the message's story (queue show).
            notes = [(job.msg_id, now, None, "bounce", f"report {qid} queued to <{b.recipients[0].address}>")
                     for qid, b in zip(bounce_ids, bounces)]
            if not job.sender and any(u.state == "failed" for u in updates):
                notes.append((job.msg_id, now, None, "dropped", "a bounce that failed: no bounce for a bounce"))
            conn.executemany("INSERT INTO history(msg_id, ts, rcpt, event, detail) VALUES (?, ?, ?, ?, ?)", notes)
            self._finish_if_final(conn, job.msg_id, now, freed)
            return bounce_ids

        result = await self._write(op)
        await self._unlink(freed)
        if bounces and self._on_enqueue:
            self._on_enqueue()
        return result

    def _finish_if_final(self, conn: sqlite3.Connection, msg_id: str, now: float, freed: list[str]) -> bool:
        rows = conn.execute(
            "SELECT COUNT(*) AS n FROM recipients WHERE msg_id = ? AND state NOT IN ('delivered', 'failed')", (msg_id,)).fetchall()
        if rows[0]["n"]:
            return False
        # Every recipient is final: the message leaves the queue but stays in its history
        # (`relay queue history`, `queue show`) until purge_finished(); of the body only the
        # header block is kept (what `queue show` prints), so retention costs little space.
        conn.execute("UPDATE messages SET finished_at = ? WHERE id = ?", (now, msg_id))
        # A spooled body's row already holds just its header block; the file goes after the commit.
        freed.extend(r[0] for r in conn.execute("SELECT path FROM bodies WHERE id = ? AND path IS NOT NULL",
                                                (msg_id,)))
        conn.execute("UPDATE bodies SET path = NULL WHERE id = ? AND path IS NOT NULL", (msg_id,))
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
            conn.executemany(
                "UPDATE recipients SET next_attempt_at = ?, lease_token = NULL, lease_owner = NULL, "
                "attempts = MAX(attempts - 1, 0) WHERE id = ? AND lease_token = ?",
                [(now, r.id, job.token) for r in job.recipients])

        await self._write(op)

    async def recover(self) -> int:
        """Take back this node's leases: called when no runner of this node is alive (startup, or
        after the delivery process died), so whatever its earlier incarnations held is due now.
        Another node's leases are not touched: they come due by themselves when they run out,
        and until then that node may well be delivering them. (Leases without an owner date from
        before owners were recorded, when there was only ever one node.)"""
        now = self._clock()
        node = self.owner.node

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE recipients SET next_attempt_at = ?, lease_token = NULL, lease_owner = NULL "
                "WHERE lease_token IS NOT NULL AND state IN ('pending', 'deferred') "
                "AND (lease_owner IS NULL OR substr(lease_owner, 1, ?) = ?)",
                (now, len(node) + 1, node + "/"))
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
        return await self._summaries(msgs)

    async def _summaries(self, msgs: list[Any]) -> list[dict[str, Any]]:
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
            "SELECT rcpt, route, state, attempts, next_attempt_at, last_error, remote_mta, notify, orcpt, lease_token, "
            "lease_owner "
            "FROM recipients WHERE msg_id = ? ORDER BY id", (msg_id,))
        hist = await self._conn.execute_fetchall(
            "SELECT ts, rcpt, event, detail, host, tls, tls_policy, tls_cipher, tls_verified FROM history "
            "WHERE msg_id = ? ORDER BY ts, rowid", (msg_id,))
        body = await self.body(msg_id, limit=0) or b""  # the header block is all it shows
        head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        now = self._clock()
        # In flight: leased, and the lease has not run out (a crashed holder's rows are just due).
        m["recipients"] = [{**dict(r), "in_flight": r["lease_token"] is not None and r["next_attempt_at"] > now,
                            "leased_by": r["lease_owner"] if r["lease_token"] is not None else None} for r in rcpts]
        for r in m["recipients"]:
            r.pop("lease_token")
            r.pop("lease_owner")
        m["history"] = [dict(h) for h in hist]
        m["headers"] = head
        m["state"] = _message_state(rcpts, m["sender"], m["finished_at"])
        return m

    async def retry(self, msg_id: str | None, *, also: Op | None = None) -> int:
        """Make active recipients (of one message, or all) due now. Returns how many.
        `also` runs in the same transaction (the operations layer's audit row)."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> int:
            if msg_id is None:
                cur = conn.execute("UPDATE recipients SET next_attempt_at = ? "
                                         "WHERE state IN ('pending', 'deferred') AND lease_token IS NULL", (now,))
            else:
                cur = conn.execute("UPDATE recipients SET next_attempt_at = ? WHERE msg_id = ? "
                                         "AND state IN ('pending', 'deferred') AND lease_token IS NULL", (now, msg_id))
            if also is not None:
                also(conn)
            return cur.rowcount

        n = await self._write(op)
        if n and self._on_enqueue:
            self._on_enqueue()
        return n

    async def delete(self, msg_id: str, *, bounce: NewMessage | None = None, also: Op | None = None) -> bool:
        now = self._clock()
        freed: list[str] = []

        def op(conn: sqlite3.Connection) -> bool:
            freed.clear()
            rows = conn.execute("SELECT finished_at FROM messages WHERE id = ?", (msg_id,)).fetchall()
            if not rows:
                return False
            if rows[0][0] is not None:  # finished: deleting it removes it from the history
                for table, col in (("history", "msg_id"), ("recipients", "msg_id"), ("bodies", "id"), ("messages", "id")):
                    conn.execute(f"DELETE FROM {table} WHERE {col} = ?", (msg_id,))
                if also is not None:
                    also(conn)
                return True
            conn.execute("UPDATE recipients SET state = 'failed', lease_token = NULL, "
                               "last_error = 'deleted by the administrator' WHERE msg_id = ? "
                               "AND state IN ('pending', 'deferred')", (msg_id,))
            if bounce is not None:
                self._insert(conn, bounce.queue_id or new_queue_id(), bounce, now)
            self._finish_if_final(conn, msg_id, now, freed)
            if also is not None:
                also(conn)
            return True

        result = await self._write(op)
        await self._unlink(freed)
        if result and bounce is not None and self._on_enqueue:
            self._on_enqueue()  # the failure report is new work for the runner
        return result

    PAGE_STATES = ("active", "pending", "deferred", "finished", "delivered", "failed", "all")

    async def page(self, *, state: str = "active", domain: str | None = None, sender: str | None = None,
                   recipient: str | None = None, qid: str | None = None,
                   after: tuple[float, str] | None = None, limit: int = 50) -> tuple[list[dict[str, Any]], bool]:
        """One page of messages in (created_at, id) order after the keyset `after`, filtered; and
        whether more follow. Keyset, never OFFSET: a page costs the same deep in a long queue, and
        messages accepted meanwhile land after the end instead of shifting what a reader sees."""
        where, args = [], []
        if state not in self.PAGE_STATES:
            raise ValueError(f"unknown state {state!r}")
        if state in ("active", "pending", "deferred"):
            where.append("m.finished_at IS NULL")
        elif state in ("finished", "delivered", "failed"):
            where.append("m.finished_at IS NOT NULL")
        if state in ("pending", "deferred", "delivered", "failed"):
            where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND r.state = ?)")
            args.append(state)
        if domain:
            pat = f"%@{_like_escape(domain)}"
            where.append("(m.sender LIKE ? ESCAPE '\\' OR m.auth_user LIKE ? ESCAPE '\\')")
            args += [pat, pat]
        if sender:
            where.append("m.sender LIKE ? ESCAPE '\\'")
            args.append(f"%{_like_escape(sender)}%")
        if recipient:
            where.append("EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND r.rcpt LIKE ? ESCAPE '\\')")
            args.append(f"%{_like_escape(recipient)}%")
        if qid:
            where.append("m.id LIKE ? ESCAPE '\\'")
            args.append(f"{_like_escape(qid.upper())}%")
        if after is not None:
            where.append("(m.created_at > ? OR (m.created_at = ? AND m.id > ?))")
            args += [after[0], after[0], after[1]]
        sql = ("SELECT m.id, m.sender, m.created_at, m.size, m.finished_at, m.auth_user FROM messages m"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY m.created_at, m.id LIMIT ?")
        msgs = await self._conn.execute_fetchall(sql, (*args, limit + 1))
        msgs = list(msgs)
        more = len(msgs) > limit
        return await self._summaries(msgs[:limit]), more

    async def activity_by_domain(self, since: float) -> dict[str, dict[str, int]]:
        """Per sending domain (the credential's, else the sender's), how many recipient outcomes
        of each kind (delivered, deferred, failed, expired) the history holds since `since`."""
        rows = await self._conn.execute_fetchall(
            "SELECT lower(substr(a.addr, instr(a.addr, '@') + 1)) AS domain, a.event, COUNT(*) AS n FROM "
            "(SELECT COALESCE(NULLIF(m.auth_user, ''), m.sender) AS addr, h.event FROM history h "
            " JOIN messages m ON m.id = h.msg_id WHERE h.ts >= ? AND h.rcpt IS NOT NULL) a "
            "GROUP BY domain, a.event", (since,))
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["domain"], {})[r["event"]] = r["n"]
        return out

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
