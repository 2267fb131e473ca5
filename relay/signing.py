"""DKIM signing at acceptance time (dkimpy), once per message so retries never re-sign.

Relaxed/relaxed canonicalization, the usual header set, From oversigned (listed once more
than it occurs, so a second From added in transit breaks the signature). Signing is CPU work:
it runs in the thread pool so other sessions keep their latency.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor

import dkim
import dkim.canonicalization
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from .dkim_keys import DKIMKey, DKIMStore
from .headers import field_name, split

SIGNED_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type",
                  "reply-to", "in-reply-to", "references")


# dkimpy does the DKIM work (canonicalization, header hash, the signature field) but computes
# RSA in pure Python: 5 ms a signature, under the GIL. The RSA primitive is swapped for
# OpenSSL's (0.2 ms, GIL released) for keys we hold; PKCS#1 v1.5 is deterministic, so the
# bytes are identical (tests compare both). Unknown keys still take dkimpy's own path.
_PURE_RSA_SIGN = dkim.RSASSA_PKCS1_v1_5_sign
_OPENSSL_KEYS: dict[int, rsa.RSAPrivateKey] = {}
_REGISTERED: set[str] = set()


def _rsa_sign(hash_obj, private_key):
    key = _OPENSSL_KEYS.get(private_key.get("modulus")) if isinstance(private_key, dict) else None
    if key is None or hash_obj.name != "sha256":
        return _PURE_RSA_SIGN(hash_obj, private_key)
    return key.sign(hash_obj.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign
# dkimpy parses the PEM (pure-Python ASN.1) on every signature; the result depends only on the
# key text, so remember it for the keys in use.
dkim.parse_pem_private_key = functools.lru_cache(maxsize=256)(dkim.parse_pem_private_key)


# Relaxed body canonicalization (RFC 6376 3.4.4) runs two regular expressions over the whole
# body: a fifth of the acceptance process's CPU at 10 KB. A body with no tab, no run of spaces
# and no space before a line end has no whitespace to change, which is most mail: only the
# trailing empty lines are left to handle. Anything else takes dkimpy's own code.
_RELAXED_BODY = dkim.canonicalization.Relaxed.canonicalize_body


def _relaxed_body(body: bytes) -> bytes:
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        return _RELAXED_BODY(body)
    return dkim.canonicalization.correct_empty_body(dkim.canonicalization.strip_trailing_lines(body))


dkim.canonicalization.Relaxed.canonicalize_body = staticmethod(_relaxed_body)


def _register(key: DKIMKey) -> None:
    if key.algorithm != "rsa" or key.private_key in _REGISTERED or len(_REGISTERED) >= 10_000:
        return
    _REGISTERED.add(key.private_key)
    loaded = serialization.load_pem_private_key(key.private_key.encode(), None)
    if isinstance(loaded, rsa.RSAPrivateKey):
        _OPENSSL_KEYS.setdefault(loaded.private_numbers().public_numbers.n, loaded)


def sign(message: bytes, key: DKIMKey) -> bytes:
    """The message with a DKIM-Signature field prepended."""
    _register(key)
    present = {field_name(f) for f in split(message).fields}
    include = [h.encode() for h in SIGNED_HEADERS if h in present] + [b"from"]
    # dkimpy's parser splits the whole message into a list of lines and joins the body back: ~45x
    # the size of a message of short lines. Give it the header section only, and the body as is.
    head, sep, body = message.partition(b"\r\n\r\n")
    d = dkim.DKIM(head + sep, linesep=b"\r\n",
                  signature_algorithm=b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256")
    d.body = body
    sig = d.sign(key.selector.encode(), key.domain.encode(), key.private_key.encode(),
                 canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
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
