"""Sending domains and their SMTP credentials: CRUD, the per-domain limit, argon2id verification.

Verification runs argon2 in a thread pool so one login never stalls the event loop. A short-lived
cache of successful verifications is keyed on (stored hash, keyed password digest): a reset or
delete changes or removes the stored hash, so it takes effect at the very next AUTH, on any node.
"""
from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import hmac
import os
import re
import secrets
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import aiosqlite
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from . import metrics
from .config import CredentialsConfig
from .store.contract import StoreRefusal, StoreUnavailable
from .store.writer import GroupWriter


class StoreError(StoreRefusal):
    """A refused or impossible operation; str() is the one line for the operator.

    `code` says which kind of "no" it is, for the operations layer to map onto a stable API
    error code and HTTP status: invalid (bad input), conflict (exists, or still in use),
    credential_limit (the per-domain cap), not_found."""
    code = "invalid"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(StoreError):
    code = "not_found"


# An extra write run inside the same transaction (and SAVEPOINT) as a store's own change: the
# operations layer passes its audit row this way, so the change and its record commit together
# or not at all.
Also = Callable[[sqlite3.Connection], None] | None


def _also(also: Also, conn: sqlite3.Connection) -> None:
    if also is not None:
        also(conn)


@dataclass(frozen=True)
class Principal:
    """Who a session acts for: an authenticated credential or a trusted network."""
    username: str
    domains: tuple[str, ...]  # sending domains allowed (ASCII form); subdomains included
    kind: str = "auth"        # "auth" | "trusted"
    # The stored hash this login was verified against (the verify cache's generation): each MAIL
    # compares it with the row's current one, so a reset or delete reaches open sessions.
    generation: str = field(default="", repr=False, compare=False)


def normalize_domain(domain: str) -> str:
    """Lower-case ASCII (IDNA) form; raises StoreError for something that is not a domain name."""
    d = domain.strip().rstrip(".").lower()
    if not d or " " in d or "@" in d:
        raise StoreError(f"not a domain name: {domain!r}")
    try:
        ascii_d = d.encode("idna").decode("ascii")
    except UnicodeError:
        raise StoreError(f"not a valid internationalised domain name: {domain!r}") from None
    # The 253-octet limit (RFC 1035 2.3.4) applies to the ASCII form, which is longer than the Unicode one.
    if len(ascii_d) > 253:
        raise StoreError(f"not a domain name: {domain!r} (longer than 253 characters)")
    labels = ascii_d.split(".")
    if len(labels) < 2 or any(not lab or len(lab) > 63 or lab.startswith("-") or lab.endswith("-") for lab in labels):
        raise StoreError(f"not a domain name: {domain!r} (need at least two labels, e.g. mg.example.com)")
    # ASCII letters and digits only (str.isalnum() would also pass other scripts' digits).
    if not all(c.isascii() and c.isalnum() or c == "-" for lab in labels for c in lab):
        raise StoreError(f"not a domain name: {domain!r}")
    if labels[-1].isdigit():
        # An all-numeric top-level label is an IP address, not a sending domain (RFC 3696 2).
        raise StoreError(f"not a domain name: {domain!r} (an IP address cannot be a sending domain)")
    return ascii_d


def display_domain(ascii_domain: str) -> str:
    """The Unicode form of an IDNA domain, for humans."""
    try:
        return ascii_domain.encode("ascii").decode("idna")
    except UnicodeError:
        return ascii_domain


_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010FFFF-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010FFFF-]+)*")


def normalize_username(username: str) -> tuple[str, str]:
    """'App@MG.Example.com' -> ('app@mg.example.com', 'mg.example.com'). Usernames are case-insensitive."""
    local, at, domain = username.strip().rpartition("@")
    # A second '@' (only legal inside a quoted local part) would make login names ambiguous.
    if not at or not local or "@" in local or any(c.isspace() or ord(c) < 32 for c in local) or len(local) > 64:
        raise StoreError(f"username must be a full address at a sending domain, e.g. app@mg.example.com: {username!r}")
    d = normalize_domain(domain)
    return f"{local.lower()}@{d}", d


