"""The audit side of every change: the row to write with it, and the log to read back."""
from __future__ import annotations

from ..store.audit import AuditStore, Op
from .model import Actor, AuditEntry


class Audit:
    def __init__(self, store: AuditStore):
        self._store = store

    def row(self, actor: Actor, action: str, target: str | None = None, detail: str | None = None) -> Op:
        """The write to hand to the store making the change (same transaction)."""
        return self._store.record(actor=actor.name, via=actor.via, ip=actor.ip, action=action, target=target,
                                  detail=detail)

    async def list(self, before: int | None = None, limit: int = 50) -> list[AuditEntry]:
        rows = await self._store.list(before, max(1, min(limit, 500)))
        return [AuditEntry(**r) for r in rows]
