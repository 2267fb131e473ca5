"""The DKIM key store on both backends (fixture `store_backend`): create, rotate (the old key
stays published but unused), remove only a retired key, verification state, and a domain's
removal taking its keys along."""
from __future__ import annotations

import pytest

from relay.config import CredentialsConfig
from relay.credentials import NotFound, StoreError

FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
DAY = 1_780_000_000.0


async def test_create_rotate_remove_and_verification(store_backend):
    creds = await store_backend.credentials(CredentialsConfig(**FAST))
    await creds.add_domain("mg.example.com")
    dkim = await store_backend.dkim(clock=lambda: DAY)
    first = await dkim.create("mg.example.com", algorithm="ed25519")
    assert first.active and (await dkim.active("mg.example.com")).selector == first.selector
    await dkim.mark_verified("mg.example.com", True)
    assert await dkim.is_verified("mg.example.com") and await dkim.verified_at("mg.example.com") == DAY
    second = await dkim.create("mg.example.com", algorithm="ed25519")  # a rotation the same day
    assert second.selector == first.selector + "b"
    assert not await dkim.is_verified("mg.example.com")  # the new key must be published and checked again
    keys = await dkim.keys("mg.example.com")
    assert {(k.selector, k.active) for k in keys} == {(first.selector, False), (second.selector, True)}
    with pytest.raises(StoreError):
        await dkim.remove("mg.example.com", second.selector)  # the active one
    with pytest.raises(NotFound):
        await dkim.remove("mg.example.com", "nosuch")
    await dkim.remove("mg.example.com", first.selector)
    assert [k.selector for k in await dkim.keys("mg.example.com")] == [second.selector]
    assert await creds.remove_domain("mg.example.com") == 0
    assert await dkim.keys("mg.example.com") == [] and await dkim.active("mg.example.com") is None
    assert not await dkim.is_verified("mg.example.com")
