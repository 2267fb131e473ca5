"""AUTH budgets across nodes (issue 17): on PostgreSQL each node's AuthThrottle asks the shared
budgets (store/shared_auth.py), so guesses spread over three nodes get the budget of one; on
SQLite the one node's in-memory throttle is the whole truth (every "node" here is that one)."""
from __future__ import annotations

import asyncio

import pytest

from relay.config import LimitsConfig
from relay.server.auth import NETWORK, PAIR, UNAVAILABLE, USER, AuthThrottle


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


LIMITS = LimitsConfig(auth_failures=5, auth_failure_window=300, auth_lockout=900, auth_failures_per_network=8,
                      auth_failures_per_user=12, auth_user_window=3600)


async def nodes(backend, n: int = 3, limits: LimitsConfig = LIMITS, clock: Clock | None = None) -> list[AuthThrottle]:
    """n nodes' throttles. SQLite: one node, so the same throttle n times."""
    clock = clock or Clock()
    if backend.name == "sqlite":
        t = AuthThrottle(limits, clock=clock)
        return [t] * n
    return [AuthThrottle(limits, clock=clock, shared=await backend.auth_budgets(clock=clock)) for _ in range(n)]


async def guess(t: AuthThrottle, ip: str, user: str) -> str | None:
    """One wrong password, as the session does it; the refusal, or None if it was tried."""
    refused = await t.acquire(ip, user, timeout=0.5)
    if refused is not None:
        return refused
    try:
        t.failure(ip, user)
    finally:
        t.end(ip, user)
    await t.settled()
    return None


async def test_guesses_spread_over_nodes_get_the_budget_of_one(store_backend):
    ns = await nodes(store_backend)
    tried = 0
    refusals = []
    for i in range(30):
        r = await guess(ns[i % 3], "198.51.100.7", "app@mg.example.com")
        if r is None:
            tried += 1
        else:
            refusals.append(r)
    assert tried == LIMITS.auth_failures
    assert set(refusals) == {PAIR}
    # Every node refuses that pair now, even one that never saw a guess for it.
    for t in ns:
        assert await t.acquire("198.51.100.7", "app@mg.example.com", timeout=0.2) == PAIR


async def test_spraying_usernames_from_one_network_over_nodes_locks_the_network(store_backend):
    ns = await nodes(store_backend)
    tried = 0
    for i in range(40):
        if await guess(ns[i % 3], "2001:db8:1:2::7", f"user{i}@mg.example.com") is None:
            tried += 1
    assert tried == LIMITS.auth_failures_per_network
    # Another address of the same /64, on another node: locked too.
    assert await ns[1].acquire("2001:db8:1:2::99", "new@mg.example.com", timeout=0.2) == NETWORK


async def test_attempts_being_verified_on_other_nodes_use_the_budget(store_backend):
    """Five parallel guesses from one network on three nodes: while they are being verified
    (reserved, not yet failed), a sixth on any node is refused instead of a sixth guess."""
    ns = await nodes(store_backend, limits=LimitsConfig(auth_failures=5, auth_failures_per_network=5))
    ip, user = "203.0.113.9", "app@mg.example.com"
    held = []
    for i in range(5):
        t = ns[i % 3]
        held.append(asyncio.create_task(_hold(t, ip, user)))
    await asyncio.sleep(0.3)
    assert await ns[2].acquire(ip, user, timeout=0.2) in (PAIR, NETWORK)
    for h in held:
        h.cancel()
    await asyncio.gather(*held, return_exceptions=True)


async def _hold(t: AuthThrottle, ip: str, user: str) -> None:
    assert await t.acquire(ip, user, timeout=1) is None
    try:
        await asyncio.sleep(60)
    finally:
        t.end(ip, user)


async def test_a_given_back_reservation_frees_the_budget(store_backend):
    """An attempt that ends without a verdict (AUTH refused as busy, connection dropped) gives
    its reservation back: it is not a failed guess."""
    ns = await nodes(store_backend, limits=LimitsConfig(auth_failures=1, auth_failures_per_network=1))
    ip, user = "203.0.113.10", "app@mg.example.com"
    assert await ns[0].acquire(ip, user, timeout=0.2) is None
    ns[0].end(ip, user)
    await ns[0].settled()
    assert await ns[1].acquire(ip, user, timeout=0.2) is None
    ns[1].success(ip, user)
    ns[1].end(ip, user)
    await ns[1].settled()
    assert await ns[2].acquire(ip, user, timeout=0.2) is None
    ns[2].end(ip, user)


