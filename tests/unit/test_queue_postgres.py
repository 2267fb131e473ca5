"""PostgreSQL-only parts of the queue store (the contract itself runs against both backends in
test_queue_contract.py): claims by several nodes at once skip each other's rows, two nodes
starting at once migrate once, a lost database link answers StoreUnavailable (451 at the SMTP
edge) and recovers without a restart, and a COMMIT whose synchronous-replication wait is
cancelled is "not stored", never 250."""
from __future__ import annotations

import asyncio

import asyncpg
import pytest

from relay.store import pg_schema
from relay.store.contract import LeaseLost, LeaseOwner, NewMessage, NewRecipient, RecipientUpdate, StoreUnavailable
from relay.store.pg_queue import PgQueueStore, create_pool


def message(*rcpts: str, sender="alice@example.com") -> NewMessage:
    return NewMessage(sender=sender, data=b"Subject: t\r\n\r\nhi\r\n",
                      recipients=tuple(NewRecipient(r, r.rpartition("@")[2]) for r in rcpts))


@pytest.fixture
async def dsn(pg_server):
    return await pg_server.new_database()


async def test_nodes_claiming_at_once_never_share_a_recipient(dsn):
    pools = [await create_pool(dsn, size=4) for _ in range(3)]
    try:
        stores = [PgQueueStore(p, owner=LeaseOwner(f"n{i}", "x")) for i, p in enumerate(pools)]
        await asyncio.gather(*(stores[0].enqueue(message(*(f"u{i}.{j}@d{j}.example" for j in range(3))))
                               for i in range(60)))

        async def drain(store):
            got = []
            while jobs := await store.claim(7):
                got += [(r.id, j.token) for j in jobs for r in j.recipients]
            return got

        results = await asyncio.gather(*(drain(s) for s in stores for _ in range(2)))
        ids = [i for got in results for i, _ in got]
        assert len(ids) == 180 and len(set(ids)) == 180  # every recipient claimed exactly once
        assert sum(1 for got in results if got) >= 2     # and the work was shared
        owners = {r["lease_owner"] async for r in _rows(pools[0], "SELECT DISTINCT lease_owner FROM recipients")}
        assert owners <= {"n0/x", "n1/x", "n2/x"}
    finally:
        for p in pools:
            await p.close()


async def _rows(pool, sql, *args):
    async with pool.acquire() as conn:
        for r in await conn.fetch(sql, *args):
            yield r


async def test_a_frozen_node_that_wakes_changes_nothing(dsn):
    clock = [1000.0]
    pa, pb = await create_pool(dsn, size=2), await create_pool(dsn, size=2)
    try:
        a = PgQueueStore(pa, clock=lambda: clock[0], lease_seconds=60, owner=LeaseOwner("a", "1"))
        b = PgQueueStore(pb, clock=lambda: clock[0], lease_seconds=60, owner=LeaseOwner("b", "1"))
        qid = await a.enqueue(message("bob@example.net"))
        [old] = await a.claim(10)
        clock[0] += 120  # a is SIGSTOPped past its lease; b takes the job
        [new] = await b.claim(10)
        # a wakes: its fence before DATA says no, and its late result is refused
        assert await a.holds(old) is False
        with pytest.raises(LeaseLost):
            await a.settle(old, [RecipientUpdate(old.recipients[0].id, "failed", clock[0], "550 late")],
                           bounces=(message("alice@example.com", sender=""),))
        assert await a.recover() == 0  # and its restart does not take b's lease either
        await b.settle(new, [RecipientUpdate(new.recipients[0].id, "delivered", clock[0])])
        shown = await b.show(qid)
        assert shown["state"] == "delivered"
        assert [m["id"] async for m in _rows(pa, "SELECT id FROM messages")] == [qid]  # no bounce queued
    finally:
        await pa.close()
        await pb.close()


async def test_the_relaxed_pool_takes_the_fence_and_still_fences(dsn):
    """The delivery process's synchronous_commit=off pool (factory): the fence goes through it
    as single statements, still refuses a lost lease, and what it wrote is what the main pool
    reads. (The DKIM signature is kept by the settle, on the main pool: test_queue_contract.)"""
    clock = [1000.0]
    main = await create_pool(dsn, size=2)
    relaxed = await create_pool(dsn, size=2, server_settings={"synchronous_commit": "off"})
    try:
        async with relaxed.acquire() as c:
            assert await c.fetchval("SHOW synchronous_commit") == "off"
        a = PgQueueStore(main, clock=lambda: clock[0], lease_seconds=60, owner=LeaseOwner("a", "1"),
                         relaxed_pool=relaxed)
        b = PgQueueStore(main, clock=lambda: clock[0], lease_seconds=60, owner=LeaseOwner("b", "1"))
        await a.enqueue(NewMessage(sender="alice@example.com", data=b"Subject: t\r\n\r\nhi\r\n",
                                   recipients=(NewRecipient("bob@example.net", "example.net"),)))
        [job] = await a.claim(10)
        clock[0] += 30
        assert await a.holds(job) is True and job.leased_until == clock[0] + 60
        clock[0] += 120  # a froze past the extended lease; b takes the job
        [_new] = await b.claim(10)
        assert await a.holds(job) is False
    finally:
        await main.close()
        await relaxed.close()