def password_problem(username: str, password: str, min_length: int) -> str | None:
    """Why a password is too weak, or None."""
    if len(password) < min_length:
        return f"password too short: at least {min_length} characters"
    low = password.lower()
    if low == username.lower() or low == username.split("@")[0].lower():
        return "password must not equal the username"
    if len(set(password)) < 4:
        return "password too repetitive"
    if "\x00" in password or "\n" in password or "\r" in password:
        return "password must not contain NUL or line breaks"
    return None


def generate_password() -> str:
    # 24 URL-safe characters: ~143 bits; no characters that confuse config files or shells.
    return secrets.token_urlsafe(18)


class CredentialStore:
    def __init__(self, conn: aiosqlite.Connection, cfg: CredentialsConfig,
                 executor: Executor | None = None, clock=time.time, writer: GroupWriter | None = None):
        self._conn = conn          # reads
        # Writes: the process's shared group-commit writer (the factory passes it), so no
        # transaction is held on `conn` across awaits; a store built alone gets a private one.
        self._own_writer = writer is None
        self._writer = writer or GroupWriter(reader=conn)
        self._cfg = cfg
        self._executor = executor
        self._clock = clock
        self._hasher = PasswordHasher(time_cost=cfg.argon2_time_cost, memory_cost=cfg.argon2_memory_cost,
                                      parallelism=cfg.argon2_parallelism)
        # Keyed digest so the cache never holds a password or an offline-crackable fast hash of one.
        self._cache_key = os.urandom(32)
        self._cache: dict[str, tuple[str, bytes, float]] = {}
        # Verifying an unknown user against this costs the same as a wrong password. Made on
        # first need, in the executor: every CLI command builds a store and most never verify.
        self._dummy_hash: str | None = None
        # LAST LOGIN of every successful login, cache hits included: collected here and written
        # as one short transaction per LOGIN_FLUSH_DELAY, not one commit per login.
        self._logins: dict[str, float] = {}
        self._failed_logins: dict[str, float] = {}  # the same, for wrong passwords of known credentials
        self._login_flush: asyncio.Task | None = None

    def configure(self, cfg: CredentialsConfig) -> None:
        """SIGHUP: new limits and argon2 parameters (old hashes are rehashed at next login)."""
        self._cfg = cfg
        self._hasher = PasswordHasher(time_cost=cfg.argon2_time_cost, memory_cost=cfg.argon2_memory_cost,
                                      parallelism=cfg.argon2_parallelism)
        # Remade with the new parameters, or an unknown user would answer at the old speed.
        self._dummy_hash = None
        self._cache.clear()

    # ------------------------------------------------------------ domains

    async def close(self) -> None:
        await self.flush_logins(final=True)
        if self._own_writer:
            await self._writer.close()

    async def add_domain(self, domain: str, *, also: Also = None) -> str:
        d = normalize_domain(domain)
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("INSERT INTO domains(name, created_at) VALUES (?, ?)", (d, now))
            except sqlite3.IntegrityError:
                raise StoreError(f"domain {d} already exists", "conflict") from None
            _also(also, conn)

        await self._writer.write(op)
        return d

    async def list_domains(self) -> list[dict]:
        rows = await self._conn.execute_fetchall(
            "SELECT d.name, d.created_at, d.verified_at, COUNT(c.username) AS credentials "
            "FROM domains d LEFT JOIN credentials c ON c.domain = d.name GROUP BY d.name ORDER BY d.name")
        return [{"domain": r["name"], "display": display_domain(r["name"]), "credentials": r["credentials"],
                 "created_at": r["created_at"], "verified_at": r["verified_at"],
                 "state": "verified" if r["verified_at"] else "unverified"} for r in rows]

    async def domain_exists(self, domain: str) -> bool:
        rows = await self._conn.execute_fetchall("SELECT 1 FROM domains WHERE name = ?", (normalize_domain(domain),))
        return bool(rows)

    async def remove_domain(self, domain: str, *, force: bool = False, queued: int = 0, also: Also = None) -> int:
        """Remove a domain; returns how many credentials went with it."""
        d = normalize_domain(domain)
        # One write transaction: the count we refuse on is the count we delete, even with a
        # `user add` running at the same time, and a crash never leaves half a removal.
        from .dkim_keys import forget_domain_keys  # its table, its SQL (dkim_keys imports us)

        def op(conn: sqlite3.Connection) -> int:
            if not conn.execute("SELECT 1 FROM domains WHERE name = ?", (d,)).fetchall():
                raise NotFound(f"domain {d} not found")
            n = conn.execute("SELECT COUNT(*) AS n FROM credentials WHERE domain = ?", (d,)).fetchone()["n"]
            if not force and (n or queued):
                raise StoreError(f"domain {d} still has {n} credential(s) and {queued} queued message(s); "
                                 "use --force to remove it anyway", "conflict")
            conn.execute("DELETE FROM credentials WHERE domain = ?", (d,))
            forget_domain_keys(conn, d)
            conn.execute("DELETE FROM domains WHERE name = ?", (d,))
            _also(also, conn)
            return n

        creds = await self._writer.write(op)
        self._cache.clear()
        return creds

    # ------------------------------------------------------------ credentials

    async def _hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._hasher.hash, password)

    def _check_password(self, username: str, password: str) -> None:
        problem = password_problem(username, password, self._cfg.min_password_length)
        if problem:
            raise StoreError(problem)

    async def check_can_add(self, username: str) -> tuple[str, str]:
        """The refusals `add_user` would give that need no password: a local part that is not
        an RFC 5321 dot-string, unknown domain, an existing credential, the per-domain limit.
        Lets the CLI refuse before prompting."""
        user, domain = normalize_username(username)
        local = user.rpartition("@")[0]
        # New credentials only (logins still take what older versions stored): a username is an
        # address mail clients type and pages show, so atext and dots (RFC 5322 3.2.3), or a
        # UTF-8 local part (RFC 6531); no quoted strings, no "<b>".
        if not _LOCAL_PART.fullmatch(local):
            raise StoreError(f"username's local part must be letters, digits, dots and !#$%&'*+-/=?^_`{{|}}~ "
                             f"(no leading, trailing or double dot): {username!r}")
        if not await self.domain_exists(domain):
            raise NotFound(f"domain {domain} is not a sending domain; add it first: relay domain add {domain}")
        # Existence before the limit: "already exists" is the true reason even on a full domain.
        if await self.lookup(user) is not None:
            raise StoreError(f"credential {user} already exists; use reset-password", "conflict")
        n = await self._count(domain)
        if n >= self._cfg.per_domain:
            raise self._limit_error(domain, n)
        return user, domain

    async def _count(self, domain: str) -> int:
        rows = await self._conn.execute_fetchall("SELECT COUNT(*) AS n FROM credentials WHERE domain = ?", (domain,))
        return rows[0]["n"]

    def _limit_error(self, domain: str, n: int) -> StoreError:
        return StoreError(f"domain {domain} already has {n} credentials (limit {self._cfg.per_domain}); "
                          "delete one first: relay user delete <USER@DOMAIN>", "credential_limit")

    async def add_user(self, username: str, password: str, *, also: Also = None) -> str:
        user, domain = await self.check_can_add(username)
        self._check_password(user, password)
        hashed = await self._hash(password)
        now = self._clock()
        def op(conn: sqlite3.Connection) -> int:
            # The limit is checked inside the INSERT itself: two concurrent `user add` commands
            # (hashing takes a while) cannot both pass a separate count and exceed it.
            added = conn.execute(
                "INSERT INTO credentials(username, domain, hash, created_at, updated_at) "
                "SELECT ?, ?, ?, ?, ? WHERE (SELECT COUNT(*) FROM credentials WHERE domain = ?) < ?",
                (user, domain, hashed, now, now, domain, self._cfg.per_domain)).rowcount
            if added:
                _also(also, conn)  # no audit row for a refused add
            return added

        try:
            added = await self._writer.write(op)
        except StoreUnavailable:
            # Lost a race (another process added this user, or removed the domain, meanwhile:
            # a constraint failed), or the store failed: say which.
            await self.check_can_add(user)
            raise
        if added == 0:
            raise self._limit_error(domain, await self._count(domain))
        return user

    async def list_users(self, domain: str | None = None) -> list[dict]:
        if domain:
            d = normalize_domain(domain)
            if not await self.domain_exists(d):
                raise NotFound(f"domain {d} not found")
            rows = await self._conn.execute_fetchall(
                "SELECT username, domain, created_at, updated_at, last_login, last_failed_login FROM credentials "
                "WHERE domain = ? ORDER BY username", (d,))
        else:
            rows = await self._conn.execute_fetchall(
                "SELECT username, domain, created_at, updated_at, last_login, last_failed_login FROM credentials "
                "ORDER BY domain, username")
        return [dict(r) for r in rows]

    async def reset_password(self, username: str, password: str, *, also: Also = None) -> str:
        user, _ = normalize_username(username)
        if await self.lookup(user) is None:
            raise NotFound(f"credential {user} not found")
        self._check_password(user, password)
        hashed = await self._hash(password)
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("UPDATE credentials SET hash = ?, updated_at = ? WHERE username = ?",
                            (hashed, now, user)).rowcount == 0:
                raise NotFound(f"credential {user} not found")  # deleted while we were hashing
            _also(also, conn)

        await self._writer.write(op)
        return user

    async def delete_user(self, username: str, *, also: Also = None) -> str:
        user, _ = normalize_username(username)

        def op(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM credentials WHERE username = ?", (user,)).rowcount
            if n:
                _also(also, conn)
            return n

        deleted = await self._writer.write(op)
        if deleted == 0:
            raise NotFound(f"credential {user} not found")
        self._cache.pop(user, None)
        return user

    async def lookup(self, username: str) -> str | None:
        """The stored hash for a login (any case, Unicode or ASCII domain), or None."""
        try:
            user, _ = normalize_username(username)
        except StoreError:
            return None
        rows = await self._conn.execute_fetchall("SELECT hash FROM credentials WHERE username = ?", (user,))
        return rows[0]["hash"] if rows else None

    # ------------------------------------------------------------ verification

    def _digest(self, password: bytes) -> bytes:
        return hmac.new(self._cache_key, password, hashlib.sha256).digest()

    async def verify(self, login: bytes, password: bytes) -> Principal | None:
        """Check a login; None for any failure (unknown user and bad password look the same)."""
        try:
            user, domain = normalize_username(login.decode("utf-8"))
            pw = password.decode("utf-8")
        except (UnicodeDecodeError, StoreError):
            user, domain, pw = "", "", ""
        stored = await self.lookup(user) if user else None
        digest = self._digest(password)
        if stored is not None:
            hit = self._cache.get(user)
            if hit and hit[0] == stored and hmac.compare_digest(hit[1], digest) and hit[2] > self._clock():
                metrics.AUTH_CACHE.labels("hit").inc()
                self._note_login(user)
                return Principal(user, (domain,), generation=stored)
        loop = asyncio.get_running_loop()
        if stored is None and self._dummy_hash is None:
            self._dummy_hash = await self._hash(secrets.token_hex(16))
        ok = await loop.run_in_executor(self._executor, self._verify_blocking, stored or self._dummy_hash, pw)
        if not ok or stored is None:
            if stored is not None:
                self._note_login(user, failed=True)  # a known credential: shown as its last failed login
            return None
        metrics.AUTH_CACHE.labels("miss").inc()
        self._cache[user] = (stored, digest, self._clock() + self._cfg.verify_cache_ttl)
        if len(self._cache) > 10_000:  # bound memory under a credential-stuffing run
            self._cache.clear()
        self._note_login(user)
        stored = await self._after_login(user, stored, pw)
        return Principal(user, (domain,), generation=stored)

    def _verify_blocking(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _after_login(self, user: str, stored: str, password: str) -> str:
        """Rehash with the current parameters when needed; the stored hash now (new when rehashed).
        (LAST LOGIN is written in batches by `_note_login`.)"""
        if not self._hasher.check_needs_rehash(stored):
            return stored
        try:
            new = await self._hash(password)
            # Only replace the hash we verified: a concurrent CLI reset wins.
            changed = await self._writer.write(lambda conn: conn.execute(
                "UPDATE credentials SET hash = ? WHERE username = ? AND hash = ?", (new, user, stored)).rowcount)
            self._cache.pop(user, None)
            return new if changed == 1 else stored
        except StoreUnavailable:
            pass  # bookkeeping only: a busy database must not fail a good login
        return stored

    # ------------------------------------------------------------ for open sessions (issue 12)

    async def cached(self, login: bytes, password: bytes) -> Principal | None:
        """The cache-hit half of `verify`, without argon2: a Principal when this password was
        verified against the current stored hash within verify_cache_ttl, else None. Lets the
        session answer a known-good login even when the bound on pending verifications is full."""
        try:
            user, domain = normalize_username(login.decode("utf-8"))
        except (UnicodeDecodeError, StoreError):
            return None
        hit = self._cache.get(user)
        if not hit or hit[2] <= self._clock() or not hmac.compare_digest(hit[1], self._digest(password)):
            return None
        stored = await self.lookup(user)
        if stored is None or stored != hit[0]:
            return None
        metrics.AUTH_CACHE.labels("hit").inc()
        self._note_login(user)
        return Principal(user, (domain,), generation=stored)

    async def generation(self, username: str) -> str | None:
        """The credential's stored hash if it and its domain still exist, else None: one indexed
        read, compared with `Principal.generation` at each MAIL FROM of an open session."""
        rows = await self._conn.execute_fetchall(
            "SELECT c.hash FROM credentials c JOIN domains d ON d.name = c.domain WHERE c.username = ?",
            (username,))
        return rows[0]["hash"] if rows else None

    # ------------------------------------------------------------ LAST LOGIN (issue 13), last failed login (14)

    LOGIN_FLUSH_DELAY = 1.0

    def _note_login(self, user: str, failed: bool = False) -> None:
        (self._failed_logins if failed else self._logins)[user] = self._clock()
        if self._login_flush is None or self._login_flush.done():
            self._login_flush = asyncio.get_running_loop().create_task(self._flush_later(), name="last-login")

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.LOGIN_FLUSH_DELAY)
        await self.flush_logins()

    async def flush_logins(self, final: bool = False) -> None:
        """Write the collected LAST LOGIN times; `final` (shutdown) also stops the pending timer."""
        if final and self._login_flush is not None and self._login_flush is not asyncio.current_task():
            self._login_flush.cancel()
        batch, self._logins = self._logins, {}
        failed, self._failed_logins = self._failed_logins, {}
        if not batch and not failed:
            return

        def op(conn: sqlite3.Connection) -> None:
            # MAX: a slower batch from another process never moves a login back in time.
            conn.executemany(
                "UPDATE credentials SET last_login = MAX(COALESCE(last_login, 0), ?) WHERE username = ?",
                [(t, u) for u, t in batch.items()])
            conn.executemany(
                "UPDATE credentials SET last_failed_login = MAX(COALESCE(last_failed_login, 0), ?) "
                "WHERE username = ?", [(t, u) for u, t in failed.items()])

        try:
            await self._writer.write(op)
        except StoreUnavailable:
            pass  # bookkeeping only: a busy database must not fail logins; the next login writes again
