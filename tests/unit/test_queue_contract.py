"""The queue store contract, against every backend (fixture `store_backend`: a real SQLite
file, and a real PostgreSQL when installed): enqueue, claim leases, fenced settles, recovery.

A fake clock drives lease expiry and due times, so nothing here sleeps. What only one backend
has (SQLite's group writer and cross-process lock; PostgreSQL's SKIP LOCKED between nodes,
replication-wait cancellation) is tested in test_queue_sqlite.py and test_queue_postgres.py.
"""
from __future__ import annotations

import asyncio

import pytest

from relay.store.contract import LeaseLost, LeaseOwner, NewMessage, NewRecipient, RecipientUpdate

LEASE = 600.0


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def conn(store_backend):
    """The backend (named `conn` as the tables are looked at through it: conn.rows(sql))."""
    return store_backend


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def store(conn, clock):
    return await conn.store(clock=clock, lease_seconds=LEASE)


def message(*rcpts: str, sender="alice@example.com", data=b"Subject: t\r\n\r\nhi\r\n", **kw) -> NewMessage:
    return NewMessage(sender=sender, data=data,
                      recipients=tuple(NewRecipient(r, r.rpartition("@")[2]) for r in rcpts), **kw)


async def rows(conn, sql="SELECT * FROM recipients ORDER BY id", *args):
    return await conn.rows(sql, *args)


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


async def test_settle_keeps_the_signature_the_attempt_sent(store, conn, clock):
    """The DKIM-Signature an attempt sent is stored by its settle: a deferred recipient's retry
    sends it unchanged (no new signing), a finished message keeps it in what `queue show` reads,
    and a lost lease keeps nothing."""
    sig = b"DKIM-Signature: v=1; d=example.com\r\n"
    qid = await store.enqueue(message("bob@example.net", "carol@example.org", dkim_domain="example.com"))
    [a, b] = sorted(await store.claim(100), key=lambda j: j.route)
    clock.t += LEASE + 1
    [stale, b2] = sorted(await store.claim(100), key=lambda j: j.route)  # both leases expired
    with pytest.raises(LeaseLost):
        await store.settle(a, done(a, "deferred", clock.t + 60), signature=sig)
    assert (await store.body_to_send(qid))[1] == "example.com"  # still to be signed
    await store.settle(stale, done(stale, "deferred", clock.t + 60), signature=sig)
    body, dkim_domain = await store.body_to_send(qid)
    assert dkim_domain is None and body.prefix == sig  # the retry sends these bytes, unsigned again
    assert await store.body(qid) == sig + b"Subject: t\r\n\r\nhi\r\n"
    await store.settle(b2, done(b2), signature=b"DKIM-Signature: other\r\n")  # the first one kept stays
    assert (await store.body(qid)).startswith(sig)
    qid2 = await store.enqueue(message("dave@example.net", dkim_domain="example.com"))
    [j] = [j for j in await store.claim(100) if j.msg_id == qid2]
    await store.settle(j, done(j), signature=sig)
    shown = await store.show(qid2)
    assert shown["state"] == "delivered" and shown["dkim_domain"] is None and sig in shown["headers"].encode()


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


async def test_recover_makes_a_crashed_nodes_leases_due_now(conn, clock):
    first = await conn.store(clock=clock, lease_seconds=LEASE, owner=LeaseOwner("n1", "a"))
    await first.enqueue(message("bob@example.net", "carol@example.org"))
    await first.enqueue(message("dave@example.net"))
    jobs = await first.claim(2)
    assert sum(len(j.recipients) for j in jobs) == 2
    # "Crash": a new store of the same node on a fresh connection, as after a restart.
    clock.t += 10
    other = await conn.store(clock=clock, lease_seconds=LEASE, owner=LeaseOwner("n2", "b"), fresh_connection=True)
    assert await other.recover() == 0  # another node's leases are not its to take back
    second = await conn.store(clock=clock, lease_seconds=LEASE, owner=LeaseOwner("n1", "c"), fresh_connection=True)
    assert await second.recover() == 2
    rs = await rows(conn)
    assert all(r["lease_token"] is None and r["next_attempt_at"] <= clock.t for r in rs)
    # A claim that crashed counts as an attempt: a message that kills the process cannot loop forever.
    assert sorted(r["attempts"] for r in rs) == [0, 1, 1]
    jobs2 = await second.claim(100)
    assert sum(len(j.recipients) for j in jobs2) == 3
    for j in jobs:
        with pytest.raises(LeaseLost):
            await second.settle(j, done(j))
    assert await second.recover() == 3  # everything claimed is in flight again


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


