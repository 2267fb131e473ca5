"""relay.credentials and relay.db on real SQLite files: domains, credentials, argon2id, the verify cache.

Fast argon2 parameters keep each hash around a millisecond; everything else is the real thing
(aiosqlite on a temp file, argon2-cffi, the metrics registry).
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from argon2 import PasswordHasher

from relay import db, metrics
from relay.config import CredentialsConfig
from relay.credentials import (CredentialStore, NotFound, Principal, StoreError, display_domain, normalize_domain,
                               normalize_username)

FAST = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
PW = "correct horse battery staple"
USER = "app@mg.example.com"


class CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that counts the work given to it (argon2 runs only here)."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "var" / "relay.db")


@pytest.fixture
async def conn(db_path):
    c = await db.open_async(db_path)
    yield c
    await c.close()


@pytest.fixture
def executor():
    ex = CountingExecutor()
    yield ex
    ex.shutdown(wait=True)


@pytest.fixture
async def store(conn, executor):
    return CredentialStore(conn, CredentialsConfig(**FAST), executor)


async def stored_hash(conn, username: str) -> str:
    rows = await conn.execute_fetchall("SELECT hash FROM credentials WHERE username = ?", (username,))
    return rows[0]["hash"]


def cache_hits() -> float:
    return metrics.REGISTRY.get_sample_value("relay_auth_cache_total", {"result": "hit"}) or 0.0


# ------------------------------------------------------------------ domains

async def test_add_list_remove_domain(store):
    assert await store.add_domain("MG.Example.com.") == "mg.example.com"
    [row] = await store.list_domains()
    assert row["domain"] == "mg.example.com" and row["display"] == "mg.example.com"
    assert row["credentials"] == 0 and row["state"] == "unverified"
    with pytest.raises(StoreError, match="already exists"):
        await store.add_domain("mg.EXAMPLE.com")
    assert await store.remove_domain("Mg.Example.Com") == 0
    assert await store.list_domains() == []
    with pytest.raises(NotFound, match="not found"):
        await store.remove_domain("mg.example.com")


async def test_idna_domain_stored_ascii_shown_unicode(store, conn):
    assert await store.add_domain("Bücher.example") == "xn--bcher-kva.example"
    rows = await conn.execute_fetchall("SELECT name FROM domains")
    assert [r["name"] for r in rows] == ["xn--bcher-kva.example"]
    [row] = await store.list_domains()
    assert (row["domain"], row["display"]) == ("xn--bcher-kva.example", "bücher.example")
    assert display_domain("xn--bcher-kva.example") == "bücher.example"
    assert await store.domain_exists("BÜCHER.example")
    with pytest.raises(StoreError, match="already exists"):
        await store.add_domain("xn--bcher-kva.example")  # the same domain in its other form


@pytest.mark.parametrize("bad", [
    "", "   ", "localhost", "example", "exa mple.com", "user@example.com", "-bad.example", "bad-.example",
    "a..example", "ex_ample.com", "x" * 64 + ".example", ".".join(["a" * 63] * 4) + ".example",
    "1.2.3.4", "[127.0.0.1]", "exa\tmple.com", "mg.example.com/x",
])
async def test_invalid_domains_refused(store, bad):
    with pytest.raises(StoreError, match="domain name"):
        await store.add_domain(bad)
    assert await store.list_domains() == []


@pytest.mark.parametrize("bad", ["app", "@mg.example.com", "app@", "a b@mg.example.com", "a@b@mg.example.com",
                                 "x" * 65 + "@mg.example.com", "app@localhost"])
def test_invalid_usernames_refused(bad):
    with pytest.raises(StoreError):
        normalize_username(bad)


def test_normalize_username_is_case_insensitive_and_idna():
    assert normalize_username(" App@MG.Example.COM ") == ("app@mg.example.com", "mg.example.com")
    assert normalize_username("App@Bücher.Example") == ("app@xn--bcher-kva.example", "xn--bcher-kva.example")
    assert normalize_domain("xn--bcher-kva.example") == "xn--bcher-kva.example"


async def test_remove_domain_refused_with_credentials_or_queued_mail(store):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    with pytest.raises(StoreError, match=r"1 credential\(s\) and 0 queued message\(s\); use --force"):
        await store.remove_domain("mg.example.com")
    assert await store.verify(USER.encode(), PW.encode()) is not None  # nothing was removed
    await store.add_domain("other.example")
    with pytest.raises(StoreError, match=r"0 credential\(s\) and 2 queued message\(s\)"):
        await store.remove_domain("other.example", queued=2)
    assert await store.remove_domain("mg.example.com", force=True) == 1
    assert await store.verify(USER.encode(), PW.encode()) is None
    assert await store.list_users() == []
    assert [d["domain"] for d in await store.list_domains()] == ["other.example"]


# ------------------------------------------------------------------ credentials

async def test_add_user_case_insensitive(store):
    await store.add_domain("mg.example.com")
    assert await store.add_user("App@MG.Example.COM", PW) == USER
    [row] = await store.list_users()
    assert (row["username"], row["domain"]) == (USER, "mg.example.com")
    assert await store.lookup("APP@mg.example.com") is not None
    principal = await store.verify(b"APP@Mg.Example.Com", PW.encode())
    assert principal == Principal(USER, ("mg.example.com",))


async def test_user_at_idna_domain(store):
    await store.add_domain("bücher.example")
    assert await store.add_user("App@BÜCHER.example", PW) == "app@xn--bcher-kva.example"
    assert await store.verify("app@bücher.example".encode(), PW.encode()) == Principal(
        "app@xn--bcher-kva.example", ("xn--bcher-kva.example",))
    assert await store.verify(b"app@xn--bcher-kva.example", PW.encode()) is not None


@pytest.mark.parametrize("local", ["<b>x</b>", "a..b", ".a", "a.", '"quoted"', "a(b)", "a,b", "a;b", "a[b]"])
async def test_new_usernames_are_dot_strings(store, local):
    # What mail clients type and the admin pages show: RFC 5322 atext and dots (or UTF-8).
    await store.add_domain("mg.example.com")
    with pytest.raises(StoreError, match="local part must be"):
        await store.add_user(f"{local}@mg.example.com", PW)
    assert await store.list_users() == []


async def test_usual_local_parts_are_taken(store):
    await store.add_domain("mg.example.com")
    for local in ["app", "no-reply", "o'neil", "us+tag", "a.b.c", "café", "x_y=z"]:
        assert await store.add_user(f"{local}@mg.example.com", PW) == f"{local}@mg.example.com"
        await store.delete_user(f"{local}@mg.example.com")


async def test_duplicate_user_refused(store):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    with pytest.raises(StoreError, match="already exists; use reset-password"):
        await store.add_user("APP@mg.example.com", PW + "!")
    assert await store.verify(USER.encode(), PW.encode()) is not None  # the original is untouched


async def test_unknown_domain_refused(store):
    with pytest.raises(NotFound, match="add it first: relay domain add mg.example.com"):
        await store.add_user(USER, PW)
    with pytest.raises(NotFound):
        await store.list_users("mg.example.com")


async def test_five_per_domain_allowed_sixth_refused(store):
    await store.add_domain("mg.example.com")
    await store.add_domain("other.example")
    for i in range(5):
        await store.add_user(f"app{i}@mg.example.com", PW)
    with pytest.raises(StoreError, match=r"already has 5 credentials \(limit 5\); delete one first"):
        await store.add_user("app5@mg.example.com", PW)
    # A duplicate on a full domain is refused for the true reason.
    with pytest.raises(StoreError, match="already exists"):
        await store.add_user("app0@mg.example.com", PW)
    await store.add_user("app@other.example", PW)  # the limit is per domain
    await store.delete_user("app0@mg.example.com")
    await store.add_user("app5@mg.example.com", PW)  # room again after a delete
    assert len(await store.list_users("mg.example.com")) == 5


async def test_limit_follows_config(conn):
    store = CredentialStore(conn, CredentialsConfig(per_domain=2, **FAST))
    await store.add_domain("mg.example.com")
    await store.add_user("a@mg.example.com", PW)
    await store.add_user("b@mg.example.com", PW)
    with pytest.raises(StoreError, match=r"limit 2"):
        await store.add_user("c@mg.example.com", PW)


async def test_concurrent_adds_never_exceed_the_limit(db_path, conn):
    # Hashing happens between the checks and the INSERT: concurrent adds (two CLI processes, or
    # here two connections) must still stop at the limit.
    other = await db.open_async(db_path)
    try:
        stores = [CredentialStore(c, CredentialsConfig(**FAST)) for c in (conn, other)]
        await stores[0].add_domain("mg.example.com")
        results = await asyncio.gather(*(stores[i % 2].add_user(f"u{i}@mg.example.com", PW) for i in range(8)),
                                       return_exceptions=True)
    finally:
        await other.close()
    refused = [r for r in results if isinstance(r, StoreError)]
    assert len(refused) == 3 and all("limit 5" in str(r) for r in refused), results
    assert len(await stores[0].list_users()) == 5


@pytest.mark.parametrize("username,password,why", [
    (USER, "Sh0rt!pw", "too short: at least 12 characters"),
    (USER, "", "too short"),
    (USER, "APP@MG.EXAMPLE.COM", "must not equal the username"),
    ("longlocalpart1@mg.example.com", "LongLocalPart1", "must not equal the username"),
    (USER, "aaaaaaaaaaaaaaaa", "too repetitive"),
    (USER, "abababababababab", "too repetitive"),
    (USER, "abcabcabcabcabca", "too repetitive"),
    (USER, "good password\nline2", "line breaks"),
    (USER, "good password\x00nul", "NUL"),
])
async def test_weak_passwords_refused(store, username, password, why):
    await store.add_domain("mg.example.com")
    with pytest.raises(StoreError, match=why):
        await store.add_user(username, password)
    assert await store.list_users() == []


async def test_min_password_length_follows_config(conn):
    store = CredentialStore(conn, CredentialsConfig(min_password_length=20, **FAST))
    await store.add_domain("mg.example.com")
    with pytest.raises(StoreError, match="at least 20 characters"):
        await store.add_user(USER, "only-19-characters!")
    await store.add_user(USER, "twenty-characters-ok")


async def test_reset_password_refuses_weak_and_unknown(store):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    with pytest.raises(StoreError, match="too short"):
        await store.reset_password(USER, "short")
    assert await store.verify(USER.encode(), PW.encode()) is not None
    with pytest.raises(NotFound):
        await store.reset_password("nobody@mg.example.com", PW)
    with pytest.raises(NotFound):
        await store.delete_user("nobody@mg.example.com")


# ------------------------------------------------------------------ hashing and verification

async def test_stored_value_is_argon2id_without_the_password(store, conn, db_path):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    h = await stored_hash(conn, USER)
    assert h.startswith("$argon2id$") and "m=1024,t=1,p=1" in h
    assert PW not in h
    raw = b"".join(open(p, "rb").read() for p in (db_path, db_path + "-wal") if os.path.exists(p))
    assert USER.encode() in raw and PW.encode() not in raw


async def test_verify_success_wrong_password_unknown_user(store):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    assert await store.verify(USER.encode(), PW.encode()) == Principal(USER, ("mg.example.com",))
    assert await store.verify(USER.encode(), (PW + "x").encode()) is None
    assert await store.verify(USER.encode(), PW.upper().encode()) is None
    assert await store.verify(b"other@mg.example.com", PW.encode()) is None
    assert await store.verify(b"app@unknown.example", PW.encode()) is None
    assert await store.verify(b"not-an-address", PW.encode()) is None
    assert await store.verify(b"\xff\xfe@mg.example.com", PW.encode()) is None
    assert await store.verify(USER.encode(), b"\xff\xfe") is None
    assert await store.verify(USER.encode(), b"") is None


async def test_unknown_user_still_costs_an_argon2_verification(store, executor):
    # Same work as a wrong password, so timing does not reveal which logins exist.
    before = executor.submitted
    assert await store.verify(b"ghost@mg.example.com", PW.encode()) is None
    assert executor.submitted > before


async def test_successful_login_records_last_login(store, conn):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    assert (await store.list_users())[0]["last_login"] is None
    await store.verify(USER.encode(), PW.encode())
    await store.flush_logins()  # written in batches, not a commit per login
    first = (await store.list_users())[0]["last_login"]
    assert first is not None
    # A login answered from the verify cache is a login too (issue 13: LAST LOGIN lagged 5 min).
    await asyncio.sleep(0.01)
    assert await store.verify(USER.encode(), PW.encode()) is not None
    await store.flush_logins()
    assert (await store.list_users())[0]["last_login"] > first


async def test_rehash_on_login_when_parameters_change(conn, executor):
    weak = PasswordHasher(time_cost=1, memory_cost=512, parallelism=1)
    store = CredentialStore(conn, CredentialsConfig(argon2_time_cost=2, argon2_memory_cost=2048,
                                                    argon2_parallelism=1), executor)
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    old = weak.hash(PW)
    await conn.execute("UPDATE credentials SET hash = ? WHERE username = ?", (old, USER))
    await conn.commit()

    assert await store.verify(USER.encode(), PW.encode()) is not None
    new = await stored_hash(conn, USER)
    assert new != old and new.startswith("$argon2id$") and "m=2048,t=2,p=1" in new
    assert not PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1).check_needs_rehash(new)
    # The new hash still verifies (fresh store: no cache), and only for the right password.
    fresh = CredentialStore(conn, CredentialsConfig(**FAST))
    assert await fresh.verify(USER.encode(), PW.encode()) is not None
    assert await fresh.verify(USER.encode(), b"wrong password here") is None


async def test_no_rehash_on_failed_login(conn):
    store = CredentialStore(conn, CredentialsConfig(argon2_time_cost=2, argon2_memory_cost=2048,
                                                    argon2_parallelism=1))
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    old = PasswordHasher(time_cost=1, memory_cost=512, parallelism=1).hash(PW)
    await conn.execute("UPDATE credentials SET hash = ? WHERE username = ?", (old, USER))
    await conn.commit()
    assert await store.verify(USER.encode(), b"not the password") is None
    assert await stored_hash(conn, USER) == old


async def test_rehash_after_configure(store, conn):
    # SIGHUP path: new parameters apply to the next successful login.
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    old = await stored_hash(conn, USER)
    store.configure(CredentialsConfig(argon2_time_cost=2, argon2_memory_cost=1024, argon2_parallelism=1))
    assert await store.verify(USER.encode(), PW.encode()) is not None
    new = await stored_hash(conn, USER)
    assert new != old and "t=2" in new


# ------------------------------------------------------------------ verify cache

async def test_second_verify_is_served_from_the_cache(store, executor):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    hits = cache_hits()
    assert await store.verify(USER.encode(), PW.encode()) is not None
    assert cache_hits() == hits  # first one is a miss
    argon2_calls = executor.submitted
    assert await store.verify(b"APP@mg.example.com", PW.encode()) == Principal(USER, ("mg.example.com",))
    assert cache_hits() == hits + 1
    assert executor.submitted == argon2_calls  # no argon2 for a hit
    # A cached user with a wrong password is not a hit.
    assert await store.verify(USER.encode(), b"wrong password here") is None
    assert cache_hits() == hits + 1


async def test_cache_expires_after_ttl(conn, executor):
    now = [1_000_000.0]
    store = CredentialStore(conn, CredentialsConfig(verify_cache_ttl=60, **FAST), executor, clock=lambda: now[0])
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    await store.verify(USER.encode(), PW.encode())
    hits = cache_hits()
    now[0] += 59
    await store.verify(USER.encode(), PW.encode())
    assert cache_hits() == hits + 1
    now[0] += 2  # 61 s after the miss
    argon2_calls = executor.submitted
    assert await store.verify(USER.encode(), PW.encode()) is not None
    assert cache_hits() == hits + 1 and executor.submitted > argon2_calls


async def test_reset_from_another_connection_applies_at_next_verify(db_path, store):
    # The CLI runs in another process with its own connection; the daemon's cache must not
    # outlive the stored hash it was made from, even well within the TTL (300 s here).
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    assert await store.verify(USER.encode(), PW.encode()) is not None
    hits = cache_hits()
    assert await store.verify(USER.encode(), PW.encode()) is not None
    assert cache_hits() == hits + 1  # it IS cached

    cli_conn = await db.open_async(db_path)
    try:
        await CredentialStore(cli_conn, CredentialsConfig(**FAST)).reset_password(USER, "a brand new password")
    finally:
        await cli_conn.close()
    assert await store.verify(USER.encode(), PW.encode()) is None
    assert await store.verify(USER.encode(), b"a brand new password") is not None
    assert cache_hits() == hits + 1


async def test_delete_from_another_connection_applies_at_next_verify(db_path, store):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    await store.verify(USER.encode(), PW.encode())
    assert await store.verify(USER.encode(), PW.encode()) is not None  # cached
    cli_conn = await db.open_async(db_path)
    try:
        await CredentialStore(cli_conn, CredentialsConfig(**FAST)).delete_user(USER)
    finally:
        await cli_conn.close()
    assert await store.verify(USER.encode(), PW.encode()) is None


async def test_delete_then_re_add_same_password_does_not_reuse_cache(db_path, store):
    await store.add_domain("mg.example.com")
    await store.add_user(USER, PW)
    await store.verify(USER.encode(), PW.encode())
    cli_conn = await db.open_async(db_path)
    try:
        cli = CredentialStore(cli_conn, CredentialsConfig(**FAST))
        await cli.delete_user(USER)
        await cli.add_user(USER, "another good password")
    finally:
        await cli_conn.close()
    assert await store.verify(USER.encode(), PW.encode()) is None
    assert await store.verify(USER.encode(), b"another good password") is not None


# ------------------------------------------------------------------ the database file

async def test_schema_version_wal_and_pragmas(conn):
    assert (await conn.execute_fetchall("PRAGMA user_version"))[0][0] == db.SCHEMA_VERSION
    assert (await conn.execute_fetchall("PRAGMA journal_mode"))[0][0] == "wal"
    assert (await conn.execute_fetchall("PRAGMA synchronous"))[0][0] == 2  # FULL
    assert (await conn.execute_fetchall("PRAGMA foreign_keys"))[0][0] == 1
    assert (await conn.execute_fetchall("PRAGMA busy_timeout"))[0][0] == 5000


async def test_database_file_mode_0600(tmp_path):
    old = os.umask(0o022)  # the usual umask would give 0644
    try:
        path = str(tmp_path / "new" / "relay.db")
        c = await db.open_async(path)
        await c.execute("CREATE TABLE t(x)")  # make sure -wal/-shm exist
        for p in (path, path + "-wal", path + "-shm"):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o750
        await c.close()
    finally:
        os.umask(old)


async def test_existing_file_with_loose_mode_is_tightened(tmp_path):
    path = str(tmp_path / "relay.db")
    sqlite3.connect(path).close()
    os.chmod(path, 0o644)
    c = await db.open_async(path)
    await c.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_sync_and_async_open_give_the_same_schema(tmp_path):
    path = str(tmp_path / "relay.db")
    c = db.open_sync(path)
    try:
        assert c.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"domains", "credentials", "messages", "bodies", "recipients", "history"} <= names
    finally:
        c.close()


def _open_in_fresh_process(path: str) -> subprocess.CompletedProcess:
    """open_async in a child process that must then simply exit (as the CLI does)."""
    code = ("import asyncio, sys\n"
            "from relay import db\n"
            "async def main():\n"
            "    try:\n"
            "        await db.open_async(sys.argv[1])\n"
            "    except db.DatabaseError as exc:\n"
            "        print(exc)\n"
            "asyncio.run(main())\n")
    return subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.parametrize("content", [b"this is not an SQLite database, just text" * 100, None])
def test_unusable_file_is_one_line_and_the_process_exits(tmp_path, content):
    path = tmp_path / "relay.db"
    if content is None:
        path.mkdir()  # storage.path pointing at a directory
    else:
        path.write_bytes(content)
    # Before the fix the aiosqlite thread (non-daemon) was left running: the child never exited.
    cp = _open_in_fresh_process(str(path))
    assert cp.returncode == 0, cp.stderr
    [line] = cp.stdout.splitlines()
    assert line.startswith(f"database {path}: ")
    assert ("is a directory" if content is None else "file is not a database") in line


async def test_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "relay.db")
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(db.DatabaseError, match="newer than this relay"):
        await db.open_async(path)
    cp = _open_in_fresh_process(path)
    assert cp.returncode == 0 and "newer than this relay" in cp.stdout


def test_concurrent_first_opens_migrate_once(tmp_path):
    # Daemon and CLI may open a brand-new file at the same moment: one migrates, none fails.
    # Switching to WAL and migrating both race; a few rounds make a lost race near certain.
    errors: list[BaseException] = []
    for rnd in range(10):
        path = str(tmp_path / f"relay{rnd}.db")
        barrier = threading.Barrier(16)

        def opener() -> None:
            barrier.wait()
            try:
                db.open_sync(path).close()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=opener) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        c = sqlite3.connect(path)
        assert c.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        c.close()
    assert errors == []


async def test_second_connection_keeps_first_ones_view_current(tmp_path):
    # The daemon opens two connections to one file. Opening the second must not drop the first
    # one's POSIX locks (closing any descriptor of a file drops them all): otherwise a CLI process
    # deletes the WAL on exit and the first connection reads a stale snapshot from then on.
    path = str(tmp_path / "relay.db")
    a = await db.open_async(path)
    b = None
    try:
        await a.execute("INSERT INTO domains(name, created_at) VALUES ('a.example', 0)")
        b = await db.open_async(path)
        for n, name in enumerate(("b.example", "c.example", "d.example"), start=2):
            subprocess.run([sys.executable, "-c",
                            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                            "c.execute('INSERT INTO domains(name, created_at) VALUES (?, 0)', (sys.argv[2],)); c.close()",
                            path, name], check=True, timeout=30)
            assert (await a.execute_fetchall("SELECT COUNT(*) FROM domains"))[0][0] == n
        assert os.path.exists(path + "-wal")
    finally:
        if b is not None:
            await b.close()
        await a.close()
