"""DKIM signing at acceptance time (dkimpy), once per message so retries never re-sign.

Relaxed/relaxed canonicalization, the usual header set, From oversigned (listed once more
than it occurs, so a second From added in transit breaks the signature). Signing is CPU work:
it runs in the thread pool so other sessions keep their latency.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import dkim

from .dkim_keys import DKIMKey, DKIMStore
from .headers import field_name, split

SIGNED_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type",
                  "reply-to", "in-reply-to", "references")


def sign(message: bytes, key: DKIMKey) -> bytes:
    """The message with a DKIM-Signature field prepended."""
    present = {field_name(f) for f in split(message).fields}
    include = [h.encode() for h in SIGNED_HEADERS if h in present] + [b"from"]
    sig = dkim.sign(message, key.selector.encode(), key.domain.encode(),
                    key.private_key.encode(), canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256",
                    include_headers=include, linesep=b"\r\n")
    return sig + message


class Signer:
    """Signs for the domains that have an active key; others pass through unsigned."""

    def __init__(self, store: DKIMStore, executor: Executor | None = None):
        self._store = store
        self._executor = executor

    async def __call__(self, domain: str, message: bytes) -> tuple[bytes, str | None]:
        """(message, selector used or None)."""
        key = await self._store.active(domain)
        if key is None:
            return message, None
        signed = await asyncio.get_running_loop().run_in_executor(self._executor, sign, message, key)
        return signed, key.selector
