"""The group-commit writer: every write to the database, of every store, goes through here.

One thread per process and database file owns a sqlite3 connection of its own and commits
continuously: whatever is waiting when it gets its turn becomes one transaction (one fsync
under synchronous=FULL), each operation inside its own SAVEPOINT so one bad operation fails
alone; what arrives meanwhile is the next transaction. A caller's future resolves only after
the COMMIT that holds its work (the session sends 250 only then), with one wake of the event
loop per transaction. No transaction is ever held open across an await, and the cross-process
turn (`db.WriterLock`, taken by `relay serve`, the delivery process and the CLI alike) is held
for one transaction only.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
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

# A write's life, changed only under GroupWriter._mutex: exactly one of "the thread takes it
# into a transaction" and "its caller stops waiting" wins, so an abandoned write never commits.
_WAITING, _TAKEN, _ABANDONED = 0, 1, 2

Outcome = tuple[BaseException | None, list[tuple[Any, BaseException | None]]]


class _Write:
    __slots__ = ("op", "fut", "state")

    def __init__(self, op: Op, fut: asyncio.Future):
        self.op = op
        self.fut = fut
        self.state = _WAITING


class GroupWriter:
    """One per process and database file; shared by the queue, credential and DKIM stores."""

    def __init__(self, path: str | None = None, *, reader: Any = None, writer_lock: WriterLock | None = None,
                 sync_commits: bool = True):
        # The file by name, or (tests, one-off stores) the file an open aiosqlite connection has.
        self._path = path
        self._reader = reader
        self._lock = writer_lock
        self._sync_commits = sync_commits
        self._mutex = threading.Lock()
        self._ready = threading.Condition(self._mutex)
        self._pending: list[_Write] = []  # under _mutex
        self._closing = False
        self._thread: threading.Thread | None = None
        self._starting: asyncio.Task | None = None
        self._exited: concurrent.futures.Future = concurrent.futures.Future()
        self._conn: sqlite3.Connection | None = None  # the writer thread's only
        # Batches committed so far: a caller that sees the same count as an earlier one after
        # its own commit knows that one came after its commit too (QueueStore: one wake a batch).
        self.commits = 0

    async def write(self, op: Op) -> Any:
        """Run `op` inside the next group transaction; its return value once committed."""
        if self._closing:
            raise StoreUnavailable("the store is closing")
        loop = asyncio.get_running_loop()
        w = _Write(op, loop.create_future())
        # Only the cross-process turn can wait without bound (another process stopped or frozen
        # while holding it); SQLite's busy_timeout bounds the rest.
        timer = loop.call_later(db.BUSY_TIMEOUT, self._give_up, w) if self._lock is not None else None
        with self._ready:
            self._pending.append(w)
            self._ready.notify()
        if self._thread is None and self._starting is None:
            self._starting = loop.create_task(self._start(), name="store-writer-start")
        try:
            return await w.fut
        except asyncio.CancelledError:
            # A caller that stopped waiting before its transaction began: the write is dropped
            # (nobody will hear of it); once begun, it commits or fails as it would have.
            with self._mutex:
                if w.state == _WAITING:
                    w.state = _ABANDONED
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _start(self) -> None:
        """The thread, once the file is known (by name, or asked of the reader connection)."""
        if self._path is None:
            try:
                rows = await self._reader.execute_fetchall("PRAGMA database_list")
                self._path = next(r["file"] for r in rows if r["name"] == "main")
            except Exception as exc:  # noqa: BLE001 - what waits hears a transient reply; the next write tries again
                err = classify_error(exc)
                with self._mutex:
                    waiting, self._pending = self._pending, []
                for w in waiting:
                    if not w.fut.done():
                        w.fut.set_exception(err)
                self._starting = None
                return
        self._thread = threading.Thread(target=self._serve, name="store-writer", daemon=True)
        self._thread.start()

    def _give_up(self, w: _Write) -> None:
        """On the loop, db.BUSY_TIMEOUT after the write: still no turn, so answer 4xx now; the
        thread skips the write when its turn comes, so nothing commits behind the client's back."""
        with self._mutex:
            if w.state != _WAITING:
                return
            w.state = _ABANDONED
        if not w.fut.done():
            w.fut.set_exception(classify_error(StoreUnavailable(
                f"store busy: no write turn within {db.BUSY_TIMEOUT:g}s")))

    # ------------------------------------------------------------ the writer thread

    def _serve(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._pending and not self._closing:
                        self._ready.wait()
                    if not self._pending:
                        return  # closing, and nothing left to commit
                self._one_transaction()
        finally:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001
                    pass
                self._conn = None
            self._exited.set_result(None)

    def _one_transaction(self) -> None:
        batch: list[_Write] = []
        failed: BaseException | None = None
        results: list[tuple[Any, BaseException | None]] = []
        try:
            if self._conn is None:
                self._conn = self._open()
        except Exception as exc:  # noqa: BLE001 - this batch fails; the next one tries again
            failed = exc
        held = self._lock is not None and failed is None
        if held:
            self._lock.acquire_blocking()
        try:
            # Taken after the turn came, so whatever arrived while waiting for it rides along.
            with self._mutex:
                batch = [w for w in self._pending if w.state == _WAITING]
                self._pending = []
                for w in batch:
                    w.state = _TAKEN
            if batch and failed is None:
                failed, results = self._transaction([w.op for w in batch])
        finally:
            if held:
                self._lock.release()
        if not batch:
            return
        if failed is None:
            metrics.STORE_COMMITS.inc()
        loops: dict[asyncio.AbstractEventLoop, list[int]] = {}
        for i, w in enumerate(batch):
            loops.setdefault(w.fut.get_loop(), []).append(i)
        for loop, idx in loops.items():
            part = [batch[i] for i in idx]
            outcome = (failed, [results[i] for i in idx] if failed is None else [])
            try:
                loop.call_soon_threadsafe(self._deliver, part, outcome)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more

    def _open(self) -> sqlite3.Connection:
        conn = db.open_sync(self._path)
        if not self._sync_commits:
            # WAL without an fsync per commit: a commit survives a crash of the process, and
            # the next synchronous commit on the file (any acceptance) makes it durable too.
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _transaction(self, ops: list[Op]) -> Outcome:
        """(error that sank the whole batch, or None; per-op (value, error))."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:  # noqa: BLE001
            return exc, []
        results: list[tuple[Any, BaseException | None]] = []
        for op in ops:
            try:
                conn.execute("SAVEPOINT op")
                value = op(conn)
                conn.execute("RELEASE op")
                results.append((value, None))
            except Exception as exc:  # noqa: BLE001
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (SQLITE_FULL, IOERR, NOMEM may): the
                    # earlier operations' work is gone too, and nothing after may run outside it.
                    return exc, []
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
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

    # ------------------------------------------------------------ back on the loop

    def _deliver(self, batch: list[_Write], outcome: Outcome) -> None:
        failed, results = outcome
        if failed is not None:
            err = classify_error(failed)
            for w in batch:
                if not w.fut.done():
                    w.fut.set_exception(err)
            return
        self.commits += 1
        for w, (value, exc) in zip(batch, results):
            if w.fut.done():
                continue
            if exc is None:
                w.fut.set_result(value)
            elif isinstance(exc, _ANSWERS):
                w.fut.set_exception(exc)
            else:
                w.fut.set_exception(classify_error(exc))

    async def close(self) -> None:
        """Commit what is waiting, then stop the thread and close its connection."""
        self._closing = True
        if self._starting is not None:
            await self._starting  # writes made before close() are committed, not stranded
        with self._ready:
            self._ready.notify()
        if self._thread is not None:
            await asyncio.wrap_future(self._exited)
