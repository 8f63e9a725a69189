"""Talking to Kafka: client settings, topics, and producing until the broker has the record.

The defaults here exist because of measured broker behaviour (see
`../shared/notes/local-parts.md`), not taste:

- `fetch.wait.max.ms=10`: Tansu answers a waiting fetch only when the wait expires, so
  the default 500 ms wait becomes end-to-end latency.
- `fetch.queue.backoff.ms=10`: Tansu ignores `max.partition.fetch.bytes` and returns
  ~5 MB per partition, overfilling librdkafka's queue; the default 1 s backoff starves
  fast consumers.
- `session.timeout.ms=6000`: a group join is held for half the session timeout.
- `linger.ms=20` for a producer that relays a steady stream (`STREAM_PRODUCER`, the
  dispatcher's): Tansu serves many small produce requests slowly, so a short linger
  makes it fall behind and latency grows without bound. Measured by
  `benchmarks/run.py --only latency` (two hops at 5K ev/s, plain relays and Sluice in
  the same run, shared 2 cores, 2026-11-30): relays linger 5 p99 2.1 s vs linger 20
  p99 0.33 s; Sluice linger 5 p99 3.1 s vs linger 20 p99 0.89 s. An idle machine gave
  linger 1 > 1 s, 5 ms 165-219 ms, 10 ms 109 ms, 20 ms 80 ms (shared/notes/local-parts.md).
  Producers that wait for each request's acks (the gateway, the HTTP host) keep the
  general default: there linger is added to every answer.

On `--storage s3` (Tansu over SeaweedFS) the stream clients take `client_tuning("s3")`:
consumers `fetch.wait.max.ms=1000`, the dispatcher's producer `linger.ms=50`. The fetch
wait is Tansu's *time budget* for the whole fetch, not only how long it may wait: the
build we run (it reports 0.6.0; its code is tansu-io/tansu main at cf82d41, after
"propagate max_wait into storage") LISTs a partition's batch objects from the oldest,
stops listing when the request's `max_wait` is spent, keeps only objects at or after the
fetch offset, and answers error NONE with no records when the listing had not reached
that offset (`tansu-storage/src/dynostore.rs` `fetch`, `has_deadline_expired`). The
consumer then asks for the same offset again and gets the same empty answer, for ever:
a LIST that takes longer than the wait stalls the partition, and a stalled group also
holds retention, so the partition only grows. Measured here (2026-11-30, load average
~20, one partition of single-record objects, `assign()` at its end): a LIST of 600
objects took 20-162 ms and of 1,650 objects 49-349 ms; a 10 ms wait read 0 of 600
records in 20 s, 300 ms needed several empty fetches at 1,650 objects, 1000 ms read
them at once. The example at 20 events/s keeps about (min-age 5 min + one 30 s pass) x
5 records/s ~ 1,650 objects per partition (`eventing.stack.retention`), so 1000 ms is
about three times the slowest LIST seen. The wait also shares out the budget between
the request's partitions in order (librdkafka rotates the order), and when nothing is
new an idle fetch returns after the wait, so a trickle pays up to ~0.5 s per consumer
hop; memory storage answers from RAM and keeps 10 ms, hence per storage. Each produce
batch is a PUT plus a watermark update, hence the longer linger for the dispatchers.

They are harmless on Apache Kafka, so one configuration serves both. Every broker
address comes from the caller: nothing here knows where the broker is.

It is also the one home of "produce and know it is durable": `produce` waits out a full
local queue (librdkafka's `BufferError`) until a deadline instead of failing, `RoomWait`
is that wait for callers that cannot block (the gateway's event loop), and `Acks` counts
the delivery reports of a group of records (one HTTP request's outputs).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

# How long a producer's local queue may stay full before `produce` gives up. Records
# leave the queue as the broker acknowledges them, so a queue full for this long means
# the broker is not taking records: the same bound the dispatcher's flush waits.
QUEUE_FULL_TIMEOUT_S = 30.0

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 10,
    "fetch.queue.backoff.ms": 10,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "enable.partition.eof": False,
}

PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    "enable.idempotence": False,
}


# The dispatcher's producer: a steady stream of outputs, whose latency is bounded by
# how fast the broker takes them (see the module docstring for the measurements).
STREAM_PRODUCER: dict[str, Any] = {"linger.ms": 20}


@dataclass(frozen=True)
class ClientTuning:
    """Overrides for the stream clients (dispatchers, sinks) on one broker storage.

    `consumer` goes over `CONSUMER_DEFAULTS`, `stream_producer` over `STREAM_PRODUCER`.
    """

    consumer: dict[str, Any] = field(default_factory=dict)
    stream_producer: dict[str, Any] = field(default_factory=dict)


# Measured reasons in the module docstring.
_TUNING: dict[str, ClientTuning] = {
    "memory": ClientTuning(),
    "s3": ClientTuning(consumer={"fetch.wait.max.ms": 1000},
                       stream_producer={"linger.ms": 50}),
}


def client_tuning(storage: str | None) -> ClientTuning:
    """The stream clients' overrides for a broker on `storage` (none when unknown)."""
    return _TUNING.get(storage or "memory", ClientTuning())


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Return a confluent-kafka consumer config for `bootstrap` with Sluice's defaults."""
    return {"bootstrap.servers": bootstrap, "group.id": group_id, **CONSUMER_DEFAULTS, **overrides}


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Return a confluent-kafka producer config for `bootstrap` with Sluice's defaults."""
    return {"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS, **overrides}


def admin_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Return a confluent-kafka AdminClient config."""
    return {"bootstrap.servers": bootstrap, **overrides}


def ensure_topics(
    bootstrap: str,
    topics: dict[str, int],
    *,
    config: dict[str, dict[str, str]] | None = None,
    timeout: float = 10.0,
) -> None:
    """Create each topic (name -> partitions) that does not exist yet.

    Idempotent: an existing topic is left as it is (Tansu cannot add partitions).
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(admin_config(bootstrap))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(name, num_partitions=parts, replication_factor=1,
                 config=(config or {}).get(name, {}))
        for name, parts in topics.items()
        if name not in existing
    ]
    if not wanted:
        return
    for name, fut in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {name!r}: {exc}") from exc


