"""AUTH failure budgets shared by the nodes of one PostgreSQL (issue 17): the same three budgets
as `server.auth.AuthThrottle` (per network+username, per network, per username with familiar
networks), counted in UNLOGGED tables (pg_schema migration 9) so that an attacker spreading
guesses over N nodes gets the budget of one node.

Each node keeps its in-memory AuthThrottle as the fast path: it is exact for the attempts it
saw, which are a subset of all, so a local refusal needs no database. Past it, the database
decides, in one round trip per step (PL/pgSQL functions, so the attempts of one network or
username take turns under a transaction-scoped advisory lock and counting is exact):

- `begin`: refused (a lock, or the window's failures use the budget up), "wait" (only attempts
  being verified on some node use it up), or a reservation: pending rows that count against
  the budgets while the password is verified, on every node;
- `failure`: the reservation becomes the failure; at the limit the key is locked (and its
  failures forgotten, like `_Budget.failure`);
- `success`: the reservation goes; the network becomes familiar for the username (shared, so
  a user under attack keeps working from home on every node);
- `release`: the reservation goes (an AUTH refused for being busy, a dropped connection).

Rows expire (`expires_at`): a sweep at most every SWEEP_INTERVAL on one node at a time
(`pg_try_advisory_xact_lock`) deletes what no budget can count any more, so the tables hold at
most about one window of failures. Unreachable database: `begin` raises StoreUnavailable and
AUTH is answered 454 4.7.0 (replies.AUTH_UNAVAILABLE): fail closed, never unlimited guesses.

SQLite (one node) needs none of this: `relay serve` is the one process doing AUTH, and its
in-memory AuthThrottle is exact (AuthThrottle(shared=None)).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .contract import StoreUnavailable

if TYPE_CHECKING:  # asyncpg is loaded only where PostgreSQL is used (server.auth imports this module)
    import asyncpg

PENDING_TTL = 120.0       # a reservation whose node died mid-verification stops counting after this
SWEEP_INTERVAL = 60.0
FAMILIAR_TTL = 30 * 86400.0  # auth.FAMILIAR_TTL (also in relay_auth_begin)
FAMILIAR_PER_USER = 8        # auth.FAMILIAR_PER_USER
SWEEP_LOCK = 0x72656C6179737765  # "relayswe": one node sweeps at a time


@dataclass(frozen=True)
class Budgets:
    """The numbers the database applies (from LimitsConfig, as AuthThrottle.configure sets them)."""
    pair_limit: int
    net_limit: int
    user_limit: int
    window: float
    user_window: float
    lockout: float


@dataclass(frozen=True)
class Begin:
    refusal: str | None       # auth.NETWORK / PAIR / USER, or None (then `attempt` is reserved)
    waiting: bool             # refused only because of attempts in flight: worth waiting for
    attempt: int | None


class SharedAuthBudgets(Protocol):
    """What AuthThrottle asks of the shared budgets (one implementation: PostgreSQL)."""

    async def begin(self, net: str, user: str, b: Budgets) -> Begin: ...
    async def failure(self, attempt: int | None, net: str, user: str, b: Budgets) -> list[str]: ...
    async def success(self, attempt: int | None, net: str, user: str) -> None:
        await self._call(lambda conn: conn.execute(
            "SELECT relay_auth_success($1, $2, $3, $4, $5)", attempt, net, user, self._clock(), FAMILIAR_PER_USER,
            timeout=self.timeout))

    async def release(self, attempt: int) -> None: ...


class PgAuthBudgets:
    def __init__(self, pool: asyncpg.Pool, *, clock: Callable[[], float] = time.time, timeout: float = 5.0):
        self._pool = pool
        self._clock = clock
        # Short: a client waits on this before its AUTH is answered (454 when it runs out).
        self.timeout = timeout
        self._last_sweep = 0.0
        self._sweeping: asyncio.Task | None = None

    async def _call(self, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        from .pg_queue import _unavailable
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn:
                return await fn(conn)
        except BaseException as exc:
            mapped = _unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise

    async def begin(self, net: str, user: str, b: Budgets) -> Begin:
        now = self._clock()
        row = await self._call(lambda conn: conn.fetchrow(
            "SELECT * FROM relay_auth_begin($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            net, user, now, b.window, b.user_window, b.pair_limit, b.net_limit, b.user_limit, PENDING_TTL,
            timeout=self.timeout))
        if now - self._last_sweep >= SWEEP_INTERVAL and (self._sweeping is None or self._sweeping.done()):
            self._last_sweep = now
            self._sweeping = asyncio.create_task(self._sweep_quietly(), name="auth-sweep")
        return Begin(row["refusal"], row["waiting"], row["attempt"])

    async def failure(self, attempt: int | None, net: str, user: str, b: Budgets) -> list[str]:
        if attempt is None:  # recorded anew (a failure the shared side never reserved)
            attempt = await self._call(lambda conn: conn.fetchval("SELECT nextval('auth_attempts')"))
        hit = await self._call(lambda conn: conn.fetchval(
            "SELECT relay_auth_fail($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            attempt, net, user, self._clock(), b.window, b.user_window, b.pair_limit, b.net_limit, b.user_limit,
            b.lockout, timeout=self.timeout))
        return list(hit or ())

    async def success(self, attempt: int | None, net: str, user: str) -> None:
        async def op(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                if attempt is not None:
                    await conn.execute("DELETE FROM auth_events WHERE attempt = $1", attempt)
                if user:
                    await conn.execute(
                        "INSERT INTO auth_familiar VALUES ($1, $2, $3) ON CONFLICT (username, network) "
                        "DO UPDATE SET seen_at = GREATEST(auth_familiar.seen_at, EXCLUDED.seen_at)",
                        user, net, self._clock())
                    # The most recent FAMILIAR_PER_USER networks, as in memory.
                    await conn.execute(
                        "DELETE FROM auth_familiar WHERE username = $1 AND network NOT IN ("
                        "SELECT network FROM auth_familiar WHERE username = $1 ORDER BY seen_at DESC LIMIT $2)",
                        user, FAMILIAR_PER_USER)
        await self._call(op)

    async def release(self, attempt: int) -> None:
        await self._call(lambda conn: conn.execute("DELETE FROM auth_events WHERE attempt = $1", attempt,
                                                   timeout=self.timeout))

    async def sweep(self) -> int:
        """Delete what no budget counts any more; one node at a time. Rows deleted (-1: another
        node was sweeping)."""
        now = self._clock()

        async def op(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK):
                    return -1
                n = 0
                for sql, arg in (("DELETE FROM auth_events WHERE expires_at <= $1", now),
                                 ("DELETE FROM auth_locks WHERE until <= $1", now),
                                 ("DELETE FROM auth_familiar WHERE seen_at <= $1", now - FAMILIAR_TTL)):
                    n += int((await conn.execute(sql, arg)).rsplit(" ", 1)[-1])
                return n
        return await self._call(op)

    async def _sweep_quietly(self) -> None:
        try:
            await self.sweep()
        except (StoreUnavailable, asyncio.CancelledError):
            pass

    async def close(self) -> None:
        if self._sweeping is not None and not self._sweeping.done():
            self._sweeping.cancel()
            await asyncio.gather(self._sweeping, return_exceptions=True)
