"""Where a function's result goes: its output records to Kafka, its failure to a status.

Both invocation modes use this module, so they agree on what an outcome means:

- in process (`eventing.delivery.invoke`): `OutputProducer.send(records)` queues the
  records on the dispatcher's producer with no per-record report; their durability is
  known at the dispatcher's flush, before it commits (`eventing.delivery.checkpoint`);
- behind HTTP (`eventing.fn.host`): `send_acked(records, acks)` counts each record's
  delivery report in an `eventing.kafka.Acks`, and the host answers 2xx only once all
  arrived, since a KafkaSource drops replies.

`failure` maps what went wrong to the status Knative (and the dispatcher, which follows
it) reacts to:

    422  the function raised `Reject`                  -> not retried, dead letter
    500  the function raised anything else             -> retried with backoff
    503  an output could not be queued (`OutputFailed`) -> retried with backoff

A full local queue is not a failure: `send` waits for room (`eventing.kafka.produce`) and
only a queue that stays full past its deadline fails the event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from eventing.fn.api import Reject
from eventing.fn.runtime import OutputRecord
from eventing.kafka import QUEUE_FULL_TIMEOUT_S, Acks, KafkaProducer, QueueFull, produce

REJECTED = 422
FAILED = 500
UNAVAILABLE = 503


class OutputFailed(RuntimeError):
    """An output record could not be queued for the broker (a queue full past its deadline,
    an unknown topic, a record too large): the event may succeed when retried."""


def failure(exc: BaseException) -> tuple[int, str]:
    """The status and text for an exception of running a function or sending its outputs."""
    if isinstance(exc, Reject):
        return REJECTED, f"Reject: {exc}"
    if isinstance(exc, OutputFailed):
        return UNAVAILABLE, str(exc)
    return FAILED, f"{type(exc).__name__}: {exc}"


class OutputProducer:
    """Queues a function's output records on a Kafka producer: the one place they are produced.

    `send` is the in-process path (no per-record report: the dispatcher's flush proves
    durability); `send_acked` counts each record's delivery report in `acks` (the HTTP
    host waits for them). `poll` says whether the calling thread may serve the producer's
    delivery reports while it waits for room in a full queue (the dispatcher's thread:
    yes; the HTTP host's request threads: no, its poller thread does).
    """

    __slots__ = ("producer", "poll", "queue_timeout_s", "_produce")

    def __init__(self, producer: KafkaProducer, *, poll: bool = True,
                 queue_timeout_s: float = QUEUE_FULL_TIMEOUT_S) -> None:
        self.producer = producer
        self.poll = poll
        self.queue_timeout_s = queue_timeout_s
        self._produce = producer.produce

    def send(self, records: Sequence[OutputRecord]) -> None:
        """Queue `records`. Raises `OutputFailed` if one cannot be queued; records before
        it stay queued (a retry of the event produces them again: at-least-once)."""
        produce = self._produce
        deadline = None
        topic = ""
        try:
            for topic, key, value, headers in records:
                try:
                    produce(topic, value, key, headers=headers)
                except BufferError:  # local queue full: wait for room, up to the deadline
                    deadline = self._wait_and_produce(deadline, topic, value, key,
                                                      headers=headers)
        except Exception as exc:
            raise _failed(exc, topic) from exc

    def send_acked(self, records: Sequence[OutputRecord], acks: Acks) -> None:
        """`send`, with `acks` as each record's delivery callback (counted as sent)."""
        produce = self._produce
        deadline = None
        topic = ""
        try:
            for topic, key, value, headers in records:
                try:
                    produce(topic, value, key, headers=headers, on_delivery=acks)
                except BufferError:
                    deadline = self._wait_and_produce(deadline, topic, value, key,
                                                      headers=headers, on_delivery=acks)
                acks.sent()
        except Exception as exc:
            raise _failed(exc, topic) from exc

    def _wait_and_produce(self, deadline: float | None, topic: str, value: bytes | None,
                          key: bytes | None, **kwargs: Any) -> float:
        """The slow path: wait for room (one deadline for all records of a `send`)."""
        if deadline is None:
            deadline = time.monotonic() + self.queue_timeout_s
        produce(self.producer, topic, value, key, deadline=deadline, poll=self.poll, **kwargs)
        return deadline


def _failed(exc: Exception, topic: str) -> OutputFailed:
    """`OutputFailed` for an exception of queuing a record for `topic` (named first)."""
    if isinstance(exc, QueueFull):  # its text names the topic already
        return OutputFailed(str(exc))
    return OutputFailed(f"{topic}: {type(exc).__name__}: {exc}")
