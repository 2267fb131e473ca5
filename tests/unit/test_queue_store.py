"""QueueStore against a real SQLite file (aiosqlite): enqueue, claim leases, fenced settles, recovery.

A fake clock drives lease expiry and due times, so nothing here sleeps.
"""
from __future__ import annotations

import asyncio

import pytest

from relay import db
from relay.metrics import REGISTRY
from relay.store.sqlite_queue import LeaseLost, NewMessage, NewRecipient, QueueStore, RecipientUpdate

LEASE = 600.0


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def conn(tmp_path):
    c = await db.open_async(str(tmp_path / "queue.db"))
    yield c
    await c.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def store(conn, clock):
    s = QueueStore(conn, clock=clock, lease_seconds=LEASE)
    yield s
    await s.close()


def message(*rcpts: str, sender="alice@example.com", data=b"Subject: t\r\n\r\nhi\r\n", **kw) -> NewMessage:
    return NewMessage(sender=sender, data=data,
                      recipients=tuple(NewRecipient(r, r.rpartition("@")[2]) for r in rcpts), **kw)


async def rows(conn, sql="SELECT * FROM recipients ORDER BY id", *args):
    return [dict(r) for r in await conn.execute_fetchall(sql, args)]


def done(job, state="delivered", next_at=0.0, error=None):
    return [RecipientUpdate(r.id, state, next_at, error) for r in job.recipients]


# ------------------------------------------------------------------ enqueue and claim

async def test_enqueue_commits_message_body_and_pending_recipients(store, conn, clock):
    woken = []
    store._on_enqueue = lambda: woken.append(1)
    qid = await store.enqueue(message("bob@example.net", "carol@example.org", envid="e1", ret="FULL"))
    assert woken == [1]
    [m] = await rows(conn, "SELECT * FROM messages")
    assert (m["id"], m["sender"], m["created_at"], m["envid"], m["ret"]) == (qid, "alice@example.com", clock.t, "e1", "FULL")
    assert await store.body(qid) == b"Subject: t\r\n\r\nhi\r\n"
    rs = await rows(conn)
    assert [(r["rcpt"], r["route"], r["state"], r["attempts"], r["next_attempt_at"], r["lease_token"]) for r in rs] == [
        ("bob@example.net", "example.net", "pending", 0, clock.t, None),
        ("carol@example.org", "example.org", "pending", 0, clock.t, None)]
    assert await store.next_due() == clock.t


async def test_claim_groups_by_message_and_destination_and_leases(store, conn, clock):
    q1 = await store.enqueue(message("bob@example.net", "dave@example.net", "carol@example.org"))
    q2 = await store.enqueue(message("erin@example.net"))
    jobs = await store.claim(100)
    assert sorted((j.msg_id, j.route, [r.address for r in j.recipients]) for j in jobs) == sorted([
        (q1, "example.net", ["bob@example.net", "dave@example.net"]),
        (q1, "example.org", ["carol@example.org"]),
        (q2, "example.net", ["erin@example.net"])])
    assert len({j.token for j in jobs}) == 3
    assert all(r.attempts == 1 for j in jobs for r in j.recipients)
    assert all(j.leased_until == clock.t + LEASE for j in jobs)
    for r in await rows(conn):
        assert r["attempts"] == 1 and r["next_attempt_at"] == clock.t + LEASE and r["lease_token"]
    assert await store.claim(100) == []  # leased: invisible to other claims
    assert await store.next_due() == clock.t + LEASE


async def test_claim_with_a_shared_destination_makes_one_job_per_message(store):
    qid = await store.enqueue(message("bob@example.net", "carol@example.org"))
    [job] = await store.claim(100, destination=lambda route: "smarthost")
    assert (job.msg_id, job.route, len(job.recipients)) == (qid, "smarthost", 2)


async def test_claim_respects_the_limit_and_due_times(store, clock):
    for i in range(5):
        await store.enqueue(message(f"u{i}@example.net"))
        clock.t += 1
    assert sum(len(j.recipients) for j in await store.claim(3)) == 3
    assert sum(len(j.recipients) for j in await store.claim(3)) == 2


# ------------------------------------------------------------------ settle and fencing

