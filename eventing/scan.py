"""Read a topic's records for a person or a tool: from a time, to the end, or following.

What `sluice tail`, `sluice deadletters` and `sluice replay` read through. Partitions are
assigned directly (no consumer group: a group join costs seconds on Tansu and would
commit nothing anyway), and each record comes back as a `Seen`: the consumed message and
its CloudEvent (`eventing.cloudevent.kafka.from_record`, non-CloudEvents wrapped as a
KafkaSource wraps them) with `data` decoded by the one rule (`eventing.serde.decode_data`).

"The end" is found without trusting the reported high watermark alone (Tansu can report
the first offset of the last batch + 1, see the broker notes): a partition counts as read
when its reported end was reached AND nothing new arrived for `idle_s`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from eventing.cloudevent import kafka as ce_kafka
from eventing.kafka import consumer_config
from eventing.serde import SerdeError, decode_data


@dataclass
class Seen:
    """One record as read: where it was, its event, and its data decoded (or the reason not)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    message: Any  # the confluent_kafka Message: value and headers as written
    event: Any    # CloudEvent, data left as bytes
    data: Any
    decode_error: str | None = None

    def attributes(self) -> dict[str, Any]:
        return dict(self.event._get_attributes())


def partitions(consumer: Consumer, topics: Sequence[str], timeout: float = 10.0
               ) -> list[TopicPartition]:
    """Every partition of `topics`; a missing topic is a `LookupError` naming it."""
    found: list[TopicPartition] = []
    meta = consumer.list_topics(timeout=timeout).topics
    for topic in topics:
        if topic not in meta or meta[topic].error is not None:
            known = ", ".join(sorted(t for t in meta if not t.startswith("__"))) or "none"
            raise LookupError(f"topic {topic!r} does not exist (topics: {known})")
        found += [TopicPartition(topic, p) for p in sorted(meta[topic].partitions)]
    return found


def read(bootstrap: str, topics: Sequence[str], *, since_ms: int | None = None,
         until_ms: int | None = None, from_beginning: bool = True, follow: bool = False,
         serde: Any = None, stop: threading.Event | None = None, idle_s: float = 1.0,
         timeout_s: float | None = None,
         on_ready: Callable[[], None] | None = None, raw: bool = False) -> Iterator[Any]:
    """Records of `topics` in arrival order per partition.

    Starts at `since_ms` (record time: the broker's time index gives where to start
    reading, records before `since_ms` are then skipped, since Tansu's index answers the
    first offset whatever the time), else the beginning
    (or, with `from_beginning=False`, the end: only new records). Without `follow` it
    stops once every partition was read to its end (see the module docstring); records
    after `until_ms` are skipped. With `follow` it runs until `stop` is set or
    `timeout_s` passes. `on_ready()` is called once the start offsets are fixed: a
    record produced after it is read (the end is taken as offsets now, not resolved
    lazily at the first fetch). With `raw`, the consumed messages themselves come back
    (key, value, headers as written; nothing decoded: a broker rollover copies them).
    """
    consumer = Consumer(consumer_config(bootstrap, f"sluice-scan-{uuid.uuid4().hex}"))
    try:
        assigned = partitions(consumer, topics)
        if since_ms is not None:
            wanted = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in assigned]
            assigned = consumer.offsets_for_times(wanted, timeout=10)
            # -1: no record at or after since_ms in that partition: start at its end.
            assigned = [tp if tp.offset >= 0 else
                        TopicPartition(tp.topic, tp.partition, OFFSET_END) for tp in assigned]
        else:
            start = OFFSET_BEGINNING if from_beginning else OFFSET_END
            assigned = [TopicPartition(tp.topic, tp.partition, start) for tp in assigned]
        ends = {}
        fixed = []
        for tp in assigned:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=10)
            start = tp.offset if tp.offset >= 0 else (low if tp.offset == OFFSET_BEGINNING
                                                      else high)
            ends[(tp.topic, tp.partition)] = (max(start, low), high)
            fixed.append(TopicPartition(tp.topic, tp.partition, max(start, low)))
        consumer.assign(fixed)
        if on_ready is not None:
            on_ready()
        yield from _consume(consumer, ends, since_ms, until_ms, follow, serde, stop, idle_s,
                            timeout_s, raw)
    finally:
        consumer.close()


def _consume(consumer: Consumer, ends: dict[tuple[str, int], tuple[int, int]],
             since_ms: int | None, until_ms: int | None, follow: bool, serde: Any,
             stop: threading.Event | None, idle_s: float, timeout_s: float | None,
             raw: bool = False) -> Iterator[Any]:
    pending = {k for k, (start, high) in ends.items() if high > start}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_record = time.monotonic()
    while True:
        now = time.monotonic()
        if stop is not None and stop.is_set():
            return
        if deadline is not None and now > deadline:
            return
        if not follow and not pending and now - last_record >= idle_s:
            return
        try:
            batch = consumer.consume(500, 0.1)
        except KafkaException:
            continue
        for msg in batch:
            if msg.error():
                continue
            last_record = time.monotonic()
            where = (msg.topic(), msg.partition())
            if where in pending and msg.offset() >= ends[where][1] - 1:
                pending.discard(where)
            ts_type, ts = msg.timestamp()
            ts = ts if ts_type else None
            if ts is not None and ((until_ms is not None and ts > until_ms)
                                   or (since_ms is not None and ts < since_ms)):
                continue  # the broker's time index is a lower bound (Tansu: offset 0)
            yield msg if raw else decode(msg, serde)


def ends(bootstrap: str, topics: Sequence[str], idle_s: float = 0.5,
         timeout_s: float = 30.0) -> dict[tuple[str, int], int]:
    """The true next offset of every partition of `topics` (0 for an empty one).

    Tansu may report the first offset of the last batch + 1 as the high watermark, and a
    fetch returns whole batches: reading from the reported end - 1 to the end (the rule
    of the module docstring) yields the last batch, whose last offset + 1 is the end.
    """
    consumer = Consumer(consumer_config(bootstrap, f"sluice-ends-{uuid.uuid4().hex}"))
    out: dict[tuple[str, int], int] = {}
    try:
        fixed, bounds = [], {}
        for tp in partitions(consumer, topics):
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            out[(tp.topic, tp.partition)] = max(high, 0)
            if high > low:
                start = max(low, high - 1)
                fixed.append(TopicPartition(tp.topic, tp.partition, start))
                bounds[(tp.topic, tp.partition)] = (start, high)
        if fixed:
            consumer.assign(fixed)
            for msg in _consume(consumer, bounds, None, None, False, None, None, idle_s,
                                timeout_s, True):
                where = (msg.topic(), msg.partition())
                out[where] = max(out[where], msg.offset() + 1)
    finally:
        consumer.close()
    return out


def decode(msg: Any, serde: Any) -> Seen:
    """A consumed message as a `Seen`: its CloudEvent and decoded data."""
    ts_type, ts = msg.timestamp()
    event = ce_kafka.from_record(
        msg.key(), msg.value(), msg.headers(), topic=msg.topic(), partition=msg.partition(),
        offset=msg.offset(), timestamp_ms=ts if ts_type else None, wrap_invalid=True,
        validate=False)
    data, problem = event.data, None
    try:
        data = decode_data(event._get_attributes().get("datacontenttype"), event.data, serde)
    except (SerdeError, LookupError) as exc:
        problem = str(exc)
    return Seen(msg.topic(), msg.partition(), msg.offset(), ts if ts_type else None,
                msg.key(), msg, event, data, problem)
