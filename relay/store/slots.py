"""Per-destination connection slots (issue 17): `delivery.max_connections_per_destination` for the
whole cluster, not per node, so N nodes do not open N times the limit to one receiver.

A slot is what one queue-runner worker needs before it opens its outbound connection (it then
carries message after message over it) and gives back when that connection closes. The runner
asks `acquire(destination, limit)`; None means every slot is in use (on some node) and the
worker does not start; the runner tries again shortly and, if no slot comes, hands the waiting
jobs back so the nodes holding the slots can claim them (queue_runner.SLOT_WAIT).

- LocalSlots (SQLite, one node): always a slot. The runner's own per-destination worker count
  already is the limit when one process delivers everything.
- PgSlots (PostgreSQL): rows (destination, slot, owner, token, expires_at) in an UNLOGGED table.
  `acquire` is one call of relay_slot_acquire (pg_schema migration 9): the first slot number
  below the limit that has no row, or whose lease ran out (a dead or frozen node's), decided by
  INSERT .. ON CONFLICT DO UPDATE .. WHERE expired under the row's own lock. The runner's
  heartbeat renews the leases of the slots it holds (`renew`, one UPDATE for all); a slot whose
  renewal finds another token was taken over after a freeze: its worker stops after the
  message in flight. `release` deletes the row (token-fenced), so only a node that died leaves
  rows behind: reused in place by the next acquire, and deleted an hour after they ran out by
  `sweep`, which `acquire` starts at most every SWEEP_INTERVAL, on one node at a time.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .contract import StoreUnavailable

if TYPE_CHECKING:
    import asyncpg

SWEEP_INTERVAL = 300.0
SWEEP_AFTER = 3600.0   # a slot row this long past its lease is deleted
SWEEP_LOCK = 0x72656C6179736C74  # "relayslt": one node sweeps at a time


@dataclass(eq=False)
class Slot:
    destination: str
    number: int
    token: str
    expires_at: float = 0.0
    lost: bool = field(default=False)  # the lease was taken over (we were frozen past it)


class DestinationSlots(Protocol):
    ttl: float

    async def acquire(self, destination: str, limit: int) -> Slot | None: ...
    async def renew(self, slots: list[Slot]) -> list[Slot]: ...   # the ones lost
    async def release(self, slot: Slot) -> None: ...


class LocalSlots:
    """One node: the runner's own worker count per destination is the limit."""
    ttl = float("inf")

    async def acquire(self, destination: str, limit: int) -> Slot | None:
        return Slot(destination, 0, "")

    async def renew(self, slots: list[Slot]) -> list[Slot]:
        return []

    async def release(self, slot: Slot) -> None:
        pass


class PgSlots:
    def __init__(self, pool: asyncpg.Pool, *, owner: str = "", ttl: float = 180.0,
                 clock: Callable[[], float] = time.time, timeout: float = 10.0):
        self._pool = pool
        self.owner = owner or secrets.token_hex(4)
        self.ttl = ttl
        self._clock = clock
        self.timeout = timeout
        self._last_sweep = 0.0
        self._sweeping: asyncio.Task | None = None

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        from .pg_queue import _unavailable
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn:
                return await fn(conn)
        except BaseException as exc:
            mapped = _unavailable(exc)
            if mapped is not None:
                raise mapped from exc
            raise

    async def acquire(self, destination: str, limit: int) -> Slot | None:
        token = secrets.token_hex(8)
        now = self._clock()
        until = now + self.ttl
        number = await self._call(lambda conn: conn.fetchval(
            "SELECT relay_slot_acquire($1, $2, $3, $4, $5, $6)", destination, limit, self.owner, token, now, until,
            timeout=self.timeout))
        if now - self._last_sweep >= SWEEP_INTERVAL and (self._sweeping is None or self._sweeping.done()):
            self._last_sweep = now
            self._sweeping = asyncio.get_running_loop().create_task(self._sweep_quietly(), name="slot-sweep")
        return None if number is None else Slot(destination, number, token, until)

    async def renew(self, slots: list[Slot]) -> list[Slot]:
        live = [s for s in slots if not s.lost]
        if not live:
            return []
        until = self._clock() + self.ttl
        kept = await self._call(lambda conn: conn.fetch(
            "UPDATE destination_slots d SET expires_at = $2 FROM unnest($1::text[]) AS u(token) "
            "WHERE d.token = u.token RETURNING d.token", [s.token for s in live], until, timeout=self.timeout))
        kept_tokens = {r["token"] for r in kept}
        lost = []
        for s in live:
            if s.token in kept_tokens:
                s.expires_at = until
            else:
                s.lost = True
                lost.append(s)
        return lost

    async def release(self, slot: Slot) -> None:
        if slot.lost:
            return
        await self._call(lambda conn: conn.execute(
            "DELETE FROM destination_slots WHERE destination = $1 AND slot = $2 AND token = $3",
            slot.destination, slot.number, slot.token, timeout=self.timeout))

    async def in_use(self, destination: str) -> int:
        """Slots leased now for a destination, on all nodes (tests, `relay node list` later)."""
        return await self._call(lambda conn: conn.fetchval(
            "SELECT count(*) FROM destination_slots WHERE destination = $1 AND expires_at > $2",
            destination, self._clock()))

    async def sweep(self, older_than: float = SWEEP_AFTER) -> int:
        """Delete leases that ran out long ago (a node died holding them); -1: another node is
        sweeping."""
        cutoff = self._clock() - older_than

        async def op(conn: Any) -> int:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK):
                    return -1
                status = await conn.execute("DELETE FROM destination_slots WHERE expires_at < $1", cutoff)
                return int(status.rsplit(" ", 1)[-1])
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


__all__ = ["DestinationSlots", "LocalSlots", "PgSlots", "Slot", "StoreUnavailable"]
