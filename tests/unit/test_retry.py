"""The runner's pure decisions: the retry schedule and RFC 3461 NOTIFY handling."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from relay.queue_runner import notify_allows, retry_delay

SCHEDULE = (60, 300, 900, 3600)


@pytest.mark.parametrize("attempts, delay", [
    (1, 60), (2, 300), (3, 900), (4, 3600),
    (5, 3600), (50, 3600),   # the last step repeats
    (0, 60), (-3, 60),       # nonsense counts clamp to the first step
])
def test_retry_delay_follows_the_schedule(attempts, delay):
    assert retry_delay(attempts, SCHEDULE) == delay


def test_single_step_schedule_repeats():
    assert [retry_delay(n, (5,)) for n in range(1, 5)] == [5, 5, 5, 5]


@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=8), st.integers(-5, 100))
def test_retry_delay_is_always_a_step_of_the_schedule(schedule, attempts):
    d = retry_delay(attempts, tuple(schedule))
    assert d in schedule
    if attempts >= len(schedule):
        assert d == schedule[-1]


@pytest.mark.parametrize("notify, what, allowed", [
    (None, "FAILURE", True), (None, "DELAY", True), (None, "SUCCESS", False),   # RFC 3461 4.1 default
    ("NEVER", "FAILURE", False), ("NEVER", "DELAY", False), ("NEVER", "SUCCESS", False),
    ("SUCCESS", "SUCCESS", True), ("SUCCESS", "FAILURE", False), ("SUCCESS", "DELAY", False),
    ("FAILURE", "FAILURE", True), ("FAILURE", "DELAY", False),
    ("SUCCESS,FAILURE,DELAY", "DELAY", True), ("FAILURE,DELAY", "SUCCESS", False),
    ("success,failure", "FAILURE", True),  # keywords are case-insensitive
])
def test_notify_allows(notify, what, allowed):
    assert notify_allows(notify, what) is allowed
