"""The state the nodes must agree on, built for one process from its stores (issue 17): the
AUTH budgets (store/shared_auth.py), the per-destination connection slots (store/slots.py) and
the singleton-job locks (store/singleton.py). On PostgreSQL they live in the database and use
the stores' pool; on SQLite (one node) they are the in-process equivalents.

    shared = shared_state(stores)
    AuthThrottle(cfg.limits, shared=shared.auth_budgets)
    QueueRunner(..., slots=shared.slots)
    TLSReporter(..., singleton=shared.job_locks)
    singleton.every(shared.job_locks, "queue-purge", PURGE_INTERVAL, purge_once)
    ...
    await shared.close()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .shared_auth import SharedAuthBudgets
from .singleton import JobLocks, LocalJobLocks
from .slots import DestinationSlots, LocalSlots


@dataclass
class SharedState:
    auth_budgets: SharedAuthBudgets | None   # None: AuthThrottle's in-memory budgets are exact (one node)
    slots: DestinationSlots
    job_locks: JobLocks

    async def close(self) -> None:
        """Background sweeps stop (before the pool closes)."""
        for part in (self.auth_budgets, self.slots):
            close = getattr(part, "close", None)
            if close is not None:
                await close()


def shared_state(stores: Any) -> SharedState:
    """From `factory.open_stores(...)`'s Stores: PostgreSQL when it has a pool, else one node."""
    pool = getattr(stores, "pool", None)
    if pool is None:
        return SharedState(None, LocalSlots(), LocalJobLocks())
    from .pg_queue import PgQueueStore
    from .shared_auth import PgAuthBudgets
    from .singleton import PgJobLocks
    from .slots import PgSlots
    owner = str(stores.queue.owner) if isinstance(stores.queue, PgQueueStore) else ""
    timeout = stores.cfg.storage.commit_timeout if getattr(stores, "cfg", None) is not None else 10.0
    return SharedState(PgAuthBudgets(pool, timeout=min(timeout, 5.0)),
                       PgSlots(pool, owner=owner, timeout=timeout),
                       PgJobLocks(pool, node=owner, timeout=timeout))
