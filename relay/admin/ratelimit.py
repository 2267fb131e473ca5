"""The login rate limit, in memory (one process serves the admin): failures counted per client
IP and per username within admin.login_failure_window; past admin.login_failures either key is
locked for admin.login_lockout seconds. Both keys, because an attacker rotating addresses still
hits the username's budget, and one spraying names still hits the address's. Bounded: at most
MAX_KEYS entries, the oldest dropped first."""
from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque

MAX_KEYS = 10_000


class LoginLimiter:
    def __init__(self, failures: int, window: float, lockout: float, clock=time.monotonic):
        self.failures, self.window, self.lockout = failures, window, lockout
        self._clock = clock
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked: dict[str, float] = {}

    def configure(self, failures: int, window: float, lockout: float) -> None:
        self.failures, self.window, self.lockout = failures, window, lockout

    @staticmethod
    def keys(ip: str, username: str) -> tuple[str, str]:
        # IPv6 by /64, like the SMTP side's limits.auth_ipv6_prefix default: one host gets a
        # whole /64, and must not get 2^64 budgets. The username folded: "Admin" is "admin".
        # ::ffff:a.b.c.d (a dual-stack proxy's X-Forwarded-For) is that IPv4 address: as an IPv6
        # /64 every IPv4 client would share the one key ::/64.
        try:
            addr = ipaddress.ip_address(ip)
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            net = ipaddress.ip_network(f"{addr}/64", strict=False) if addr.version == 6 else addr
        except ValueError:
            net = ip
        return f"ip:{net}", f"user:{username.lower()[:64]}"

    def locked(self, ip: str, username: str) -> float:
        """Seconds until a login from `ip` as `username` may be tried again (0: now)."""
        now = self._clock()
        wait = 0.0
        for k in self.keys(ip, username):
            until = self._locked.get(k)
            if until is not None:
                if until <= now:
                    del self._locked[k]
                else:
                    wait = max(wait, until - now)
        return wait

    def failed(self, ip: str, username: str) -> bool:
        """Count a failure; True when it locked a key."""
        now = self._clock()
        locked = False
        for k in self.keys(ip, username):
            q = self._fails.pop(k, None) or deque()
            q.append(now)
            while q and q[0] <= now - self.window:
                q.popleft()
            while len(q) > self.failures:
                q.popleft()
            self._fails[k] = q
            if len(q) >= self.failures:
                self._locked[k] = now + self.lockout
                q.clear()
                locked = True
        while len(self._fails) > MAX_KEYS:
            self._fails.popitem(last=False)
        if len(self._locked) > MAX_KEYS:
            for k in [k for k, t in self._locked.items() if t <= now]:
                del self._locked[k]
        return locked

    def succeeded(self, ip: str, username: str) -> None:
        """A good password clears that username's and address's failure counts (not a lock)."""
        for k in self.keys(ip, username):
            self._fails.pop(k, None)
