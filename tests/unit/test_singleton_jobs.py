"""store/singleton.py: a periodic job runs on one node per period. Both backends: on SQLite the
"nodes" are one process's LocalJobLocks (one node), on PostgreSQL each node has its own pool and
the advisory lock plus singleton_runs decide."""
from __future__ import annotations

import asyncio

import pytest

from relay.store.singleton import every, period_of


async def node_locks(backend, n: int):
    if backend.name == "sqlite":
        one = await backend.job_locks()
        return [one] * n
    return [await backend.job_locks(node=f"node-{i}") for i in range(n)]


async def test_three_nodes_run_a_job_once_per_period(store_backend):
    ns = await node_locks(store_backend, 3)
    runs = []

    async def job():
        runs.append(1)

    got = [await ns[i % 3].run_once("queue-purge", "100", job) for i in range(9)]
    assert got.count(True) == 1 and len(runs) == 1
    # The next period: once again, whichever node ticks first.
    assert await ns[2].run_once("queue-purge", "101", job) is True
    assert await ns[0].run_once("queue-purge", "101", job) is False
    assert len(runs) == 2


async def test_a_job_running_on_one_node_is_skipped_by_the_others(store_backend):
    ns = await node_locks(store_backend, 2)
    started, release = asyncio.Event(), asyncio.Event()
    runs = []

    async def slow():
        runs.append(1)
        started.set()
        await release.wait()

    t = asyncio.create_task(ns[0].run_once("tlsrpt", "2026-12-01", slow))
    await started.wait()
    # Even for another period: never two runs of one job at once.
    assert await ns[1].run_once("tlsrpt", "2026-12-02", slow) is False
    release.set()
    assert await t is True
    assert len(runs) == 1


async def test_a_failed_run_is_tried_again_in_the_same_period(store_backend):
    ns = await node_locks(store_backend, 2)
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DNS down")

    with pytest.raises(RuntimeError):
        await ns[0].run_once("tlsrpt", "2026-12-01", flaky)
    assert await ns[1].run_once("tlsrpt", "2026-12-01", flaky) is True
    assert len(calls) == 2


async def test_every_runs_each_period_once_over_nodes(store_backend):
    """Three nodes tick every 0.05 s over 0.2 s periods (an injected clock): each period runs
    exactly once."""
    ns = await node_locks(store_backend, 3)
    t = [1000.0]
    seen: list[str] = []

    async def job():
        seen.append(period_of(t[0], 0.2))

    tasks = [asyncio.create_task(every(ns[i], "sweep", 0.2, job, clock=lambda: t[0], tick=0.02)) for i in range(3)]
    try:
        for _ in range(5):
            await asyncio.sleep(0.15)
            t[0] += 0.2
        await asyncio.sleep(0.15)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(seen) == len(set(seen)) >= 5


async def test_the_lock_goes_with_a_dead_nodes_connection(store_backend):
    if store_backend.name != "postgres":
        pytest.skip("advisory locks: PostgreSQL")
    import asyncpg
    from relay.store.singleton import lock_key
    ns = await node_locks(store_backend, 1)
    dead = await asyncpg.connect(store_backend.dsn)
    assert await dead.fetchval("SELECT pg_try_advisory_lock($1)", lock_key("queue-purge"))
    runs = []

    async def job():
        runs.append(1)

    assert await ns[0].run_once("queue-purge", "7", job) is False  # the other node is running it
    dead.terminate()  # that node dies mid-run
    for _ in range(100):
        if await ns[0].run_once("queue-purge", "7", job):
            break
        await asyncio.sleep(0.05)
    assert runs == [1]


async def test_shared_state_is_built_from_the_factorys_stores(store_backend, tmp_path):
    """store/shared_state.py: what the daemon and the delivery process get from their stores:
    the database's shared state on PostgreSQL, the in-process equivalents on SQLite."""
    from relay import config as config_mod
    from relay.store.factory import open_stores
    from relay.store.shared_auth import PgAuthBudgets
    from relay.store.shared_state import shared_state
    from relay.store.singleton import LocalJobLocks, PgJobLocks
    from relay.store.slots import LocalSlots, PgSlots
    storage = ({"backend": "postgres", "dsn": store_backend.dsn, "pool_size": 2} if store_backend.name == "postgres"
               else {"path": str(tmp_path / "f.db")})
    cfg = config_mod.from_dict({"server": {"hostname": "relay.example.com", "node_id": "n1"}, "storage": storage})
    stores = await open_stores(cfg, role="delivery")
    try:
        shared = shared_state(stores)
        if store_backend.name == "postgres":
            assert isinstance(shared.auth_budgets, PgAuthBudgets)
            assert isinstance(shared.slots, PgSlots) and shared.slots.owner.startswith("n1/")
            assert isinstance(shared.job_locks, PgJobLocks)
            slot = await shared.slots.acquire("example.net", 1)
            assert slot is not None
            await shared.slots.release(slot)
        else:
            assert shared.auth_budgets is None
            assert isinstance(shared.slots, LocalSlots) and isinstance(shared.job_locks, LocalJobLocks)
        ran = []

        async def job():
            ran.append(1)
        assert await shared.job_locks.run_once("j", "1", job) and ran == [1]
        await shared.close()
    finally:
        await stores.close()
