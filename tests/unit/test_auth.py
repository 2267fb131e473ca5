"""server.auth: strict base64, AUTH PLAIN decoding, network grouping and the failed-login budgets (injected clock)."""
from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings, strategies as st

from relay import replies
from relay.config import LimitsConfig
from relay.server.auth import NETWORK, PAIR, USER, AuthThrottle, b64, decode_plain, network_of


@pytest.mark.parametrize("text,expected", [
    (b"AGFwcABwdw==", b"\0app\0pw"),
    (b"  AGFwcABwdw==\r\n", b"\0app\0pw"),
    (b"=", b""),
    (b"", b""),
    (b"AGFwcABwdw", replies.AUTH_BAD_BASE64),       # padding missing
    (b"AGFw cABwdw==", replies.AUTH_BAD_BASE64),    # embedded space
    (b"AGFw*ABwdw==", replies.AUTH_BAD_BASE64),
    (b"AGFwcABwdw==AA", replies.AUTH_BAD_BASE64),   # data after padding
    ("é".encode(), replies.AUTH_BAD_BASE64),
    (b"*", replies.AUTH_BAD_BASE64),
])
def test_b64(text, expected):
    assert b64(text) == expected


@pytest.mark.parametrize("blob,expected", [
    (b"\0app@mg.example.com\0secret", (b"app@mg.example.com", b"secret")),
    (b"app@mg.example.com\0app@mg.example.com\0secret", (b"app@mg.example.com", b"secret")),
    (b"APP@MG.example.com\0app@mg.example.com\0secret", (b"app@mg.example.com", b"secret")),
    (b"\0app@mg.example.com\0", (b"app@mg.example.com", b"")),
    (b"boss@mg.example.com\0app@mg.example.com\0secret", replies.AUTH_INVALID),  # acting for someone else
    (b"app@mg.example.com\0secret", replies.AUTH_INVALID),
    (b"\0\0app@mg.example.com\0secret", replies.AUTH_INVALID),
    (b"\0app@mg.example.com\0secret\0", replies.AUTH_INVALID),
    (b"\0\0secret", replies.AUTH_INVALID),
    (b"", replies.AUTH_INVALID),
])
def test_decode_plain(blob, expected):
    assert decode_plain(blob) == expected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_b64_and_decode_plain_never_raise(data):
    assert isinstance(b64(data), (bytes, replies.Reply))
    got = decode_plain(data)
    assert got == replies.AUTH_INVALID or (isinstance(got, tuple) and len(got) == 2 and got[0])


@given(st.binary(max_size=200))
def test_b64_round_trip(data):
    assert b64(base64.b64encode(data)) == data


# ---------------------------------------------------------------- lockout

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def throttle(clock=None, max_tracked: int = 100_000, **limits) -> AuthThrottle:
    base = dict(auth_failures=3, auth_failure_window=60, auth_lockout=100, auth_failures_per_network=10,
                auth_failures_per_user=6, auth_user_window=3600)
    return AuthThrottle(LimitsConfig(**{**base, **limits}), clock=clock or Clock(), max_tracked=max_tracked)


def fail(th: AuthThrottle, ip: str, user: str) -> list[str]:
    """One verified-and-wrong attempt, as the session runs it: begin, failure, end."""
    assert th.begin(ip, user) is None
    try:
        return th.failure(ip, user)
    finally:
        th.end(ip, user)