async def test_recipients_settle_independently_and_delivered_is_never_claimed_again(store, conn, clock):
    qid = await store.enqueue(message("bob@example.net", "dave@example.net"))
    [job] = await store.claim(100)
    bob, dave = job.recipients
    await store.settle(job, [RecipientUpdate(bob.id, "delivered", clock.t),
                             RecipientUpdate(dave.id, "deferred", clock.t + 60, "451 4.2.0 busy", "mx.example.net")],
                       history=[(bob.address, "delivered", "250 ok"), (dave.address, "deferred", "451 4.2.0 busy")])
    rs = {r["rcpt"]: r for r in await rows(conn)}
    assert rs["bob@example.net"]["state"] == "delivered" and rs["bob@example.net"]["lease_token"] is None
    assert rs["dave@example.net"]["state"] == "deferred" and rs["dave@example.net"]["last_error"] == "451 4.2.0 busy"
    assert rs["dave@example.net"]["remote_mta"] == "mx.example.net"
    assert await store.claim(100) == []
    clock.t += 60
    [again] = await store.claim(100)
    assert [(r.address, r.attempts) for r in again.recipients] == [("dave@example.net", 2)]
    await store.settle(again, done(again))
    # Every recipient final: the message leaves the queue, but stays in its history (headers
    # only) until purged after storage.finished_retention.
    assert await store.list() == [] and (await store.stats())["messages"] == 0 and await store.next_due() is None
    [finished] = await store.list(finished=True)
    assert (finished["id"], finished["state"], finished["finished_at"]) == (qid, "delivered", clock.t)
    assert await store.body(qid) == b"Subject: t\r\n\r\n"
    assert await store.purge_finished(before=clock.t) == 0  # not older than that yet
    assert await store.purge_finished(before=clock.t + 1) == 1
    for table in ("messages", "bodies", "recipients", "history"):
        assert await rows(conn, f"SELECT * FROM {table}") == [], table
    assert await store.show(qid) is None


async def test_settle_with_a_stale_token_raises_lease_lost_and_changes_nothing(store, conn, clock):
    qid = await store.enqueue(message("bob@example.net"))
    [old] = await store.claim(100)
    clock.t += LEASE + 1  # the worker holding `old` is presumed dead: its lease expired
    [new] = await store.claim(100)  # expired leases come due again
    assert new.token != old.token and new.recipients[0].attempts == 2
    before = (await rows(conn), await rows(conn, "SELECT * FROM history"), await rows(conn, "SELECT * FROM messages"))
    bounce = message("alice@example.com", sender="")
    with pytest.raises(LeaseLost):
        await store.settle(old, done(old, "failed"), bounces=(bounce,), history=[("bob@example.net", "failed", "x")],
                           mark_warned=True)
    after = (await rows(conn), await rows(conn, "SELECT * FROM history"), await rows(conn, "SELECT * FROM messages"))
    assert after == before  # no state change, no history, no bounce, not marked warned
    await store.settle(new, done(new))
    assert (await store.show(qid))["state"] == "delivered"


async def test_settle_queues_its_dsns_atomically(store, conn, clock):
    await store.enqueue(message("bob@example.net"))
    [job] = await store.claim(100)
    [dsn_id] = await store.settle(job, done(job, "failed"), bounces=(message("alice@example.com", sender=""),))
    [m] = await rows(conn, "SELECT id, sender FROM messages WHERE finished_at IS NULL")
    assert m == {"id": dsn_id, "sender": ""}
    [r] = await rows(conn, "SELECT * FROM recipients WHERE msg_id = ?", dsn_id)
    assert (r["rcpt"], r["state"]) == ("alice@example.com", "pending")


async def test_renew_extends_a_live_lease_and_refuses_a_lost_one(store, conn, clock):
    await store.enqueue(message("bob@example.net"))
    [job] = await store.claim(100)
    clock.t += 100
    await store.renew(job)
    assert job.leased_until == clock.t + LEASE
    assert [r["next_attempt_at"] for r in await rows(conn)] == [clock.t + LEASE]
    clock.t += LEASE + 1
    [taken] = await store.claim(100)
    with pytest.raises(LeaseLost):
        await store.renew(job)
    assert [r["lease_token"] for r in await rows(conn)] == [taken.token]


# ------------------------------------------------------------------ release, recover, retry, delete

async def test_release_gives_the_lease_back_unattempted(store, conn, clock):
    await store.enqueue(message("bob@example.net"))
    [job] = await store.claim(100)
    clock.t += 5
    await store.release(job)
    [r] = await rows(conn)
    assert (r["lease_token"], r["attempts"], r["next_attempt_at"], r["state"]) == (None, 0, clock.t, "pending")
    with pytest.raises(LeaseLost):  # a released job can no longer settle
        await store.settle(job, done(job))
    [again] = await store.claim(100)
    assert again.recipients[0].attempts == 1


