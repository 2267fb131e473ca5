"""order_mx: ascending preference, random order among equal preferences, each host once (RFC 5321 5.1)."""
from __future__ import annotations

import random
from collections import Counter

from relay.delivery.mx import MXHost, order_mx


def mx(*pairs):
    return [MXHost(p, n) for p, n in pairs]


def test_preference_order_not_answer_order():
    records = mx((30, "c.example"), (10, "a.example"), (20, "b.example"))
    assert order_mx(records, random.Random(1)) == ["a.example", "b.example", "c.example"]


def test_single_and_empty():
    assert order_mx(mx((0, "only.example"))) == ["only.example"]
    assert order_mx([]) == []


def test_equal_preferences_are_shuffled_reproducibly_and_stay_in_their_band():
    records = mx((20, "backup.example"), (10, "a.example"), (10, "b.example"), (10, "c.example"))
    first = order_mx(records, random.Random(7))
    assert first == order_mx(records, random.Random(7))  # the seed decides
    assert sorted(first[:3]) == ["a.example", "b.example", "c.example"] and first[3] == "backup.example"
    # Over many seeds every equal host leads sometimes: load spreads across them.
    leaders = Counter(order_mx(records, random.Random(seed))[0] for seed in range(300))
    assert set(leaders) == {"a.example", "b.example", "c.example"}
    assert min(leaders.values()) > 50


def test_duplicates_are_tried_once_at_their_best_preference():
    records = mx((20, "a.example"), (10, "b.example"), (10, "a.example"), (10, "b.example"), (30, "c.example"))
    for seed in range(20):
        out = order_mx(records, random.Random(seed))
        assert sorted(out[:2]) == ["a.example", "b.example"] and out[2:] == ["c.example"]
        assert len(out) == len(set(out))


def test_input_is_not_modified():
    records = mx((10, "b.example"), (10, "a.example"))
    before = list(records)
    order_mx(records, random.Random(3))
    assert records == before
