"""server.auth: strict base64, AUTH PLAIN decoding, and the per-IP lockout (with an injected clock)."""
from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings, strategies as st

from relay import replies
from relay.server.auth import AuthThrottle, b64, decode_plain


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


def test_lockout_after_n_failures_in_window_then_expires():
    clock = Clock()
    th = AuthThrottle(failures=3, window=60, lockout=100, clock=clock)
    assert not th.failure("192.0.2.1")
    assert not th.failure("192.0.2.1")
    assert not th.locked("192.0.2.1")
    assert th.failure("192.0.2.1")          # the third one locks
    assert th.locked("192.0.2.1")
    assert not th.locked("192.0.2.2")       # per address
    clock.t += 99
    assert th.locked("192.0.2.1")
    clock.t += 2
    assert not th.locked("192.0.2.1")
    assert not th.failure("192.0.2.1")      # counting starts afresh


def test_failures_outside_the_window_do_not_count():
    clock = Clock()
    th = AuthThrottle(failures=3, window=60, lockout=100, clock=clock)
    th.failure("ip")
    th.failure("ip")
    clock.t += 61
    assert not th.failure("ip")
    assert not th.failure("ip")
    assert th.failure("ip")


def test_attempts_in_flight_use_the_budget():
    th = AuthThrottle(failures=3, window=60, lockout=100, clock=Clock())
    th.failure("ip")
    assert th.begin("ip") and th.begin("ip")
    assert not th.begin("ip")               # 1 failure + 2 being verified = 3
    assert th.begin("other")
    th.end("ip")                            # one of them succeeded
    assert th.begin("ip")
    th.end("ip")
    th.end("ip")
    th.end("other")
    assert th._inflight == {}


def test_begin_refuses_when_locked_and_window_frees_budget():
    clock = Clock()
    th = AuthThrottle(failures=2, window=60, lockout=10, clock=clock)
    th.failure("ip")
    assert th.failure("ip")
    assert not th.begin("ip")
    clock.t += 11
    assert th.begin("ip")
    th.end("ip")
    th.failure("ip")
    assert th.begin("ip")                   # 1 failure + 0 in flight < 2
    th.end("ip")
    clock.t += 61
    assert th.begin("ip") and th.begin("ip")  # the old failure left the window


def test_configure_applies_new_limits():
    th = AuthThrottle(failures=5, window=60, lockout=100, clock=Clock())
    th.configure(1, 60, 10)
    assert th.failure("ip") and th.locked("ip")


def test_table_is_bounded():
    clock = Clock()
    th = AuthThrottle(failures=3, window=60, lockout=100, clock=clock, max_tracked=100)
    for i in range(1000):
        th.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(th._fails) <= 100
    th.failure("victim")
    th.failure("victim")
    assert th.failure("victim") and th.locked("victim")


async def test_acquire_waits_for_attempts_in_flight_instead_of_refusing():
    import asyncio
    th = AuthThrottle(failures=2, window=60, lockout=600)
    assert await th.acquire("ip") and await th.acquire("ip")
    third = asyncio.create_task(th.acquire("ip"))
    await asyncio.sleep(0.05)
    assert not third.done()          # budget used by attempts in flight: wait, do not refuse
    th.end("ip")                     # a success finishes
    assert await asyncio.wait_for(third, 1)
    th.failure("ip")
    th.end("ip")
    th.failure("ip")                 # second failure in the window: locked
    th.end("ip")
    assert not await th.acquire("ip")
