"""Per-destination connection limits across nodes (issue 17, store/slots.py): two queue runners
("nodes") on one PostgreSQL open at most max_connections_per_destination connections to a
receiver in all, not that many each; a dead node's slots are free again after their lease; on
SQLite (one node) the runner's own worker count is the limit. Real parts: the store, the
Router and outbound sessions, loopback DNS, a scripted receiver counting its open connections."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from relay import config as config_mod
from relay.delivery import Router
from relay.queue_runner import QueueRunner
from relay.store.contract import LeaseOwner, NewMessage, NewRecipient
from tests.support.scripted_peer import Script, ScriptedPeer

SENDER = "app@mg.example.com"


def message(rcpt: str) -> NewMessage:
    return NewMessage(sender=SENDER, recipients=(NewRecipient(rcpt, rcpt.rpartition("@")[2]),),
                      data=f"From: {SENDER}\r\nSubject: t\r\n\r\nhello\r\n".encode())


async def until(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def nodes(backend, dns_server, port: int, n: int, *, slots=None, clock=time.time, **delivery):
    """n runners on the backend, each a node with its own store (and pool) and slots."""
    cfg = config_mod.from_dict({
        "server": {"hostname": "relay.example.com"},
        "dns": {"nameservers": [dns_server.address], "timeout": 2},
        "delivery": {"mx_port": port, "connect_timeout": 2, "command_timeout": 5, **delivery},
    })
    runners, tasks, stores = [], [], []
    for i in range(n):
        store = await backend.store(fresh_connection=True, lease_seconds=cfg.delivery.lease_seconds,
                                    owner=LeaseOwner(f"node-{i}", "1"))
        s = slots[i] if slots is not None else await backend.slots(owner=f"node-{i}/1")
        runner = QueueRunner(store, Router(cfg), cfg, slots=s, clock=clock)
        runners.append(runner)
        stores.append(store)
        tasks.append(asyncio.create_task(runner.run()))
    try:
        yield stores, runners
    finally:
        for r in runners:
            await r.stop(timeout=2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in stores:
            await s.close()


def mx(dns_server, domain: str) -> None:
    dns_server.set(f"mx.{domain}", "A", ["127.0.0.1"])
    dns_server.set(domain, "MX", [f"10 mx.{domain}."])


async def test_two_nodes_open_the_destination_limit_in_all(store_backend, dns_server):
    """12 messages, each held 0.3 s at the dot; limit 2 per destination. Two PostgreSQL nodes:
    never more than 2 connections at the receiver (without shared slots: 4). SQLite: one node."""
    n = 2 if store_backend.name == "postgres" else 1
    async with ScriptedPeer(Script(dot_delay=0.3)) as peer:
        mx(dns_server, "example.net")
        async with nodes(store_backend, dns_server, peer.port, n, max_connections_per_destination=2) as (stores, rs):
            for i in range(12):
                await stores[i % n].enqueue(message(f"user{i}@example.net"))
            for r in rs:
                r.wake()
            await until(lambda: len(peer.stats.completed) >= 12, what="12 deliveries")
            assert len(peer.stats.completed) == 12
            assert 1 <= peer.stats.max_active <= 2
            if store_backend.name == "postgres":
                await until(lambda: _no_slots(store_backend), 10, "slots given back")


async def _no_slots(backend) -> bool:
    return (await backend.rows("SELECT count(*) AS n FROM destination_slots"))[0]["n"] == 0


async def test_a_dead_nodes_slot_is_reused_after_its_lease(store_backend, dns_server):
    if store_backend.name != "postgres":
        pytest.skip("slots are shared on PostgreSQL only")
    dead = await store_backend.slots(owner="dead/1", ttl=2.0)
    assert await dead.acquire("example.net", 1) is not None  # then the node dies, slot held
    async with ScriptedPeer(Script()) as peer:
        mx(dns_server, "example.net")
        async with nodes(store_backend, dns_server, peer.port, 1, max_connections_per_destination=1) as (stores, rs):
            t0 = time.monotonic()
            await stores[0].enqueue(message("bob@example.net"))
            rs[0].wake()
            await until(lambda: len(peer.stats.completed) == 1, 15, "delivery after the dead lease")
            assert time.monotonic() - t0 >= 1.5  # not before the dead node's lease ran out
            assert peer.stats.max_active == 1


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_jobs_wait_for_a_slot_then_go_back_to_the_nodes_holding_them(store_backend, dns_server):
    """Every slot is held by another node: this node keeps its job a while (a slot may come),
    then hands it back (lease released, due now) and leaves the destination out of its claims,
    so the node with the slots claims and delivers it."""
    if store_backend.name != "postgres":
        pytest.skip("slots are shared on PostgreSQL only")
    from relay.queue_runner import SLOT_WAIT
    busy = await store_backend.slots(owner="busy/1", ttl=600)
    held = await busy.acquire("example.net", 1)
    clock = Clock()
    async with ScriptedPeer(Script()) as peer:
        mx(dns_server, "example.net")
        async with nodes(store_backend, dns_server, peer.port, 1, clock=clock,
                         max_connections_per_destination=1) as (stores, rs):
            qid = await stores[0].enqueue(message("bob@example.net"))
            rs[0].wake()
            await until(lambda: (d := rs[0]._dests.get("example.net")) is not None and d.no_slot_since, 10,
                        "waiting for a slot")
            shown = await stores[0].show(qid)
            assert shown["recipients"][0]["in_flight"]  # still ours while it waits
            clock.offset += SLOT_WAIT + 1
            await until(lambda: _not_in_flight(stores[0], qid), 10, "handed back")
            # The busy node claims it; this node does not take it again meanwhile.
            other = await store_backend.store(fresh_connection=True, owner=LeaseOwner("busy", "1"))
            jobs = await other.claim(10)
            assert [j.msg_id for j in jobs] == [qid]
            assert "example.net" in rs[0]._slotless
            assert peer.stats.connections == 0
    await busy.release(held)


async def _not_in_flight(store, qid) -> bool:
    shown = await store.show(qid)
    return not shown["recipients"][0]["in_flight"]
