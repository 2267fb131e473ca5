"""DKIM signing (dkimpy) in the delivery process, once per message: a retry sends the stored signature.

Relaxed/relaxed canonicalization, the usual header set, From oversigned (listed once more
than it occurs, so a second From added in transit breaks the signature). The result is the
DKIM-Signature field alone, sent before the unchanged message. The body is hashed as it is
read, in chunks cut at line ends (`RelaxedBodyHash`), so a spooled body is never held whole:
only the header block and a hash are in memory. Hashing and RSA run in threads (the loop
keeps serving other deliveries).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import dkim
import dkim.canonicalization
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from .dkim_keys import DKIMKey, DKIMStore
from .headers import field_name, split
from .spool import Body

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


class RelaxedBodyHash:
    """SHA-256 of the relaxed canonical body (RFC 6376 3.4.4), fed in pieces that each end at a
    line end (the last may not). WSP rules are per line, so each piece is canonicalized on its
    own (by dkimpy's functions); only "ignore all empty lines at the end of the body" reaches
    across pieces: empty lines are counted, not hashed, until a non-empty line follows them."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._pending = 0   # empty lines seen after the last non-empty one, not hashed yet

    def update(self, piece: bytes) -> None:
        if b"\t" in piece or b"  " in piece or b" \r\n" in piece:
            piece = _CANON.compress_whitespace(_CANON.strip_trailing_whitespace(piece))
        end = len(piece)
        while end >= 2 and piece[end - 2:end] == b"\r\n":
            end -= 2
        if end == 0:  # nothing but empty lines: they count only if something follows
            self._pending += len(piece) // 2
            return
        if self._pending:
            self._h.update(b"\r\n" * self._pending)
        self._h.update(memoryview(piece)[:end])
        # The last non-empty line's own CRLF (added when the body does not end in one, as
        # dkimpy's strip_trailing_lines does); the empty lines after it wait.
        self._h.update(b"\r\n")
        self._pending = max(0, (len(piece) - end) // 2 - 1)

    def digest(self) -> bytes:
        # An empty canonical body (nothing, or only empty lines) hashes as "" (RFC 6376 3.4.4).
        return self._h.digest()


_CANON = dkim.canonicalization


def _include(head: bytes) -> list[bytes]:
    present = {field_name(f) for f in split(head).fields}
    return [h.encode() for h in SIGNED_HEADERS if h in present] + [b"from"]


def signature(head: bytes, body_hash: bytes, key: DKIMKey, now: float | None = None) -> bytes:
    """The DKIM-Signature field for header block `head` (ending in its empty line) and the body
    hash from RelaxedBodyHash. The steps of dkimpy's DKIM.sign after its body hash, with ours:
    its own gen_header computes the header hash and the signature (the same bytes as dkim.sign
    over the whole message; a test compares them)."""
    _register(key)
    alg = b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256"
    # dkimpy's parser gets the header section only: it splits what it is given into lines.
    d = dkim.DKIM(head, linesep=b"\r\n", signature_algorithm=alg)
    if alg == b"rsa-sha256":
        try:
            pk = dkim.parse_pem_private_key(key.private_key.encode())
        except dkim.UnparsableKeyError as e:
            raise dkim.KeyFormatError(str(e)) from None
    else:
        import nacl.encoding
        import nacl.signing
        pk = nacl.signing.SigningKey(key.private_key.encode(), encoder=nacl.encoding.Base64Encoder)
    include = tuple(h.lower() for h in _include(head))
    d.include_headers = include
    d.hasher = dkim.HASH_ALGORITHMS[alg]
    canon = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    domain, selector = key.domain.encode(), key.selector.encode()
    fields = [
        (b"v", b"1"), (b"a", alg), (b"c", canon.to_c_value()), (b"d", domain), (b"i", b"@" + domain),
        (b"q", b"dns/txt"), (b"s", selector), (b"t", str(int(time.time() if now is None else now)).encode()),
        (b"h", b" : ".join(include)), (b"bh", base64.b64encode(body_hash)),
        # As dkimpy does: b= folds onto a line of its own, so refolding after adding it changes nothing.
        (b"b", b"0" * 60),
    ]
    return b"DKIM-Signature: " + d.gen_header(fields, include, canon, b"DKIM-Signature", pk)


class _HeadSplit:
    """Splits the content's pieces into the header block (kept, with its empty line) and the
    body (handed on for hashing): the empty line may straddle two pieces."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.in_head = True

    def feed(self, piece: bytes) -> bytes:
        """What of `piece` is body (b"" while the header block goes on)."""
        if not self.in_head:
            return piece
        start = max(0, len(self.head) - 3)
        self.head += piece
        i = self.head.find(b"\r\n\r\n", start)
        if i < 0:
            return b""  # no empty line yet (or at all: then all is header, the body empty)
        rest = bytes(self.head[i + 4:])
        del self.head[i + 4:]
        self.in_head = False
        return rest


def _head_and_hash(pieces) -> tuple[bytes, bytes]:
    """(header block with its empty line, relaxed body hash) from the content's pieces."""
    split, h = _HeadSplit(), RelaxedBodyHash()
    for piece in pieces:
        body = split.feed(piece)
        if body:
            h.update(body)
    return bytes(split.head), h.digest()


def sign(message: bytes, key: DKIMKey) -> bytes:
    """The message with a DKIM-Signature field prepended (in-memory messages, tests)."""
    head, digest = _head_and_hash([message])
    return signature(head, digest, key) + message


# The signing pool: a few threads of its own, one per core. RSA (OpenSSL) releases the GIL,
# so two signatures run at once; dkimpy's Python around it does not, and in the loop's default
# pool (cores + 4 threads, shared with everything else) more signing threads than cores only
# queued for the GIL: measured 0.48 CPU-ms a message in 7 threads against 0.32 in isolation.
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="dkim-sign")
    return _POOL


class Signer:
    """Signs for the domains that have an active key; others pass through unsigned."""

    # The active key per domain is read from the store at most this often (one read a message
    # was a thread hop each on the delivery loop); a rotation reaches signing within this time.
    KEY_TTL = 0.25

    @staticmethod
    def _sign_whole(data: bytes, key: DKIMKey) -> bytes:
        head, digest = _head_and_hash([data])
        return signature(head, digest, key)

    def __init__(self, store: DKIMStore, executor: Executor | None = None, clock=time.monotonic):
        self._store = store
        self._executor = executor
        self._clock = clock
        self._keys: dict[str, tuple[float, DKIMKey | None]] = {}

    async def _active(self, domain: str) -> DKIMKey | None:
        now = self._clock()
        hit = self._keys.get(domain)
        if hit is not None and now - hit[0] < self.KEY_TTL:
            return hit[1]
        key = await self._store.active(domain)
        if len(self._keys) >= 10_000:
            self._keys.clear()
        self._keys[domain] = (now, key)
        return key

    async def __call__(self, domain: str, body: Body) -> tuple[bytes, str | None]:
        """(the DKIM-Signature field, or b"" without a key; selector used or None). The body is
        read piece by piece; each piece is hashed in a thread, so only the header block, one
        piece and the hash state are in memory."""
        key = await self._active(domain)
        if key is None:
            return b"", None
        loop = asyncio.get_running_loop()
        executor = self._executor or _pool()
        if body.data is not None:  # in memory (small): one hop does it all
            return await loop.run_in_executor(executor, self._sign_whole, body.data, key), key.selector
        split, h = _HeadSplit(), RelaxedBodyHash()
        async for piece in body.chunks():
            rest = split.feed(piece)
            if rest:
                await loop.run_in_executor(executor, h.update, rest)
        sig = await loop.run_in_executor(executor, signature, bytes(split.head), h.digest(), key)
        return sig, key.selector
