"""Keyed function state that survives restarts and rescaling: a compacted changelog topic.

Design choice (the Kafka Streams one): state lives in memory for speed, and every change
is written to a compacted topic keyed like the state (e.g. by card). The changelog is
the store: real (the broker keeps it, on S3 with the durable stack), shared (any
instance can restore any key), and compacted to one record per key.

Why it stays consistent with at-least-once delivery: the function host drains the
changes made while handling an event, and they reach the changelog on the outputs'
producer before the input's offset is committed. In the in-process dispatcher they reach
it only *after* the outputs of the same events were acknowledged (held by the host,
latest value per key, and produced at the commit: `eventing.delivery.checkpoint` step 3
says why): so the changelog never holds the state of an event whose output could be
lost, and a replayed event either finds its output already written or computes the same
one again from the state it first saw. The HTTP host still produces them with the
event's outputs and answers 2xx once both are acknowledged. Replayed events can still
meet state that includes them (output and state both written, offset not yet
committed): state values should carry what they need to recognise an event already
applied (the fraud scorer keeps recent payment ids), so it is not counted twice.

A function declares a store at import time (through `eventing.fn.api`, the one module
functions import) and uses it like a dict:

    from eventing.fn.api import store

    WINDOWS = store("card-windows", topic="score.state")
    ...
    window = WINDOWS.get(card_id, [])
    WINDOWS.put(card_id, window)

The host restores every store before the first event and again whenever the group
hands it partitions, so keys that move between instances are read fresh.

Several instances for one partition (the HTTP host: a Knative Service spreads one
partition's events over its pods). Restoring at start is then not enough: pod A handles
a card's event 1, pod B its event 2 with B's copy of the card missing event 1. So the
HTTP host runs its stores in *following* mode (`KeyedState.follow`): a consumer stays
assigned to the whole changelog after the restore, and the first `get(K)` of each event
reads K's changelog partition to its end before answering. With ordered delivery per
partition (a KafkaSource's default) event n+1 is sent only after event n's 2xx, and the
host answers 2xx only after the broker acknowledged the state change, so the catch-up
always sees the previous event's state, whichever pod wrote it. In following mode the
log is the only source of `get`: a `put` is visible to the rest of its own call, then
it comes back through the log, so a call whose outputs or state were not acknowledged
leaves nothing behind to diverge from what other pods read.

The end of a partition is found from its high watermark, with Tansu's quirk in mind: it
reports the last batch's *first* offset + 1, and fetches return whole batches. Reading
until that offset has been applied, then taking whatever else is already queued (the
rest of its batch arrived in the same fetch response), reaches the true end; on Apache
Kafka the watermark is exact and the same rule holds. Cost (measured by
`benchmarks/state_follow.py`, README "Measured here"): one ListOffsets round trip per
event plus decoding the changelog records the other pods wrote.

What this does not give: per-key mutual exclusion. Two events of one key in flight at
once (`ordering: unordered`, or a delivery timeout retried on another pod while the
first attempt still runs) can both read the same base and the later write wins, as with
one instance and concurrent requests; ordered delivery is what serialises a key.
The dispatcher's in-process path does not follow: its consumer group gives each
partition to one instance, and a restore on every assignment covers keys that move.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from eventing.kafka import consumer_config, ensure_topics, produce, producer_config

_MARKER = b"__sluice_restore_marker__"
_stores: dict[str, KeyedState] = {}
_lock = threading.Lock()
log = logging.getLogger("sluice.state")

CATCH_UP_TIMEOUT_S = 10.0  # a partition not read to its end by then fails the event (500)
FRESH_READ_AFTER_S = 1.0  # a catch-up waiting this long reads with a fresh consumer


def partition_for(key: bytes, partitions: int) -> int:
    """The changelog partition a key's records land in.

    The producer writes state records without a partition, so librdkafka's default
    partitioner (`consistent_random`: CRC-32 of the key, modulo the partition count)
    places them; this is that function, so a following store reads only the key's
    partition. A record found elsewhere is logged (`_Follower.apply`).
    """
    return zlib.crc32(key) % partitions


class StateBehind(RuntimeError):
    """A changelog partition could not be read to its end in time: the event is retried."""


class KeyedState:
    """In-memory map backed by a compacted changelog topic."""

    def __init__(self, name: str, topic: str, partitions: int = 4) -> None:
        self.name = name
        self.topic = topic
        self.partitions = partitions
        self._data: dict[str, Any] = {}
        self._dirty: dict[str, Any] = {}
        self.restored_keys = 0
        self._follower: _Follower | None = None  # set by `follow`

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._dirty[key] = value

    def delete(self, key: str) -> None:
        self._data.pop(key, None)
        self._dirty[key] = None

    def __len__(self) -> int:
        return len(self._data)

    def drain(self) -> list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]]:
        """Changes since the last drain, as output records for the changelog topic."""
        if not self._dirty:
            return []
        out = [(self.topic, k.encode(), None if v is None else orjson.dumps(v), [])
               for k, v in self._dirty.items()]
        self._dirty.clear()
        return out

    def discard_pending(self) -> None:
        """Forget changes of a failed call; the next restore brings back the truth."""
        self._dirty.clear()

    def restore(self, bootstrap: str, timeout: float = 60.0,
                consumer_overrides: dict[str, Any] | None = None) -> int:
        """Read the whole changelog into memory. Returns the number of keys.

        The end of the log is found by writing a marker and reading until it comes back,
        because a broker's reported high watermark is not always right (Tansu).
        `consumer_overrides` is the broker storage's tuning (`eventing.kafka.client_tuning`):
        on s3 a 10 ms fetch wait reads nothing of a long changelog, and the restore
        would time out.
        """
        consumer, _ = self._read_changelog(bootstrap, timeout, consumer_overrides)
        consumer.close()
        return len(self._data)

    def follow(self, bootstrap: str, timeout: float = 60.0,
               catch_up_timeout_s: float = CATCH_UP_TIMEOUT_S) -> int:
        """Restore, then keep reading: each event's first `get(K)` first reads K's
        changelog partition to its end (see the module docstring). Returns the keys restored.

        For hosts that may share a partition's events with other instances (the HTTP
        host). Swaps this store's methods for the following ones on the instance, so a
        store that never follows (the in-process dispatcher's) runs the plain ones.
        """
        if self._follower is not None and self._follower.pid != os.getpid():
            self._follower = None  # a parent's consumer: its threads did not survive the fork
        self.close()  # following again starts from a fresh read
        consumer, positions = self._read_changelog(bootstrap, timeout)
        self._follower = _Follower(consumer, self.topic, positions, self._apply,
                                   catch_up_timeout_s,
                                   consumer_config(bootstrap, f"state-{uuid.uuid4().hex}"))
        self._synced: set[int] = set()
        self.get = self._get_following  # type: ignore[method-assign]
        self.put = self._put_following  # type: ignore[method-assign]
        self.delete = self._delete_following  # type: ignore[method-assign]
        self.drain = self._drain_following  # type: ignore[method-assign]
        self.discard_pending = self._discard_following  # type: ignore[method-assign]
        return len(self._data)

    def close(self) -> None:
        """Stop following (tests, and hosts that shut down cleanly)."""
        if self._follower is not None:
            self._follower.consumer.close()
            self._follower = None

    # ----------------------------------------------------------- following mode

    def _get_following(self, key: str, default: Any = None) -> Any:
        if key in self._dirty:  # written earlier in this call
            value = self._dirty[key]
            return default if value is None else value
        follower: _Follower = self._follower  # type: ignore[assignment]
        partition = partition_for(key.encode(), follower.partitions)
        if partition not in self._synced:
            follower.catch_up(partition)
            self._synced.add(partition)
        return self._data.get(key, default)

    def _put_following(self, key: str, value: Any) -> None:
        self._dirty[key] = value  # `_data` changes only from the log

    def _delete_following(self, key: str) -> None:
        self._dirty[key] = None

    def _drain_following(self) -> list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]]:
        self._synced.clear()  # the next event reads its partitions to the end again
        return KeyedState.drain(self)

    def _discard_following(self) -> None:
        self._synced.clear()
        self._dirty.clear()

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._data.pop(key, None)
        else:
            self._data[key] = orjson.loads(value)

    # ----------------------------------------------------------- reading the log

    def _read_changelog(self, bootstrap: str, timeout: float,
                        consumer_overrides: dict[str, Any] | None = None,
                        ) -> tuple[Consumer, dict[int, int]]:
        """Read the changelog to its marked end into `_data`; return the consumer (still
        assigned, positioned after the markers) and each partition's next offset."""
        ensure_topics(bootstrap, {self.topic: self.partitions},
                      config={self.topic: {"cleanup.policy": "compact"}})
        marker_id = uuid.uuid4().hex.encode()
        producer = Producer(producer_config(bootstrap))
        consumer = Consumer(consumer_config(bootstrap, f"restore-{uuid.uuid4().hex}",
                                            **(consumer_overrides or {})))
        try:
            parts = consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            for p in parts:  # one marker per partition: each must be read to its end
                produce(producer, self.topic, marker_id, _MARKER, partition=p)
            if producer.flush(timeout) != 0:
                raise TimeoutError(f"state {self.name}: changelog not writable")
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            data: dict[str, Any] = {}
            positions = dict.fromkeys(parts, 0)
            pending = set(parts)
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for msg in consumer.consume(5000, 0.2):
                    if msg.error():
                        continue
                    positions[msg.partition()] = msg.offset() + 1
                    key = msg.key()
                    if key == _MARKER:
                        if msg.value() == marker_id:
                            pending.discard(msg.partition())
                        continue
                    if key is None:
                        continue
                    value = msg.value()
                    if value is None:
                        data.pop(key.decode(), None)
                    else:
                        data[key.decode()] = orjson.loads(value)
            if pending:
                raise TimeoutError(f"state {self.name}: restore did not reach the end of "
                                   f"{self.topic} within {timeout:.0f}s")
            # A tombstone per marker key keeps compaction from holding markers forever.
            for p in parts:
                produce(producer, self.topic, None, _MARKER, partition=p)
            producer.flush(timeout)
        except BaseException:
            consumer.close()
            raise
        self._data = data
        self._dirty.clear()
        self.restored_keys = len(data)
        return consumer, positions


class _Follower:
    """A consumer assigned to every partition of a changelog, read to the end on demand.

    librdkafka keeps fetching assigned partitions in the background, so a catch-up
    usually finds the records already queued and only pays the watermark query.
    """

    def __init__(self, consumer: Consumer, topic: str, positions: dict[int, int],
                 apply: Callable[[str, bytes | None], None], timeout_s: float,
                 fresh_config: dict[str, Any]) -> None:
        self.consumer = consumer
        self.pid = os.getpid()
        self.topic = topic
        self.partitions = len(positions)
        self.next = positions  # partition -> offset after the last record applied
        self._apply = apply
        self.timeout_s = timeout_s
        self.fresh_config = fresh_config
        self.catch_ups = 0
        self.fresh_reads = 0
        self.records = 0  # changelog records applied after the restore
        self._misplaced_logged = False

    def catch_up(self, partition: int) -> None:
        """Apply every record of `partition` the broker holds now.

        The watermark names an offset the log has reached (Tansu: the first offset of the
        last batch); once it is applied, the rest of its batch is already queued (a fetch
        returns whole batches), so taking what is queued finishes the read.
        """
        self.catch_ups += 1
        _, high = self.consumer.get_watermark_offsets(
            TopicPartition(self.topic, partition), timeout=self.timeout_s, cached=False)
        target = high - 1
        start = time.monotonic()
        deadline = start + self.timeout_s
        fresh_at = start + FRESH_READ_AFTER_S
        while self.next[partition] <= target:
            now = time.monotonic()
            if now >= deadline:
                raise StateBehind(
                    f"state changelog {self.topic}[{partition}] not read to offset {target} "
                    f"within {self.timeout_s:.0f}s (at {self.next[partition]})")
            if now >= fresh_at:
                # Seen on Tansu under load: the follower's fetch did not bring a record the
                # watermark vouches for, for 10 s and through seeks, while a fresh consumer
                # read it in ~50 ms. So a slow catch-up reads the tail with a fresh consumer.
                self.fresh_reads += 1
                log.warning("state changelog %s[%d]: offset %d not fetched after %.1fs; "
                            "reading it with a fresh consumer", self.topic, partition,
                            self.next[partition], now - start)
                self._read_fresh(partition, target, deadline)
                fresh_at = time.monotonic() + FRESH_READ_AFTER_S
                continue
            self.apply(self.consumer.consume(1000, min(deadline - now, 0.05)))
        while True:
            batch = self.consumer.consume(1000, 0)
            self.apply(batch)
            if len(batch) < 1000:
                return

    def new_consumer(self) -> Any:
        """A consumer of its own for `_read_fresh` (assign only, no group, no commits)."""
        return Consumer(self.fresh_config)

    def _read_fresh(self, partition: int, target: int, deadline: float) -> None:
        """Read `partition` from the follower's position to `target` (and the rest of its
        batch) with a consumer of its own, then move the follower past it."""
        consumer = self.new_consumer()
        try:
            consumer.assign([TopicPartition(self.topic, partition, self.next[partition])])
            while self.next[partition] <= target and time.monotonic() < deadline:
                self.apply(consumer.consume(1000, 0.05))
            while True:
                batch = consumer.consume(1000, 0)
                self.apply(batch)
                if len(batch) < 1000:
                    break
        finally:
            consumer.close()
        self.consumer.seek(TopicPartition(self.topic, partition, self.next[partition]))

    def apply(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if msg.error():
                continue
            partition = msg.partition()
            if msg.offset() < self.next[partition]:
                continue  # already applied (a fresh read went ahead of the follower)
            self.next[partition] = msg.offset() + 1
            key = msg.key()
            if key is None or key == _MARKER:
                continue
            if partition_for(key, self.partitions) != partition and not self._misplaced_logged:
                self._misplaced_logged = True
                log.warning("state changelog %s: key %r found in partition %d, not %d: a "
                            "producer with another partitioner wrote it; following hosts "
                            "may read stale state for such keys", self.topic, key, partition,
                            partition_for(key, self.partitions))
            self._apply(key.decode(), msg.value())
            self.records += 1


def store(name: str, topic: str, partitions: int = 4) -> KeyedState:
    """The process-wide store `name` (created on first use, from the function module)."""
    with _lock:
        existing = _stores.get(name)
        if existing is None:
            existing = _stores[name] = KeyedState(name, topic, partitions)
        return existing


def stores() -> list[KeyedState]:
    return list(_stores.values())
