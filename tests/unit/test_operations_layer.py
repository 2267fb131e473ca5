"""relay.operations against real temp SQLite stores (open_stores, the group-commit writer, argon2
in its pool, a loopback DNS server for the check): the 5-cap under a race, audit rows written
with their change and never without it, keyset pages stable under inserts, the DSN of a
delete with bounce."""
from __future__ import annotations

import asyncio
import dataclasses
import sqlite3

import pytest

from relay.config import Config, CredentialsConfig, DNSConfig, DomainsConfig, StorageConfig
from relay.operations import Actor, Operations, OperationError, QueueFilter, as_dict
from relay.store.contract import NewMessage, NewRecipient
from relay.store.factory import open_stores
from tests.support.dns_server import DNSServer

FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
PW = "correct horse battery staple"
D = "mg.example.com"
ALICE = Actor("alice", "web", "127.0.0.1")


def make_cfg(tmp_path, **over) -> Config:
    return dataclasses.replace(
        Config(), storage=StorageConfig(path=str(tmp_path / "relay.db")), credentials=CredentialsConfig(**FAST),
        domains=DomainsConfig(dkim_algorithm="ed25519"), **over)


@pytest.fixture
async def ops(tmp_path):
    cfg = make_cfg(tmp_path)
    async with Operations.opened(cfg) as o:
        yield o


def audit_rows(path: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT actor, via, ip, action, target FROM audit_log ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_domain_add_with_key_and_audit_in_one_go(ops):
    info = await ops.add_domain(ALICE, "MG.Example.com")
    assert (info.name, info.state, info.credentials, info.credential_cap) == (D, "unverified", 0, 5)
    assert info.dkim_selector and info.dkim_selector.startswith("relay")
    [entry] = await ops.list_audit()
    assert (entry.actor, entry.via, entry.ip, entry.action, entry.target) == ("alice", "web", "127.0.0.1",
                                                                              "domain.add", D)
    recs = await ops.domain_records(D)
    assert {r.purpose for r in recs} >= {"DKIM (active)", "SPF", "DMARC (suggested)"}
    zone = await ops.zone_snippet(D)
    assert f"_domainkey.{D}. 3600 IN TXT" in zone
    with pytest.raises(OperationError) as e:
        await ops.add_domain(ALICE, D)
    assert (e.value.code, e.value.status) == ("conflict", 409)
    with pytest.raises(OperationError) as e:
        await ops.add_domain(ALICE, "not a domain")
    assert (e.value.code, e.value.status) == ("invalid", 422)
    assert len(await ops.list_audit()) == 1  # refusals leave no audit row


async def test_five_cap_race_for_the_last_slot_exactly_one_wins(tmp_path):
    cfg = make_cfg(tmp_path)
    # Two stores with a writer each, as two processes (CLI and web) would have.
    a, b = await open_stores(cfg, role="cli"), await open_stores(cfg, role="cli")
    try:
        oa, ob = Operations(a, cfg), Operations(b, cfg)
        await oa.add_domain(ALICE, D, dkim=False)
        for i in range(4):
            await oa.create_credential(ALICE, f"u{i}@{D}", PW)
        results = await asyncio.gather(oa.create_credential(ALICE, f"x@{D}"), ob.create_credential(ALICE, f"y@{D}"),
                                       return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], OperationError)
        assert (lost[0].code, lost[0].status) == ("credential_limit", 409)
        info, password = won[0]
        assert len(password) >= 20  # generated, returned once
        assert len(await oa.list_credentials(D)) == 5
        creates = [r for r in audit_rows(cfg.storage.path) if r[3] == "credential.create"]
        assert len(creates) == 5 and info.username in {r[4] for r in creates}
    finally:
        await a.close()
        await b.close()


async def test_a_change_whose_audit_row_fails_is_not_made(ops):
    await ops.add_domain(ALICE, D, dkim=False)
    broken = Actor("mallory", None)  # audit_log.via is NOT NULL: the row cannot be written
    with pytest.raises(OperationError) as e:
        await ops.create_credential(broken, f"app@{D}", PW)
    assert e.value.code == "unavailable"
    assert await ops.list_credentials(D) == []
    _, pw = await ops.create_credential(ALICE, f"app@{D}", PW)
    assert pw == PW
    with pytest.raises(OperationError):
        await ops.delete_credential(broken, f"app@{D}")
    assert [c.username for c in await ops.list_credentials(D)] == [f"app@{D}"]
    # A refused change writes no row either.
    with pytest.raises(OperationError) as e:
        await ops.delete_credential(ALICE, f"nobody@{D}")
    assert (e.value.code, e.value.status) == ("not_found", 404)
    assert [a.action for a in await ops.list_audit()] == ["credential.create", "domain.add"]