async def test_a_user_under_attack_keeps_its_familiar_network_on_every_node(store_backend):
    clock = Clock()
    limits = LimitsConfig(auth_failures=5, auth_failures_per_network=20, auth_failures_per_user=6)
    ns = await nodes(store_backend, limits=limits, clock=clock)
    user = "boss@mg.example.com"
    # The owner logs in from home on node 0.
    assert await ns[0].acquire("192.0.2.50", user) is None
    ns[0].success("192.0.2.50", user)
    ns[0].end("192.0.2.50", user)
    await ns[0].settled()
    # A botnet: one guess per network, over the nodes.
    tried = sum([await guess(ns[i % 3], f"198.18.{i}.1", user) is None for i in range(20)])
    assert tried == 6
    assert await ns[1].acquire("198.18.99.1", user, timeout=0.2) == USER
    # Home still works on node 2, which never saw the owner log in.
    assert await ns[2].acquire("192.0.2.50", user, timeout=0.2) is None
    ns[2].end("192.0.2.50", user)


async def test_a_lock_ends_on_every_node_after_auth_lockout(store_backend):
    clock = Clock()
    ns = await nodes(store_backend, clock=clock)
    ip, user = "198.51.100.20", "app@mg.example.com"
    for i in range(5):
        assert await guess(ns[i % 3], ip, user) is None
    assert await ns[1].acquire(ip, user, timeout=0.2) == PAIR
    clock.t += LIMITS.auth_lockout + 1
    for t in ns:  # the lock and the failures before it are gone; a fresh budget
        assert await t.acquire(ip, user, timeout=0.2) is None
        t.end(ip, user)
        await t.settled()


# ---------------------------------------------------------------- PostgreSQL only


@pytest.fixture
async def pg(store_backend):
    if store_backend.name != "postgres":
        pytest.skip("the shared tables exist on PostgreSQL only")
    return store_backend


async def test_unreachable_database_fails_closed(pg):
    """The database cannot be asked: 454 (UNAVAILABLE), never an unlimited guess; the local
    reservation is given back, so the node works again when the database returns."""
    from relay.store.shared_auth import PgAuthBudgets
    from tests.support.tcp_cut import CuttableProxy
    import asyncpg
    host, port = pg.dsn.split("@", 1)[1].split("/", 1)[0].split(":")
    async with CuttableProxy(host, int(port)) as proxy:
        dsn = pg.dsn.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2)
        try:
            t = AuthThrottle(LIMITS, shared=PgAuthBudgets(pool, timeout=2))
            assert await guess(t, "198.51.100.30", "app@mg.example.com") is None
            proxy.cut()
            assert await t.acquire("198.51.100.30", "app@mg.example.com", timeout=0.5) == UNAVAILABLE
            assert t.pair.inflight == {} and t.net.inflight == {}
            proxy.restore()
            await proxy.restored()
            assert await guess(t, "198.51.100.30", "app@mg.example.com") is None
        finally:
            pool.terminate()


async def test_rows_expire_and_the_sweep_bounds_the_tables(pg):
    clock = Clock()
    budgets = await pg.auth_budgets(clock=clock)
    t = AuthThrottle(LimitsConfig(auth_failures=3, auth_failure_window=60, auth_lockout=120,
                                  auth_failures_per_network=50, auth_failures_per_user=50, auth_user_window=600),
                     clock=clock, shared=budgets)
    for i in range(40):
        await guess(t, f"198.51.100.{i}", f"u{i % 7}@mg.example.com")
    events = (await pg.rows("SELECT count(*) AS n FROM auth_events"))[0]["n"]
    assert events > 0
    assert await budgets.sweep() == 0  # nothing expired yet
    clock.t += 601
    assert await budgets.sweep() >= events
    assert (await pg.rows("SELECT count(*) AS n FROM auth_events"))[0]["n"] == 0
    assert (await pg.rows("SELECT count(*) AS n FROM auth_locks"))[0]["n"] == 0


async def test_cost_per_auth(pg, capsys):
    """A good login costs one awaited round trip (begin: check and reserve) and one in the
    background (success: reservation gone, network familiar); a failure the same with
    relay_auth_fail. Measured here on the test server; argon2 is ~50-100 ms a verification."""
    import time
    budgets = await pg.auth_budgets()
    b = AuthThrottle(LIMITS).budgets
    n = 300
    t0 = time.perf_counter()
    for i in range(n):
        got = await budgets.begin(f"198.51.{i % 250}.1/32", f"u{i}@mg.example.com", b)
        await budgets.success(got.attempt, f"198.51.{i % 250}.1/32", f"u{i}@mg.example.com")
    good = (time.perf_counter() - t0) / n * 1000
    t0 = time.perf_counter()
    for i in range(n):
        begin_t = time.perf_counter()
        got = await budgets.begin(f"203.0.{i % 250}.1/32", f"v{i}@mg.example.com", b)
        begin_ms = (time.perf_counter() - begin_t) * 1000
        await budgets.failure(got.attempt, f"203.0.{i % 250}.1/32", f"v{i}@mg.example.com", b)
    bad = (time.perf_counter() - t0) / n * 1000
    with capsys.disabled():
        print(f"\nshared AUTH budgets: good login {good:.2f} ms (begin + success), failed login {bad:.2f} ms "
              f"(begin + failure; last begin {begin_ms:.2f} ms)")
    assert good < 50 and bad < 50  # loose: the point is the printed figure