async def test_recover_makes_a_crashed_nodes_leases_due_now(conn, clock, tmp_path):
    first = QueueStore(conn, clock=clock, lease_seconds=LEASE)
    await first.enqueue(message("bob@example.net", "carol@example.org"))
    await first.enqueue(message("dave@example.net"))
    jobs = await first.claim(2)
    assert sum(len(j.recipients) for j in jobs) == 2
    # "Crash": a new store on a fresh connection to the same file, as after a restart.
    conn2 = await db.open_async(str(tmp_path / "queue.db"))
    try:
        clock.t += 10
        second = QueueStore(conn2, clock=clock, lease_seconds=LEASE)
        assert await second.recover() == 2
        rs = await rows(conn2)
        assert all(r["lease_token"] is None and r["next_attempt_at"] <= clock.t for r in rs)
        # A claim that crashed counts as an attempt: a message that kills the process cannot loop forever.
        assert sorted(r["attempts"] for r in rs) == [0, 1, 1]
        jobs2 = await second.claim(100)
        assert sum(len(j.recipients) for j in jobs2) == 3
        for j in jobs:
            with pytest.raises(LeaseLost):
                await second.settle(j, done(j))
        assert await second.recover() == 3  # everything claimed is in flight again
        await second.close()
    finally:
        await conn2.close()
        await first.close()


async def test_retry_makes_deferred_recipients_due_but_leaves_leases_alone(store, conn, clock):
    q1 = await store.enqueue(message("bob@example.net"))
    q2 = await store.enqueue(message("carol@example.net"))
    jobs = await store.claim(100)
    j1 = next(j for j in jobs if j.msg_id == q1)
    await store.settle(j1, done(j1, "deferred", clock.t + 3600, "451 later"))
    assert await store.retry(q1) == 1
    assert await store.retry(q2) == 0  # in flight: not touched
    [r1] = await rows(conn, "SELECT * FROM recipients WHERE msg_id = ?", q1)
    assert r1["next_attempt_at"] == clock.t and r1["state"] == "deferred"
    [again] = await store.claim(100)
    assert again.msg_id == q1
    assert await store.retry(None) == 0


async def test_delete_fails_the_recipients_and_can_queue_a_bounce(store, conn, clock):
    qid = await store.enqueue(message("bob@example.net"))
    [job] = await store.claim(100)
    assert await store.delete(qid, bounce=message("alice@example.com", sender="")) is True
    with pytest.raises(LeaseLost):  # the worker that held it changes nothing afterwards
        await store.settle(job, done(job))
    msgs = await rows(conn, "SELECT id, sender FROM messages WHERE finished_at IS NULL")
    assert [m["sender"] for m in msgs] == [""]
    assert (await store.show(qid))["state"] == "deleted"
    assert await store.delete(qid) is True  # a finished one: gone from the history too
    assert await store.show(qid) is None
    assert await store.delete("NOSUCH") is False


@pytest.mark.parametrize("sender,notify,states,outcome", [
    ("alice@example.com", None, ["delivered", "delivered"], "delivered"),
    ("alice@example.com", None, ["failed", "failed"], "bounced"),
    ("alice@example.com", None, ["delivered", "failed"], "partly delivered, bounced"),
    ("", None, ["failed", "failed"], "dropped bounce"),
    ("alice@example.com", "NEVER", ["failed", "failed"], "failed"),
])
async def test_finished_messages_say_their_outcome(store, clock, sender, notify, states, outcome):
    msg = NewMessage(sender=sender, data=b"Subject: t\r\n\r\nhi\r\n", recipients=tuple(
        NewRecipient(r, "example.net", notify=notify) for r in ("bob@example.net", "carol@example.net")))
    qid = await store.enqueue(msg)
    [job] = await store.claim(100)
    await store.settle(job, [RecipientUpdate(r.id, st, clock.t, None if st == "delivered" else "550 5.1.1 no such user")
                             for r, st in zip(job.recipients, states)])
    shown = await store.show(qid)
    assert shown["state"] == outcome and shown["finished_at"] == clock.t
    events = [h["event"] for h in shown["history"]]
    assert ("dropped" in events) == (outcome == "dropped bounce")


async def test_list_show_and_stats(store, clock):
    qid = await store.enqueue(message("bob@example.net", "carol@example.org"))
    [row] = await store.list()
    assert row["id"] == qid and row["state"] == "pending" and row["recipients"] == ["bob@example.net", "carol@example.org"]
    jobs = await store.claim(1)
    shown = await store.show(qid)
    assert shown["state"] == "in-flight"
    assert [r["in_flight"] for r in shown["recipients"]] == [True, False]
    assert "lease_token" not in shown["recipients"][0]
    assert shown["headers"] == "Subject: t"
    await store.settle(jobs[0], done(jobs[0], "deferred", clock.t + 60, "451 x"))
    assert (await store.show(qid))["state"] == "deferred"
    stats = await store.stats()
    assert stats["messages"] == 1 and stats["recipients"]["deferred"] == 1 and stats["recipients"]["pending"] == 1


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