async def test_reset_and_delete_take_effect_at_the_next_verify(tmp_path):
    cfg = make_cfg(tmp_path)
    stores = await open_stores(cfg, role="serve")
    try:
        ops = Operations(stores, cfg)
        await ops.add_domain(ALICE, D, dkim=False)
        _, first = await ops.create_credential(ALICE, f"app@{D}")
        assert await stores.credentials.verify(f"app@{D}".encode(), first.encode())
        second = await ops.reset_credential(ALICE, f"app@{D}")
        assert second != first
        assert await stores.credentials.verify(f"app@{D}".encode(), first.encode()) is None
        assert await stores.credentials.verify(f"app@{D}".encode(), second.encode())
        await stores.credentials.flush_logins()
        [c] = await ops.list_credentials(D)
        assert c.last_login and c.last_failed_login  # the wrong password was recorded, batched
        await ops.delete_credential(ALICE, f"app@{D}")
        assert await stores.credentials.verify(f"app@{D}".encode(), second.encode()) is None
        assert [a.action for a in await ops.list_audit()] == ["credential.delete", "credential.reset",
                                                              "credential.create", "domain.add"]
        with pytest.raises(OperationError) as e:
            await ops.reset_credential(ALICE, f"app@{D}", PW)
        assert e.value.code == "not_found"
        with pytest.raises(OperationError) as e:
            await ops.create_credential(ALICE, f"app@{D}", "short")
        assert e.value.code == "invalid"
    finally:
        await stores.close()


async def _enqueue(stores, n: int, sender: str = f"app@{D}", rcpt: str = "bob@example.net") -> list[str]:
    return [await stores.queue.enqueue(NewMessage(sender, (NewRecipient(rcpt, rcpt.split("@")[1]),),
                                                  b"Subject: hi\r\n\r\nbody\r\n", auth_user=sender))
            for _ in range(n)]


async def test_keyset_pages_are_stable_under_inserts(tmp_path):
    cfg = make_cfg(tmp_path)
    stores = await open_stores(cfg, role="cli")
    try:
        ops = Operations(stores, cfg)
        first = await _enqueue(stores, 12)
        seen: list[str] = []
        cursor = None
        added: list[str] = []
        for round_ in range(10):  # bounded: 15 messages in pages of 5
            page = await ops.list_queue(QueueFilter(), after=cursor, limit=5)
            seen += [m.id for m in page.items]
            if round_ == 0:
                added = await _enqueue(stores, 3)  # accepted while someone pages
            if page.next is None:
                break
            cursor = page.next
        assert len(seen) == len(set(seen)) == 15
        assert seen[:12] == first and sorted(seen[12:]) == sorted(added)
        # Filters
        other = await _enqueue(stores, 1, sender="x@other.example", rcpt="carol@example.org")
        assert [m.id for m in (await ops.list_queue(QueueFilter(domain="other.example"))).items] == other
        assert [m.id for m in (await ops.list_queue(QueueFilter(recipient="carol@"))).items] == other
        assert [m.id for m in (await ops.list_queue(QueueFilter(sender="x@other"))).items] == other
        assert [m.id for m in (await ops.list_queue(QueueFilter(qid=other[0][:12].lower()))).items] == other
        assert (await ops.list_queue(QueueFilter(state="finished"))).items == ()
        assert (await ops.list_queue(QueueFilter(sender="%"))).items == ()  # LIKE wildcards are literal
        for bad in ({"after": "garbage!"}, {"after": "WzEsMl0"}, {"limit": 0}, {"limit": 501},
                    {"filter": QueueFilter(state="nope")}):
            with pytest.raises(OperationError) as e:
                await ops.list_queue(**{"filter": QueueFilter(), **bad})
            assert (e.value.code, e.value.status) == ("invalid", 422)
    finally:
        await stores.close()


