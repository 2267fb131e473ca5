"""Web admin accounts and sessions on both backends (fixture `store_backend`), seen from two
nodes: a session made on one is valid on the other, a password change or removal on one ends
the sessions on both, and the timeouts hold."""
from __future__ import annotations

import pytest

from relay.admin.accounts import AccountError
from relay.admin.sessions import token_hash
from relay.config import CredentialsConfig

FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
PW = "correct horse battery staple"


class Clock:
    t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def test_accounts_and_sessions_across_two_nodes(store_backend):
    clock = Clock()
    kw = dict(idle_timeout=600, absolute_timeout=3600, clock=clock)
    acc1, ses1 = await store_backend.admin(CredentialsConfig(**FAST), **kw)
    acc2, ses2 = await store_backend.admin(CredentialsConfig(**FAST), **kw)
    await acc1.add("ops", PW)
    with pytest.raises(AccountError):
        await acc2.add("ops", PW)
    with pytest.raises(AccountError):
        await acc1.add("bad name!", PW)
    assert await acc2.verify("ops", PW) and not await acc2.verify("ops", "wrong") and not await acc2.verify("nobody", PW)
    assert await acc2.count() == 1
    await acc2.record_login("ops")
    [u] = await acc1.list()
    assert u.username == "ops" and u.last_login_at == clock.t
    keep = await ses1.create("ops", "192.0.2.1", "browser A")
    other = await ses1.create("ops", "192.0.2.2", "browser B")
    assert (await ses2.lookup(keep)).username == "ops"          # made on node 1, valid on node 2
    assert len(await ses2.list("ops")) == 2
    assert await acc2.set_password("ops", PW + "!", keep_session=token_hash(keep)) == 1
    assert await ses1.lookup(other) is None and await ses1.lookup(keep) is not None
    clock.t += 601  # idle past the timeout
    assert await ses2.lookup(keep) is None
    fresh = await ses2.create("ops", None, None)
    assert await ses1.delete_hash(token_hash(fresh), username="someone else") is False
    assert await ses1.delete_hash(token_hash(fresh), username="ops") is True
    fresh = await ses2.create("ops", None, None)
    await acc1.remove("ops")
    assert await ses2.lookup(fresh) is None and await ses2.list() == []
    with pytest.raises(AccountError):
        await acc1.remove("ops")
    with pytest.raises(AccountError):
        await acc1.set_password("ops", PW)