def topic_id(admin: Any, topic: str, timeout_s: float = 10.0) -> str | None:
    """The topic's id (a new one each time the topic is created), or None if unknown.

    How a reader tells a recreated log (a memory broker's restart) from its own: offsets
    start again at 0, and Tansu's high watermark cannot be trusted to show it (a fetch
    past the new end waits instead of failing with "offset out of range").
    """
    from confluent_kafka import TopicCollection

    try:
        [future] = admin.describe_topics(TopicCollection([topic]),
                                         request_timeout=timeout_s).values()
        found = future.result().topic_id
    except Exception:  # noqa: BLE001 - broker down, topic missing: unknown for now
        return None
    return None if found is None else str(found)


# --------------------------------------------------------------------------- producing


class KafkaProducer(Protocol):
    """The part of `confluent_kafka.Producer` Sluice's producing code uses (tests fake it)."""

    def produce(self, topic: str, value: Any = None, key: Any = None, **kwargs: Any) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...


class QueueFull(BufferError):
    """The producer's local queue stayed full until the deadline: nothing more is queued."""

    def __init__(self, topic: str, waited_s: float) -> None:
        self.topic = topic
        self.waited_s = waited_s
        super().__init__(
            f"{topic}: the producer's local queue stayed full for {waited_s:.1f}s; the broker "
            "is not acknowledging records as fast as they are produced (or is unreachable)")


class RoomWait:
    """Waiting for room in a full local queue: how long each pause lasts, when to give up.

    A full queue is not an error: records leave it as the broker acknowledges them, which
    the producer's `poll` serves. `pause` says how long to wait before trying again, and
    raises `QueueFull` once `deadline` (a `time.monotonic()` value) has passed. `produce`
    blocks in `poll` for the pause; the gateway awaits it instead.
    """

    __slots__ = ("deadline", "pause_s", "started")

    def __init__(self, deadline: float, pause_s: float = 0.01) -> None:
        self.deadline = deadline
        self.pause_s = pause_s
        self.started = time.monotonic()

    def pause(self, topic: str) -> float:
        now = time.monotonic()
        if now >= self.deadline:
            raise QueueFull(topic, now - self.started)
        return min(self.pause_s, self.deadline - now)


def produce(producer: KafkaProducer, topic: str, value: Any = None, key: Any = None, *,
            deadline: float | None = None, poll: bool = True, **kwargs: Any) -> None:
    """`producer.produce(topic, value, key, **kwargs)`, waiting out a full local queue.

    On `BufferError` it polls the producer (serving delivery reports frees room) and tries
    again until `deadline` (default: `QUEUE_FULL_TIMEOUT_S` from the first refusal), then
    raises `QueueFull`. With `poll=False` it sleeps instead, for a producer another thread
    polls. Other errors (`KafkaException`: unknown topic, record too large) are raised
    as they are. Hot loops try `producer.produce` first and call this on `BufferError`.
    """
    try:
        producer.produce(topic, value, key, **kwargs)
        return
    except BufferError:
        pass
    wait = RoomWait(deadline if deadline is not None
                    else time.monotonic() + QUEUE_FULL_TIMEOUT_S)
    while True:
        pause = wait.pause(topic)
        if poll:
            producer.poll(pause)
        else:
            time.sleep(pause)
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            continue


class Acks:
    """Delivery reports of a group of records; `wait` returns once all have arrived.

    Pass it as `on_delivery` of each record, call `sent()` after each record is queued and
    `seal()` when no more will be. Reports may arrive on another thread (a poller), so the
    count is guarded by a lock, and the waiting thread blocks on an Event rather than
    polling (no added latency).
    """

    __slots__ = ("_lock", "_sent", "_acked", "_sealed", "errors", "_done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = 0
        self._acked = 0
        self._sealed = False
        self.errors: list[str] = []
        self._done = threading.Event()

    def sent(self) -> None:
        with self._lock:
            self._sent += 1

    def __call__(self, err: Any, msg: Any) -> None:
        with self._lock:
            self._acked += 1
            if err is not None:
                self.errors.append(f"{msg.topic()}: {err}")
            if self._sealed and self._acked >= self._sent:
                self._done.set()

    def seal(self) -> None:
        """No more records will be produced in this group."""
        with self._lock:
            self._sealed = True
            if self._acked >= self._sent:
                self._done.set()

    def wait(self, deadline: float) -> str | None:
        """None when every record was acknowledged by `deadline`, else why not."""
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                missing = self._sent - self._acked
            return f"{missing} output(s) not acknowledged in time by the broker"
        if self.errors:
            return "output(s) not acknowledged: " + "; ".join(self.errors[:3])
        return None
