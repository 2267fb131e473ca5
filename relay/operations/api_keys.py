"""HTTP API keys: add (the token shown once), list, revoke, and the bearer check the API runs."""
from __future__ import annotations

import time

from ..store.api_keys import ApiKeyStore
from .audit import Audit
from .errors import translated
from .model import Actor, ApiKeyInfo, ApiPrincipal

TOUCH_EVERY = 60.0  # last_used_at is bookkeeping: one write per key a minute, not one per request


class ApiKeys:
    def __init__(self, store: ApiKeyStore, audit: Audit, clock=time.time):
        self._store = store
        self._audit = audit
        self._clock = clock
        self._touched: dict[str, float] = {}

    async def add(self, actor: Actor, name: str, scope: str) -> tuple[ApiKeyInfo, str]:
        with translated():
            row, token = await self._store.add(
                name, scope, also=lambda key_id: self._audit.row(actor, "api_key.add", key_id, f"{scope}: {name}"))
        return ApiKeyInfo(**row), token

    async def list(self) -> list[ApiKeyInfo]:
        return [ApiKeyInfo(**r) for r in await self._store.list()]

    async def revoke(self, actor: Actor, key_id: str) -> None:
        with translated():
            await self._store.revoke(key_id, also=self._audit.row(actor, "api_key.revoke", key_id))

    async def authenticate(self, token: str) -> tuple[ApiPrincipal | None, bool]:
        """(principal, revoked): (None, False) for a token that is not ours."""
        row = await self._store.authenticate(token)
        if row is None:
            return None, False
        if row["revoked_at"] is not None:
            return None, True
        now = self._clock()
        if now - self._touched.get(row["id"], 0.0) >= TOUCH_EVERY:
            self._touched[row["id"]] = now
            try:
                await self._store.touch(row["id"], now)
            except Exception:  # noqa: BLE001 - bookkeeping must not fail a request
                pass
        return ApiPrincipal(row["id"], row["name"], row["scope"]), False
