"""What the operations layer takes and returns: frozen dataclasses, plain data for the CLI to
print, the web pages to render and the API to serialise (`as_dict`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def as_dict(obj: Any) -> Any:
    """A dataclass (or list of them) as JSON-ready data; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class Actor:
    """Who asks: an admin (web), an API key id (api) or the OS user (cli); the audit log's who."""
    name: str
    via: str                # "cli" | "web" | "api"
    ip: str | None = None


@dataclass(frozen=True)
class DomainInfo:
    name: str               # ASCII (IDNA) form
    display: str            # Unicode form, for people
    created_at: float
    verified_at: float | None
    state: str              # verified | unverified
    credentials: int        # credentials in use
    credential_cap: int     # credentials.per_domain
    dkim_selector: str | None
    sent_24h: int = 0       # recipient outcomes in the last 24 h (history)
    deferred_24h: int = 0
    bounced_24h: int = 0    # failed or expired


@dataclass(frozen=True)
class DnsRecord:
    type: str
    name: str
    value: str
    purpose: str            # "DKIM (active)", "SPF", "DMARC (suggested)", ...
    required: bool


@dataclass(frozen=True)
class RecordCheck:
    type: str
    name: str
    purpose: str
    required: bool
    expected: str
    found: tuple[str, ...]
    status: str             # ok | missing | mismatch | optional (not required and not right) | error
    lookup: str             # what the lookup gave: ok | different | missing | error
    checked_at: float


@dataclass(frozen=True)
class CredentialInfo:
    username: str
    domain: str
    created_at: float
    updated_at: float       # password last set
    last_login: float | None
    last_failed_login: float | None


@dataclass(frozen=True)
class QueueFilter:
    state: str = "active"   # active | pending | deferred | finished | delivered | failed | all
    domain: str | None = None
    sender: str | None = None
    recipient: str | None = None
    qid: str | None = None  # a prefix


@dataclass(frozen=True)
class QueueItem:
    id: str
    sender: str
    created_at: float
    size: int
    recipients: tuple[str, ...]
    state: str
    next_attempt_at: float | None
    last_error: str | None
    finished_at: float | None


@dataclass(frozen=True)
class QueuePage:
    items: tuple[QueueItem, ...]
    next: str | None        # opaque cursor for the next page, None at the end


@dataclass(frozen=True)
class RecipientInfo:
    address: str
    route: str
    state: str
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    remote_mta: str | None
    in_flight: bool


@dataclass(frozen=True)
class Attempt:
    ts: float
    recipient: str | None
    event: str              # delivered | deferred | failed | expired | bounce | dropped | ...
    reply: str | None
    host: str | None = None  # the remote MTA that answered (schema 8; None before, and for our own notes)
    tls: str | None = None   # "TLSv1.3", "plain", or None when unknown
    # issue 15: the outbound TLS policy applied (may, verify, sts-enforce, ...), the cipher, and
    # whether the certificate was verified; None before that schema or for our own notes
    tls_policy: str | None = None
    tls_cipher: str | None = None
    tls_verified: bool | None = None


@dataclass(frozen=True)
class MessageDetail:
    id: str
    sender: str
    created_at: float
    size: int
    auth_user: str | None
    client_ip: str | None
    state: str
    finished_at: float | None
    dkim_domain: str | None
    dkim_signed: bool
    headers: str            # the header block only, never the body
    recipients: tuple[RecipientInfo, ...]
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True)
class AuditEntry:
    id: int
    ts: float
    actor: str
    via: str
    ip: str | None
    action: str             # e.g. credential.create, queue.retry
    target: str | None
    detail: str | None


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    name: str
    scope: str              # read | write
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class ApiPrincipal:
    """An authenticated API key: the audit log's actor is its id."""
    key_id: str
    name: str
    scope: str
