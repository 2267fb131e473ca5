"""relay.memory: freed memory goes back to the system only after enough large-message traffic,
and not while the process is in the middle of it."""
from __future__ import annotations

import asyncio

import pytest

from relay import memory


def test_small_traffic_never_trims():
    t = memory.Trimmer(threshold=1000)
    t.note(999)
    assert asyncio.run(t.trim_if_due()) is False and t.trims == 0


def test_busy_waits_and_the_count_is_kept_for_later():
    t = memory.Trimmer(threshold=1000)
    t.note(5000)
    assert asyncio.run(t.trim_if_due(busy=True)) is False
    if not t.available:
        pytest.skip("this C library has no malloc_trim")
    assert asyncio.run(t.trim_if_due()) is True and t.trims == 1
    # The count starts again: the next trim needs as much traffic again.
    assert asyncio.run(t.trim_if_due()) is False and t.trims == 1


@pytest.mark.skipif(not memory.Trimmer().available, reason="this C library has no malloc_trim")
def test_the_periodic_task_trims_once_traffic_went_by_and_stops_when_cancelled():
    async def scenario() -> int:
        t = memory.Trimmer(threshold=10, interval=0.01)
        busy = [True]
        task = asyncio.create_task(t.run(lambda: busy[0]))
        t.note(100)
        await asyncio.sleep(0.05)
        assert t.trims == 0  # busy all along
        busy[0] = False
        for _ in range(200):
            if t.trims:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return t.trims

    assert asyncio.run(scenario()) == 1
