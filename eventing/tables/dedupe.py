"""Drop replayed events by CloudEvent id, with bounded memory: the ids written recently.

Why offsets are not enough: the lake sink never writes one *record* twice (the table's
offsets decide), but an upstream function that crashed replays from its last commit and
produces *new records* for events it had already handled (at-least-once). Those carry
the same CloudEvent `source` + `id` (the fraud scorer uses the payment id), so the sink
recognises them by that pair, which CloudEvents defines as unique.

The bound. A replay is produced when the crashed producer runs again, so its Kafka
timestamp (produce time) is at most "time to restart and reprocess" after the original's.
`RecentIds` keeps, per partition, the ids whose Kafka timestamp is within `window_ms` of
the newest one seen there (default 5 minutes; a supervised function is back within
seconds), and at most `max_ids` ids in all (~150 bytes each: 1M ids ≈ 150 MB), oldest
dropped first. A duplicate produced later than that (a function left dead for longer
than the window) is written again: say so where it matters, or widen the window.
Per partition is enough: a replay has the original's key, so it lands in the same
partition (as long as the partition count does not change, which Tansu cannot do anyway).

After a restart the set is rebuilt by `restore`: it reads the topic back from
`window_ms` before the last record the table holds, up to that record. That is the same
set of ids as the table's recent rows (the rows are those records minus the duplicates
already dropped), but the topic has the CloudEvent ids and produce times, which the
table's columns do not.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka

log = logging.getLogger("sluice.dedupe")

DEFAULT_WINDOW_MS = 5 * 60_000
DEFAULT_MAX_IDS = 1_000_000


DEFAULT_KEY: tuple[str, ...] = ("source", "id")


def event_key(msg: Any, attributes: Sequence[str] = DEFAULT_KEY) -> str | None:
    """`source id` (or the table's declared `attributes`) of a consumed record that is a
    CloudEvent (binary or structured mode); None for anything else (its offset is its
    only identity)."""
    headers = msg.headers()
    if not headers:
        return None
    try:
        event = ce_kafka.from_record(
            msg.key(), msg.value(), headers, topic=msg.topic(), partition=msg.partition(),
            offset=msg.offset(), timestamp_ms=None, validate=False)
    except ce_event.BindingError:
        return None
    return key_of(event, attributes)


def key_of(event: Any, attributes: Sequence[str] = DEFAULT_KEY) -> str | None:
    """`event_key` of an already decoded event (None for a wrapped non-CloudEvent).

    A table may declare another key (topology `dedupe.key`: CloudEvent attributes); a
    missing attribute is an empty part, so events lacking it still compare."""
    if event["type"] == ce_event.NON_CLOUDEVENT_TYPE:
        return None
    if attributes == DEFAULT_KEY:
        return f"{event['source']} {event['id']}"
    return " ".join(str(event.get(a) or "") for a in attributes)


def record_time_ms(msg: Any) -> int:
    """The record's Kafka timestamp, or now when the broker gave none."""
    kind, ts = msg.timestamp()
    return ts if ts and ts > 0 else int(time.time() * 1000)


class RecentIds:
    """Event keys seen recently, per partition, bounded by Kafka time and by count."""

    def __init__(self, window_ms: int = DEFAULT_WINDOW_MS,
                 max_ids: int = DEFAULT_MAX_IDS) -> None:
        self.window_ms = window_ms
        self.max_ids = max_ids
        self._ids: dict[int, OrderedDict[str, int]] = {}
        self._newest: dict[int, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def seen(self, partition: int, key: str, ts_ms: int) -> bool:
        """True if `key` was added to `partition` within the window; else add it."""
        ids = self._ids.get(partition)
        if ids is None:
            ids = self._ids[partition] = OrderedDict()
        if key in ids:
            return True
        self._add(partition, ids, key, ts_ms)
        return False

    def add(self, partition: int, key: str, ts_ms: int) -> None:
        ids = self._ids.get(partition)
        if ids is None:
            ids = self._ids[partition] = OrderedDict()
        if key not in ids:
            self._add(partition, ids, key, ts_ms)

    def _add(self, partition: int, ids: OrderedDict[str, int], key: str, ts_ms: int) -> None:
        ids[key] = ts_ms
        self._count += 1
        newest = max(ts_ms, self._newest.get(partition, ts_ms))
        self._newest[partition] = newest
        horizon = newest - self.window_ms
        # Records of a partition come in offset order, timestamps (nearly) rising: the
        # oldest entries are at the front.
        while ids and next(iter(ids.values())) < horizon:
            ids.popitem(last=False)
            self._count -= 1
        if self._count > self.max_ids:
            victim = max(self._ids.values(), key=len)
            while self._count > self.max_ids and victim:
                victim.popitem(last=False)
                self._count -= 1

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the partitions' ids (revoked: another instance owns them now)."""
        for p in partitions:
            self._count -= len(self._ids.pop(p, ()))
            self._newest.pop(p, None)


def restore(recent: RecentIds, bootstrap: str, topic: str, last: dict[int, int], *,
            key_of: Callable[[Any], str | None] = event_key, timeout_s: float = 60.0,
            consumer_overrides: dict[str, Any] | None = None) -> int:
    """Add the keys of `topic`'s records in `(last_ts - window, last]` per partition,
    where `last` is the last offset the table holds. Returns the keys added.

    `consumer_overrides`: the broker storage's tuning (`eventing.kafka.client_tuning`), as
    the sink's own consumer has it: on s3 storage a fetch wait shorter than Tansu's
    listing of the partition answers no records at all (README "Broker storage").

    Best effort: on a timeout it logs and keeps what it read (offsets still prevent
    duplicate records; only replays of events written just before the restart could
    slip through).
    """
    from confluent_kafka import Consumer, TopicPartition

    from eventing.kafka import consumer_config

    wanted = {p: o for p, o in last.items() if o >= 0}
    if not wanted or recent.window_ms <= 0:
        return 0
    consumer = Consumer(consumer_config(bootstrap, f"sluice-dedupe-restore-{uuid.uuid4().hex}",
                                        **(consumer_overrides or {})))
    deadline = time.monotonic() + timeout_s
    added = 0
    try:
        # 1. the produce time of the last record in the table, per partition
        consumer.assign([TopicPartition(topic, p, o) for p, o in wanted.items()])
        last_ts: dict[int, int] = {}
        while len(last_ts) < len(wanted) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if not msg.error() and msg.partition() not in last_ts:
                    last_ts[msg.partition()] = record_time_ms(msg)
        # 2. where the window starts: the first record at or after last_ts - window
        asks = [TopicPartition(topic, p, ts - recent.window_ms) for p, ts in last_ts.items()]
        starts = {}
        if asks:
            for tp in consumer.offsets_for_times(asks, timeout=10):
                fallback = max(0, wanted[tp.partition] - recent.max_ids)
                ok = tp.error is None and 0 <= tp.offset <= wanted[tp.partition]
                starts[tp.partition] = tp.offset if ok else fallback
        # 3. read the window up to the table's last record
        consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        pending = set(starts)
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.2):
                if msg.error():
                    continue
                p, o = msg.partition(), msg.offset()
                if p not in pending:
                    continue
                if o > wanted[p]:
                    pending.discard(p)
                    continue
                key = key_of(msg)
                if key is not None:
                    recent.add(p, key, record_time_ms(msg))
                    added += 1
                if o == wanted[p]:
                    pending.discard(p)
        if pending or len(last_ts) < len(wanted):
            log.warning("dedupe restore of %s timed out after %.0fs (partitions %s); "
                        "continuing with %d ids", topic, timeout_s,
                        sorted(pending | (set(wanted) - set(last_ts))), added)
    finally:
        consumer.close()
    log.info("dedupe: restored %d recent event ids of %s (window %.0fs)", added, topic,
             recent.window_ms / 1000)
    return added
