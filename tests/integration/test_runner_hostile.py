"""The queue runner in-process against hostile receivers: the middle layer between the store's
unit tests and the whole relay.

Real parts throughout: the queue store (every test runs on SQLite, on a temp file, and on a
throwaway PostgreSQL when installed: fixture `store_backend`), the real Router and outbound
sessions, a loopback DNS server, and scripted receivers on real sockets (`ScriptedPeer`). The
runner and the store share an injectable clock, so retry, suspension and lease decisions can
be moved along without sleeping. Each test asserts what the receiver got (exactly one copy, or
none) and how every message settled.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from relay import config as config_mod, metrics
from relay.delivery import Router
from relay.queue_runner import PER_DESTINATION_BACKLOG, QueueRunner
from relay.store.contract import LeaseOwner, NewMessage, NewRecipient, StoreUnavailable
from relay.store.contract import QueueStore
from tests.support.scripted_peer import Script, ScriptedPeer

SENDER = "app@mg.example.com"
_BACKEND = None


@pytest.fixture(autouse=True)
def backend(store_backend):
    """Every test here runs once per store backend; `running()` builds its store on it."""
    global _BACKEND
    _BACKEND = store_backend
    yield store_backend
    _BACKEND = None


class Clock:
    """Real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def until(cond, timeout: float = 20.0, what: str = "condition"):
    """Await an async or sync condition with a deadline (no fixed sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def message(rcpt: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n", orcpt: str | None = None,
            sender: str = SENDER) -> NewMessage:
    domain = rcpt.rpartition("@")[2]
    return NewMessage(sender=sender, recipients=(NewRecipient(rcpt, domain, None, orcpt),),
                      data=body if body.startswith(b"From:") else f"From: {sender}\r\n".encode() + body)


@contextlib.asynccontextmanager
async def running(tmp_path, dns_server, mx_port: int, *, own_listeners=(), **delivery):
    """A store, a router and a runner over them, configured like the relay would be."""
    clock = Clock()
    cfg = config_mod.from_dict({
        "server": {"hostname": "relay.example.com", "node_id": "node-a"},
        "dns": {"nameservers": [dns_server.address], "timeout": 2},
        "delivery": {"mx_port": mx_port, "connect_timeout": 2, "command_timeout": 5, **delivery},
    })
    runner: QueueRunner | None = None
    store = await _BACKEND.store(clock=clock, lease_seconds=cfg.delivery.lease_seconds,
                                 owner=LeaseOwner("node-a", "1"), on_enqueue=lambda: runner.wake() if runner else None)
    router = Router(cfg)
    router.set_own_listeners(list(own_listeners))
    runner = QueueRunner(store, router, cfg, clock=clock)
    task = asyncio.create_task(runner.run())
    try:
        yield store, runner, clock
    finally:
        await runner.stop(timeout=2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


def mx(dns_server, domain: str, *addresses: str) -> None:
    hosts = []
    for i, addr in enumerate(addresses or ("127.0.0.1",)):
        host = f"mx{i}.{domain}"
        dns_server.set(host, "A", [addr])
        hosts.append(f"10 {host}.")
    dns_server.set(domain, "MX", hosts)


async def recipient(store: QueueStore, qid: str) -> dict:
    shown = await store.show(qid)
    return shown["recipients"][0] if shown else {"state": "gone"}


async def settled(store: QueueStore, qid: str, state: str, timeout: float = 20.0) -> dict:
    async def check():
        r = await recipient(store, qid)
        return r if r["state"] == state and not r["in_flight"] else None
    return await until(check, timeout, f"{qid} {state}")


async def gone(store: QueueStore, qid: str, timeout: float = 20.0) -> None:
    await until(lambda: _is_gone(store, qid), timeout, f"{qid} finished")


async def _is_gone(store, qid):
    """Out of the active queue: every recipient final (kept a while for `queue history`)."""
    shown = await store.show(qid)
    return shown is None or shown.get("finished_at") is not None


def counter(c) -> float:
    return c._value.get()


# ------------------------------------------------------------------ DATA that cannot repeat


async def test_slow_reader_gets_exactly_one_copy(tmp_path, dns_server):
    """A body that keeps moving is not cut by command_timeout (one clock over upload and reply
    used to fire, the buffered rest with its dot arrived anyway, and every retry was a copy)."""
    async with ScriptedPeer(Script(read_rate=400_000)) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, command_timeout=1, data_xfer_timeout=10) as (store, _, _c):
            qid = await store.enqueue(message("bob@example.net",
                                              b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 16_000))
            await gone(store, qid, timeout=30)
            assert len(peer.stats.completed) == 1
            assert peer.stats.connections == 1


@pytest.mark.parametrize("size", ["fits_the_kernel_buffers", "larger_than_the_kernel_buffers"])
async def test_reader_that_stops_never_completes_a_partial_message(tmp_path, dns_server, size):
    """No progress for data_xfer_timeout aborts with a reset: the rest of the body, dot
    included, is discarded, never delivered after we gave up (the receiver resumes reading).
    A body small enough to sit whole in our kernel's send buffer is not "sent" either until
    the receiver has acknowledged it: a stall there is a stall, not a possible duplicate."""
    wmem = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
    lines = (wmem + 4 * 1024 * 1024) // 80 if size.startswith("larger") else 2_000
    async with ScriptedPeer(Script(pause_body=4)) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, data_xfer_timeout=1,
                           retry_schedule=[3600]) as (store, _, _c):
            before = counter(metrics.DATA_ABORTED.labels("stalled"))
            qid = await store.enqueue(message("bob@example.net", b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * lines))
            lost_replies = counter(metrics.REPLY_LOST_AFTER_DOT)
            r = await settled(store, qid, "deferred", timeout=30)
            assert "no progress" in r["last_error"]
            assert counter(metrics.DATA_ABORTED.labels("stalled")) == before + 1
            assert counter(metrics.REPLY_LOST_AFTER_DOT) == lost_replies
            # The peer wakes up and reads everything that reaches it: the dot never does.
            await until(lambda: peer.stats.active == 0, 15, "peer connection ended")
            assert peer.stats.completed == []


async def test_close_mid_data_defers_without_a_copy(tmp_path, dns_server):
    async with ScriptedPeer(Script(close_mid_data=5000)) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, retry_schedule=[3600]) as (store, _, _c):
            qid = await store.enqueue(message("bob@example.net", b"Subject: x\r\n\r\n" + (b"q" * 78 + b"\r\n") * 1000))
            r = await settled(store, qid, "deferred")
            assert r["last_error"].startswith("mx0.example.net")
            assert peer.stats.completed == []


async def test_reply_after_the_lease_still_one_copy(tmp_path, dns_server):
    """The dot's reply comes after several lease lengths: the heartbeat keeps the lease, so the
    runner never claims the message again while the first attempt waits (7 copies before)."""
    async with ScriptedPeer(Script(dot_delay=3)) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, lease_seconds=1) as (store, _, _c):
            lost = counter(metrics.LEASES_LOST.labels("settle"))
            qid = await store.enqueue(message("bob@example.net"))
            await gone(store, qid, timeout=20)
            assert len(peer.stats.completed) == 1
            assert peer.stats.connections == 1
            assert counter(metrics.LEASES_LOST.labels("settle")) == lost


async def test_reply_lost_after_the_dot_is_counted_and_deferred(tmp_path, dns_server):
    async with ScriptedPeer(Script(dot_delay=30)) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, data_done_timeout=1,
                           retry_schedule=[3600]) as (store, _, _c):
            before = counter(metrics.REPLY_LOST_AFTER_DOT)
            qid = await store.enqueue(message("bob@example.net"))
            r = await settled(store, qid, "deferred")
            assert "may have been delivered" in r["last_error"]
            assert counter(metrics.REPLY_LOST_AFTER_DOT) == before + 1


async def test_attempt_timeout_ends_a_tarpit_attempt(tmp_path, dns_server):
    async with ScriptedPeer(Script(rcpt_stall=True)) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, command_timeout=60, attempt_timeout=1,
                           retry_schedule=[3600]) as (store, _, _c):
            qid = await store.enqueue(message("bob@example.net"))
            r = await settled(store, qid, "deferred")
            assert "attempt_timeout" in r["last_error"]
            await until(lambda: peer.stats.active == 0, 5, "tarpit connection dropped")


# ------------------------------------------------------------------ session hygiene


async def test_a_broken_transaction_never_poisons_the_next_message(tmp_path, dns_server):
    """An error in the middle of one transaction (here: an ORCPT that cannot be encoded, which
    inbound now refuses, queued directly) breaks that connection; the next message, on the same
    destination, gets a fresh session instead of `503 nested MAIL`."""
    async with ScriptedPeer(Script(dsn=True)) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, retry_schedule=[3600],
                           max_connections_per_destination=1) as (store, _, _c):
            bad = await store.enqueue(message("bob@example.net", orcpt="ü;bob"))
            good = await store.enqueue(message("carol@example.net", sender="other@mg.example.com"))
            await gone(store, good)
            r = await settled(store, bad, "deferred")
            assert r["state"] == "deferred"
            assert [m.rcpts for m in peer.stats.completed] == [["carol@example.net"]]


# ------------------------------------------------------------------ a fair scheduler


async def test_stalled_destination_does_not_hold_up_the_others(tmp_path, dns_server):
    """Hundreds of messages for a destination that stalls at RCPT: it gets no more than its
    connection limit, the runner holds a bounded part of its backlog, and a message for a
    healthy destination, queued after all of them, goes out while the tarpit still holds on."""
    n = PER_DESTINATION_BACKLOG * 3
    async with ScriptedPeer(Script(rcpt_stall=True)) as tarpit:
        mx(dns_server, "tarpit.example", "127.0.0.1")
        mx(dns_server, "healthy.example", "127.0.0.2")
        async with running(tmp_path, dns_server, tarpit.port, command_timeout=60,
                           max_connections_per_destination=2, dead_destination_failures=1000,
                           attempt_timeout=600) as (store, runner, _c):
            for i in range(n):
                await store.enqueue(message(f"u{i}@tarpit.example"))
            await until(lambda: tarpit.stats.active == 2, 10, "tarpit saturated")
            # The healthy destination listens on 127.0.0.2 at the same port (one mx_port for all).
            async with ScriptedPeer(host="127.0.0.2", port=tarpit.port) as healthy:
                qid = await store.enqueue(message("bob@healthy.example"))
                await gone(store, qid, timeout=10)
                assert len(healthy.stats.completed) == 1
            assert tarpit.stats.active == 2 and tarpit.stats.max_active == 2
            assert tarpit.stats.completed == []
            held = sum(len(d.queue) for d in runner._dests.values())
            assert 0 < held <= PER_DESTINATION_BACKLOG + 200  # one claim batch over the bound at most


async def test_dead_destination_is_suspended_then_probed(tmp_path, dns_server):
    async with ScriptedPeer(Script(greeting="421 4.3.2 go away")) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, dead_destination_failures=2,
                           dead_destination_backoff=300, retry_schedule=[1],
                           max_connections_per_destination=1) as (store, runner, clock):
            suspended = counter(metrics.DESTINATIONS_SUSPENDED)
            ids = [await store.enqueue(message(f"u{i}@example.net")) for i in range(10)]
            for qid in ids:
                await settled(store, qid, "deferred")
            # Two connections, then the rest deferred without one.
            assert peer.stats.connections == 2
            assert counter(metrics.DESTINATIONS_SUSPENDED) == suspended + 1
            r = await recipient(store, ids[-1])
            assert r["last_error"].startswith("delivery temporarily suspended: ")
            assert r["next_attempt_at"] >= clock() + 290  # not before the suspension ends
            # The backoff passes (moved clock): exactly one probe goes, and it finds the host fixed.
            peer.script.greeting = "220 peer.test ESMTP fixed"
            clock.advance(301)
            await store.retry(None)
            for qid in ids:
                await gone(store, qid)
            assert peer.stats.connections == 3  # the probe's connection, reused for the rest
            assert len(peer.stats.completed) == 10


# ------------------------------------------------------------------ MX limits and loops


async def test_twenty_five_mx_hosts_cost_at_most_five_connections(tmp_path, dns_server):
    async with ScriptedPeer(Script(greeting="421 4.3.2 busy")) as peer:
        addrs = [f"127.0.0.{i}" for i in range(1, 26)]
        twins = [ScriptedPeer(peer.script, host=a, port=peer.port) for a in addrs[1:]]
        async with contextlib.AsyncExitStack() as stack:
            for t in twins:
                await stack.enter_async_context(t)
            mx(dns_server, "example.net", *addrs)
            async with running(tmp_path, dns_server, peer.port, retry_schedule=[3600]) as (store, _, _c):
                qid = await store.enqueue(message("bob@example.net"))
                await settled(store, qid, "deferred")
                total = peer.stats.connections + sum(t.stats.connections for t in twins)
                assert total == 5


async def test_sessions_past_the_greeting_are_limited_to_two(tmp_path, dns_server):
    async with ScriptedPeer() as peer:
        addrs = [f"127.0.0.{i}" for i in range(1, 6)]
        twins = [ScriptedPeer(host=a, port=peer.port) for a in addrs[1:]]
        async with contextlib.AsyncExitStack() as stack:
            for t in twins:
                await stack.enter_async_context(t)
            mx(dns_server, "example.net", *addrs)
            # TLS is required for this domain and no peer offers STARTTLS: each session gets
            # past the greeting and then fails, which is what max_mx_sessions counts.
            async with running(tmp_path, dns_server, peer.port, retry_schedule=[3600],
                               require_tls_domains=["example.net"]) as (store, _, _c):
                qid = await store.enqueue(message("bob@example.net"))
                r = await settled(store, qid, "deferred")
                assert "STARTTLS" in r["last_error"]
                total = peer.stats.connections + sum(t.stats.connections for t in twins)
                assert total == 2


async def test_mx_that_is_this_relay_fails_at_once_with_5_4_6(tmp_path, dns_server):
    async with ScriptedPeer() as peer:
        mx(dns_server, "example.net", "127.0.0.1")
        mx(dns_server, "mg.example.com", "127.0.0.3")  # where the bounce would go
        async with running(tmp_path, dns_server, peer.port, own_listeners=[("127.0.0.1", peer.port)],
                           retry_schedule=[3600]) as (store, _, _c):
            loops = counter(metrics.MAIL_LOOPS)
            qid = await store.enqueue(message("bob@example.net"))
            await gone(store, qid)
            assert peer.stats.connections == 0
            assert counter(metrics.MAIL_LOOPS) == loops + 1
            listed = await store.list()
            bounce = [m for m in listed if m["sender"] == ""]
            assert len(bounce) == 1 and bounce[0]["recipients"] == [SENDER]
            body = await store.body(bounce[0]["id"])
            assert b"5.4.6" in body and b"loops back to myself" in body


async def test_peer_greeting_with_our_hostname_is_a_loop(tmp_path, dns_server):
    async with ScriptedPeer(Script(greeting="220 relay.example.com ESMTP")) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port) as (store, _, _c):
            qid = await store.enqueue(message("bob@example.net", sender=""))  # no bounce for a bounce
            await gone(store, qid)
            assert peer.stats.completed == []
            assert "MAIL" not in peer.stats.commands


# ------------------------------------------------------------------ lease ownership


async def test_recovery_takes_back_only_this_nodes_leases(backend):
    clock = Clock()
    a1 = await backend.store(clock=clock, lease_seconds=600, owner=LeaseOwner("node-a", "1"))
    a2 = await backend.store(clock=clock, lease_seconds=600, owner=LeaseOwner("node-a", "2"))
    b = await backend.store(clock=clock, lease_seconds=600, owner=LeaseOwner("node-b", "1"), fresh_connection=True)
    try:
        await a1.enqueue(message("x@one.example"))
        await a1.enqueue(message("y@two.example"))
        got_a = await a1.claim(10, exclude_routes=["two.example"])
        got_b = await b.claim(10)
        assert [j.route for j in got_a] == ["one.example"] and [j.route for j in got_b] == ["two.example"]
        # node-a restarts (a new incarnation): its own old lease comes back, node-b's stays.
        assert await a2.recover() == 1
        again = await a2.claim(10)
        assert [j.route for j in again] == ["one.example"]
        assert await b.holds(got_b[0])
        assert not await a1.holds(got_a[0])
        # A lease that was taken over cannot be renewed: the old holder learns it is lost.
        assert await a1.renew_many(got_a) == got_a and got_a[0].lost
    finally:
        for s in (a1, a2, b):
            await s.close()


async def test_a_fence_the_database_cannot_answer_sends_nothing_and_suspends_nothing(tmp_path, dns_server):
    """The database is gone at the fence before DATA (a PostgreSQL failover): nothing is sent,
    and it is not the receiver's failure. (It used to count as a broken connection: two of
    them suspended the destination for dead_destination_backoff, 300 s, found by the
    multinode promotion test.)"""
    async with ScriptedPeer(Script()) as peer:
        mx(dns_server, "example.net")
        async with running(tmp_path, dns_server, peer.port, dead_destination_failures=2,
                           lease_seconds=1, retry_schedule=[1]) as (store, runner, clock):
            real, failed = store.holds, []

            async def holds(job):
                if len(failed) < 2:
                    failed.append(len(peer.stats.completed))
                    raise StoreUnavailable("database unreachable: ConnectionError: test")
                return await real(job)
            store.holds = holds
            store.fence_each_attempt = True  # SQLite trusts a fresh heartbeat; ask every time here
            suspended = counter(metrics.DESTINATIONS_SUSPENDED)
            qid = await store.enqueue(message("bob@example.net"))
            await gone(store, qid, timeout=30)
            assert failed == [0, 0]  # nothing reached the receiver while the fence had no answer
            assert len(peer.stats.completed) == 1
            assert counter(metrics.DESTINATIONS_SUSPENDED) == suspended
