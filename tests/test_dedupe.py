"""Dropping replayed events by CloudEvent id: the bounded set and its restore from a topic."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from eventing.serde import AvroSerde
from eventing.tables.dedupe import RecentIds, restore
from tests.helpers import unique
from tests.pipeline import produce_payments, register, setup_topics


def test_a_key_seen_within_the_window_is_a_duplicate_after_it_is_not() -> None:
    ids = RecentIds(window_ms=1_000)
    assert not ids.seen(0, "s a", 10_000)
    assert ids.seen(0, "s a", 10_500)
    assert not ids.seen(1, "s a", 10_500)  # another partition is another key space
    assert not ids.seen(0, "s b", 11_001)  # newest is now 11,001: "s a" (10,000) expired
    assert not ids.seen(0, "s a", 11_002)
    assert len(ids) == 3  # p0: b, a; p1: a


def test_the_count_is_capped_oldest_first_and_forget_drops_partitions() -> None:
    ids = RecentIds(window_ms=10**9, max_ids=100)
    for i in range(250):
        ids.seen(i % 2, f"k{i}", i)
    assert len(ids) == 100
    assert ids.seen(1, "k249", 249) and not ids.seen(0, "k0", 250)
    ids.forget([0])
    assert len(ids) == 50 and not ids.seen(0, "k248", 251)


@pytest.mark.stack
def test_restore_reads_back_the_window_before_the_last_offset(stack) -> None:
    topic = unique("dedupe-test-") + ".scored"
    setup_topics(stack.bootstrap, {topic: 1})
    register(stack.registry_url, topic, "payments.raw.avsc")
    serde = AvroSerde(stack.registry_url)
    old = [{"payment_id": f"old-{i}", "card_id": "c", "merchant_id": "m", "amount": 1.0,
            "currency": "EUR", "country": "DE", "event_time": 0} for i in range(50)]
    produce_payments(stack.bootstrap, serde, topic, old)
    time.sleep(1.5)  # the window (1 s) ends before these
    new = [dict(p, payment_id=f"new-{i}") for i, p in enumerate(old)]
    produce_payments(stack.bootstrap, serde, topic, new)
    recent = RecentIds(window_ms=1_000)
    # The table holds offsets 0..89: new-0 .. new-39 are in the window, new-40.. are not
    # in the table yet, the old ones are older than the window.
    added = restore(recent, stack.bootstrap, topic, {0: 89})
    assert added == 40
    seen = Counter(recent.seen(0, f"/tests {p['payment_id']}", 0)
                   for p in old + new)
    assert seen == {True: 40, False: 60}