async def test_holds_is_the_fence_before_data(store, clock):
    await store.enqueue(message("bob@example.net"))
    [job] = await store.claim(100)
    assert await store.holds(job) is True and not job.lost
    clock.t += 2 * LEASE  # frozen past its lease; another worker takes the job over
    [taken] = await store.claim(100)
    assert await store.holds(job) is False and job.lost
    assert await store.holds(taken) is True
    lost = await store.renew_many([job, taken])
    assert lost == [job]


async def test_a_duplicate_queue_id_fails_alone(store, conn):
    good = store.enqueue(message("bob@example.net"))
    bad = store.enqueue(message("carol@example.net", queue_id="DUP"))
    dup = store.enqueue(message("dave@example.net", queue_id="DUP"))  # same primary key: fails alone
    results = await asyncio.gather(good, bad, dup, return_exceptions=True)
    # Which of the two same-id messages wins is not promised (PostgreSQL runs them on separate
    # connections at once); that exactly one does, and the other leaves nothing, is.
    assert isinstance(results[0], str)
    [won] = [i for i, r in enumerate(results[1:]) if r == "DUP"]
    assert isinstance(results[2 - won], Exception)
    assert len(await rows(conn, "SELECT id FROM messages")) == 2
    assert sorted(r["rcpt"] for r in await rows(conn)) == ["bob@example.net", ["carol@example.net", "dave@example.net"][won]]


async def test_excluded_routes_are_not_claimed(store):
    await store.enqueue(message("bob@example.net", "carol@example.org"))
    [job] = await store.claim(100, exclude_routes=["example.net"])
    assert job.route == "example.org"
    assert await store.next_due(exclude_routes=["example.net", "example.org"]) is None


async def test_page_filters_and_keyset(store, clock):
    ids = []
    for i in range(5):
        ids.append(await store.enqueue(message(f"u{i}@example.net", sender=f"s{i}@mg.example.com",
                                               auth_user="app@mg.example.com" if i % 2 else None)))
        clock.t += 1
    first, more = await store.page(limit=2)
    assert [m["id"] for m in first] == ids[:2] and more
    after = (first[-1]["created_at"], first[-1]["id"])
    rest, more = await store.page(after=after, limit=10)
    assert [m["id"] for m in rest] == ids[2:] and not more
    assert [m["id"] for m in (await store.page(sender="s3@"))[0]] == [ids[3]]
    assert [m["id"] for m in (await store.page(recipient="u4@"))[0]] == [ids[4]]
    assert [m["id"] for m in (await store.page(qid=ids[1][:-1].lower()))[0]] == [ids[1]]
    assert len((await store.page(domain="mg.example.com"))[0]) == 5
    assert (await store.page(domain="other.example"))[0] == []
    assert (await store.page(state="finished"))[0] == []
    with pytest.raises(ValueError):
        await store.page(state="bogus")
    assert await store.count_for_domain("mg.example.com") == 5


async def test_activity_by_domain_counts_outcomes(store, clock):
    await store.enqueue(message("bob@example.net", "carol@example.net", auth_user="app@mg.example.com"))
    [job] = await store.claim(100)
    bob, carol = job.recipients
    await store.settle(job, [RecipientUpdate(bob.id, "delivered", clock.t),
                             RecipientUpdate(carol.id, "deferred", clock.t + 60, "451 x")],
                       history=[(bob.address, "delivered", "250"), (carol.address, "deferred", "451 x")])
    assert await store.activity_by_domain(clock.t - 1) == {"mg.example.com": {"delivered": 1, "deferred": 1}}
    assert await store.activity_by_domain(clock.t + 1) == {}


async def test_requiretls_and_the_attempts_tls_policy_are_kept(store):
    qid = await store.enqueue(message("bob@example.net", requiretls=True))
    [job] = await store.claim(100)
    assert job.requiretls is True
    await store.settle(job, done(job), history=[("bob@example.net", "delivered", "250 ok", "mx.example.net",
                                                 "TLSv1.3", "sts-enforce", "TLS_AES_256_GCM_SHA384", True)])
    [h] = [h for h in (await store.show(qid))["history"] if h["event"] == "delivered"]
    assert (h["host"], h["tls"], h["tls_policy"], h["tls_cipher"], bool(h["tls_verified"])) == (
        "mx.example.net", "TLSv1.3", "sts-enforce", "TLS_AES_256_GCM_SHA384", True)
