"""Audit rows and API keys on both backends (fixture `store_backend`): a change and its audit
row commit together or not at all, in every store that takes `also=`; API keys are stored
hashed, authenticate in constant time, revoke once."""
from __future__ import annotations

import pytest

from relay.config import CredentialsConfig
from relay.credentials import NotFound, StoreError
from relay.store.contract import NewMessage, NewRecipient

FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
PW = "correct horse battery staple"


def _both(*ops):
    from relay.operations.domains import _both as both
    return both(*ops)


async def test_a_change_and_its_audit_row_commit_together_or_not_at_all(store_backend):
    audit = await store_backend.audit()
    creds = await store_backend.credentials(CredentialsConfig(**FAST))
    dkim = await store_backend.dkim()
    queue = await store_backend.store()

    def row(action, target=None):
        return audit.record(actor="ops", via="cli", ip=None, action=action, target=target)

    key, key_op = await dkim.prepare("mg.example.com", algorithm="ed25519")
    await creds.add_domain("mg.example.com", also=_both(key_op, row("domain.add", "mg.example.com")))
    assert (await dkim.active("mg.example.com")).selector == key.selector  # the key came in the same commit
    with pytest.raises(StoreError):
        await creds.add_domain("mg.example.com", also=row("domain.add", "again"))
    await creds.add_user("app@mg.example.com", PW, also=row("credential.add"))
    await creds.reset_password("app@mg.example.com", PW + "!", also=row("credential.reset"))
    await creds.delete_user("app@mg.example.com", also=row("credential.delete"))
    with pytest.raises(NotFound):
        await creds.delete_user("app@mg.example.com", also=row("credential.delete", "twice"))
    await dkim.mark_verified("mg.example.com", True, also=row("dkim.verified"))
    _k, op = await dkim.prepare("mg.example.com", algorithm="ed25519")
    await dkim.store_prepared(op, also=row("dkim.rotate"))
    await dkim.remove("mg.example.com", key.selector, also=row("dkim.remove"))
    qid = await queue.enqueue(NewMessage("a@mg.example.com", (NewRecipient("b@example.net", "example.net"),),
                                         b"Subject: x\r\n\r\nx\r\n"))
    assert await queue.retry(qid, also=row("queue.retry", qid)) == 1
    assert await queue.delete(qid, also=row("queue.delete", qid))
    assert not await queue.delete("NOSUCH", also=row("queue.delete", "NOSUCH"))
    await creds.remove_domain("mg.example.com", force=True, also=row("domain.remove"))
    entries = await audit.list()
    assert [e["action"] for e in reversed(entries)] == [
        "domain.add", "credential.add", "credential.reset", "credential.delete", "dkim.verified", "dkim.rotate",
        "dkim.remove", "queue.retry", "queue.delete", "domain.remove"]
    assert all(e["target"] not in ("again", "twice", "NOSUCH") for e in entries)
    older = await audit.list(before=entries[1]["id"], limit=2)
    assert [e["id"] for e in older] == [e["id"] for e in entries[2:4]]


async def test_api_keys(store_backend):
    audit = await store_backend.audit()
    keys = await store_backend.api_keys()
    row, token = await keys.add("deploy bot", "write",
                                also=lambda key_id: audit.record(actor="ops", via="cli", ip=None,
                                                                 action="api_key.add", target=key_id))
    assert token.startswith("rk_" + row["id"] + "_")
    got = await keys.authenticate(token)
    assert got["id"] == row["id"] and got["scope"] == "write" and "key_hash" not in got
    assert await keys.authenticate(token + "x") is None and await keys.authenticate("nonsense") is None
    with pytest.raises(StoreError):
        await keys.add("x", "admin")
    await keys.touch(row["id"], 1234.0)
    await keys.touch(row["id"], 1000.0)  # never back in time
    [listed] = await keys.list()
    assert listed["last_used_at"] == 1234.0
    await keys.revoke(row["id"])
    with pytest.raises(StoreError) as e:
        await keys.revoke(row["id"])
    assert e.value.code == "conflict"
    with pytest.raises(NotFound):
        await keys.revoke("000000000000")
    assert (await keys.authenticate(token))["revoked_at"] is not None
    assert [e["target"] for e in await audit.list()] == [row["id"]]
