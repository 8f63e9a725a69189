"""Keyed state in following mode against a fake log that behaves like Tansu.

Tansu reports a partition's high watermark as its last batch's first offset + 1 and
fetches return whole batches (shared/notes/local-parts.md). The follower must still read
to the true end. The real broker is exercised by tests/test_state_hosts_stack.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from eventing.fn import state as st
from tests.helpers import FakeMessage


class TansuLikeLog:
    """Per partition, a list of batches of (key, value); offsets count records."""

    def __init__(self, partitions: int) -> None:
        self.batches: dict[int, list[list[tuple[bytes, bytes | None]]]] = {
            p: [] for p in range(partitions)}

    def append(self, partition: int, *records: tuple[str, Any]) -> None:
        self.batches[partition].append(
            [(k.encode(), None if v is None else orjson.dumps(v)) for k, v in records])

    def first_offsets(self, partition: int) -> list[int]:
        out, n = [], 0
        for batch in self.batches[partition]:
            out.append(n)
            n += len(batch)
        return out


class FakeConsumer:
    """Each `consume` fetches at most one whole batch per partition past the fetch position,
    as a background fetcher would; the watermark is Tansu's (first offset of the last batch + 1)."""

    def __init__(self, log: TansuLikeLog, positions: dict[int, int]) -> None:
        self.log = log
        self.fetched = dict(positions)  # partition -> next offset to fetch
        self.queue: list[FakeMessage] = []
        self.watermark_queries = 0
        self.stalled: set[int] = set()  # partitions whose fetch hangs until a seek

    def get_watermark_offsets(self, tp: Any, timeout: float = 0, cached: bool = False
                              ) -> tuple[int, int]:
        assert not cached, "a cached watermark may predate the previous event's write"
        self.watermark_queries += 1
        firsts = self.log.first_offsets(tp.partition)
        return 0, (firsts[-1] + 1) if firsts else 0

    def consume(self, num: int, timeout: float = 0) -> list[FakeMessage]:
        for p in self.log.batches:
            if p in self.stalled:
                continue
            offset = 0
            for batch in self.log.batches[p]:
                if offset >= self.fetched[p]:
                    self.queue += [FakeMessage(topic="s", partition=p, offset=offset + i,
                                               key=k, value=v) for i, (k, v) in enumerate(batch)]
                    self.fetched[p] = offset + len(batch)
                    break
                offset += len(batch)
        out, self.queue = self.queue[:num], self.queue[num:]
        return out

    def assign(self, tps: list[Any]) -> None:
        self.fetched = {tp.partition: tp.offset for tp in tps}
        self.log = _only(self.log, set(self.fetched))

    def seek(self, tp: Any) -> None:
        self.stalled.discard(tp.partition)
        self.queue = [m for m in self.queue if m.partition() != tp.partition]
        self.fetched[tp.partition] = tp.offset

    def close(self) -> None:
        pass


def _only(log: TansuLikeLog, partitions: set[int]) -> TansuLikeLog:
    view = TansuLikeLog(0)
    view.batches = {p: b for p, b in log.batches.items() if p in partitions}
    return view


def key_in(partition: int, partitions: int, prefix: str = "card") -> str:
    return next(f"{prefix}-{i}" for i in range(1000)
                if st.partition_for(f"{prefix}-{i}".encode(), partitions) == partition)


@pytest.fixture
def following(monkeypatch) -> tuple[st.KeyedState, TansuLikeLog, FakeConsumer]:
    log = TansuLikeLog(2)
    consumer = FakeConsumer(log, {0: 0, 1: 0})

    def read(self: st.KeyedState, bootstrap: str, timeout: float):
        self._data = {}
        return consumer, {0: 0, 1: 0}

    monkeypatch.setattr(st.KeyedState, "_read_changelog", read)
    store = st.KeyedState("windows", "s", partitions=2)
    store.follow("unused:9092")
    return store, log, consumer


