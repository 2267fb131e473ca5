"""SQLite-only parts of the queue store: the group-commit writer shares commits between sessions,
and a writer denied the cross-process turn answers 'unavailable' (the contract itself is in
test_queue_contract.py, against both backends)."""
from __future__ import annotations

import asyncio

import pytest

from relay import db
from relay.metrics import REGISTRY
from relay.store.sqlite_queue import NewMessage, NewRecipient, QueueStore


@pytest.fixture
async def conn(tmp_path):
    c = await db.open_async(str(tmp_path / "queue.db"))
    yield c
    await c.close()


@pytest.fixture
async def store(conn):
    s = QueueStore(conn)
    yield s
    await s.close()


def message(*rcpts: str, sender="alice@example.com", data=b"Subject: t\r\n\r\nhi\r\n", **kw) -> NewMessage:
    return NewMessage(sender=sender, data=data,
                      recipients=tuple(NewRecipient(r, r.rpartition("@")[2]) for r in rcpts), **kw)


async def rows(conn, sql="SELECT * FROM recipients ORDER BY id", *args):
    return [dict(r) for r in await conn.execute_fetchall(sql, args)]


# ------------------------------------------------------------------ group commit

async def test_concurrent_enqueues_share_commits(store, conn):
    before = REGISTRY.get_sample_value("relay_store_commits_total") or 0.0
    n = 50
    qids = await asyncio.gather(*(store.enqueue(message(f"u{i}@example.net")) for i in range(n)))
    commits = REGISTRY.get_sample_value("relay_store_commits_total") - before
    assert len(set(qids)) == n
    assert 1 <= commits < n / 2, commits  # one fsync carries many messages
    assert len(await rows(conn, "SELECT id FROM messages")) == n


async def test_a_failing_operation_does_not_sink_its_batch(store, conn):
    good = store.enqueue(message("bob@example.net"))
    bad = store.enqueue(message("carol@example.net", queue_id="DUP"))
    dup = store.enqueue(message("dave@example.net", queue_id="DUP"))  # same primary key: fails alone
    results = await asyncio.gather(good, bad, dup, return_exceptions=True)
    assert isinstance(results[0], str) and results[1] == "DUP"
    assert isinstance(results[2], Exception)
    assert len(await rows(conn, "SELECT id FROM messages")) == 2
    assert sorted(r["rcpt"] for r in await rows(conn)) == ["bob@example.net", "carol@example.net"]


async def test_a_writer_denied_its_turn_answers_unavailable_and_commits_nothing_later(tmp_path, monkeypatch):
    """The other process holds the writer lock (stopped, frozen): the caller hears 'unavailable' in
    bounded time, and the batch is dropped, not committed once the lock comes free."""
    import fcntl
    import os

    from relay.store.sqlite_queue import StoreUnavailable
    monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.5)
    path = str(tmp_path / "queue.db")
    conn = await db.open_async(path)
    lock = db.WriterLock(path)
    store = QueueStore(conn, writer_lock=lock)
    other = os.open(lock.path, os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)  # the other process's turn, and it does not end
    try:
        with pytest.raises(StoreUnavailable):
            await store.enqueue(message("bob@example.net"))
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    qid = await store.enqueue(message("carol@example.net"))  # the store works again
    rows = await conn.execute_fetchall("SELECT r.rcpt FROM recipients r")
    assert [r["rcpt"] for r in rows] == ["carol@example.net"], "the abandoned batch was committed"
    assert qid
    await store.close()
    await conn.close()
    lock.close()


async def test_a_write_cancelled_before_its_turn_never_commits(tmp_path):
    """A caller that stops waiting (its client hung up) while the other process holds the turn:
    its write is dropped when the turn comes, and the writer goes on with the next one."""
    import fcntl
    import os

    path = str(tmp_path / "queue.db")
    conn = await db.open_async(path)
    lock = db.WriterLock(path)
    store = QueueStore(conn, writer_lock=lock)
    await store.enqueue(message("first@example.net"))  # the writer thread is up
    other = os.open(lock.path, os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        waiting = asyncio.ensure_future(store.enqueue(message("bob@example.net")))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # no turn yet
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    await store.enqueue(message("carol@example.net"))
    got = sorted(r["rcpt"] for r in await rows(conn))
    assert got == ["carol@example.net", "first@example.net"], got
    await store.close()
    await conn.close()
    lock.close()


async def test_close_commits_what_is_waiting(tmp_path):
    path = str(tmp_path / "queue.db")
    conn = await db.open_async(path)
    store = QueueStore(conn)
    writes = [asyncio.ensure_future(store.enqueue(message(f"u{i}@example.net"))) for i in range(10)]
    await asyncio.sleep(0)  # every write is handed to the writer
    await store.close()
    qids = await asyncio.wait_for(asyncio.gather(*writes), 5)
    assert len(set(qids)) == 10
    assert len(await rows(conn)) == 10
    with pytest.raises(Exception, match="closing"):
        await store.enqueue(message("late@example.net"))
    await conn.close()