@pytest.mark.parametrize("ip, v4, v6, net", [
    ("192.0.2.77", 32, 64, "192.0.2.77/32"),
    ("192.0.2.77", 24, 64, "192.0.2.0/24"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 32, 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", 32, 48, "2001:db8:1::/48"),
    ("2001:db8:1:2::1", 32, 128, "2001:db8:1:2::1/128"),
    ("::ffff:192.0.2.9", 32, 64, "192.0.2.9/32"),   # dual-stack socket: still IPv4
    ("unknown", 32, 64, "unknown"),
])
def test_network_grouping(ip, v4, v6, net):
    assert network_of(ip, v4, v6) == net


def test_lockout_after_n_failures_in_window_then_expires():
    clock = Clock()
    th = throttle(clock)
    assert fail(th, "192.0.2.1", "u") == []
    assert fail(th, "192.0.2.1", "u") == []
    assert fail(th, "192.0.2.1", "u") == [PAIR]       # the third one locks (network, user)
    assert th.begin("192.0.2.1", "u") == PAIR
    assert th.begin("192.0.2.2", "u") is None         # per network
    th.end("192.0.2.2", "u")
    clock.t += 99
    assert th.begin("192.0.2.1", "u") == PAIR
    clock.t += 2
    assert th.begin("192.0.2.1", "u") is None
    th.end("192.0.2.1", "u")
    assert fail(th, "192.0.2.1", "u") == []           # counting starts afresh


def test_a_stale_app_does_not_lock_out_other_credentials_on_its_address():
    th = throttle()
    for _ in range(3):
        fail(th, "198.51.100.5", "stale@example.com")
    for _ in range(20):                               # it keeps retrying: refused, never verified
        assert th.begin("198.51.100.5", "stale@example.com") == PAIR
    for other in ("a@example.com", "b@example.com", "c@example.com"):
        assert th.begin("198.51.100.5", other) is None
        th.end("198.51.100.5", other)


def test_a_slash_64_gets_no_more_guesses_than_one_address():
    th = throttle()
    verified = 0
    for i in range(2000):
        ip = f"2001:db8:0:1::{i:x}"
        user = f"user{i % 50}@example.com"
        if th.begin(ip, user) is None:
            th.failure(ip, user)
            th.end(ip, user)
            verified += 1
    assert verified == 10                             # auth_failures_per_network
    assert th.begin("2001:db8:0:1:ffff::1", "fresh@example.com") == NETWORK
    assert th.network_locked("2001:db8:0:1::abcd")
    assert not th.network_locked("2001:db8:0:2::1")   # the next /64 is another network


def test_one_username_from_many_networks_is_capped_and_familiar_networks_keep_working():
    clock = Clock()
    th = throttle(clock)
    th.success("203.0.113.10", "ceo@example.com")    # the owner's usual network
    verified = 0
    for i in range(30):                               # 30 networks, 3 guesses each
        for _ in range(3):
            if th.begin(f"10.{i}.0.1", "ceo@example.com") is None:
                th.failure(f"10.{i}.0.1", "ceo@example.com")
                th.end(f"10.{i}.0.1", "ceo@example.com")
                verified += 1
    assert verified == 6                              # auth_failures_per_user per auth_user_window
    assert th.begin("10.99.0.1", "ceo@example.com") == USER
    assert th.begin("203.0.113.10", "ceo@example.com") is None   # familiar: still tries
    th.end("203.0.113.10", "ceo@example.com")
    assert th.begin("10.99.0.1", "other@example.com") is None    # other usernames unaffected
    th.end("10.99.0.1", "other@example.com")
    clock.t += 3601                                   # the window moves on
    assert th.begin("10.99.0.1", "ceo@example.com") is None


def test_failures_outside_the_window_do_not_count():
    clock = Clock()
    th = throttle(clock)
    fail(th, "ip", "u")
    fail(th, "ip", "u")
    clock.t += 61
    assert fail(th, "ip", "u") == []
    assert fail(th, "ip", "u") == []
    assert fail(th, "ip", "u") == [PAIR]


def test_attempts_in_flight_use_the_budget():
    th = throttle()
    fail(th, "ip", "u")
    assert th.begin("ip", "u") is None and th.begin("ip", "u") is None
    assert th.begin("ip", "u") == PAIR                # 1 failure + 2 being verified = 3
    assert th.begin("other", "u") is None
    th.end("ip", "u")                                 # one of them succeeded
    assert th.begin("ip", "u") is None
    th.end("ip", "u")
    th.end("ip", "u")
    th.end("other", "u")
    assert th.pair.inflight == {} and th.net.inflight == {}


def test_pending_verifications_are_bounded():
    th = throttle(auth_pending=2)
    assert th.take_pending() and th.take_pending()
    assert not th.take_pending()
    th.end_pending()
    assert th.take_pending()


def test_configure_applies_new_limits():
    th = throttle(auth_failures=5)
    th.configure(LimitsConfig(auth_failures=1, auth_lockout=10))
    assert fail(th, "ip", "u") == [PAIR]
    assert th.begin("ip", "u") == PAIR


def test_tables_are_bounded():
    clock = Clock()
    th = throttle(clock, max_tracked=100)
    for i in range(1000):
        fail(th, f"10.0.{i // 256}.{i % 256}", f"u{i}")
        th.success(f"10.1.{i // 256}.{i % 256}", f"u{i}")
    assert len(th.pair.fails) <= 100 and len(th.net.fails) <= 100 and len(th.user.fails) <= 100
    assert len(th._familiar) <= 100
    fail(th, "victim", "u")
    fail(th, "victim", "u")
    assert fail(th, "victim", "u") == [PAIR]


async def test_acquire_waits_for_attempts_in_flight_instead_of_refusing():
    import asyncio
    th = throttle(auth_failures=2, auth_lockout=600)
    assert await th.acquire("ip", "u") is None and await th.acquire("ip", "u") is None
    third = asyncio.create_task(th.acquire("ip", "u"))
    await asyncio.sleep(0.05)
    assert not third.done()          # budget used by attempts in flight: wait, do not refuse
    th.end("ip", "u")                # a success finishes
    assert await asyncio.wait_for(third, 1) is None
    th.failure("ip", "u")
    th.end("ip", "u")
    th.failure("ip", "u")            # second failure in the window: locked
    th.end("ip", "u")
    assert await th.acquire("ip", "u") == PAIR


@pytest.mark.parametrize("login, key", [
    (b"App@MG.Example.com", "app@mg.example.com"),
    (" app@bücher.example".encode(), "app@xn--bcher-kva.example"),   # one username, one budget
    (b"app@xn--bcher-kva.example", "app@xn--bcher-kva.example"),
    (b"Not A Username", "not a username"),
    (b"\xff\xfe", "\ufffd\ufffd"),
])
def test_failures_are_counted_under_the_credentials_normal_form(login, key):
    from relay.server.session import budget_username
    assert budget_username(login) == key
