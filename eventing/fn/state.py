"""Keyed function state that survives restarts and rescaling: a compacted changelog topic.

Design choice (the Kafka Streams one): state lives in memory for speed, and every change
is written to a compacted topic keyed like the state (e.g. by card). The changelog is
the store: real (the broker keeps it, on S3 with the durable stack), shared (any
instance can restore any key), and compacted to one record per key.

Why it stays consistent with at-least-once delivery: the function host drains the
changes made while handling an event and produces them with that event's outputs, on the
same producer, so the dispatcher's "flush, then commit" rule (see `eventing.delivery.checkpoint`)
covers state too. After a crash, replayed events meet state that may already include
them: state values should carry what they need to recognise an event already applied
(the fraud scorer keeps recent payment ids), which makes replays harmless.

A function declares a store at import time (through `eventing.fn.api`, the one module
functions import) and uses it like a dict:

    from eventing.fn.api import store

    WINDOWS = store("card-windows", topic="score.state")
    ...
    window = WINDOWS.get(card_id, [])
    WINDOWS.put(card_id, window)

The host restores every store before the first event and again whenever the group
hands it partitions, so keys that move between instances are read fresh.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from eventing.kafka import consumer_config, ensure_topics, produce, producer_config

_MARKER = b"__sluice_restore_marker__"
_stores: dict[str, KeyedState] = {}
_lock = threading.Lock()


class KeyedState:
    """In-memory map backed by a compacted changelog topic."""

    def __init__(self, name: str, topic: str, partitions: int = 4) -> None:
        self.name = name
        self.topic = topic
        self.partitions = partitions
        self._data: dict[str, Any] = {}
        self._dirty: dict[str, Any] = {}
        self.restored_keys = 0

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

    def restore(self, bootstrap: str, timeout: float = 60.0) -> int:
        """Read the whole changelog into memory. Returns the number of keys.

        The end of the log is found by writing a marker and reading until it comes back,
        because a broker's reported high watermark is not always right (Tansu).
        """
        ensure_topics(bootstrap, {self.topic: self.partitions},
                      config={self.topic: {"cleanup.policy": "compact"}})
        marker_id = uuid.uuid4().hex.encode()
        producer = Producer(producer_config(bootstrap))
        consumer = Consumer(consumer_config(bootstrap, f"restore-{uuid.uuid4().hex}"))
        try:
            parts = consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            for p in parts:  # one marker per partition: each must be read to its end
                produce(producer, self.topic, marker_id, _MARKER, partition=p)
            if producer.flush(timeout) != 0:
                raise TimeoutError(f"state {self.name}: changelog not writable")
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            data: dict[str, Any] = {}
            pending = set(parts)
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for msg in consumer.consume(5000, 0.2):
                    if msg.error():
                        continue
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
        finally:
            consumer.close()
        self._data = data
        self._dirty.clear()
        self.restored_keys = len(data)
        return len(data)


def store(name: str, topic: str, partitions: int = 4) -> KeyedState:
    """The process-wide store `name` (created on first use, from the function module)."""
    with _lock:
        existing = _stores.get(name)
        if existing is None:
            existing = _stores[name] = KeyedState(name, topic, partitions)
        return existing


def stores() -> list[KeyedState]:
    return list(_stores.values())
