"""AUTH PLAIN / LOGIN (RFC 4616, RFC 4954) decoding and the per-IP failed-login lockout.

Decoding is pure; the lockout is a small in-memory table per client address with bounded size.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import deque
from typing import Callable

from .. import replies
from ..replies import Reply

MAX_RESPONSE = 12288  # RFC 4954 4: AUTH response line limit


def b64(text: bytes) -> bytes | Reply:
    """Strict base64 (RFC 4954 4: '=' alone is an empty initial response)."""
    text = text.strip()
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return replies.AUTH_BAD_BASE64


def decode_plain(blob: bytes) -> tuple[bytes, bytes] | Reply:
    """`authzid NUL authcid NUL passwd` -> (authcid, passwd).

    An authzid naming someone else would let one credential act for another: refused (535)
    unless it is empty or the authcid itself.
    """
    parts = blob.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        return replies.AUTH_INVALID
    authz, authc, password = parts
    if authz and authz.lower() != authc.lower():
        return replies.AUTH_INVALID
    return authc, password


class AuthThrottle:
    """Counts failed logins per client IP in a sliding window and locks the IP out for a cool-down.

    A good login does not clear the count: otherwise anyone holding one credential could guess
    another's password without limit, logging in as themselves every few tries. Attempts being
    verified count against the budget (`begin`/`end`), so parallel connections cannot all guess
    while the first failures are still in their delay.
    """

    def __init__(self, failures: int, window: float, lockout: float, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = 100_000):
        self.failures = failures
        self.window = window
        self.lockout = lockout
        self._clock = clock
        self._max = max_tracked
        self._fails: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}
        self._inflight: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def configure(self, failures: int, window: float, lockout: float) -> None:
        self.failures, self.window, self.lockout = failures, window, lockout

    def locked(self, ip: str) -> bool:
        until = self._locked.get(ip)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._locked[ip]
        return False

    def _recent(self, ip: str, now: float) -> int:
        q = self._fails.get(ip)
        if q is None:
            return 0
        while q and q[0] < now - self.window:
            q.popleft()
        return len(q)

    def begin(self, ip: str) -> bool:
        """Before verifying a login: False (answer 454) when locked, or when the failures in the window
        plus the attempts already being verified use up the budget. Pair a True with `end`."""
        if self.locked(ip):
            return False
        if self._recent(ip, self._clock()) + self._inflight.get(ip, 0) >= self.failures:
            return False
        self._inflight[ip] = self._inflight.get(ip, 0) + 1
        return True

    async def acquire(self, ip: str, timeout: float = 30.0) -> bool:
        """Like `begin`, but when only attempts in flight use the budget, wait for one to finish
        instead of refusing: twenty pooled connections of one app logging in at once are not an
        attack, and each waits just for a verification, while guesses still cannot outrun a lockout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.begin(ip):
                return True
            if self.locked(ip) or not self._inflight.get(ip) or time.monotonic() >= deadline:
                return False
            waiter = self._waiters.setdefault(ip, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return False

    def end(self, ip: str) -> None:
        n = self._inflight.get(ip, 0) - 1
        if n <= 0:
            self._inflight.pop(ip, None)
        else:
            self._inflight[ip] = n
        waiter = self._waiters.pop(ip, None)
        if waiter is not None:
            waiter.set()

    def failure(self, ip: str) -> bool:
        """Record a failure; True when this one triggers a lockout."""
        now = self._clock()
        q = self._fails.get(ip)
        if q is None:
            if len(self._fails) >= self._max:
                self._prune(now)
            q = self._fails[ip] = deque()
        q.append(now)
        if self._recent(ip, now) >= self.failures:
            self._locked[ip] = now + self.lockout
            del self._fails[ip]
            return True
        return False

    def _prune(self, now: float) -> None:
        for ip in [ip for ip, q in self._fails.items() if not q or q[-1] < now - self.window]:
            del self._fails[ip]
        for ip in [ip for ip, t in self._locked.items() if t <= now]:
            del self._locked[ip]
        if len(self._fails) >= self._max:  # still full of fresh entries: forget the oldest half
            for ip in list(self._fails)[: self._max // 2]:
                del self._fails[ip]
