"""DKIM keys per sending domain (RFC 6376, RFC 8463), the DNS records to publish, and their verification.

Keys live in the database (mode 0600) and are never printed: only the public half leaves it,
as the TXT record. Rotation makes a new active selector and keeps the old key published-but-
unused until the operator removes it, so mail signed with it in transit still verifies.
"""
from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable
from datetime import datetime, timezone

import aiosqlite

if TYPE_CHECKING:
    import dns.asyncresolver

from .credentials import Also, NotFound, StoreError, normalize_domain
from .store.writer import GroupWriter

ALGORITHMS = ("rsa", "ed25519")


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str          # rsa | ed25519
    private_key: str        # rsa: PEM (PKCS#1); ed25519: base64 seed (what dkimpy/nacl take)
    public_key: str         # the p= value
    created_at: float
    active: bool

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key}"


def generate(algorithm: str, rsa_bits: int = 2048) -> tuple[str, str]:
    """(private, public p= value). CPU-bound: call it from a thread."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, base64.b64encode(public).decode()
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        # RFC 8463 3: p= is the base64 of the raw 32-byte public key.
        return base64.b64encode(seed).decode(), base64.b64encode(public).decode()
    raise StoreError(f"unknown DKIM algorithm {algorithm!r}; use rsa or ed25519")


def default_selector(now: float | None = None) -> str:
    return "relay" + datetime.fromtimestamp(now or time.time(), timezone.utc).strftime("%Y%m%d")


def _row(r) -> DKIMKey:
    return DKIMKey(r["domain"], r["selector"], r["algorithm"], r["private_key"], r["public_key"], r["created_at"],
                   bool(r["active"]))


def forget_domain_keys(conn: sqlite3.Connection, domain: str) -> None:
    """Inside a write transaction (a domain's removal): its keys go with it."""
    conn.execute("DELETE FROM dkim_keys WHERE domain = ?", (domain,))


class DKIMStore:
    def __init__(self, conn: aiosqlite.Connection, clock=time.time, writer: GroupWriter | None = None):
        self._conn = conn          # reads
        self._own_writer = writer is None
        self._writer = writer or GroupWriter(reader=conn)  # writes, as every store's
        self._clock = clock

    async def close(self) -> None:
        if self._own_writer:
            await self._writer.close()

    async def create(self, domain: str, *, algorithm: str = "rsa", rsa_bits: int = 2048,
                     selector: str = "", also: Also = None) -> DKIMKey:
        """A new active key for the domain; any previous active key becomes published-but-unused."""
        key, op = await self.prepare(domain, algorithm=algorithm, rsa_bits=rsa_bits, selector=selector)
        await self.store_prepared(op, also=also)
        return key

    async def store_prepared(self, op: "Callable[[sqlite3.Connection], None]", *, also: Also = None) -> None:
        """Commit a key from `prepare` (and `also`, e.g. its audit row) in one transaction."""
        def with_also(conn: sqlite3.Connection) -> None:
            op(conn)
            if also is not None:
                also(conn)

        await self._writer.write(with_also)

    async def prepare(self, domain: str, *, algorithm: str = "rsa", rsa_bits: int = 2048,
                      selector: str = "") -> tuple[DKIMKey, "Callable[[sqlite3.Connection], None]"]:
        """A new key (generated in a thread) and the write that stores it as the active one, for a
        caller that commits it together with other work (a new domain's row, an audit row)."""
        d = normalize_domain(domain)
        if algorithm not in ALGORITHMS:
            raise StoreError(f"unknown DKIM algorithm {algorithm!r}; use rsa or ed25519")
        base = selector or default_selector(self._clock())
        if not all(c.isalnum() or c in "-." for c in base) or base.startswith(("-", ".")):
            raise StoreError(f"invalid DKIM selector {base!r}")
        existing = {k.selector for k in await self.keys(d)}
        chosen, n = base, 1
        while chosen in existing:  # two rotations on one day: relay20261126, relay20261126b, ...
            n += 1
            chosen = f"{base}{chr(ord('a') + n - 1)}" if n <= 26 else f"{base}-{n}"
        private, public = await asyncio.get_running_loop().run_in_executor(None, generate, algorithm, rsa_bits)
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE dkim_keys SET active = 0 WHERE domain = ?", (d,))
            conn.execute(
                "INSERT INTO dkim_keys(domain, selector, algorithm, private_key, public_key, created_at, active) "
                "VALUES (?, ?, ?, ?, ?, ?, 1)", (d, chosen, algorithm, private, public, now))
            # A new key must be published and verified again before mail relies on it.
            conn.execute("UPDATE domains SET verified_at = NULL WHERE name = ?", (d,))

        return DKIMKey(d, chosen, algorithm, private, public, now, True), op

    async def keys(self, domain: str) -> list[DKIMKey]:
        rows = await self._conn.execute_fetchall(
            "SELECT * FROM dkim_keys WHERE domain = ? ORDER BY created_at DESC", (normalize_domain(domain),))
        return [_row(r) for r in rows]

    async def active(self, domain: str) -> DKIMKey | None:
        rows = await self._conn.execute_fetchall(
            "SELECT * FROM dkim_keys WHERE domain = ? AND active = 1", (domain,))
        return _row(rows[0]) if rows else None

    async def remove(self, domain: str, selector: str, *, also: Also = None) -> None:
        d = normalize_domain(domain)
        rows = await self._conn.execute_fetchall(
            "SELECT active FROM dkim_keys WHERE domain = ? AND selector = ?", (d, selector))
        if not rows:
            raise NotFound(f"no DKIM key {selector} for {d}")
        if rows[0]["active"]:
            raise StoreError(f"{selector} is the active key of {d}; rotate first: relay domain dkim rotate {d}")
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM dkim_keys WHERE domain = ? AND selector = ?", (d, selector))
            if also is not None:
                also(conn)

        await self._writer.write(op)

    async def mark_verified(self, domain: str, verified: bool, *, also: Also = None) -> None:
        when, d = (self._clock() if verified else None), normalize_domain(domain)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE domains SET verified_at = ? WHERE name = ?", (when, d))
            if also is not None:
                also(conn)

        await self._writer.write(op)

    async def verified_at(self, domain: str) -> float | None:
        rows = await self._conn.execute_fetchall("SELECT verified_at FROM domains WHERE name = ?", (domain,))
        return rows[0]["verified_at"] if rows else None

    async def is_verified(self, domain: str) -> bool:
        rows = await self._conn.execute_fetchall("SELECT verified_at FROM domains WHERE name = ?", (domain,))
        return bool(rows and rows[0]["verified_at"])


# ---------------------------------------------------------------- records to publish (pure)

@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str
    purpose: str
    required: bool = True


def spf_value(public_addresses: tuple[str, ...], hostname: str, spf_include: str, smarthost: bool) -> str:
    import ipaddress
    mechs = []
    if smarthost and spf_include:
        mechs.append(f"include:{spf_include}")
    for a in public_addresses:
        ip = ipaddress.ip_address(a)
        mechs.append(f"ip{ip.version}:{ip}")
    if not mechs:
        mechs.append(f"a:{hostname}")
    return "v=spf1 " + " ".join(mechs) + " ~all"


def records(domain: str, keys: list[DKIMKey], *, spf: str, dmarc_rua: str, hostname: str,
            public_addresses: tuple[str, ...]) -> list[Record]:
    out = [Record(k.record_name, "TXT", k.txt, "DKIM (active)" if k.active else "DKIM (retired, keep until unused)",
                  k.active) for k in keys]
    out.append(Record(domain, "TXT", spf, "SPF"))
    rua = dmarc_rua or f"postmaster@{domain}"
    out.append(Record(f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=none; rua=mailto:{rua}", "DMARC (suggested)", False))
    for a in public_addresses:
        import ipaddress
        ip = ipaddress.ip_address(a)
        out.append(Record(hostname, "A" if ip.version == 4 else "AAAA", str(ip), "relay host (reference)", False))
        out.append(Record(ip.reverse_pointer, "PTR", hostname + ".", "reverse DNS to set with your provider", False))
    return out


def txt_chunks(value: str) -> str:
    """A TXT value as zone-file character strings of at most 255 octets (RFC 1035 3.3.14)."""
    return " ".join('"' + value[i:i + 255].replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for i in range(0, len(value), 255)) or '""'


def zone_snippet(recs: list[Record], ttl: int = 3600) -> str:
    lines = []
    for r in recs:
        value = txt_chunks(r.value) if r.type == "TXT" else r.value
        lines.append(f"; {r.purpose}\n{r.name}. {ttl} IN {r.type} {value}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- verification

@dataclass(frozen=True)
class Check:
    record: Record
    status: str               # ok | different | missing | error
    found: list[str]


def _tags(value: str) -> dict[str, str]:
    out = {}
    for part in value.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq:
            out[k.strip().lower()] = "".join(v.split())
    return out


def _matches(rec: Record, found: str) -> bool:
    if rec.purpose.startswith("DKIM"):
        want, got = _tags(rec.value), _tags(found)
        return got.get("p") == want.get("p") and got.get("k", "rsa") == want.get("k")
    if rec.purpose == "SPF":
        want = set(rec.value.split()[1:-1])
        return found.lower().startswith("v=spf1") and want <= set(found.split())
    if rec.purpose.startswith("DMARC"):
        return found.startswith("v=DMARC1")
    return found.rstrip(".").lower() == rec.value.rstrip(".").lower()


async def verify(resolver: "dns.asyncresolver.Resolver", recs: list[Record]) -> list[Check]:
    # dnspython here only: the accepting process imports this module and never resolves (~13 MB).
    import dns.exception
    import dns.resolver
    checks = []
    for rec in recs:
        try:
            answer = await resolver.resolve(rec.name, rec.type, search=False)
            if rec.type == "TXT":
                found = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
            else:
                found = [r.to_text() for r in answer]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            checks.append(Check(rec, "missing", []))
            continue
        except dns.exception.DNSException as exc:
            checks.append(Check(rec, "error", [type(exc).__name__]))
            continue
        if rec.purpose == "SPF":
            found = [f for f in found if f.lower().startswith("v=spf1")]
        elif rec.purpose.startswith("DMARC"):
            found = [f for f in found if f.startswith("v=DMARC1")]
        if not found:
            checks.append(Check(rec, "missing", []))
        elif any(_matches(rec, f) for f in found):
            checks.append(Check(rec, "ok", found))
        else:
            checks.append(Check(rec, "different", found))
    return checks
