"""The group-commit writer: every write to the database, of every store, goes through here.

Whatever is waiting becomes one transaction (one fsync under synchronous=FULL), each
operation inside its own SAVEPOINT so one bad operation fails alone. A caller's future
resolves only after the COMMIT that holds its work (the session sends 250 only then). The
batch runs as one call in a writer thread with a sqlite3 connection of its own, so no
transaction is ever held open across an await, and the cross-process turn (`db.WriterLock`,
taken by `relay serve`, the delivery process and the CLI alike) is held for one hop only.
"""
from __future__ import annotations

import asyncio
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .. import db, metrics
from ..db import WriterLock
from .contract import LeaseLost, StorageFull, StoreRefusal, StoreUnavailable

Op = Callable[[sqlite3.Connection], Any]  # runs in the writer thread, inside the batch's transaction


def classify_error(exc: BaseException) -> StoreUnavailable:
    if isinstance(exc, StoreUnavailable):
        return exc
    text = str(exc).lower()
    if isinstance(exc, sqlite3.Error) and ("full" in text or getattr(exc, "sqlite_errorcode", None) == 13):
        metrics.STORE_ERRORS.labels("full").inc()
        return StorageFull(str(exc))
    metrics.STORE_ERRORS.labels("unavailable").inc()
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")


# An operation's own answer ("no such row", "already exists", "lease lost"), passed to its
# caller as is; anything else is the store failing, and becomes StoreUnavailable.
_ANSWERS = (LeaseLost, StoreRefusal, KeyError, ValueError)


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


class GroupWriter:
    """One per process and database file; shared by the queue, credential and DKIM stores."""

    def __init__(self, path: str | None = None, *, reader: Any = None, writer_lock: WriterLock | None = None,
                 sync_commits: bool = True):
        # The file by name, or (tests, one-off stores) the file an open aiosqlite connection has.
        self._path = path
        self._reader = reader
        self._lock = writer_lock
        # Writes: a connection of their own, used only from this one thread.
        self._wexec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._wconn: sqlite3.Connection | None = None
        self._sync_commits = sync_commits
        self._pending: list[tuple[Op, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing = False
        # Batches committed so far: a caller that sees the same count as an earlier one after
        # its own commit knows that one came after its commit too (QueueStore: one wake a batch).
        self.commits = 0

    async def write(self, op: Op) -> Any:
        """Run `op` inside the next group transaction; its return value once committed."""
        if self._closing:
            raise StoreUnavailable("the store is closing")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        self._wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._writer_loop(), name="store-writer")
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

    async def _run_batch(self, batch: list[tuple[Op, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._wconn is None:
                if self._path is None:
                    rows = await self._reader.execute_fetchall("PRAGMA database_list")
                    self._path = next(r["file"] for r in rows if r["name"] == "main")
                self._wconn = await loop.run_in_executor(self._wexec, self._open_writer)
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
                    failed, results = StoreUnavailable("store busy: no write turn within "
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
        self.commits += 1
        for (_, fut), (value, exc) in zip(batch, results):
            if fut.done():
                continue
            if exc is None:
                fut.set_result(value)
            elif isinstance(exc, _ANSWERS):
                fut.set_exception(exc)
            else:
                fut.set_exception(classify_error(exc))

    def _open_writer(self) -> sqlite3.Connection:
        conn = db.open_sync(self._path)
        if not self._sync_commits:
            # WAL without an fsync per commit: a commit survives a crash of the process, and
            # the next synchronous commit on the file (any acceptance) makes it durable too.
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _run_batch_sync(self, ops: list[Op], turn: _Turn) -> tuple[BaseException | None,
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

    def _transaction(self, ops: list[Op]) -> tuple[BaseException | None, list[tuple[Any, BaseException | None]]]:
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
