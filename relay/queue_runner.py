"""The scheduler (like Postfix's qmgr): claims due recipients, delivers them per destination, settles.

Per destination (a recipient domain, or the smarthost), up to max_connections_per_destination
workers each keep one outbound connection and carry queued messages in a row over it
(connection reuse); an idle connection is kept a moment for the next message. A global
semaphore caps outbound connections. What is held in memory is bounded per destination
(PER_DESTINATION_BACKLOG) as well as in all (MAX_BACKLOG), and claims skip destinations whose
backlog is full, so one stalled destination cannot hold up mail for the others.

A destination whose connections keep failing is suspended (Postfix's "dead destination"):
its mail is deferred without a connection until the backoff ends, then one probe goes.

Leases: every job the runner holds is renewed by a heartbeat; each attempt runs under a
deadline that never reaches past its lease (nor attempt_timeout), and the lease is checked
again right before DATA. So a slow attempt is never claimed a second time while it runs.
Outcomes and any DSNs they cause are settled in one transaction. Never a bounce for a bounce.

Several nodes (PostgreSQL): a worker takes one of the destination's cluster-wide slots
(store/slots.py) before it connects and gives it back when its connection closes, so N nodes
open at most max_connections_per_destination connections to a receiver in all. A destination
with jobs here and no slot free is tried again every SLOT_RETRY; after SLOT_WAIT its jobs are
handed back (leases released) and it is left out of this node's claims for a while, so the
nodes that hold its slots deliver them.
"""
from __future__ import annotations

import asyncio
import logging
import dataclasses
import re
import time
from collections import deque
from datetime import datetime, timezone
from typing import Awaitable, Callable

from . import bounce, metrics
from .config import Config
from .delivery import DELIVERED, PERMANENT, TRANSIENT, Envelope, Fenced, OutRecipient, RcptOutcome, Router
from .logs import event
from .spool import Body
from .store.slots import DestinationSlots, LocalSlots, Slot
from .store.sqlite_queue import (Job, LeaseLost, NewMessage, NewRecipient, QueueStore, RecipientUpdate,
                                 StoreUnavailable)

log = logging.getLogger("relay.queue")

CLAIM_BATCH = 200
MAX_BACKLOG = 2000  # claimed-but-not-started jobs held in memory, in all
# ... and per destination: a destination at this many is skipped by claims, so a stalled one
# holds at most this (plus one claim batch) while the others keep being claimed.
PER_DESTINATION_BACKLOG = 100
# Longest sleep between looks at the queue. Enqueues by `relay serve` wake the runner at once
# (in-process, or down the delivery process's wake pipe); this bounds how late it notices
# changes made elsewhere (`relay queue retry`, later other nodes): one indexed MIN() every 2 s.
IDLE_POLL = 2.0
# An idle outbound connection waits this long for the next message to its destination
# (Postfix's smtp_connection_cache_time_limit), so a burst of submissions shares one session.
CONNECTION_IDLE = 2.0
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
_SMTP_REPLY = re.compile(r"^[245]\d\d[ -]")
# No slot free for a destination (every one held by some node): look again this often; after
# SLOT_WAIT without one, hand its jobs back and leave it out of claims for SLOT_WAIT.
SLOT_RETRY = 1.0
SLOT_WAIT = 10.0


def retry_delay(attempts: int, schedule: tuple[int, ...]) -> int:
    """Delay after the `attempts`-th failed attempt (1-based); the last step repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def notify_allows(notify: str | None, what: str) -> bool:
    """RFC 3461 5.2: without NOTIFY, send failure (and delay) reports but no success report."""
    if notify is None:
        return what in ("FAILURE", "DELAY")
    return what in notify.upper().split(",")


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


def route_of(address: str) -> str:
    """The queue's route key for an address: its domain in ASCII (IDNA) form, as the session stores it."""
    domain = _domain(address).lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


class _Destination:
    """Jobs waiting for one destination and the workers serving it."""

    def __init__(self) -> None:
        self.queue: deque[Job] = deque()
        self.workers = 0
        self.idle = 0              # workers holding an open connection, waiting for a job
        self.wake = asyncio.Event()
        self.no_slot_since = 0.0   # clock time the last worker found no slot free; 0: not waiting
        self.retry: asyncio.TimerHandle | None = None  # the next look for a slot