async def test_two_nodes_starting_at_once_migrate_once(dsn):
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(pg_schema.migrate(c) for c in conns))
        assert sorted(applied) == [0, 0, pg_schema.SCHEMA_VERSION]
        assert await conns[0].fetchval("SELECT COUNT(*) FROM relay_schema") == pg_schema.SCHEMA_VERSION
        await conns[0].execute("INSERT INTO relay_schema(version) VALUES ($1)", pg_schema.SCHEMA_VERSION + 1)
        with pytest.raises(pg_schema.SchemaTooNew):
            await pg_schema.migrate(conns[1])
    finally:
        for c in conns:
            await c.close()


class CuttableProxy:
    """A TCP forwarder between the store and PostgreSQL that the test can cut (every
    connection dropped, new ones refused) and restore on the same port."""

    def __init__(self, port: int):
        self.target = port
        self.server = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self):
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _link(self, reader, writer):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.links |= {writer, uw}

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    async def cut(self):
        self.server.close()
        for w in self.links:
            w.transport.abort()
        self.links.clear()
        await self.server.wait_closed()


async def test_a_cut_database_link_answers_unavailable_and_recovers(pg_server, dsn):
    await (await create_pool(dsn, size=1)).close()  # migrate through the direct link
    proxy = CuttableProxy(pg_server.port)
    await proxy.start()
    via = dsn.replace(f":{pg_server.port}/", f":{proxy.port}/")
    pool = await create_pool(via, size=2, command_timeout=3)
    store = PgQueueStore(pool, commit_timeout=3)
    try:
        assert await store.enqueue(message("bob@example.net"))
        await proxy.cut()
        for _ in range(2):  # the broken pooled connection, then a refused new one
            with pytest.raises(StoreUnavailable):
                await store.enqueue(message("carol@example.net"))
        with pytest.raises(StoreUnavailable):
            await store.claim(10)
        await proxy.start()  # the link comes back: no restart needed
        assert await store.enqueue(message("dave@example.net"))
        assert sorted(r for j in await store.claim(10) for r in [j.recipients[0].address]) == \
            ["bob@example.net", "dave@example.net"]
    finally:
        await pool.close()
        await proxy.cut()


@pytest.fixture
async def pool(dsn):
    p = await create_pool(dsn, size=2)  # migrated before the fixture below makes commits wait
    yield p
    p.terminate()


@pytest.fixture
async def sync_standby_missing(pg_server, pool):
    """synchronous_standby_names names a standby that is not there: every COMMIT waits."""
    admin = await asyncpg.connect(pg_server.dsn())
    await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nosuch'")
    await admin.execute("SELECT pg_reload_conf()")
    await asyncio.sleep(0.3)
    try:
        yield admin
    finally:
        await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()


async def test_a_commit_whose_replication_wait_is_cancelled_is_not_stored(pool, sync_standby_missing):
    store = PgQueueStore(pool, commit_timeout=1.5)
    if True:
        # The store's own deadline: the wait is cancelled (committed locally, maybe not on the
        # standby) -> StoreUnavailable, so the SMTP side answers 451 4.3.0, never 250.
        with pytest.raises(StoreUnavailable):
            await store.enqueue(message("bob@example.net"))
        # Someone else cancels the wait (an operator, a failover tool): PostgreSQL returns
        # success with a warning, and that warning must still mean "not stored".
        store.commit_timeout = 30
        task = asyncio.create_task(store.enqueue(message("carol@example.net")))
        for _ in range(100):
            pids = [r["pid"] for r in await sync_standby_missing.fetch(
                "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'")]
            if pids:
                break
            await asyncio.sleep(0.05)
        assert pids, "the commit never waited for the standby"
        await sync_standby_missing.execute("SELECT pg_cancel_backend($1)", pids[0])
        with pytest.raises(StoreUnavailable):
            await task


async def test_the_runner_asks_a_shared_store_before_every_data(dsn):
    """fence_each_attempt: on PostgreSQL the runner's fence calls holds() even right after a
    claim (another node's clock may disagree with ours about when the lease ends)."""
    from relay.queue_runner import Fenced, QueueRunner
    from relay import config as config_mod
    from relay.delivery import Router
    pool = await create_pool(dsn, size=2)
    try:
        a = PgQueueStore(pool, owner=LeaseOwner("a", "1"))
        b = PgQueueStore(pool, owner=LeaseOwner("b", "1"))
        await a.enqueue(message("bob@example.net"))
        [job] = await a.claim(10)
        cfg = config_mod.from_dict({"server": {"hostname": "relay.example.com"}})
        runner = QueueRunner(a, Router(cfg), cfg)
        await runner._fence(job)  # ours: passes (and the lease was extended)
        # b's clock runs ahead: to b the lease has run out, and b takes the job.
        [taken] = await b.claim(10, now=job.leased_until + 1)
        with pytest.raises(Fenced):
            await runner._fence(job)  # to a the lease is fresh, yet the store says no
        assert job.lost and taken.token != job.token
    finally:
        await pool.close()


