"""Periodic jobs that must run on one node per period (issue 17): the finished-message purge,
TLSRPT reports, and whatever else sweeps shared tables.

`run_once(job, period, fn)` runs `fn` unless that job already completed for that period (on
any node) or is running right now somewhere; it returns whether it ran. A period is a string
the caller chooses: `period_of(now, seconds)` for "every N seconds", the report day for
TLSRPT. `every(locks, job, seconds, fn)` is the loop around it that each node starts: every
node ticks, the first of each period runs the job, the others skip it.

- LocalJobLocks (SQLite, one node): in memory; a job runs in one process only anyway.
- PgJobLocks (PostgreSQL): `pg_try_advisory_lock` on a connection held for the job's run (a
  session lock: if the node dies its connection drops and the lock goes with it, no stale row
  to steal), and `singleton_runs` (job, period of the last completed run), read and written
  under that lock, so a node that ticks later in the same period skips it. A run that raises
  records nothing: the next tick of any node tries again. A node frozen mid-run (SIGSTOP) keeps
  its lock until it wakes or its TCP connection times out; the job waits for it, never runs twice
  at once.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from ..logs import event
from .contract import StoreUnavailable

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("relay.singleton")

Job = Callable[[], Awaitable[Any]]


def period_of(now: float, seconds: float) -> str:
    """The period `now` falls in, for a job that runs every `seconds` (the same on every node:
    epoch-aligned, so node clocks need only NTP)."""
    return str(int(now // seconds))


def lock_key(job: str) -> int:
    """A stable signed 64-bit advisory lock key for a job name."""
    return int.from_bytes(hashlib.sha256(b"relay-job:" + job.encode()).digest()[:8], "big", signed=True)


class JobLocks(Protocol):
    async def run_once(self, job: str, period: str, fn: Job) -> bool: ...


class LocalJobLocks:
    def __init__(self, **_: Any):
        self._done: dict[str, str] = {}
        self._running: set[str] = set()

    async def run_once(self, job: str, period: str, fn: Job) -> bool:
        if self._done.get(job) == period or job in self._running:
            return False
        self._running.add(job)
        try:
            await fn()
            self._done[job] = period
            return True
        finally:
            self._running.discard(job)


class PgJobLocks:
    def __init__(self, pool: asyncpg.Pool, *, node: str = "", clock: Callable[[], float] = time.time,
                 timeout: float = 10.0):
        self._pool = pool
        self.node = node or "?"
        self._clock = clock
        self.timeout = timeout

    async def run_once(self, job: str, period: str, fn: Job) -> bool:
        from .pg_queue import _unavailable
        key = lock_key(job)
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key, timeout=self.timeout):
                    return False  # running on another node now
                try:
                    last = await conn.fetchval("SELECT period FROM singleton_runs WHERE job = $1", job,
                                               timeout=self.timeout)
                    if last == period:
                        return False  # done this period (here or on another node)
                    await fn()
                    await conn.execute(
                        "INSERT INTO singleton_runs(job, period, node, finished_at) VALUES ($1, $2, $3, $4) "
                        "ON CONFLICT (job) DO UPDATE SET period = EXCLUDED.period, node = EXCLUDED.node, "
                        "finished_at = EXCLUDED.finished_at", job, period, self.node, self._clock(),
                        timeout=self.timeout)
                    return True
                finally:
                    if not conn.is_closed():
                        try:
                            await conn.fetchval("SELECT pg_advisory_unlock($1)", key, timeout=self.timeout)
                        except Exception:  # noqa: BLE001 - a broken connection: the server drops the lock
                            conn.terminate()
        except BaseException as exc:
            mapped = _unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise


async def every(locks: JobLocks, job: str, seconds: float, fn: Job, *,
                clock: Callable[[], float] = time.time, tick: float | None = None) -> None:
    """Run `fn` once per `seconds`-long period on one node: each node calls this (as a task) and
    ticks every `tick` (default: half the period, so sleep drift cannot skip a period); failures
    are logged, and retried at the next tick."""
    while True:
        try:
            ran = await locks.run_once(job, period_of(clock(), seconds), fn)
            if ran:
                log.debug("singleton job %s ran", job)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable:  # a busy or unreachable store now is fine: the next tick catches up
            log.debug("singleton job %s: store unavailable", job, exc_info=True)
        except Exception as exc:  # noqa: BLE001 - a bug: say so, try again at the next tick
            event(log, "job_failed", logging.WARNING, job=job, error=f"{type(exc).__name__}: {exc}"[:300])
        await asyncio.sleep(tick if tick is not None else seconds / 2)
