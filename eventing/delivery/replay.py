"""Replay: deliver a topic's records of a time range to a function again.

The records written to `topic` in [since, until) go through the function's own
dispatcher (`eventing.delivery.runner.build`: same invoker, retries, backoff, dead
letters, outputs acknowledged before offsets are committed) under a replay consumer
group of its own, `<consumerGroup>-replay-<time>`. The function's live group is not
touched, so the running pipeline neither skips nor repeats anything because of a replay.

Duplicates are the point, and they are ordinary: a replayed event produces its outputs
again, with the same derived ids (`<input id>/<function>/<n>` for returned dicts), so
consumers that dedupe on the CloudEvent `id` (the lake sink, the real-time table) keep
each row once; keyed state (`store`) sees the events a second time.

Partitions are assigned directly at the offsets the broker's time index gives for
`since`, and records are then chosen by their own time: Tansu's index answers the first
offset whatever the time (measured), so it is only where reading starts. Records older
than `since` are skipped; a partition is done at its first record at or after `until`
(record times follow the order records were written in), or, once read to the reported
end, when nothing new came for `idle_s` (the reported end can be short on Tansu).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from eventing.delivery.dispatcher import Dispatcher, Stats
from eventing.topology import Function


@dataclass
class Bound:
    start: int
    end: int | None  # first offset NOT to deliver; None: up to the log's end
    high: int        # the end the broker reported when the replay started
    done: bool = False


class BoundedConsumer:
    """A consumer that hands out only the records of the replay range (others paused)."""

    def __init__(self, consumer: Consumer, bounds: dict[tuple[str, int], Bound],
                 since_ms: int, until_ms: int | None) -> None:
        self._consumer = consumer
        self.bounds = bounds
        self.since_ms = since_ms
        self.until_ms = until_ms
        self.last_record = time.monotonic()
        self.delivered = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        out = []
        for msg in self._consumer.consume(num_messages, timeout):
            if msg.error():
                out.append(msg)
                continue
            where = (msg.topic(), msg.partition())
            bound = self.bounds.get(where)
            if bound is None or bound.done:
                continue
            self.last_record = time.monotonic()
            ts_type, ts = msg.timestamp()
            past = (bound.end is not None and msg.offset() >= bound.end) or (
                self.until_ms is not None and ts_type and ts >= self.until_ms)
            if past:
                self._finish(where, bound)
                continue
            if ts_type and ts < self.since_ms:
                continue
            if bound.end is None and msg.offset() >= bound.high - 1:
                bound.high = msg.offset() + 1
            out.append(msg)
            self.delivered += 1
        return out

    def _finish(self, where: tuple[str, int], bound: Bound) -> None:
        bound.done = True
        self._consumer.pause([TopicPartition(*where)])

    def exhausted(self, idle_s: float) -> bool:
        """True once every partition's range was handed out."""
        idle = time.monotonic() - self.last_record >= idle_s
        for where, bound in self.bounds.items():
            if bound.done:
                continue
            if bound.start >= (bound.end if bound.end is not None else bound.high) or idle:
                self._finish(where, bound)
        return all(b.done for b in self.bounds.values())


def replay(function: Function, topic: str, build: Callable[..., Dispatcher], *,
           bootstrap: str, since_ms: int, until_ms: int | None = None,
           stop: threading.Event | None = None, idle_s: float = 2.0,
           timeout_s: float = 600.0) -> tuple[str, Stats, int]:
    """Replay `topic`'s records of [since_ms, until_ms) through `function`'s delivery.

    `build(function, consumer_overrides=...)` makes the dispatcher (the runner's). Returns
    (replay group, the dispatcher's stats, records handed out).
    """
    if topic not in function.topics:
        raise ValueError(f"function {function.name!r} does not consume {topic!r} "
                         f"(its topics: {', '.join(function.topics)})")
    group = f"{function.consumer_group}-replay-{int(time.time())}"
    dispatcher = build(function, consumer_overrides={"group.id": group})
    real: Consumer = dispatcher.consumer
    meta = real.list_topics(topic, timeout=10).topics[topic]
    parts = sorted(meta.partitions)
    starts = real.offsets_for_times([TopicPartition(topic, p, since_ms) for p in parts], 10)
    bounds: dict[tuple[str, int], Bound] = {}
    assign = []
    for p, start_tp in zip(parts, starts, strict=True):
        low, high = real.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        start = start_tp.offset if start_tp.offset >= 0 else high
        bounds[(topic, p)] = Bound(max(start, low), None, high)
        assign.append(TopicPartition(topic, p, max(start, low)))
    bounded = BoundedConsumer(real, bounds, since_ms, until_ms)
    dispatcher.consumer = bounded  # type: ignore[assignment]
    if dispatcher._on_assign_hook is not None:
        dispatcher._on_assign_hook()  # keyed state restored before the first event
    real.assign(assign)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            dispatcher.step()
            if bounded.exhausted(idle_s) and not any(
                    lane.queue for lane in dispatcher.lanes.values()):
                break
    finally:
        dispatcher.consumer = real
        dispatcher.close()
    return group, dispatcher.stats, bounded.delivered