async def test_the_two_schemas_have_the_same_tables_and_columns(dsn, tmp_path):
    """What each backend keeps differs only where this says (so both answer the contract with
    the same rows): SQLite's spool-file columns, PostgreSQL's history order, accepting node and
    body pieces (body_chunks: what SQLite keeps in spool files)."""
    from relay import db
    await (await create_pool(dsn, size=1)).close()
    only_sqlite = {("bodies", "path"), ("bodies", "ascii")}
    only_pg = {("history", "seq"), ("messages", "accepted_by"), ("bodies", "chunks")}
    tables = ("messages", "bodies", "recipients", "history", "domains", "credentials", "dkim_keys", "api_keys",
              "audit_log", "admin_users", "admin_sessions")
    conn = await db.open_async(str(tmp_path / "s.db"))
    try:
        lite = {(t, r["name"]) for t in tables for r in await conn.execute_fetchall(f"PRAGMA table_info({t})")}
    finally:
        await conn.close()
    pg = await asyncpg.connect(dsn)
    try:
        pgcols = {(r["table_name"], r["column_name"]) for r in await pg.fetch(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND table_name = ANY($1::text[])", list(tables))}
    finally:
        await pg.close()
    assert lite - only_sqlite == pgcols - only_pg


async def test_nodes_lists_each_owners_leases(dsn):
    """The data behind a later `relay node list`: who holds how many recipients, until when."""
    pool = await create_pool(dsn, size=2)
    try:
        a = PgQueueStore(pool, owner=LeaseOwner("a", "1"), lease_seconds=60)
        b = PgQueueStore(pool, owner=LeaseOwner("b", "1"), lease_seconds=60)
        for i in range(3):
            await a.enqueue(message(f"u{i}@d{i}.example"))
        ja = await a.claim(2)
        jb = await b.claim(10)
        assert [(n["lease_owner"], n["leased"]) for n in await a.nodes()] == [("a/1", 2), ("b/1", 1)]
        await b.settle(jb[0], [RecipientUpdate(jb[0].recipients[0].id, "delivered", 0.0)])
        await a.release(ja[0])
        assert [(n["lease_owner"], n["leased"]) for n in await a.nodes()] == [("a/1", 1)]
    finally:
        await pool.close()


async def test_a_large_body_is_kept_in_pieces_and_read_back_a_piece_at_a_time(dsn, tmp_path):
    """A spooled (large) body: its wire form goes into body_chunks 1 MiB a row in the enqueue's
    transaction; delivery reads it back as the same bytes a row at a time, content readers get
    the dots removed, and a finished message keeps only its header block."""
    from relay import spool as spool_mod
    from relay.store import pg_queue
    line = b"..a line that starts with a stuffed dot, and some more text to fill it up\r\n"
    wire = b"Subject: big\r\nX-Pad: 1\r\n\r\n" + line * (3 * pg_queue.PIECE // len(line) + 7)
    content = wire.replace(b"\r\n..", b"\r\n.")
    (tmp_path / "Q1.wire").write_bytes(wire)
    pool = await create_pool(dsn, size=2)
    try:
        store = PgQueueStore(pool, spool_dir=str(tmp_path), lease_seconds=60)
        qid = await store.enqueue(NewMessage(sender="alice@example.com", data=b"", spool_file="Q1.wire",
                                             spool_size=len(wire), queue_id="Q1",
                                             recipients=(NewRecipient("bob@example.net", "example.net"),)))
        assert not (tmp_path / "Q1.wire").exists()  # in the database now
        pieces = [r["n"] async for r in _rows(pool, "SELECT length(data) AS n FROM body_chunks ORDER BY seq")]
        assert len(pieces) == 4 and pieces[:3] == [pg_queue.PIECE] * 3 and sum(pieces) == len(wire)
        body, _dkim = await store.body_to_send(qid)
        assert body.data is None and body.wire
        assert b"".join([b async for b in body.wire_chunks()]) == wire
        assert b"".join([b async for b in body.chunks()]) == content
        assert await store.body(qid) == b"Subject: big\r\nX-Pad: 1\r\n\r\n"        # over the limit: headers
        assert await store.body(qid, limit=len(content) + 1) == content            # within it: all
        [job] = await store.claim(10)
        await store.settle(job, [RecipientUpdate(job.recipients[0].id, "delivered", 0.0)])
        left = [bytes(r["data"]) async for r in _rows(pool, "SELECT data FROM body_chunks ORDER BY seq")]
        assert left == [b"Subject: big\r\nX-Pad: 1\r\n\r\n"]
        assert await store.body(qid) == b"Subject: big\r\nX-Pad: 1\r\n\r\n"
        assert await store.purge_finished(before=1e12) == 1
        assert [r async for r in _rows(pool, "SELECT * FROM body_chunks")] == []
    finally:
        await pool.close()
