"""Broker retention on s3 storage (`eventing.stack.retention`): what is trimmed and what
must never be, on a real Tansu over a real SeaweedFS, plus the rules on plain data."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from eventing import topology as topo
from eventing.fn.state import KeyedState
from eventing.kafka import consumer_config, ensure_topics, producer_config
from eventing.stack import retention as ret
from eventing.stack.settings import StackSettings, load_settings
from tests.helpers import free_port_offset, sluice

ROOT = Path(__file__).resolve().parent.parent


def _b(base: int, mtime: float = 0.0) -> ret.Batch:
    return ret.Batch(base, mtime, 10, f"t/{base}")


# ------------------------------------------------------------------- rules, no broker


def test_trimmable_takes_whole_batches_below_the_position_and_keeps_the_last() -> None:
    batches = [_b(0), _b(5), _b(10), _b(12)]
    # position 10: batches [0,5) and [5,10) are consumed; [10,12) is not
    assert [b.base for b in ret.trimmable(batches, 10, older_than=1.0)] == [0, 5]
    # position 9: [5,10) still holds record 9
    assert [b.base for b in ret.trimmable(batches, 9, older_than=1.0)] == [0]
    # everything consumed: the last batch stays (its end is unknown)
    assert [b.base for b in ret.trimmable(batches, 100, older_than=1.0)] == [0, 5, 10]


def test_trimmable_keeps_batches_younger_than_the_window_and_everything_after() -> None:
    batches = [_b(0, 10.0), _b(1, 50.0), _b(2, 20.0), _b(3, 30.0)]
    # the second batch is too young: the log stays contiguous from it on
    assert [b.base for b in ret.trimmable(batches, 100, older_than=40.0)] == [0]


def test_superseded_batches_hold_no_latest_record_of_any_key() -> None:
    batches = [_b(0), _b(2), _b(4), _b(6)]
    keys = {0: b"a", 1: b"b", 2: b"a", 3: None, 4: b"b", 5: b"c", 6: b"a"}
    # latest: a@6 (last batch), b@4, c@5 -> [4,6) holds latest ones; [0,2) and [2,4) don't
    assert [b.base for b in ret.superseded(batches, keys)] == [0, 2]
    # a batch none of whose records was read is unknown, so it stays
    assert [b.base for b in ret.superseded(batches, {4: b"x", 5: b"y", 6: b"x"})] == []


def test_policies_follow_the_example_topology() -> None:
    pol = ret.policies(topo.load(ROOT / "functions" / "topology.yaml"),
                       ret.RetentionSettings(min_age_s=120))
    assert pol["_schemas"].kind == "keep"
    assert pol["score.state"].kind == "compact"
    assert pol["sluice.deadletter.redriven"].kind == "compact"
    assert pol["payments.raw"] == ret.TopicPolicy("payments.raw", "delete",
                                                  frozenset({"sluice-validate"}), 120)
    scored = pol["payments.scored"]
    assert scored.groups == {"sluice-lake-payments_scored"}
    assert scored.keep_s == 3600  # the real-time table re-reads its hour on restart
    assert pol["sluice.deadletter"].groups == frozenset()


class _Positions:
    def __init__(self, committed: dict[str, dict[tuple[str, int], int]]) -> None:
        self._committed = committed

    def committed(self, group: str) -> dict[tuple[str, int], int]:
        return self._committed.get(group, {})


class _Store:
    def __init__(self, parts: dict[int, list[ret.Batch]]) -> None:
        self.parts = parts
        self.deleted: list[ret.Batch] = []

    def partitions(self, topic: str) -> dict[int, list[ret.Batch]]:
        return self.parts

    def delete(self, batches: list[ret.Batch]) -> None:
        self.deleted += batches


def test_a_reader_without_a_commit_holds_the_whole_partition() -> None:
    store = _Store({0: [_b(0), _b(1), _b(2)], 1: [_b(0), _b(1), _b(2)]})
    pol = {"t": ret.TopicPolicy("t", "delete", frozenset({"a", "b"}))}
    positions = _Positions({"a": {("t", 0): 3, ("t", 1): 3}, "b": {("t", 0): 1}})
    r = ret.Retention(store, positions, pol, ret.RetentionSettings(), clock=lambda: 1e9)
    done = r.run_once()
    # partition 0: min(3, 1) = 1 -> batch 0 only; partition 1: b never committed -> none
    assert done.objects == {"t": 1} and store.deleted == [store.parts[0][0]]


# ------------------------------------------------------------------- real broker on s3


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackSettings]:
    """Object store + Tansu on s3 storage (+ registry ...), no pipeline: an own stack."""
    state = tmp_path_factory.mktemp("retention") / "state"
    offset = free_port_offset(start=21000, step=100)
    try:
        sluice("up", "--storage", "s3", "--no-pipeline", state_dir=state, offset=offset,
               timeout=300)
        yield load_settings(state_dir=state, port_offset=offset).with_saved()
    finally:
        sluice("down", "--purge", state_dir=state, offset=offset, check=False)


def _produce_one_batch_each(bootstrap: str, topic: str, records: list[tuple[bytes, bytes | None]]
                            ) -> None:
    """One flush per record: Tansu writes one batch object per produce request."""
    producer = Producer(producer_config(bootstrap))
    for key, value in records:
        producer.produce(topic, key=key, value=value)
        assert producer.flush(30) == 0


def _commit(bootstrap: str, group: str, topic: str, offset: int) -> None:
    consumer = Consumer(consumer_config(bootstrap, group))
    try:
        consumer.assign([TopicPartition(topic, 0, offset)])
        consumer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    finally:
        consumer.close()


def _read_all(bootstrap: str, group: str, topic: str, until: int, timeout: float = 40.0
              ) -> list[int]:
    """Offsets a group member reads from its committed position (or the earliest)."""
    consumer = Consumer(consumer_config(bootstrap, group))
    got: list[int] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while (not got or got[-1] < until) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if not msg.error():
                    got.append(msg.offset())
    finally:
        consumer.close()
    return got


@pytest.mark.stack
def test_consumed_batches_go_and_a_lagging_group_loses_nothing(s3_stack: StackSettings) -> None:
    bootstrap = s3_stack.bootstrap
    topic = f"ret-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: 1})
    _produce_one_batch_each(bootstrap, topic, [(b"k", f"v{i}".encode()) for i in range(30)])
    done, lagging = f"done-{topic}", f"lag-{topic}"
    _commit(bootstrap, done, topic, 30)
    _commit(bootstrap, lagging, topic, 10)

    retention = ret.build(s3_stack, topo.load(ROOT / "functions" / "topology.yaml"),
                          ret.RetentionSettings(min_age_s=0))
    retention.policy = {topic: ret.TopicPolicy(topic, "delete", frozenset({done, lagging}))}
    trimmed = retention.run_once()
    left = retention.store.partitions(topic)[0]
    assert trimmed.objects == {topic: 10}          # offsets 0..9: below both groups
    assert [b.base for b in left] == list(range(10, 30))

    # the lagging group reads every record it had not consumed, in order, none missing
    assert _read_all(bootstrap, lagging, topic, until=29) == list(range(10, 30))
    # a new group starts at the first batch kept
    assert _read_all(bootstrap, f"new-{topic}", topic, until=29) == list(range(10, 30))

    _commit(bootstrap, lagging, topic, 30)
    assert retention.run_once().objects == {topic: 19}   # the last batch stays
    assert [b.base for b in retention.store.partitions(topic)[0]] == [29]


@pytest.mark.stack
def test_changelog_restores_the_same_state_after_compaction(s3_stack: StackSettings) -> None:
    bootstrap = s3_stack.bootstrap
    topic = f"ret-state-{uuid.uuid4().hex[:8]}"
    before = KeyedState("ret-before", topic, partitions=1)
    before.restore(bootstrap)  # creates the topic (and writes its markers)
    records: list[tuple[bytes, bytes | None]] = []
    for version in range(4):
        for card in range(5):
            records.append((f"card-{card}".encode(), f'{{"v": {version}}}'.encode()))
    records.append((b"card-3", None))                        # a deleted key
    _produce_one_batch_each(bootstrap, topic, records)
    assert before.restore(bootstrap) == 4
    expected = dict(before._data)

    retention = ret.build(s3_stack, topo.load(ROOT / "functions" / "topology.yaml"),
                          ret.RetentionSettings())
    retention.policy = {topic: ret.TopicPolicy(topic, "compact")}
    objects_before = len(retention.store.partitions(topic)[0])
    trimmed = retention.run_once().objects.get(topic, 0)
    # versions 0-2 of every card, card-3's v3 (superseded by its tombstone), old markers
    assert trimmed >= 16
    assert len(retention.store.partitions(topic)[0]) == objects_before - trimmed

    after = KeyedState("ret-after", topic, partitions=1)
    assert after.restore(bootstrap) == 4
    assert after._data == expected == {f"card-{c}": {"v": 3} for c in (0, 1, 2, 4)}
