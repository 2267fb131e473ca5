"""AUTH PLAIN / LOGIN (RFC 4616, RFC 4954) decoding and the failed-login budgets.

Decoding is pure. The budgets are bounded in-memory tables keyed by client *network* (IPv4 /32,
IPv6 /64 by default: one host gets a whole /64, so keying on the address gave 2,000 addresses
8,000 guesses) and by username, so that neither a botnet nor a stale app can dodge them or turn
them against other users.

Several nodes (PostgreSQL, issue 17): the same budgets are also counted in the database
(`AuthThrottle(shared=store.shared_auth.PgAuthBudgets)`), so guesses spread over the nodes
share one budget; the in-memory budgets stay the fast path (a local refusal needs no query).
Several acceptance workers on one node (issue 16): the parent's `LocalBudgets` is the shared
budget, asked over each worker's channel (server/workers.py), with the same protocol.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ipaddress
import logging
import time
from collections import deque
from typing import Callable

from .. import replies
from ..config import LimitsConfig
from ..logs import event
from ..replies import Reply
from ..store.contract import StoreUnavailable
from ..store.shared_auth import Begin, Budgets, SharedAuthBudgets

log = logging.getLogger("relay.smtp")

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


# Cached: every connection asks, parsing an address costs more than the rest of the AUTH check,
# and the answer depends on the arguments only. Bounded, so a scan of many addresses cannot grow it.
@functools.lru_cache(maxsize=4096)
def network_of(ip: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The network a client address is grouped in: '192.0.2.7/32', '2001:db8:1:2::/64'.

    An IPv4-mapped IPv6 address (::ffff:192.0.2.7, what a dual-stack socket reports) is IPv4.
    Like Postfix's smtpd_client_ipv6_prefix_length: a site gets a /64, so its hosts share a budget.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = ipv4_prefix if addr.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class _Budget:
    """Failures per key in a sliding window; at `limit` the key is locked for `lockout` seconds
    (lockout 0: no lock, the key is over budget while the window holds `limit` failures).
    Attempts being verified count too (`inflight`), so parallel connections cannot all guess
    while the first failures are still in their delay. Bounded to `max_tracked` keys."""

    def __init__(self, limit: int, window: float, lockout: float, clock: Callable[[], float], max_tracked: int):
        self.limit, self.window, self.lockout = limit, window, lockout
        self._clock = clock
        self._max = max_tracked
        self.fails: dict[str, deque[float]] = {}
        self.locks: dict[str, float] = {}
        self.inflight: dict[str, int] = {}

    def locked(self, key: str) -> bool:
        until = self.locks.get(key)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self.locks[key]
        return False

    def recent(self, key: str) -> int:
        q = self.fails.get(key)
        if q is None:
            return 0
        cutoff = self._clock() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self.fails[key]
            return 0
        return len(q)

    def over(self, key: str) -> bool:
        """Locked, or the window's failures alone use up the budget."""
        return self.locked(key) or self.recent(key) >= self.limit

    def full(self, key: str) -> bool:
        """Failures plus attempts in flight use up the budget."""
        return self.recent(key) + self.inflight.get(key, 0) >= self.limit

    def begin(self, key: str) -> None:
        self.inflight[key] = self.inflight.get(key, 0) + 1

    def end(self, key: str) -> None:
        n = self.inflight.get(key, 0) - 1
        if n <= 0:
            self.inflight.pop(key, None)
        else:
            self.inflight[key] = n

    def failure(self, key: str) -> bool:
        """Record one; True when it locks the key (or, without a lockout, uses up the budget)."""
        now = self._clock()
        q = self.fails.get(key)
        if q is None:
            if len(self.fails) >= self._max:
                self._prune(now)
            q = self.fails[key] = deque()
        q.append(now)
        n = self.recent(key)
        if n < self.limit:
            return False
        if not self.lockout:
            return n == self.limit  # the one that used the budget up, not each one after it
        self.locks[key] = now + self.lockout
        self.fails.pop(key, None)
        return True

    def _prune(self, now: float) -> None:
        for k in [k for k, q in self.fails.items() if not q or q[-1] < now - self.window]:
            del self.fails[k]
        for k in [k for k, t in self.locks.items() if t <= now]:
            del self.locks[k]
        if len(self.fails) >= self._max:  # still full of fresh entries: forget the oldest half
            for k in list(self.fails)[: self._max // 2]:
                del self.fails[k]


# Refusal reasons `AuthThrottle.acquire` returns (also the `scope=` of auth_lockout log lines).
NETWORK, PAIR, USER, BUSY = "network", "network_user", "user", "busy"
# The shared budgets could not be asked (database unreachable): 454 4.7.0, fail closed.
UNAVAILABLE = "unavailable"
SHARED_WAIT = 0.05  # between looks when only other nodes' attempts in flight use a budget up

FAMILIAR_PER_USER = 8          # networks remembered per username (most recent kept)
FAMILIAR_TTL = 30 * 86400.0    # a network is familiar this long after a successful login from it


class AuthThrottle:
    """Three budgets of failed logins, and a bound on password verifications pending.

    - per (network, username), `auth_failures` per `auth_failure_window`, then that pair is locked
      for `auth_lockout`: one app with a stale password locks out itself, not the other
      credentials used from the same office IP;
    - per network across usernames, `auth_failures_per_network`: spraying many usernames from one
      network (a /64 counts as one) locks the network;
    - per username across networks, `auth_failures_per_user` per `auth_user_window`: beyond it the
      username is under attack, and only its *familiar* networks (where it logged in successfully
      before, like the smart lockout of large identity systems) may still try; a botnet of 30
      networks gets that many guesses an hour, the owner keeps working.

    A good login does not clear any count: otherwise anyone holding one credential could guess
    another's password without limit, logging in as themselves every few tries.
    """

    def __init__(self, limits: LimitsConfig, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = 100_000, shared: SharedAuthBudgets | None = None):
        self._clock = clock
        self.shared = shared
        # (task, network, username) -> the shared reservation that attempt holds (see acquire).
        self._attempts: dict[tuple[object, str, str], int] = {}
        self._shared_tasks: set[asyncio.Task] = set()
        self._max = max_tracked
        self.pair = _Budget(0, 0, 0, clock, max_tracked)
        self.net = _Budget(0, 0, 0, clock, max_tracked)
        self.user = _Budget(0, 0, 0, clock, max_tracked)
        self._familiar: dict[str, dict[str, float]] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self.pending = 0
        self.configure(limits)

    def configure(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.lockout = limits.auth_lockout
        self.pair.limit, self.pair.window, self.pair.lockout = (
            limits.auth_failures, limits.auth_failure_window, limits.auth_lockout)
        # The wider budgets are never below the per-pair one: raising auth_failures (or setting
        # it huge to turn lockouts off) must not leave a smaller cap hidden behind it.
        self.net.limit, self.net.window, self.net.lockout = (
            max(limits.auth_failures_per_network, limits.auth_failures), limits.auth_failure_window,
            limits.auth_lockout)
        self.user.limit, self.user.window, self.user.lockout = (
            max(limits.auth_failures_per_user, limits.auth_failures), limits.auth_user_window, 0)
        self.budgets = Budgets(self.pair.limit, self.net.limit, self.user.limit, self.pair.window,
                               self.user.window, self.lockout)

    def network(self, ip: str) -> str:
        return network_of(ip, self.limits.auth_ipv4_prefix, self.limits.auth_ipv6_prefix)

    def network_locked(self, ip: str) -> bool:
        """Cheap check before reading credentials at all."""
        return self.net.locked(self.network(ip))

    def familiar(self, user: str, net: str) -> bool:
        seen = self._familiar.get(user, {}).get(net)
        return seen is not None and seen > self._clock() - FAMILIAR_TTL

    def _refusal(self, net: str, user: str) -> str | None:
        if self.net.locked(net) or self.net.recent(net) >= self.net.limit:
            return NETWORK
        pair = f"{net} {user}"
        if self.pair.locked(pair) or self.pair.recent(pair) >= self.pair.limit:
            return PAIR
        # With shared budgets the username's familiar networks are known there, not here (a
        # success through another node or worker): the shared side decides this one.
        if user and self.shared is None and self.user.over(user) and not self.familiar(user, net):
            return USER
        return None

    def begin(self, ip: str, user: str) -> str | None:
        """Before verifying a login: a refusal reason, or None (then pair it with `end`)."""
        net = self.network(ip)
        refused = self._refusal(net, user)
        if refused is not None:
            return refused
        pair = f"{net} {user}"
        if self.pair.full(pair):
            return PAIR
        if self.net.full(net):
            return NETWORK
        self.pair.begin(pair)
        self.net.begin(net)
        return None

    async def acquire(self, ip: str, user: str, timeout: float = 30.0) -> str | None:
        """Like `begin`, but when only attempts in flight use the budget, wait for one to finish
        instead of refusing: twenty pooled connections of one app logging in at once are not an
        attack, and each waits just for a verification, while guesses still cannot outrun a lockout.

        With shared budgets, the database is asked next (the local budgets saw only this node's
        attempts): a refusal from it, UNAVAILABLE when it cannot be asked (fail closed), or a
        reservation counted on every node until `failure`, `success` or `end`."""
        deadline = time.monotonic() + timeout
        refused = await self._acquire_local(ip, user, deadline)
        if refused is not None or self.shared is None:
            return refused
        net = self.network(ip)
        while True:
            try:
                got = await self.shared.begin(net, user, self.budgets)
            except StoreUnavailable as exc:
                self._end_local(ip, user)
                event(log, "auth_budgets_unavailable", logging.WARNING, client=ip, error=str(exc)[:200])
                return UNAVAILABLE
            except BaseException:
                self._end_local(ip, user)
                raise
            if got.refusal is None:
                assert got.attempt is not None
                self._attempts[(asyncio.current_task(), net, user)] = got.attempt
                return None
            if not got.waiting or time.monotonic() >= deadline:
                self._end_local(ip, user)
                return got.refusal
            try:
                await asyncio.sleep(SHARED_WAIT)  # another node's verification ends within ~0.1 s
            except BaseException:
                self._end_local(ip, user)
                raise

    async def _acquire_local(self, ip: str, user: str, deadline: float) -> str | None:
        net = self.network(ip)
        while True:
            refused = self.begin(ip, user)
            if refused is None:
                return None
            pair = f"{net} {user}"
            waiting_on = self.pair.inflight.get(pair) if refused == PAIR else \
                self.net.inflight.get(net) if refused == NETWORK else 0
            if not waiting_on or self._refusal(net, user) is not None or time.monotonic() >= deadline:
                return refused
            waiter = self._waiters.setdefault(net, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return refused

    def end(self, ip: str, user: str) -> None:
        """After `acquire` returned None: the attempt is over (a shared reservation that no
        `failure` or `success` used is given back)."""
        self._end_local(ip, user)
        if self.shared is not None:
            attempt = self._attempts.pop((asyncio.current_task(), self.network(ip), user), None)
            if attempt is not None:
                self._in_background(self.shared.release(attempt), "release")

    def _in_background(self, coro, what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except StoreUnavailable as exc:
                # The reservation (pending rows) stays counted until it expires: never fewer guesses.
                event(log, "auth_budgets_unavailable", logging.WARNING, step=what, error=str(exc)[:200])
            except Exception:  # noqa: BLE001
                log.exception("shared AUTH budgets: %s failed", what)
        t = asyncio.get_running_loop().create_task(run())
        self._shared_tasks.add(t)
        t.add_done_callback(self._shared_tasks.discard)

    async def settled(self) -> None:
        """Wait for the shared writes started so far (tests; shutdown)."""
        while self._shared_tasks:
            await asyncio.gather(*list(self._shared_tasks), return_exceptions=True)

    def _end_local(self, ip: str, user: str) -> None:
        net = self.network(ip)
        self.pair.end(f"{net} {user}")
        self.net.end(net)
        waiter = self._waiters.pop(net, None)
        if waiter is not None:
            waiter.set()

    def take_pending(self) -> bool:
        """A slot for one password verification (argon2, ~0.1 s of a core each): False beyond
        `auth_pending`, then AUTH is answered 454 at once instead of queueing CPU without bound."""
        if self.pending >= self.limits.auth_pending:
            return False
        self.pending += 1
        return True

    def end_pending(self) -> None:
        self.pending = max(0, self.pending - 1)

    def failure(self, ip: str, user: str) -> list[str]:
        """Record a failed login; the budgets this one used up (to log as lockouts)."""
        net = self.network(ip)
        hit = self._count_failure(net, user)
        if self.shared is not None:
            # The reservation already counts on every node; turning it into a failure (and
            # locking at the limit) need not hold up this reply.
            attempt = self._attempts.pop((asyncio.current_task(), net, user), None)
            self._in_background(self._shared_failure(attempt, ip, net, user, hit), "failure")
        return hit

    def _count_failure(self, net: str, user: str) -> list[str]:
        hit = []
        if self.pair.failure(f"{net} {user}"):
            hit.append(PAIR)
        if self.net.failure(net):
            hit.append(NETWORK)
        if user and self.user.failure(user):
            hit.append(USER)
        return hit

    async def _shared_failure(self, attempt: int | None, ip: str, net: str, user: str, local: list[str]) -> None:
        assert self.shared is not None
        for scope in await self.shared.failure(attempt, net, user, self.budgets):
            if scope not in local:  # used up by guesses on several nodes together
                event(log, "auth_lockout", logging.WARNING, client=ip, scope=scope, network=net, user=user,
                      seconds=self.limits.auth_user_window if scope == USER else self.lockout, shared="yes")

    def success(self, ip: str, user: str) -> None:
        """Remember the network as familiar for this username (most recent FAMILIAR_PER_USER)."""
        net = self.network(ip)
        if self.shared is not None:
            attempt = self._attempts.pop((asyncio.current_task(), net, user), None)
            self._in_background(self.shared.success(attempt, net, user), "success")
        self._remember(user, net)

    def _remember(self, user: str, net: str) -> None:
        nets = self._familiar.get(user)
        if nets is None:
            if len(self._familiar) >= self._max:
                for u in list(self._familiar)[: self._max // 2]:
                    del self._familiar[u]
            nets = self._familiar[user] = {}
        nets.pop(net, None)
        nets[net] = self._clock()
        while len(nets) > FAMILIAR_PER_USER:
            del nets[next(iter(nets))]


class LocalBudgets:
    """The shared AUTH budgets of one node's acceptance workers (issue 16), in the parent's
    memory: `SharedAuthBudgets`'s steps over an AuthThrottle of its own (shared=None), which sees
    every worker's attempts and so is exact, like the PostgreSQL tables are across nodes. The
    workers ask it over their channels (server/workers.py); `owner` is the asking worker, whose
    reservations are given back if it dies mid-verification."""

    def __init__(self, throttle: AuthThrottle):
        self.throttle = throttle
        self._attempts: dict[int, tuple[str, str, object]] = {}
        self._next = 0

    def begin(self, net: str, user: str, owner: object = None) -> Begin:
        t = self.throttle
        refused = t._refusal(net, user)
        if refused is not None:
            return Begin(refused, False, None)
        pair = f"{net} {user}"
        if t.pair.full(pair):
            return Begin(PAIR, True, None)
        if t.net.full(net):
            return Begin(NETWORK, True, None)
        t.pair.begin(pair)
        t.net.begin(net)
        self._next += 1
        self._attempts[self._next] = (net, user, owner)
        return Begin(None, False, self._next)

    def _end(self, attempt: int | None) -> None:
        got = self._attempts.pop(attempt, None) if attempt is not None else None
        if got is not None:
            net, user, _owner = got
            self.throttle.pair.end(f"{net} {user}")
            self.throttle.net.end(net)

    def failure(self, attempt: int | None, net: str, user: str) -> list[str]:
        self._end(attempt)
        return self.throttle._count_failure(net, user)

    def success(self, attempt: int | None, net: str, user: str) -> None:
        self._end(attempt)
        self.throttle._remember(user, net)

    def release(self, attempt: int | None) -> None:
        self._end(attempt)

    def release_owner(self, owner: object) -> int:
        """A worker died: its verifications in flight end (their guesses were never answered)."""
        mine = [a for a, (_n, _u, o) in self._attempts.items() if o is owner]
        for a in mine:
            self._end(a)
        return len(mine)
