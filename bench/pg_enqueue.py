"""Enqueue on PostgreSQL: one autocommit statement per message (what PgQueueStore does) against
application group commit (N messages per transaction), at 1 and 20 concurrent writers, on a
throwaway durable server (fsync on, synchronous_commit on). 10 KB bodies.

    .venv/bin/python bench/pg_enqueue.py
"""
from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relay.store.contract import NewMessage, NewRecipient, new_queue_id  # noqa: E402
from relay.store.pg_queue import PgQueueStore, create_pool  # noqa: E402
from tests.support.postgres import PostgresServer, binaries  # noqa: E402

BODY = b"Subject: bench\r\n\r\n" + b"x" * 10_000 + b"\r\n"


def msg(i: int) -> NewMessage:
    return NewMessage("alice@example.com", (NewRecipient(f"u{i}@example.net", "example.net"),), BODY)


async def per_message(store: PgQueueStore, n: int, writers: int) -> float:
    todo = iter(range(n))

    async def writer():
        for i in todo:
            await store.enqueue(msg(i))

    t = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return n / (time.perf_counter() - t)


async def grouped(store: PgQueueStore, n: int, writers: int, group: int) -> float:
    todo = iter(range(0, n, group))

    async def writer():
        for start in todo:
            async def op(conn, start=start):
                for i in range(start, start + group):
                    await store._insert(conn, new_queue_id(), msg(i), time.time())
            await store._run(op)

    t = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return n / (time.perf_counter() - t)


async def main() -> None:
    server = PostgresServer(binaries(), durable=True).start()
    try:
        pool = await create_pool(await server.new_database(), size=20)
        store = PgQueueStore(pool)
        for writers in (1, 20):
            print(f"per message, {writers:2} writers: {await per_message(store, 1000 * (1 + writers // 10), writers):7.0f} msg/s")
        for writers, group in ((1, 20), (4, 20)):
            print(f"{group} per transaction, {writers} writers: {await grouped(store, 2000, writers, group):7.0f} msg/s")
        await pool.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
