"""Sluice's local KafkaSource: consume, deliver through an invoker, retry, dead-letter.

It obeys the same delivery spec a Knative KafkaSource does (see `eventing.topology`):
per-partition order under `ordered` (a failing record holds back its partition, not the
others), bounded concurrency under `unordered`, `retry` retries with exponential or
linear backoff, then the original record goes to the dead-letter topic with the
`knativeerrordest`, `knativeerrorcode` and `knativeerrordata` extensions, in its own
content mode (`eventing.cloudevent.kafka.to_dead_letter`). Offsets are committed as
`eventing.delivery.checkpoint` says: only after outputs are durable.

Work is done per batch, not per record (one consume call, one produce loop, one flush,
one commit), because per-record framework cost is what separates a stream processor
from the raw client floor.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from eventing.cloudevent import kafka as ce_kafka
from eventing.delivery.checkpoint import Checkpoint, DeliveryFailed
from eventing.delivery.invoke import Failure, Invoker, record_event
from eventing.kafka import STREAM_PRODUCER, consumer_config, produce, producer_config
from eventing.telemetry import tracing
from eventing.topology import Function

log = logging.getLogger("sluice.dispatcher")
COMMIT_INTERVAL_S = 0.05  # flush-then-commit at most this often (more = more replay)
BATCH_WAIT_S = 0.025  # longest a batch may gather when nothing is waiting


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 5000)


class Histogram:
    """Bucket counts for Prometheus, observed per lane and batch, not per record."""

    __slots__ = ("bounds", "counts", "sum", "count", "exemplars")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0
        # Per bucket, the latest (labels, value, unix time) of a traced observation: an
        # OpenMetrics exemplar, so a slow bucket in Prometheus leads to a trace.
        self.exemplars: list[tuple[dict[str, str], float, float] | None] = \
            [None] * (len(bounds) + 1)

    def observe(self, value: float, weight: int = 1,
                exemplar: dict[str, str] | None = None) -> None:
        i = bisect.bisect_left(self.bounds, value)
        self.counts[i] += weight
        self.sum += value * weight
        self.count += weight
        if exemplar is not None:
            self.exemplars[i] = (exemplar, value, time.time())


@dataclass
class Stats:
    consumed: int = 0
    succeeded: int = 0
    failed_attempts: int = 0
    retries: int = 0
    dead_lettered: int = 0
    commits: int = 0
    batches: int = 0
    topic_resets: int = 0
    started_at: float = field(default_factory=time.time)
    # Record timestamp -> done, per lane per batch (weighted by the lane's records).
    delivery_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))


@dataclass
class Lane:
    """Records of one partition not yet done, in offset order, with retry bookkeeping."""

    queue: deque[Message] = field(default_factory=deque)
    attempts: dict[int, int] = field(default_factory=dict)
    due: dict[int, float] = field(default_factory=dict)
    paused: bool = False


class Dispatcher:
    """Runs one function's subscription until stopped."""

    def __init__(self, function: Function, bootstrap: str,
                 invoker_factory: Callable[[Producer], Invoker], *, max_backlog: int = 10_000,
                 consumer_overrides: dict | None = None,
                 producer_overrides: dict | None = None,
                 on_assign: Callable[[], None] | None = None,
                 subscribe_first: bool = False) -> None:
        self.function = function
        self.delivery = function.delivery
        self.ordered = function.delivery.ordering == "ordered"
        # One producer for outputs and dead letters. Only failed deliveries call back, so
        # the hot path pays nothing per record for knowing whether outputs are durable;
        # except when tracing, where a dead letter's span needs its record's own partition
        # and offset from the delivery report (a callback per record is small next to the
        # spans themselves).
        traced = tracing.get_tracer().enabled
        self.producer = Producer(producer_config(
            bootstrap, **{**STREAM_PRODUCER, **(producer_overrides or {}),
                          "delivery.report.only.error": not traced,
                          "on_delivery": self._on_delivery}
        ))
        self._on_assign_hook = on_assign
        self._last_commit = 0.0
        self.max_backlog = max_backlog
        self.stats = Stats()
        self.lanes: dict[tuple[str, int], Lane] = {}
        self._assigned = threading.Event()
        overrides = {"auto.offset.reset": function.initial_offset, **(consumer_overrides or {})}
        self.consumer = Consumer(consumer_config(bootstrap, function.consumer_group, **overrides))
        self._subscribed = False
        if subscribe_first:
            # The group join (seconds on Tansu) runs in librdkafka's threads while the
            # invoker is built (user code imported, schemas fetched): cold start overlaps
            # them instead of adding them up. Rebalance callbacks only run inside
            # consume(), i.e. in `run`, after the invoker exists.
            self.subscribe()
        try:
            self.invoker = invoker_factory(self.producer)
        except BaseException:
            if self._subscribed:
                self._close_after_join()
            raise
        self.tracer: tracing.Tracer = getattr(self.invoker, "tracer", None) or tracing.get_tracer()
        self.checkpoint = Checkpoint(self.producer, self.consumer, name=function.name,
                                     on_rewind=self._rewound,
                                     after_outputs=getattr(self.invoker, "produce_state", None))
        self.last_cycle = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def subscribe(self) -> None:
        """Join the function's consumer group (once); `run` calls it if nobody did."""
        if not self._subscribed:
            self.consumer.subscribe(list(self.function.topics), on_assign=self._on_assign,
                                    on_revoke=self._on_revoke, on_lost=self._on_revoke)
            self._subscribed = True

    def _close_after_join(self, timeout_s: float = 10.0) -> None:
        """Close a consumer that subscribed but will never run (its invoker failed).

        Not at once: on Tansu a group whose member leaves before its first join completes
        can stay stuck for minutes (shared/notes/local-parts.md), which would stall the
        fixed function's next start. So wait (bounded) for the assignment first; records
        fetched meanwhile are not processed and nothing is committed.
        """
        self._on_assign_hook = None
        deadline = time.monotonic() + timeout_s
        try:
            while not self._assigned.is_set() and time.monotonic() < deadline:
                self.consumer.consume(1, 0.1)
        finally:
            self.consumer.close()

    def run(self, stop: threading.Event, *, max_seconds: float | None = None) -> Stats:
        self.subscribe()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self.step()
                self.last_cycle = time.monotonic()  # read by /healthz
        finally:
            self.close()
        return self.stats

    @property
    def assigned(self) -> threading.Event:
        """Set once the group handed this consumer its partitions."""
        return self._assigned

    def close(self) -> None:
        try:
            self._finish_cycle(sync=True)
        except (DeliveryFailed, KafkaException) as exc:
            log.warning("%s: final commit skipped: %s", self.function.name, exc)
        self.consumer.close()
        self.invoker.close()

    def _rewound(self) -> None:
        """The checkpoint rewound: what was fetched is fetched again, and keyed-state
        changes the invoker still holds belong to records that will be replayed. (The
        in-memory store is then ahead of its changelog until the restore that follows: a
        failed commit stops the dispatcher, a failed commit on revoke precedes an
        assignment, and both restore.)"""
        self.lanes.clear()
        drop = getattr(self.invoker, "drop_state", None)
        if drop is not None:
            drop()

    # ------------------------------------------------------------------ one cycle

    def step(self) -> None:
        """Consume a batch, deliver what is due, dead-letter what is exhausted, commit."""
        # consume() returns when the batch is full or the timeout passes, so the timeout
        # is added latency on a stream slower than a batch per timeout (at 5K ev/s a
        # 500-record batch takes 100 ms per hop). Measured at 5K ev/s through two
        # functions: 100 ms gave p50 128 / p99 250 ms, 25 ms gives p50 87-107 / p99
        # 143-216 ms; draining with timeout 0 first made cycles so small that p99 rose to
        # 0.7-1.1 s.
        busy = any(lane.queue for lane in self.lanes.values())
        msgs = self.consumer.consume(self.function.batch_size, 0.005 if busy else BATCH_WAIT_S)
        if msgs:
            self._accept(msgs)
        now = time.monotonic()
        work, lanes_of_work = self._due_work(now)
        if not work:
            self.producer.poll(0)
            self._finish_cycle(sync=False)  # a quiet stream still gets its last commit
            return
        self.stats.batches += 1
        self.stats.batch_size.observe(sum(len(lane) for lane in work))
        outcomes = self.invoker.invoke(work, self.ordered)
        done: set[tuple[str, int, int]] = set()
        for msg, failure in outcomes:
            if failure is None:
                self.stats.succeeded += 1
                done.add((msg.topic(), msg.partition(), msg.offset()))
            elif self._failed(msg, failure, now):
                done.add((msg.topic(), msg.partition(), msg.offset()))
        for key in lanes_of_work:
            self._drop_done(key, done)
        self._finish_cycle(sync=False)
        self._observe_latency(work, len(done))

    def _observe_latency(self, work: list[list[Message]], done: int) -> None:
        """Latency of the newest record of each lane, weighted: cheap, per batch."""
        if not done:
            return
        now_ms = time.time() * 1000
        per_lane = max(1, done // max(1, len(work)))
        traced = self.tracer.enabled
        for lane in work:
            ts_type, ts = lane[-1].timestamp()
            if ts_type and ts > 0:
                self.stats.delivery_latency.observe(
                    max(0.0, (now_ms - ts) / 1000), per_lane,
                    tracing.record_exemplar(lane[-1]) if traced else None)

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind per owned partition: broker end minus our next offset, plus what
        is fetched but not done. Tansu's watermark can lag the truth, so this can be low,
        never invented."""
        out = {}
        for key, progress in list(self.checkpoint.partitions.items()):
            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(*key), cached=True)
            except KafkaException:
                continue
            nxt = progress.next_offset
            behind = max(0, high - nxt) if nxt is not None and high >= 0 else 0
            out[key] = behind + progress.outstanding
        return out

    def _accept(self, msgs: list[Message]) -> None:
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("%s: consumer error: %s", self.function.name, err)
                continue
            key = (msg.topic(), msg.partition())
            progress = self.checkpoint.progress(*key)
            if progress.log_was_reset(msg.offset()):
                self._topic_reset(key, msg.offset())
                progress = self.checkpoint.progress(*key)
            lane = self.lanes.get(key)
            if lane is None:
                lane = self.lanes[key] = Lane()
            lane.queue.append(msg)
            progress.seen(msg.offset())
            self.stats.consumed += 1
        self._apply_backpressure()

    def _topic_reset(self, key: tuple[str, int], offset: int) -> None:
        """The partition's log was recreated: start its bookkeeping afresh from `offset`.

        Records of the old log still queued here belonged to that log and went with it
        (the README's memory-broker caveat); keeping their progress would commit offsets
        of the old log into the new one and skip its first records after a restart.
        """
        stale = self.lanes.pop(key, None)
        self.checkpoint.forget(*key)
        self.stats.topic_resets += 1
        log.warning("%s: %s[%d] was recreated (a record at offset %d, below the committed "
                    "offset): resuming on the new log, %d queued records of the old one "
                    "dropped", self.function.name, key[0], key[1], offset,
                    len(stale.queue) if stale else 0)

    def _due_work(self, now: float) -> tuple[list[list[Message]], list[tuple[str, int]]]:
        work: list[list[Message]] = []
        keys: list[tuple[str, int]] = []
        for key, lane in self.lanes.items():
            if not lane.queue:
                continue
            if self.ordered:
                head = lane.queue[0]
                if lane.due and lane.due.get(head.offset(), 0.0) > now:
                    continue
                work.append(list(lane.queue))
            else:
                if lane.due:
                    items = [m for m in lane.queue if lane.due.get(m.offset(), 0.0) <= now]
                else:
                    items = list(lane.queue)
                if not items:
                    continue
                work.append(items[: self.function.max_in_flight])
            keys.append(key)
        return work, keys

    def _failed(self, msg: Message, failure: Failure, now: float) -> bool:
        """Schedule a retry, or dead-letter. Returns True when the record is done."""
        self.stats.failed_attempts += 1
        lane = self.lanes[(msg.topic(), msg.partition())]
        offset = msg.offset()
        attempts = lane.attempts.get(offset, 0) + 1
        span = failure.span
        if failure.retryable and attempts <= self.delivery.retry:
            lane.attempts[offset] = attempts
            lane.due[offset] = now + self.delivery.backoff(attempts)
            self.stats.retries += 1
            if span is not None:
                span.set("sluice.delivery.attempt", attempts)
                span.set("sluice.delivery.retry_in_s", round(self.delivery.backoff(attempts), 3))
                span.fail(failure.message[:1024], f"http.{failure.code}")
                span.finish()
            return False
        if span is not None:
            span.set("sluice.delivery.attempt", attempts)
            span.set("sluice.delivery.outcome", "dead_letter")
            span.fail(failure.message[:1024], f"http.{failure.code}")
            span.finish()
        self._dead_letter(msg, failure, attempts)
        lane.attempts.pop(offset, None)
        lane.due.pop(offset, None)
        return True

    def _drop_done(self, key: tuple[str, int], done: set[tuple[str, int, int]]) -> None:
        lane = self.lanes[key]
        progress = self.checkpoint.progress(*key)
        topic, partition = key
        if self.ordered:
            while lane.queue and (topic, partition, lane.queue[0].offset()) in done:
                progress.done(lane.queue.popleft().offset())
        else:
            keep: deque[Message] = deque()
            for m in lane.queue:
                if (topic, partition, m.offset()) in done:
                    progress.done(m.offset())
                else:
                    keep.append(m)
            lane.queue = keep

    def _finish_cycle(self, *, sync: bool) -> None:
        """Commit through the checkpoint (`Checkpoint.commit` owns the order).

        At most every `COMMIT_INTERVAL_S` (or when `sync`): outputs leave continuously
        in the background, and waiting for their acknowledgements after every small
        batch would put a broker round trip into each cycle's latency. A failed flush
        raises `DeliveryFailed` after the checkpoint rewound (and emptied the lanes).
        """
        now = time.monotonic()
        if not sync and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        if self.checkpoint.commit(sync=sync):
            self.stats.commits += 1

    def _apply_backpressure(self) -> None:
        for (topic, partition), lane in self.lanes.items():
            size = len(lane.queue)
            if not lane.paused and size > self.max_backlog:
                self.consumer.pause([TopicPartition(topic, partition)])
                lane.paused = True
            elif lane.paused and size < self.max_backlog // 2:
                self.consumer.resume([TopicPartition(topic, partition)])
                lane.paused = False

    # ------------------------------------------------------------------ dead letters

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self.checkpoint.delivery_failed(f"{msg.topic()}: {err}")

    def _dead_letter(self, msg: Message, failure: Failure, attempts: int = 1) -> None:
        event = record_event(msg, self.function.name)
        dl_span = self.tracer.dead_letter(
            failure.span, event._get_attributes(), event, self.delivery.dead_letter_sink, msg,
            self.function.name, failure.code, failure.message[:1024],
        ) if self.tracer.enabled else None
        key, value, out_headers = ce_kafka.to_dead_letter(
            event, msg.headers(), destination=self.invoker.destination, code=failure.code,
            message=failure.message,
            origin=(msg.topic(), msg.partition(), msg.offset(), attempts, self.function.name))
        extra: dict[str, Any] = {}
        if dl_span is not None:
            def on_delivery(err: Any, dead: Any, span: Any = dl_span) -> None:
                self._on_delivery(err, dead)
                if err is None:
                    span.delivered(dead)  # the dead letter's own partition and offset
                else:
                    span.fail(str(err), "kafka")
                span.finish()
            extra["on_delivery"] = on_delivery
        produce(self.producer, self.delivery.dead_letter_sink, value, msg.key() or key,
                headers=out_headers, **extra)  # waits out a full queue; QueueFull past 30 s
        self.stats.dead_lettered += 1
        log.warning("%s: dead-lettered %s[%d]@%d after %s: %s", self.function.name,
                    msg.topic(), msg.partition(), msg.offset(), failure.code,
                    failure.message[:200])

    # ------------------------------------------------------------------ rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._on_assign_hook is not None and partitions:
            self._on_assign_hook()  # e.g. restore keyed state before records flow
        self._assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            self._finish_cycle(sync=True)
        except (DeliveryFailed, KafkaException) as exc:
            log.warning("%s: commit on revoke failed: %s", self.function.name, exc)
        for tp in partitions:
            self.lanes.pop((tp.topic, tp.partition), None)
            self.checkpoint.forget(tp.topic, tp.partition)
