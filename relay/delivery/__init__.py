"""Outbound side: bytes and an envelope in, one outcome per recipient out. Never sees a store.

`Router` picks the route (MX lookup or the configured smarthost) and opens `Connection`s; a
connection carries several messages in a row to one destination (connection reuse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..spool import Body

DELIVERED, TRANSIENT, PERMANENT = "delivered", "transient", "permanent"


@dataclass(frozen=True)
class RcptOutcome:
    kind: str                  # delivered | transient | permanent
    reply: str                 # remote reply ("550 5.1.1 no such user") or our own description
    status: str                # enhanced status for the DSN, e.g. "5.1.1"
    remote_mta: str | None = None
    tls: str | None = None     # "TLSv1.3" or "plain" for the log
    # The remote took our DSN parameters (RFC 3461 5.2.1): success reports are its job from here on.
    dsn: bool = False
    # No SMTP reply decided this: the destination could not be reached or the session broke
    # (refused, timed out, reset). The scheduler counts these toward a dead destination.
    connection_failed: bool = False
    # The outbound TLS policy applied (tls_policy.Decision.label: may, verify, sts-enforce, ...)
    # and the TLS outcome: cipher, whether the certificate was verified, the TLSRPT result type
    # of a TLS failure. For the attempt's log line, its history row and the metrics.
    tls_policy: str | None = None
    tls_cipher: str | None = None
    tls_verified: bool | None = None
    tls_result: str | None = None

    @property
    def final(self) -> bool:
        return self.kind != TRANSIENT


@dataclass(frozen=True)
class OutRecipient:
    address: str
    notify: str | None = None
    orcpt: str | None = None


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[OutRecipient, ...]
    data: "bytes | Body"       # a spool.Body for what the queue holds (maybe in a file)
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    qid: str | None = None     # for log lines only: delivery never sees the store
    requiretls: bool = False   # RFC 8689: verified TLS and a receiver that advertises REQUIRETLS, or 5.7.30


class Fenced(Exception):
    """The job's lease is no longer ours (checked before DATA): send nothing, settle nothing."""


class Connection(Protocol):
    async def send(self, env: Envelope) -> dict[str, RcptOutcome]: ...
    async def close(self) -> None: ...


def all_same(env: Envelope, outcome: RcptOutcome) -> dict[str, RcptOutcome]:
    return {r.address: outcome for r in env.recipients}


from .router import Router  # noqa: E402  (re-export after the shared types it uses)

__all__ = ["DELIVERED", "TRANSIENT", "PERMANENT", "RcptOutcome", "OutRecipient", "Envelope", "Connection",
           "Router", "all_same", "Fenced"]
