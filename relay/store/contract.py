"""The store contract: what the daemon, the delivery process, the CLI (and later the web admin
and other backends) may ask of storage, as typed data and one Protocol per store.

Ownership: the queue store owns `messages`, `bodies`, `recipients`, `history`; the credential
store owns `domains` and `credentials`; the DKIM store owns `dkim_keys` (and the domain's
`verified_at`); `audit.py` owns `audit_log` and `api_keys.py` owns `api_keys` (issue 14); `tls_state.py` owns
`mta_sts_policies` and `tls_security` (issue 15). No store
writes another's tables. A store's change methods take `also=` (an extra write run inside the
same transaction): the operations layer passes its audit row that way. A backend (today SQLite) implements these
Protocols; `factory.open_stores` is the one place that picks and builds it.

Leases (queue): a claim gives each job a fresh token and an owner ("node/incarnation"), and
sets the rows' `next_attempt_at` to the lease's end (one index serves "due" and "lease ran
out"). Every later write about the job (renew, settle, release) applies only where the token
still matches: a worker whose lease was taken over changes nothing (fencing).
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from ..spool import Body

ACTIVE = ("pending", "deferred")
FINAL = ("delivered", "failed")


def new_queue_id() -> str:
    # Time prefix keeps ids roughly sortable for humans; 40 random bits make them unguessable.
    return f"{int(time.time()):08X}"[-8:] + secrets.token_hex(5).upper()


class StoreUnavailable(Exception):
    """The store could not commit: the client must get a transient reply."""


class StorageFull(StoreUnavailable):
    pass


class StoreRefusal(Exception):
    """An operation's own "no" (not found, already exists, over a limit): shown to the user as is."""


class LeaseLost(Exception):
    """Another worker took over this lease; the write changed nothing."""


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds a lease: the node, and the process incarnation on it (new at every start)."""
    node: str
    incarnation: str

    def __str__(self) -> str:
        return f"{self.node}/{self.incarnation}"


@dataclass(frozen=True)
class NewRecipient:
    address: str
    route: str                     # destination domain, or "smarthost"
    notify: str | None = None      # RFC 3461 NOTIFY value, e.g. "FAILURE,DELAY" or "NEVER"
    orcpt: str | None = None


@dataclass(frozen=True)
class NewMessage:
    sender: str
    recipients: tuple[NewRecipient, ...]
    data: bytes
    auth_user: str | None = None
    client_ip: str | None = None
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False
    queue_id: str | None = None    # preassigned so the Received header can carry it
    dkim_domain: str | None = None  # sign for this domain before the first delivery attempt
    # A body spooled to a file (spool.SpoolFile, already fsynced): its name in the spool
    # directory and its size; `data` then holds only the header block.
    spool_file: str | None = None
    spool_size: int = 0
    spool_ascii: bool = False      # the spooled bytes are all ASCII (delivery then skips a scan)
    requiretls: bool = False       # RFC 8689 REQUIRETLS: only over verified TLS to a REQUIRETLS server

    @property
    def size(self) -> int:
        return self.spool_size if self.spool_file else len(self.data)


@dataclass
class ClaimedRecipient:
    id: int
    address: str
    attempts: int                  # including the attempt this claim starts
    notify: str | None
    orcpt: str | None


@dataclass
class Job:
    """Due recipients of one message for one destination, under one lease token."""
    msg_id: str
    route: str
    token: str
    sender: str
    created_at: float
    size: int
    ret: str | None
    envid: str | None
    smtputf8: bool
    warned: bool
    leased_until: float = 0.0      # the lease's end (= the rows' next_attempt_at while leased)
    recipients: list[ClaimedRecipient] = field(default_factory=list)
    confirmed_at: float = 0.0      # when the store last confirmed the token (claim or renewal)
    lost: bool = False             # a renewal found the token gone: never send, never settle
    requiretls: bool = False       # RFC 8689 (issue 15)


@dataclass(frozen=True)
class RecipientUpdate:
    id: int
    state: str                     # deferred | delivered | failed
    next_attempt_at: float
    error: str | None = None
    remote_mta: str | None = None


class QueueStore(Protocol):
    lease_seconds: float
    owner: LeaseOwner
    # True: the runner asks `holds` before the DATA of every attempt (a store shared by nodes);
    # False (SQLite, one node): only when the heartbeat's last confirmation is getting old.
    fence_each_attempt: bool

    async def enqueue(self, msg: NewMessage) -> str: ...
    async def claim(self, limit: int, now: float | None = None,
                    destination: Callable[[str], str] | None = None,
                    exclude_routes: Iterable[str] = ()) -> list[Job]: ...
    async def renew(self, job: Job) -> None: ...
    async def renew_many(self, jobs: list[Job]) -> list[Job]: ...
    async def holds(self, job: Job) -> bool: ...
    async def settle(self, job: Job, updates: list[RecipientUpdate], *, bounces: tuple[NewMessage, ...] = (),
                     history: list[tuple] = (), mark_warned: bool = False,
                     signature: bytes | None = None) -> list[str]: ...
    async def release(self, job: Job) -> None: ...
    async def recover(self) -> int: ...
    async def body_to_send(self, msg_id: str) -> tuple[Body | None, str | None]: ...
    async def body(self, msg_id: str, limit: int = 1_048_576) -> bytes | None: ...
    async def next_due(self, exclude_routes: Iterable[str] = ()) -> float | None: ...
    async def stats(self) -> dict[str, Any]: ...
    async def list(self, limit: int = 1000) -> list[dict[str, Any]]: ...
    async def show(self, msg_id: str) -> dict[str, Any] | None: ...
    async def retry(self, msg_id: str | None) -> int: ...
    async def delete(self, msg_id: str, *, bounce: NewMessage | None = None) -> bool: ...
    async def close(self) -> None: ...


class CredentialStore(Protocol):
    async def add_domain(self, domain: str) -> str: ...
    async def list_domains(self) -> list[dict]: ...
    async def domain_exists(self, domain: str) -> bool: ...
    async def remove_domain(self, domain: str, *, force: bool = False, queued: int = 0) -> int: ...
    async def add_user(self, username: str, password: str) -> str: ...
    async def list_users(self, domain: str | None = None) -> list[dict]: ...
    async def reset_password(self, username: str, password: str) -> str: ...
    async def delete_user(self, username: str) -> str: ...
    async def lookup(self, username: str) -> str | None: ...
    async def verify(self, login: bytes, password: bytes) -> Any: ...


class DKIMKeyStore(Protocol):
    async def is_verified(self, domain: str) -> bool: ...


class TLSState(Protocol):
    """What the outbound TLS policy asks of storage (issue 15): the MTA-STS cache and the
    downgrade memory. The one store handed to `delivery/`, through the Router."""
    async def get_sts(self, domain: str) -> dict[str, Any] | None: ...
    async def put_sts(self, domain: str, policy: Any, now: float) -> None: ...
    async def sts_checked(self, domain: str, now: float) -> None: ...
    async def get_security(self, domain: str) -> tuple[str, float] | None: ...
    async def note_security(self, domain: str, seen: str, now: float) -> None: ...
    async def reset_security(self, domain: str, seen: str, now: float) -> None: ...
    async def add_tlsrpt(self, rows: list[tuple[str, str, str, str, str, str, int]]) -> None: ...
    # The TLSRPT sender's (relay/tls_reports.py, outside delivery/):
    async def tlsrpt_rows(self, day: str) -> list[dict[str, Any]]: ...
    async def tlsrpt_sent(self, day: str) -> list[str]: ...
    async def mark_tlsrpt_sent(self, day: str, domain: str, now: float) -> None: ...
