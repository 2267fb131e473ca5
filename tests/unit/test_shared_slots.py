"""store/slots.py: the destination slot contract. LocalSlots (SQLite, one node) always grants;
PgSlots leases at most `limit` per destination across nodes, fenced by token, reusable after a
lease runs out. Also the cost per worker connection (acquire + release), printed with -s."""
from __future__ import annotations

import time

import pytest


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_a_slot_is_always_granted_on_one_node(store_backend):
    if store_backend.name != "sqlite":
        pytest.skip("LocalSlots: the SQLite side")
    slots = await store_backend.slots()
    got = [await slots.acquire("example.net", 2) for _ in range(5)]
    assert all(s is not None for s in got)  # the runner's worker count is the limit there
    assert await slots.renew(got) == []


@pytest.fixture
async def pg(store_backend):
    if store_backend.name != "postgres":
        pytest.skip("slots are shared on PostgreSQL only")
    return store_backend


async def test_the_limit_holds_across_nodes_and_a_release_frees_one(pg):
    a, b = await pg.slots(owner="a/1"), await pg.slots(owner="b/1")
    s1 = await a.acquire("example.net", 2)
    s2 = await b.acquire("example.net", 2)
    assert {s1.number, s2.number} == {0, 1}
    assert await a.acquire("example.net", 2) is None
    assert await b.acquire("example.net", 2) is None
    assert await a.acquire("example.org", 2) is not None  # per destination
    await a.release(s1)
    s3 = await b.acquire("example.net", 2)
    assert s3 is not None and s3.number == s1.number
    assert await a.in_use("example.net") == 2


async def test_an_expired_slot_is_taken_over_and_its_old_holder_is_fenced(pg):
    clock = Clock()
    frozen = await pg.slots(owner="frozen/1", ttl=60, clock=clock)
    other = await pg.slots(owner="other/1", ttl=60, clock=clock)
    old = await frozen.acquire("example.net", 1)
    assert await other.acquire("example.net", 1) is None
    clock.t += 61  # the frozen node missed its renewals
    new = await other.acquire("example.net", 1)
    assert new is not None and new.number == old.number
    # It wakes up: its renewal reports the slot lost, and its release takes nothing away.
    assert await frozen.renew([old]) == [old] and old.lost
    await frozen.release(old)
    assert await other.in_use("example.net") == 1
    assert await other.renew([new]) == []


async def test_renewal_keeps_a_slot_past_its_first_lease(pg):
    clock = Clock()
    a = await pg.slots(owner="a/1", ttl=60, clock=clock)
    b = await pg.slots(owner="b/1", ttl=60, clock=clock)
    s = await a.acquire("example.net", 1)
    for _ in range(3):
        clock.t += 40
        assert await a.renew([s]) == []
        assert await b.acquire("example.net", 1) is None


async def test_a_limit_lowered_by_a_reload_applies_to_new_slots(pg):
    """Slots above a lowered limit drain as their connections close; new ones only below it."""
    a = await pg.slots(owner="a/1")
    held = [await a.acquire("example.net", 3) for _ in range(3)]
    assert all(held)
    await a.release(held[2])
    assert await a.acquire("example.net", 1) is None  # slot 0 still held
    await a.release(held[0])
    assert (await a.acquire("example.net", 1)).number == 0


async def test_sweep_removes_long_expired_slots(pg):
    clock = Clock()
    a = await pg.slots(owner="a/1", ttl=10, clock=clock)
    for d in ("a.example", "b.example", "c.example"):
        await a.acquire(d, 2)
    if a._sweeping is not None:
        await a._sweeping  # the one the first acquire started (nothing to delete then)
    clock.t += 3600 + 11
    assert await a.sweep() == 3
    assert await pg.rows("SELECT * FROM destination_slots") == []


async def test_cost_per_connection(pg, capsys):
    """One acquire + one release per worker connection (a connection carries many messages);
    one renew per heartbeat for all held slots. Measured here on the test server."""
    a = await pg.slots(owner="a/1")
    n = 300
    t0 = time.perf_counter()
    for i in range(n):
        s = await a.acquire(f"d{i % 20}.example", 5)
        await a.release(s)
    per = (time.perf_counter() - t0) / n * 1000
    held = [await a.acquire(f"r{i}.example", 5) for i in range(50)]
    t0 = time.perf_counter()
    for _ in range(20):
        await a.renew(held)
    renew = (time.perf_counter() - t0) / 20 * 1000
    with capsys.disabled():
        print(f"\nslots: acquire+release {per:.2f} ms per connection; renew of 50 slots {renew:.2f} ms")
    assert per < 50  # a loose bound: the point is the printed figure