def test_reads_past_tansus_watermark_to_the_end_of_the_last_batch(following) -> None:
    store, log, _ = following
    k = key_in(1, 2)
    log.append(1, (k, [1]))
    log.append(1, (k, [1, 2]), (k, [1, 2, 3]), (key_in(1, 2, "other"), ["x"]))
    # The watermark says 2 (the last batch starts at offset 1); the log ends at 3.
    assert store.get(k) == [1, 2, 3]
    assert store.get(key_in(1, 2, "other")) == ["x"]


def test_each_call_reads_the_partition_once_and_the_next_call_again(following) -> None:
    store, log, consumer = following
    k = key_in(0, 2)
    log.append(0, (k, 1))
    assert store.get(k) == 1 and store.get(k) == 1
    assert consumer.watermark_queries == 1
    store.drain()  # the call ended
    log.append(0, (k, 2))  # another host handled the next event
    assert store.get(k) == 2
    assert consumer.watermark_queries == 2


def test_a_put_is_seen_by_its_call_then_only_through_the_log(following) -> None:
    store, log, _ = following
    k = key_in(0, 2)
    log.append(0, (k, "base"))
    assert store.get(k) == "base"
    store.put(k, "mine")
    assert store.get(k) == "mine"
    [(topic, key, value, _)] = store.drain()
    assert (topic, key, orjson.loads(value)) == ("s", k.encode(), "mine")
    assert store.get(k) == "base"  # not in the log yet: not state yet
    store.drain()
    log.append(0, (k, "mine"))  # acknowledged
    assert store.get(k) == "mine"


def test_a_failed_call_leaves_the_log_value(following) -> None:
    store, log, _ = following
    k = key_in(1, 2)
    log.append(1, (k, 5))
    store.put(k, store.get(k) + 1)
    store.delete(key_in(1, 2, "gone"))
    store.discard_pending()  # the function raised, or its outputs were not acknowledged
    assert store.get(k) == 5
    assert store.drain() == []


def test_tombstones_delete(following) -> None:
    store, log, _ = following
    k = key_in(0, 2)
    log.append(0, (k, 1))
    assert store.get(k) == 1
    store.drain()
    log.append(0, (k, None))
    assert store.get(k, "none") == "none"


def test_a_partition_that_cannot_be_read_to_its_end_fails_the_event(following) -> None:
    store, log, consumer = following
    store._follower.timeout_s = 0.05  # type: ignore[union-attr]
    k = key_in(0, 2)
    log.append(0, (k, 1))
    consumer.consume = lambda num, timeout=0: []  # the broker stops answering fetches
    with pytest.raises(st.StateBehind):
        store.get(k)


def test_a_store_that_does_not_follow_keeps_the_plain_methods() -> None:
    store = st.KeyedState("plain", "t")
    assert "get" not in vars(store) and "put" not in vars(store)
    store.put("a", 1)
    assert store.get("a") == 1 and len(store.drain()) == 1


def test_a_stalled_fetch_is_read_with_a_fresh_consumer(following, monkeypatch) -> None:
    store, log, consumer = following
    monkeypatch.setattr(st, "FRESH_READ_AFTER_S", 0.01)
    store._follower.new_consumer = lambda: FakeConsumer(log, {})  # type: ignore[union-attr]
    k = key_in(0, 2)
    log.append(0, (k, 1))
    assert store.get(k) == 1
    store.drain()
    consumer.stalled.add(0)  # the watermark vouches for a record the fetcher never brings
    log.append(0, (k, 2))
    assert store.get(k) == 2
    assert store._follower.fresh_reads == 1  # type: ignore[union-attr]
    # The follower's late copy of an older record is not applied over the newer value.
    store._follower.apply([FakeMessage(topic="s", partition=0, offset=0,  # type: ignore[union-attr]
                                       key=k.encode(), value=b"1")])
    store.drain()
    assert store.get(k) == 2
