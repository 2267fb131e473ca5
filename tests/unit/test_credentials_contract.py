"""The credential store contract on both backends (fixture `store_backend`): what several nodes
must agree on. Each "node" is a store with its own connection(s) and its own verify cache."""
from __future__ import annotations

import asyncio

import pytest

from relay.config import CredentialsConfig
from relay.credentials import NotFound, StoreError

FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
PW = "correct horse battery staple"
NEW = "another horse battery staple"
USER = "app@mg.example.com"


def cfg(**kw) -> CredentialsConfig:
    return CredentialsConfig(**{**FAST, **kw})


async def test_a_reset_on_one_node_refuses_the_old_password_on_the_others(store_backend):
    n1 = await store_backend.credentials(cfg())
    n2 = await store_backend.credentials(cfg(), fresh_connection=True)
    await n1.add_domain("mg.example.com")
    await n1.add_user(USER, PW)
    first = await n2.verify(USER.encode(), PW.encode())
    assert first is not None and await n2.cached(USER.encode(), PW.encode()) is not None  # cache warm on node 2
    await n1.reset_password(USER, NEW)
    assert await n2.verify(USER.encode(), PW.encode()) is None       # the next AUTH, old password: no
    assert await n2.cached(USER.encode(), PW.encode()) is None
    assert await n2.generation(USER) != first.generation             # open sessions see it at MAIL
    assert await n2.verify(USER.encode(), NEW.encode()) is not None
    await n1.delete_user(USER)
    assert await n2.verify(USER.encode(), NEW.encode()) is None
    assert await n2.generation(USER) is None


async def test_the_per_domain_limit_holds_under_concurrent_adds_from_two_nodes(store_backend):
    n1 = await store_backend.credentials(cfg(per_domain=3))
    n2 = await store_backend.credentials(cfg(per_domain=3), fresh_connection=True)
    await n1.add_domain("mg.example.com")
    results = await asyncio.gather(*((n1 if i % 2 else n2).add_user(f"u{i}@mg.example.com", PW) for i in range(8)),
                                   return_exceptions=True)
    added = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, StoreError)]
    assert len(added) == 3 and len(refused) == 5, results
    assert all(r.code == "credential_limit" for r in refused)
    assert len(await n2.list_users("mg.example.com")) == 3


async def test_domains_and_credentials_lifecycle(store_backend):
    s = await store_backend.credentials(cfg())
    assert await s.add_domain("MG.Example.com") == "mg.example.com"
    with pytest.raises(StoreError) as e:
        await s.add_domain("mg.example.com")
    assert e.value.code == "conflict"
    with pytest.raises(NotFound):
        await s.add_user("x@other.example", PW)
    await s.add_user(USER, PW)
    with pytest.raises(StoreError) as e:
        await s.add_user(USER, PW)
    assert e.value.code == "conflict"
    [d] = await s.list_domains()
    assert (d["domain"], d["credentials"], d["state"]) == ("mg.example.com", 1, "unverified")
    with pytest.raises(StoreError) as e:
        await s.remove_domain("mg.example.com")
    assert e.value.code == "conflict"
    assert await s.remove_domain("mg.example.com", force=True) == 1
    assert await s.list_domains() == [] and await s.lookup(USER) is None
    with pytest.raises(NotFound):
        await s.reset_password(USER, NEW)
    with pytest.raises(NotFound):
        await s.delete_user(USER)


async def test_last_login_and_last_failed_login_are_written_in_batches(store_backend):
    s = await store_backend.credentials(cfg())
    await s.add_domain("mg.example.com")
    await s.add_user(USER, PW)
    assert await s.verify(USER.encode(), PW.encode()) is not None
    assert await s.verify(USER.encode(), b"wrong password here") is None
    await s.flush_logins()
    [u] = await s.list_users()
    assert u["last_login"] and u["last_failed_login"]


async def test_an_old_hash_is_rehashed_at_login(store_backend):
    old = await store_backend.credentials(cfg())
    await old.add_domain("mg.example.com")
    await old.add_user(USER, PW)
    before = await old.lookup(USER)
    stronger = await store_backend.credentials(cfg(argon2_time_cost=2), fresh_connection=True)
    p = await stronger.verify(USER.encode(), PW.encode())
    assert p is not None and p.generation != before and await stronger.lookup(USER) == p.generation