async def test_show_retry_delete_and_bounce(tmp_path):
    cfg = make_cfg(tmp_path)
    stores = await open_stores(cfg, role="cli")
    try:
        ops = Operations(stores, cfg)
        a, b = await _enqueue(stores, 2)
        m = await ops.show_message(a)
        assert (m.sender, m.state, m.headers) == (f"app@{D}", "pending", "Subject: hi")
        assert [r.address for r in m.recipients] == ["bob@example.net"]
        assert as_dict(m)["recipients"][0]["state"] == "pending"
        assert await ops.retry(ALICE, a) == 1
        assert await ops.retry(ALICE, None) == 2
        with pytest.raises(OperationError) as e:
            await ops.retry(ALICE, "NOSUCHID")
        assert e.value.code == "not_found"
        assert await ops.delete_message(ALICE, a) is False
        assert await ops.delete_message(ALICE, b, bounce=True) is True
        page = await ops.list_queue(QueueFilter())
        [dsn] = page.items  # the failure report to the sender, from the null sender
        assert (dsn.sender, dsn.recipients) == ("", (f"app@{D}",))
        body = await stores.queue.body(dsn.id)
        assert b"deleted from the queue by the administrator" in body
        assert (await ops.show_message(b)).state == "deleted"
        with pytest.raises(OperationError) as e:
            await ops.show_message("NOSUCHID")
        assert (e.value.code, e.value.status) == ("not_found", 404)
        actions = [(x.action, x.target) for x in await ops.list_audit()]
        assert actions == [("queue.delete", b), ("queue.delete", a), ("queue.retry", "*"), ("queue.retry", a)]
        older = await ops.list_audit(before=(await ops.list_audit())[1].id, limit=2)
        assert [(x.action, x.target) for x in older] == [("queue.retry", "*"), ("queue.retry", a)]
    finally:
        await stores.close()


async def test_check_domain_against_the_configured_resolver(tmp_path):
    with DNSServer({}) as dns:
        cfg = make_cfg(tmp_path, dns=DNSConfig(nameservers=(dns.address,), timeout=3))
        async with Operations.opened(cfg) as ops:
            await ops.add_domain(ALICE, D)
            checks = await ops.check_domain(ALICE, D)
            assert {c.purpose: c.status for c in checks} == {"DKIM (active)": "missing", "SPF": "missing",
                                                            "DMARC (suggested)": "optional"}
            assert (await ops.get_domain(D)).state == "unverified"
            for r in await ops.domain_records(D):
                if r.type == "TXT":
                    dns.set(r.name, "TXT", [r.value] if r.purpose != "SPF" else ["v=spf1 -all"])
            checks = await ops.check_domain(ALICE, D)
            by = {c.purpose: c for c in checks}
            assert (by["DKIM (active)"].status, by["SPF"].status, by["DMARC (suggested)"].status) == \
                ("ok", "mismatch", "ok")
            assert by["SPF"].found == ("v=spf1 -all",) and by["SPF"].checked_at > 0
            spf = next(r for r in await ops.domain_records(D) if r.purpose == "SPF")
            dns.set(D, "TXT", [spf.value])
            assert all(c.status == "ok" for c in await ops.check_domain(ALICE, D))
            assert (await ops.get_domain(D)).state == "verified"
            assert [a.detail for a in await ops.list_audit() if a.action == "domain.verify"] == \
                ["verified", "not verified", "not verified"]
            with pytest.raises(OperationError) as e:
                await ops.check_domain(ALICE, "unknown.example")
            assert e.value.code == "not_found"


async def test_remove_domain_refuses_while_in_use_then_force(ops):
    await ops.add_domain(ALICE, D)
    await ops.create_credential(ALICE, f"app@{D}", PW)
    with pytest.raises(OperationError) as e:
        await ops.remove_domain(ALICE, D)
    assert (e.value.code, e.value.status) == ("conflict", 409)
    assert await ops.remove_domain(ALICE, D, force=True) == 1
    assert await ops.list_domains() == []
    with pytest.raises(OperationError) as e:
        await ops.get_domain(D)
    assert e.value.code == "not_found"


async def test_api_keys_add_authenticate_revoke(ops):
    info, token = await ops.add_api_key(Actor("root", "cli"), "deploy bot", "read")
    assert token.startswith(f"rk_{info.id}_") and info.scope == "read"
    principal, revoked = await ops.authenticate_api_key(token)
    assert principal is not None and principal.key_id == info.id and not revoked
    for bad in ("", "rk_", token[:-1], "rk_" + "0" * 12 + "_x", "Bearer " + token, token + "x"):
        assert await ops.authenticate_api_key(bad) == (None, False)
    await ops.revoke_api_key(Actor("root", "cli"), info.id)
    assert await ops.authenticate_api_key(token) == (None, True)
    with pytest.raises(OperationError) as e:
        await ops.revoke_api_key(Actor("root", "cli"), info.id)
    assert e.value.code == "conflict"
    with pytest.raises(OperationError) as e:
        await ops.add_api_key(Actor("root", "cli"), "x", "admin")
    assert e.value.code == "invalid"
    [k] = await ops.list_api_keys()
    assert k.revoked_at is not None and k.last_used_at is not None
    assert [a.action for a in await ops.list_audit()] == ["api_key.revoke", "api_key.add"]