class _Health:
    """What the scheduler remembers of a destination between its jobs (Postfix's dead-destination
    logic): consecutive failed connections, and a suspension with its end."""

    def __init__(self) -> None:
        self.failures = 0
        self.last_error = ""
        self.suspended_until = 0.0  # clock time; 0: not suspended
        self.probing = False        # the suspension ended: one connection tries before the others


class QueueRunner:
    def __init__(self, queue: QueueStore, router: Router, cfg: Config, clock: Callable[[], float] = time.time,
                 signer: Callable[[str, bytes], Awaitable[tuple[bytes, str | None]]] | None = None,
                 slots: DestinationSlots | None = None):
        self.queue = queue
        # Per-destination connection slots: in-process (LocalSlots) on one node, shared by the
        # nodes on PostgreSQL (store.slots.PgSlots), renewed by the heartbeat.
        self.slots: DestinationSlots = slots or LocalSlots()
        self._slots_held: set[Slot] = set()
        # Destinations left out of claims until then (no slot for SLOT_WAIT: other nodes serve them).
        self._slotless: dict[str, float] = {}
        self.signer = signer
        self.router = router
        self.clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._dests: dict[str, _Destination] = {}
        self._health: dict[str, _Health] = {}
        self._global_waiting = 0
        self._tasks: set[asyncio.Task] = set()
        self._settling: set[asyncio.Task] = set()
        self._signatures: dict[object, bytes] = {}  # job token -> the DKIM-Signature its attempt sent
        self._current: dict[asyncio.Task, Job] = {}
        # Every job this runner holds a lease on (waiting, in flight or settling), by token; the
        # heartbeat renews them all. Their recipient ids: a claim must never return one of them.
        self._held: dict[str, Job] = {}
        self._held_rcpts: set[int] = set()
        # In-flight attempts: token -> (their deadline's handle, the attempt_timeout deadline).
        self._inflight: dict[str, tuple[asyncio.Timeout, float]] = {}
        self._run_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self.paused = False
        self.configure(cfg)
        if hasattr(self.slots, "ttl") and self.slots.ttl < 3 * self.heartbeat_interval:
            self.slots.ttl = 3 * self.heartbeat_interval  # two missed renewals before a slot can go

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.router.configure(cfg)
        # Workers release the semaphore they acquired, so replacing it on reload is safe.
        self._global = asyncio.Semaphore(cfg.delivery.max_connections)

    @property
    def lease_margin(self) -> float:
        """An attempt ends this long before its lease would: time to notice, abort and settle."""
        return min(self.queue.lease_seconds / 4, 60.0)

    @property
    def heartbeat_interval(self) -> float:
        return max(0.05, min(self.queue.lease_seconds / 4, 60.0))

    def wake(self) -> None:
        self._wake.set()

    @property
    def backlog(self) -> int:
        return sum(len(d.queue) for d in self._dests.values())

    def _saturated(self) -> list[str] | None:
        """Routes a claim must skip (their destination's backlog is full); None: claim nothing."""
        full = [dest for dest, d in self._dests.items() if len(d.queue) >= PER_DESTINATION_BACKLOG]
        if self._slotless:
            now = self.clock()
            for dest, until in list(self._slotless.items()):
                if until <= now:
                    del self._slotless[dest]
                elif dest not in full:
                    full.append(dest)
        if self.router.mode == "smarthost":
            return None if full else []  # one destination for every route
        return full

    async def run(self) -> None:
        self._run_task = asyncio.current_task()
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="lease-heartbeat")
        try:
            await self._claim_loop()
        except BaseException:
            self._heartbeat_task.cancel()
            raise
        # A normal end (stop()): the heartbeat goes on until stop() has let in-flight attempts finish.

    async def _claim_loop(self) -> None:
        while not self._stopping:
            claimed = 0
            exclude = self._saturated()
            if not self.paused and self.backlog < MAX_BACKLOG and exclude is not None:
                try:
                    jobs = await self.queue.claim(CLAIM_BATCH, destination=self.router.destination,
                                                  exclude_routes=exclude)
                except StoreUnavailable as exc:  # busy or full: retry shortly, no traceback for it
                    event(log, "claim_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
                    jobs = []
                except Exception:  # noqa: BLE001 - a bug: say so, and keep trying
                    log.exception("claim failed")
                    jobs = []
                if self._stopping:
                    # stop() began while this claim was committing: hand the leases straight back.
                    for job in jobs:
                        await self._release(job)
                    return
                claimed = sum(len(j.recipients) for j in jobs)
                for job in jobs:
                    self._take(job)
            if claimed >= CLAIM_BATCH and self.backlog < MAX_BACKLOG:
                await asyncio.sleep(0)
                continue
            await self._sleep_until_due(exclude)

    async def _sleep_until_due(self, exclude: list[str] | None) -> None:
        self._wake.clear()
        timeout = IDLE_POLL
        due = None
        if exclude is not None:
            try:
                due = await self.queue.next_due(exclude)
            except Exception:  # noqa: BLE001
                due = None
        if due is not None:
            timeout = min(timeout, max(0.0, due - self.clock()) + 0.01)
        if timeout <= 0.01 and (self.backlog >= MAX_BACKLOG or self.paused):
            timeout = 0.5  # due work we may not claim yet: do not spin
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------ leases

    def _take(self, job: Job) -> None:
        ids = [r.id for r in job.recipients]
        if any(i in self._held_rcpts for i in ids):
            # Cannot happen while heartbeats work (attempts end before their lease does); if it
            # does, sending this copy could duplicate the one in flight: drop it, its lease runs out.
            metrics.LEASES_LOST.labels("claimed_twice").inc()
            event(log, "lease_claimed_twice", logging.ERROR, qid=job.msg_id)
            return
        self._held[job.token] = job
        self._held_rcpts.update(ids)
        self._dispatch(job)

    def _finish(self, job: Job) -> None:
        if self._held.pop(job.token, None) is not None:
            self._held_rcpts.difference_update(r.id for r in job.recipients)
        self._inflight.pop(job.token, None)
        self._signatures.pop(job.token, None)

    def _lost(self, job: Job, where: str) -> None:
        metrics.LEASES_LOST.labels(where).inc()
        event(log, "lease_lost", logging.WARNING, qid=job.msg_id, where=where)
        self._finish(job)

    async def _heartbeat(self) -> None:
        """Renew every held lease, then move each in-flight attempt's deadline along with its
        lease: a renewal that fails leaves the old deadline, which ends the attempt before the
        lease runs out (an attempt never outlives its lease, so it is never claimed twice)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            jobs = [j for j in self._held.values() if not j.lost]
            try:
                lost = await self.queue.renew_many(jobs)
            except Exception as exc:  # noqa: BLE001 - deadlines stay where they are
                event(log, "lease_renew_failed", logging.WARNING, jobs=len(jobs), error=f"{type(exc).__name__}: {exc}")
                lost = []
            for job in lost:
                metrics.LEASES_LOST.labels("heartbeat").inc()
                event(log, "lease_lost", logging.WARNING, qid=job.msg_id, where="heartbeat")
            if self._slots_held:
                try:
                    for slot in await self.slots.renew(list(self._slots_held)):
                        # Taken over while we could not renew: its worker stops after the message in flight.
                        event(log, "slot_lost", logging.WARNING, destination=slot.destination, slot=slot.number)
                except Exception as exc:  # noqa: BLE001 - slots last 3 heartbeats; the next one tries again
                    event(log, "slot_renew_failed", logging.WARNING, slots=len(self._slots_held),
                          error=f"{type(exc).__name__}: {exc}")
            now, lnow = self.clock(), loop.time()
            for token, (cm, attempt_deadline) in list(self._inflight.items()):
                job = self._held.get(token)
                if job is None:
                    continue
                cm.reschedule(min(attempt_deadline, self._lease_deadline(job, now, lnow)))

    def _lease_deadline(self, job: Job, now: float, lnow: float) -> float:
        """In loop time: when an attempt under this job's lease must be over."""
        if job.lost:
            return lnow
        return lnow + (job.leased_until - now) - self.lease_margin

    async def _fence(self, job: Job) -> None:
        """Right before DATA: is the lease still ours? The heartbeat's last confirmation is
        trusted while it is recent (an unexpired lease cannot have been taken over); past one
        heartbeat interval the store is asked, and a store with `fence_each_attempt` always."""
        now = self.clock()
        if job.lost or now >= job.leased_until - self.lease_margin:
            raise Fenced(job.msg_id)
        # A shared store (PostgreSQL: nodes whose clocks may disagree a little) is asked before
        # every DATA; a single-node one only when the last confirmation is getting old.
        ask = getattr(self.queue, "fence_each_attempt", False) or now - job.confirmed_at > self.heartbeat_interval
        if not ask:
            return
        try:
            held = await self.queue.holds(job)
        except StoreUnavailable as exc:
            # The database cannot say whether the lease is still ours: send nothing. This is
            # not the destination's failure (it must not count toward suspending it, or every
            # message would wait dead_destination_backoff after a database failover); the job
            # comes due again when its lease runs out.
            event(log, "fence_unavailable", logging.WARNING, qid=job.msg_id, error=f"{type(exc).__name__}: {exc}")
            raise Fenced(job.msg_id) from exc
        if not held:
            raise Fenced(job.msg_id)

    # ------------------------------------------------------------ destinations

    def _health_of(self, dest: str) -> _Health:
        h = self._health.get(dest)
        if h is None:
            h = self._health[dest] = _Health()
        return h

    def _suspended(self, dest: str) -> _Health | None:
        """The destination's health when its mail must be deferred without a connection now."""
        h = self._health.get(dest)
        if h is None or not h.suspended_until:
            return None
        if self.clock() < h.suspended_until:
            return h
        h.suspended_until, h.probing = 0.0, True  # backoff over: one probe connection
        event(log, "destination_probe", destination=dest)
        return None

    def _observe(self, dest: str, outcomes: dict[str, RcptOutcome]) -> None:
        """Move a destination's health by an attempt's outcomes: any SMTP reply means it is alive;
        only failures to connect or keep a session count toward suspending it."""
        if not outcomes:
            return
        h = self._health_of(dest)
        if not all(o.connection_failed for o in outcomes.values()):
            if h.failures or h.probing:
                event(log, "destination_alive", destination=dest)
            self._health.pop(dest, None)
            return
        h.failures += 1
        h.last_error = next(iter(outcomes.values())).reply
        d = self.cfg.delivery
        if (h.probing or h.failures >= d.dead_destination_failures) and not h.suspended_until:
            h.suspended_until, h.probing = self.clock() + d.dead_destination_backoff, False
            metrics.DESTINATIONS_SUSPENDED.inc()
            event(log, "destination_suspended", logging.WARNING, destination=dest, failures=h.failures,
                  until=round(d.dead_destination_backoff), error=h.last_error)
            q = self._dests.get(dest)
            while q is not None and q.queue:
                self._defer_suspended(q.queue.popleft(), h)

    def _defer_suspended(self, job: Job, h: _Health) -> None:
        outcome = RcptOutcome(TRANSIENT, f"delivery temporarily suspended: {h.last_error}", "4.4.1")
        self._spawn_settle(job, {r.address: outcome for r in job.recipients}, None, not_before=h.suspended_until)

    # ------------------------------------------------------------ workers

    def _dispatch(self, job: Job) -> None:
        dest = self.router.destination(job.route)
        h = self._suspended(dest)
        if h is not None:
            self._defer_suspended(job, h)
            return
        d = self._dests.get(dest)
        if d is None:
            d = self._dests[dest] = _Destination()
        d.queue.append(job)
        d.wake.set()  # an idle worker with an open connection takes it
        health = self._health.get(dest)
        limit = 1 if health is not None and health.probing else self.cfg.delivery.max_connections_per_destination
        if d.retry is not None:
            return  # no slot free a moment ago: the retry timer starts the next worker
        if d.workers < limit and (d.workers == 0 or len(d.queue) > d.workers):
            self._spawn(dest, d)

    def _spawn(self, dest: str, d: _Destination) -> None:
        d.workers += 1
        t = asyncio.create_task(self._worker(dest, d), name=f"deliver:{dest}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _worker(self, dest: str, d: _Destination) -> None:
        try:
            self._global_waiting += 1
            for other in self._dests.values():
                if other.idle:
                    other.wake.set()  # idle connections give their slot to a destination with work
            try:
                sem = self._global
                await sem.acquire()
            finally:
                self._global_waiting -= 1
            route = None
            slot = None
            cancelled = False
            try:
                slot = await self._take_slot(dest, d)
                if slot is None:
                    return
                route = self.router.open(dest)
                me = asyncio.current_task()
                while not self._stopping and not slot.lost:
                    if not d.queue:
                        if await self._wait_for_work(d, route):
                            continue
                        break
                    job = d.queue.popleft()
                    if len(d.queue) == PER_DESTINATION_BACKLOG - 1:
                        self.wake()  # room again: claims may include this destination
                    h = self._suspended(dest)
                    if h is not None:  # another worker's failure suspended it meanwhile
                        self._defer_suspended(job, h)
                        continue
                    self._current[me] = job
                    try:
                        await self._deliver(route, job, dest)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # noqa: BLE001 - its lease brings the job back; keep serving the rest
                        log.exception("delivery of %s failed unexpectedly", job.msg_id)
                        self._finish(job)
                    finally:
                        self._current.pop(me, None)
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                if route is not None:
                    if cancelled:
                        route.abort()  # shutdown gave up on a stalled peer: no polite QUIT to wait on
                    else:
                        try:
                            await route.close()
                        except Exception:  # noqa: BLE001 - a failed QUIT must not leak the worker slot
                            log.debug("closing the route to %s failed", dest, exc_info=True)
                if slot is not None:
                    await self._give_slot(slot)
                sem.release()
        finally:
            d.workers -= 1
            if d.workers == 0:
                if not d.queue:
                    if self._dests.get(dest) is d and d.retry is None:
                        del self._dests[dest]
                elif not self._stopping and d.retry is None:
                    self._spawn(dest, d)  # jobs arrived while we were closing: keep going

    async def _take_slot(self, dest: str, d: _Destination) -> Slot | None:
        """One of the destination's connection slots (cluster-wide on PostgreSQL), or None: all
        are in use elsewhere (or the store cannot say). The last worker of a destination that
        finds none sets a retry timer; after SLOT_WAIT without a slot its jobs go back."""
        try:
            slot = await self.slots.acquire(dest, self.cfg.delivery.max_connections_per_destination)
        except Exception as exc:  # noqa: BLE001 - StoreUnavailable or a bug: no connection now
            if not d.no_slot_since:  # once per wait, not at every retry
                event(log, "slot_unavailable", logging.WARNING, destination=dest,
                      error=f"{type(exc).__name__}: {exc}")
            slot = None
        if slot is not None:
            d.no_slot_since = 0.0
            self._slots_held.add(slot)
            return slot
        if d.workers == 1 and d.queue and not self._stopping:  # only this one: nobody serves the queue
            now = self.clock()
            if not d.no_slot_since:
                d.no_slot_since = now
                event(log, "destination_slots_busy", destination=dest,
                      limit=self.cfg.delivery.max_connections_per_destination)
            if now - d.no_slot_since >= SLOT_WAIT:
                # The nodes holding the slots can deliver these: give them back, claim others.
                self._slotless[dest] = now + SLOT_WAIT
                d.no_slot_since = 0.0
                pending = list(d.queue)
                d.queue.clear()
                event(log, "destination_handed_back", destination=dest, jobs=len(pending))
                for job in pending:
                    self._spawn_release(job)
            else:
                d.retry = asyncio.get_running_loop().call_later(SLOT_RETRY, self._slot_retry, dest, d)
        return None

    def _slot_retry(self, dest: str, d: _Destination) -> None:
        d.retry = None
        if self._stopping:
            return
        if d.queue and d.workers == 0:
            self._spawn(dest, d)
        elif not d.queue and d.workers == 0 and self._dests.get(dest) is d:
            del self._dests[dest]

    def _spawn_release(self, job: Job) -> None:
        t = asyncio.create_task(self._release(job))
        self._settling.add(t)
        t.add_done_callback(self._settling.discard)

    async def _give_slot(self, slot: Slot) -> None:
        self._slots_held.discard(slot)
        try:
            await self.slots.release(slot)
        except Exception as exc:  # noqa: BLE001 - the slot's lease runs out by itself
            event(log, "slot_release_failed", logging.WARNING, destination=slot.destination,
                  error=f"{type(exc).__name__}: {exc}")

    async def _wait_for_work(self, d: _Destination, route) -> bool:
        """Keep an open connection for CONNECTION_IDLE seconds in case another job comes for it."""
        if not route.reusable or self._global_waiting:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECTION_IDLE
        d.idle += 1
        try:
            while not d.queue:
                remaining = deadline - loop.time()
                if self._stopping or self._global_waiting or remaining <= 0:
                    return False
                d.wake.clear()
                try:
                    await asyncio.wait_for(d.wake.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            return True
        finally:
            d.idle -= 1

    async def _deliver(self, route, job: Job, dest: str) -> None:
        if job.lost:
            self._lost(job, "queued")
            return
        if job.leased_until - self.clock() < 2 * self.lease_margin:
            # It waited long in the backlog: make sure the lease is still ours before sending.
            try:
                await self.queue.renew(job)
            except LeaseLost:
                self._lost(job, "queued")
                return
        body, dkim_domain = await self.queue.body_to_send(job.msg_id)
        if body is None:  # deleted by the administrator meanwhile
            self._finish(job)
            return
        if dkim_domain is not None and self.signer is not None:
            prefix = await self._sign(job, dkim_domain, body)
            if prefix is None:  # not sent unsigned (DMARC could reject it): try again later
                outcome = RcptOutcome(TRANSIENT, "DKIM signing failed; see the relay's log", "4.3.0")
                self._spawn_settle(job, {r.address: outcome for r in job.recipients}, None)
                return
            body = dataclasses.replace(body, prefix=prefix)
        env = Envelope(job.sender, tuple(OutRecipient(r.address, r.notify, r.orcpt) for r in job.recipients),
                       body, job.smtputf8, job.ret, job.envid, job.msg_id, job.requiretls)
        loop = asyncio.get_running_loop()
        attempt_deadline = loop.time() + self.cfg.delivery.attempt_timeout
        deadline = asyncio.timeout_at(min(attempt_deadline, self._lease_deadline(job, self.clock(), loop.time())))
        try:
            async with deadline:
                self._inflight[job.token] = (deadline, attempt_deadline)
                try:
                    outcomes = await route.send(env, fence=lambda: self._fence(job))
                finally:
                    self._inflight.pop(job.token, None)
        except Fenced:
            self._lost(job, "fence")
            return
        except TimeoutError as exc:
            if not deadline.expired():  # not our deadline: some other timeout escaped, a bug
                log.exception("delivery of %s failed unexpectedly", job.msg_id)
                outcomes = {r.address: RcptOutcome(TRANSIENT, f"internal error: {type(exc).__name__}", "4.3.0")
                            for r in job.recipients}
            elif job.lost:
                self._lost(job, "deadline")
                return
            else:
                lease = loop.time() < attempt_deadline
                why = ("its lease could not be renewed" if lease
                       else f"it took longer than attempt_timeout ({self.cfg.delivery.attempt_timeout}s)")
                event(log, "attempt_cut", logging.WARNING, qid=job.msg_id, destination=dest, reason=why)
                outcomes = {r.address: RcptOutcome(TRANSIENT, f"attempt ended because {why}", "4.4.2",
                                                   connection_failed=True) for r in job.recipients}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in one delivery must not stall the queue
            log.exception("delivery of %s failed unexpectedly", job.msg_id)
            outcomes = {r.address: RcptOutcome(TRANSIENT, f"internal error: {type(exc).__name__}", "4.3.0")
                        for r in job.recipients}
        self._observe(dest, outcomes)
        # The body is not kept for the settle: a DSN reads what it needs (bounded) from the store.
        self._spawn_settle(job, outcomes, None)

    def _spawn_settle(self, job: Job, outcomes: dict[str, RcptOutcome], body: bytes | None,
                      not_before: float = 0.0) -> None:
        t = asyncio.create_task(self._settle(job, outcomes, body, not_before))
        self._settling.add(t)
        t.add_done_callback(self._settling.discard)

    async def _sign(self, job: Job, domain: str, body: Body) -> bytes | None:
        """DKIM-sign before the first attempt; the settle stores the signature (retries send it
        as is). The DKIM-Signature field (b"" without a key), or None when signing failed: the
        attempt is deferred rather than made unsigned."""
        assert self.signer is not None
        try:
            signed, selector = await self.signer(domain, body)
        except Exception as exc:  # noqa: BLE001 - key lookup or signing: transient, logged
            event(log, "dkim_sign_failed", logging.ERROR, qid=job.msg_id, domain=domain,
                  error=f"{type(exc).__name__}: {exc}")
            return None
        # Kept for the settle, which stores it in its own transaction: a write of its own per
        # message rewrote the body's row (its blob included) once more, only for the settle to
        # rewrite it again.
        self._signatures[job.token] = signed
        if selector is not None:
            event(log, "dkim_signed", qid=job.msg_id, domain=domain, selector=selector)
        return signed

    # ------------------------------------------------------------ settle

    async def _settle(self, job: Job, outcomes: dict[str, RcptOutcome], body: bytes | None,
                      not_before: float = 0.0) -> None:
        try:
            await self._settle_job(job, outcomes, body, not_before)
        finally:
            self._finish(job)

    async def _settle_job(self, job: Job, outcomes: dict[str, RcptOutcome], body: bytes | None,
                          not_before: float) -> None:
        now = self.clock()
        d = self.cfg.delivery
        mode = self.router.mode
        expires_at = job.created_at + d.max_queue_lifetime
        updates: list[RecipientUpdate] = []
        history: list[tuple] = []  # (rcpt, event, reply, host, tls)
        failed: list[bounce.DSNRecipient] = []
        succeeded: list[bounce.DSNRecipient] = []
        delayed: list[bounce.DSNRecipient] = []
        age = now - job.created_at
        for r in job.recipients:
            o = outcomes.get(r.address) or RcptOutcome(TRANSIENT, "no outcome recorded", "4.0.0")
            status, expired = o.status, False
            if o.kind == DELIVERED:
                state, next_at = "delivered", now
                metrics.DELIVERY_LATENCY.observe(max(0.0, age))
            elif o.kind == PERMANENT:
                state, next_at = "failed", now
            elif now >= expires_at:
                # Out of time: fail with the last reply as the reason (RFC 3464 2.3.6).
                state, next_at, status, expired = "failed", now, EXPIRED_STATUS, True
            else:
                # The last retry lands on the expiry time itself, so expiry is never late by a whole step.
                state = "deferred"
                next_at = min(max(now + retry_delay(r.attempts, d.retry_schedule), not_before), expires_at)
            metrics.DELIVERY_ATTEMPTS.labels(state, mode).inc()
            updates.append(RecipientUpdate(r.id, state, next_at, None if state == "delivered" else o.reply,
                                           o.remote_mta))
            history.append((r.address, "expired" if expired else state, o.reply, o.remote_mta, o.tls, o.tls_policy,
                            o.tls_cipher, None if o.tls_verified is None else int(o.tls_verified)))
            # Deferrals are warnings too: a log filtered at warning must still show mail not moving.
            event(log, "delivery", logging.INFO if state == "delivered" else logging.WARNING, qid=job.msg_id,
                  rcpt=r.address, result=state, mx=o.remote_mta, tls=o.tls, tls_cipher=o.tls_cipher,
                  tls_verified=o.tls_verified, tls_policy=o.tls_policy, tls_result=o.tls_result,
                  reply=o.reply, attempt=r.attempts,
                  expired=expired or None, next_attempt=round(next_at - now) if state == "deferred" else None)
            # An MX or smarthost is not the final mailbox: success there is "relayed" (RFC 3461 5.2.2).
            action = {"delivered": "relayed", "failed": "failed"}.get(state, "delayed")
            dsn_r = bounce.DSNRecipient(
                final_recipient=r.address, action=action, status=status,
                diagnostic=o.reply, remote_mta=o.remote_mta, original_recipient=r.orcpt,
                last_attempt=datetime.fromtimestamp(now, timezone.utc),
                will_retry_until=datetime.fromtimestamp(expires_at, timezone.utc) if state == "deferred" else None,
                diagnostic_type="smtp" if o.remote_mta and _SMTP_REPLY.match(o.reply) else "X-Relay")
            if state == "failed" and notify_allows(r.notify, "FAILURE"):
                failed.append(dsn_r)
            elif state == "delivered" and notify_allows(r.notify, "SUCCESS") and not o.dsn:
                # When the remote took NOTIFY along, the success report is its to send (RFC 3461 5.2.1).
                succeeded.append(dsn_r)
            elif state == "deferred" and notify_allows(r.notify, "DELAY"):
                delayed.append(dsn_r)
        signed = self._signatures.pop(job.token, None)
        bounces = []
        warn = bool(d.delay_warning_after and delayed and not job.warned and age >= d.delay_warning_after)
        if job.sender and (failed or succeeded or warn) and body is None:
            body = await self.queue.body(job.msg_id) or b""  # a deferral without an attempt read no body
            if signed:  # stored by this settle, after the read: the report returns what was sent
                body = signed + body
        if job.sender:  # never a bounce for a bounce (RFC 3461 6.2, RFC 5321 3.6.3)
            for kind, rcpts in (("failure", failed), ("success", succeeded), ("delay", delayed if warn else [])):
                if rcpts:
                    bounces.append(self._dsn(job, body, rcpts))
                    metrics.BOUNCES.labels(kind).inc()
        elif failed:
            event(log, "bounce_dropped", logging.WARNING, qid=job.msg_id, rcpts=len(failed),
                  reason="null sender: no bounce for a bounce")
        try:
            # The signature goes into the settle's own transaction: a retry sends what this
            # attempt sent, and `queue show` of the finished message shows it signed.
            ids = await self.queue.settle(job, updates, bounces=tuple(bounces), history=history, mark_warned=warn,
                                          signature=signed)
        except LeaseLost:
            metrics.LEASES_LOST.labels("settle").inc()
            event(log, "lease_lost", logging.WARNING, qid=job.msg_id, where="settle")
            return
        except StoreUnavailable as exc:
            # Disk full, store busy: expected, and the work comes due again when its lease runs out.
            event(log, "settle_failed", logging.WARNING, qid=job.msg_id, error=f"{type(exc).__name__}: {exc}")
            return
        except Exception:  # noqa: BLE001 - unsettled work comes due again when its lease expires
            log.exception("settle failed for %s", job.msg_id)
            return
        if any(u.state == "deferred" for u in updates):
            # The runner is asleep until the lease expiry it saw at claim time; the due time is earlier now.
            self.wake()
        for qid, b in zip(ids, bounces):
            event(log, "bounce", qid=job.msg_id, dsn_qid=qid, to=job.sender,
                  rcpts=len(b.recipients))

    def _dsn(self, job: Job, body: bytes, rcpts: list[bounce.DSNRecipient]) -> NewMessage:
        data = bounce.build_dsn(
            reporting_mta=self.cfg.server.hostname, original_sender=job.sender, original_message=body,
            original_size=job.size,
            recipients=rcpts, ret=job.ret or "HDRS", envid=job.envid,
            arrival_date=datetime.fromtimestamp(job.created_at, timezone.utc), queue_id=job.msg_id)
        return NewMessage(sender="", recipients=(NewRecipient(job.sender, route_of(job.sender)),), data=data,
                          smtputf8=not job.sender.isascii())

    # ------------------------------------------------------------ shutdown

    async def stop(self, timeout: float) -> None:
        """Stop claiming; give back what has not started; let in-flight deliveries finish or release them."""
        self._stopping = True
        self._wake.set()
        for d in self._dests.values():
            d.wake.set()
        if self._run_task is not None and not self._run_task.done() and self._run_task is not asyncio.current_task():
            # Let a claim that is committing right now finish, so its leases are released, not stranded.
            await asyncio.wait({self._run_task}, timeout=min(timeout, 10))
        pending = [job for d in self._dests.values() for job in d.queue]
        for d in self._dests.values():
            d.queue.clear()
            if d.retry is not None:
                d.retry.cancel()
                d.retry = None
        for job in pending:
            await self._release(job)
        if self._tasks:
            done, still = await asyncio.wait(set(self._tasks), timeout=timeout)
            for t in still:
                job = self._current.get(t)
                t.cancel()
                if job is not None:
                    await self._release(job)
            if still:
                await asyncio.wait(still, timeout=5)
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        policy = getattr(self.router, "tls_policy", None)
        if policy is not None:
            await policy.flush()  # TLSRPT counts still in memory

    async def _release(self, job: Job) -> None:
        try:
            await self.queue.release(job)
        except Exception:  # noqa: BLE001 - the lease expires by itself anyway
            log.warning("could not release lease of %s", job.msg_id)
        finally:
            self._finish(job)
