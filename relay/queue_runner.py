"""The scheduler (like Postfix's qmgr): claims due recipients, delivers them per destination, settles.

Per destination, up to N workers each keep one outbound connection and carry queued messages
in a row over it (connection reuse); a global semaphore caps outbound connections. Outcomes
and any DSNs they cause are settled in one transaction. Never a bounce for a bounce.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import datetime, timezone
from typing import Callable

from . import bounce, metrics
from .config import Config
from .delivery import DELIVERED, PERMANENT, TRANSIENT, Envelope, OutRecipient, RcptOutcome, Router
from .logs import event
from .queue_store import Job, LeaseLost, NewMessage, NewRecipient, QueueStore, RecipientUpdate

log = logging.getLogger("relay.queue")

CLAIM_BATCH = 200
MAX_BACKLOG = 2000  # claimed-but-not-started recipients held in memory


def retry_delay(attempts: int, schedule: tuple[int, ...]) -> int:
    """Delay after the `attempts`-th failed attempt (1-based); the last step repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def notify_allows(notify: str | None, what: str) -> bool:
    """RFC 3461 5.2: without NOTIFY, send failure (and delay) reports but no success report."""
    if notify is None:
        return what in ("FAILURE", "DELAY")
    return what in notify.split(",")


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


class QueueRunner:
    def __init__(self, queue: QueueStore, router: Router, cfg: Config, clock: Callable[[], float] = time.time):
        self.queue = queue
        self.router = router
        self.clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._backlog: dict[str, deque[Job]] = {}
        self._workers: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._settling: set[asyncio.Task] = set()
        self._current: dict[asyncio.Task, Job] = {}
        self.paused = False
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.router.configure(cfg)
        self._global = asyncio.Semaphore(cfg.delivery.max_connections)

    def wake(self) -> None:
        self._wake.set()

    @property
    def backlog(self) -> int:
        return sum(len(q) for q in self._backlog.values())

    async def run(self) -> None:
        while not self._stopping:
            claimed = 0
            if not self.paused and self.backlog < MAX_BACKLOG:
                try:
                    jobs = await self.queue.claim(CLAIM_BATCH)
                except Exception:  # noqa: BLE001 - the store may be briefly busy; retry shortly
                    log.exception("claim failed")
                    jobs = []
                claimed = sum(len(j.recipients) for j in jobs)
                for job in jobs:
                    self._dispatch(job)
            if claimed >= CLAIM_BATCH and self.backlog < MAX_BACKLOG:
                await asyncio.sleep(0)
                continue
            await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        self._wake.clear()
        timeout = 30.0
        try:
            due = await self.queue.next_due()
        except Exception:  # noqa: BLE001
            due = None
        if due is not None:
            timeout = min(timeout, max(0.0, due - self.clock()) + 0.01)
        if timeout <= 0.01 and self.backlog >= MAX_BACKLOG:
            timeout = 0.5
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _dispatch(self, job: Job) -> None:
        dest = self.router.destination(job.route)
        q = self._backlog.setdefault(dest, deque())
        q.append(job)
        workers = self._workers.get(dest, 0)
        if workers < self.cfg.delivery.max_connections_per_destination and (workers == 0 or len(q) > workers):
            self._workers[dest] = workers + 1
            t = asyncio.create_task(self._worker(dest), name=f"deliver:{dest}")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _worker(self, dest: str) -> None:
        q = self._backlog[dest]
        route = None
        try:
            async with self._global:
                route = self.router.open(dest)
                me = asyncio.current_task()
                while q and not self._stopping:
                    job = q.popleft()
                    self._current[me] = job
                    try:
                        await self._deliver(route, job)
                    finally:
                        self._current.pop(me, None)
        finally:
            if route is not None:
                await route.close()
            self._workers[dest] -= 1
            if self._workers[dest] == 0:
                del self._workers[dest]
                if not q:
                    self._backlog.pop(dest, None)
                elif not self._stopping:
                    self._workers[dest] = 1  # jobs arrived while we were closing: keep going
                    t = asyncio.create_task(self._worker(dest), name=f"deliver:{dest}")
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)

    async def _deliver(self, route, job: Job) -> None:
        now = self.clock()
        body = await self.queue.body(job.msg_id)
        if body is None:  # deleted by the administrator meanwhile
            return
        expired = now - job.created_at >= self.cfg.delivery.max_queue_lifetime
        if expired:
            outcomes = {r.address: RcptOutcome(PERMANENT, "message expired in the queue without delivery "
                                               f"(max_queue_lifetime {self.cfg.delivery.max_queue_lifetime}s)", "4.4.7")
                        for r in job.recipients}
        else:
            env = Envelope(job.sender, tuple(OutRecipient(r.address, r.notify, r.orcpt) for r in job.recipients),
                           body, job.smtputf8, job.ret, job.envid)
            try:
                outcomes = await route.send(env)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug in one delivery must not stall the queue
                log.exception("delivery of %s failed unexpectedly", job.msg_id)
                outcomes = {r.address: RcptOutcome(TRANSIENT, f"internal error: {type(exc).__name__}", "4.3.0")
                            for r in job.recipients}
        t = asyncio.create_task(self._settle(job, outcomes, body, expired))
        self._settling.add(t)
        t.add_done_callback(self._settling.discard)

    async def _settle(self, job: Job, outcomes: dict[str, RcptOutcome], body: bytes, expired: bool) -> None:
        now = self.clock()
        d = self.cfg.delivery
        mode = self.router.mode
        updates: list[RecipientUpdate] = []
        history: list[tuple[str | None, str, str]] = []
        failed: list[bounce.DSNRecipient] = []
        succeeded: list[bounce.DSNRecipient] = []
        delayed: list[bounce.DSNRecipient] = []
        age = now - job.created_at
        for r in job.recipients:
            o = outcomes.get(r.address) or RcptOutcome(TRANSIENT, "no outcome recorded", "4.0.0")
            if o.kind == DELIVERED:
                state, next_at = "delivered", now
                metrics.DELIVERY_LATENCY.observe(max(0.0, age))
            elif o.kind == PERMANENT:
                state, next_at = "failed", now
            else:
                state, next_at = "deferred", now + retry_delay(r.attempts, d.retry_schedule)
            metrics.DELIVERY_ATTEMPTS.labels({"delivered": "delivered", "failed": "failed"}.get(state, "deferred"),
                                             mode).inc()
            updates.append(RecipientUpdate(r.id, state, next_at, None if state == "delivered" else o.reply,
                                           o.remote_mta))
            history.append((r.address, state, o.reply))
            event(log, "delivery", logging.INFO if state != "failed" else logging.WARNING, qid=job.msg_id,
                  rcpt=r.address, result=state, mx=o.remote_mta, tls=o.tls, reply=o.reply, attempt=r.attempts,
                  expired=expired or None, next_attempt=int(next_at - now) if state == "deferred" else None)
            dsn_r = bounce.DSNRecipient(
                final_recipient=r.address, action={"delivered": "delivered", "failed": "failed"}.get(state, "delayed"),
                status=o.status if state != "delivered" else "2.0.0", diagnostic=o.reply if o.remote_mta or state != "delivered" else None,
                remote_mta=o.remote_mta, original_recipient=r.orcpt,
                last_attempt=datetime.fromtimestamp(now, timezone.utc),
                will_retry_until=datetime.fromtimestamp(job.created_at + d.max_queue_lifetime, timezone.utc)
                if state == "deferred" else None)
            if state == "failed" and notify_allows(r.notify, "FAILURE"):
                failed.append(dsn_r)
            elif state == "delivered" and notify_allows(r.notify, "SUCCESS"):
                succeeded.append(dsn_r)
            elif state == "deferred" and notify_allows(r.notify, "DELAY"):
                delayed.append(dsn_r)
        bounces = []
        warn = bool(d.delay_warning_after and delayed and not job.warned and age >= d.delay_warning_after)
        if job.sender:  # never a bounce for a bounce (RFC 3461 6.2, RFC 5321 3.6.3)
            for kind, rcpts in (("failure", failed), ("success", succeeded), ("delay", delayed if warn else [])):
                if rcpts:
                    bounces.append(self._dsn(job, body, rcpts))
                    metrics.BOUNCES.labels(kind).inc()
        elif failed:
            event(log, "bounce_dropped", logging.WARNING, qid=job.msg_id, rcpts=len(failed),
                  reason="null sender: no bounce for a bounce")
        try:
            ids = await self.queue.settle(job, updates, bounces=tuple(bounces), history=history, mark_warned=warn)
        except LeaseLost:
            event(log, "lease_lost", logging.WARNING, qid=job.msg_id)
            return
        except Exception:  # noqa: BLE001 - unsettled work comes due again when its lease expires
            log.exception("settle failed for %s", job.msg_id)
            return
        for qid, b in zip(ids, bounces):
            event(log, "bounce", qid=job.msg_id, dsn_qid=qid, to=job.sender,
                  rcpts=len(b.recipients))

    def _dsn(self, job: Job, body: bytes, rcpts: list[bounce.DSNRecipient]) -> NewMessage:
        data = bounce.build_dsn(
            reporting_mta=self.cfg.server.hostname, original_sender=job.sender, original_message=body,
            recipients=rcpts, ret=job.ret or "HDRS", envid=job.envid,
            arrival_date=datetime.fromtimestamp(job.created_at, timezone.utc), queue_id=job.msg_id)
        return NewMessage(sender="", recipients=(NewRecipient(job.sender, _domain(job.sender).lower()),), data=data,
                          smtputf8=not job.sender.isascii())

    async def stop(self, timeout: float) -> None:
        """Stop claiming; give back what has not started; let in-flight deliveries finish or release them."""
        self._stopping = True
        self._wake.set()
        pending = [job for q in self._backlog.values() for job in q]
        for q in self._backlog.values():
            q.clear()
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

    async def _release(self, job: Job) -> None:
        try:
            await self.queue.release(job)
        except Exception:  # noqa: BLE001 - the lease expires by itself anyway
            log.warning("could not release lease of %s", job.msg_id)
