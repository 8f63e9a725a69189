"""Producing and knowing it is durable: a full local queue is waited out, never fatal.

librdkafka refuses a record with `BufferError` while its local queue is full; records
leave the queue as the broker acknowledges them. `eventing.kafka.produce` polls and tries
again until a deadline, and the one output producer of `eventing.fn.output` maps what
still fails to a retryable 503, so a dispatcher keeps running (before, a second
`BufferError` in a row stopped every dispatcher of the process).
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from eventing.delivery.invoke import InProcessInvoker
from eventing.fn.api import Reject
from eventing.fn.output import OutputFailed, OutputProducer, failure
from eventing.fn.runtime import FunctionHost
from eventing.kafka import Acks, QueueFull, RoomWait, produce
from eventing.topology import Delivery, Function
from tests.helpers import FakeMessage, FakeProducer


class FullQueue(FakeProducer):
    """A producer whose local queue is full for the first `full_for` attempts (or always)."""

    def __init__(self, full_for: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.full_for = full_for
        self.refused = 0
        self.polls = 0

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None) -> None:
        if self.full_for is None or self.refused < self.full_for:
            self.refused += 1
            raise BufferError("Local: Queue full")
        super().produce(topic, value, key, headers, on_delivery)

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        return super().poll(timeout)


def test_produce_waits_out_a_full_queue_polling_for_room() -> None:
    producer = FullQueue(full_for=7)
    produce(producer, "out", b"v", b"k", headers=[("h", b"1")])
    assert producer.records == [("out", b"k", b"v", [("h", b"1")])]
    assert producer.refused == 7 and producer.polls == 7  # each pause served reports


def test_produce_without_poll_sleeps_for_a_producer_another_thread_polls() -> None:
    producer = FullQueue(full_for=3)
    produce(producer, "out", b"v", poll=False)
    assert len(producer.records) == 1 and producer.polls == 0


def test_produce_gives_up_at_the_deadline_with_a_clear_error() -> None:
    producer = FullQueue(full_for=None)
    started = time.monotonic()
    with pytest.raises(QueueFull, match="out: the producer's local queue stayed full") as info:
        produce(producer, "out", b"v", deadline=time.monotonic() + 0.05)
    assert 0.04 <= time.monotonic() - started < 1.0
    assert info.value.topic == "out" and isinstance(info.value, BufferError)


def test_room_wait_pauses_no_longer_than_the_time_left() -> None:
    wait = RoomWait(time.monotonic() + 0.003, pause_s=1.0)
    assert 0 < wait.pause("t") <= 0.003
    time.sleep(0.005)
    with pytest.raises(QueueFull):
        wait.pause("t")


def test_other_produce_errors_are_not_retried() -> None:
    error = KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC))
    with pytest.raises(KafkaException):
        produce(FakeProducer(raise_on_produce=error), "out", b"v")


# --------------------------------------------------------------------------- output producer


def test_output_producer_counts_every_ack_through_a_full_queue() -> None:
    producer = FullQueue(full_for=4)
    acks = Acks()
    records = [("out", b"k", f"{i}".encode(), []) for i in range(3)]
    OutputProducer(producer, poll=False).send_acked(records, acks)
    acks.seal()
    producer.poll(0)
    assert acks.wait(time.monotonic() + 1) is None
    assert [r[2] for r in producer.written] == [b"0", b"1", b"2"]


@pytest.mark.parametrize("raised, text", [
    (None, "out: the producer's local queue stayed full"),
    (KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC)), "out: KafkaException: "),
])
def test_output_producer_failures_are_output_failed(raised, text) -> None:
    producer = FullQueue(full_for=None) if raised is None else FakeProducer(
        raise_on_produce=raised)
    output = OutputProducer(producer, queue_timeout_s=0.02)
    with pytest.raises(OutputFailed, match=text):
        output.send([("out", None, b"v", [])])


def test_one_failure_mapping_for_both_invocation_modes() -> None:
    assert failure(Reject("bad amount")) == (422, "Reject: bad amount")
    assert failure(OutputFailed("out: full")) == (503, "out: full")
    assert failure(ValueError("boom")) == (500, "ValueError: boom")


# ---------------------------------------------------------------- the dispatcher's invoker


def _invoker(producer: FakeProducer, queue_timeout_s: float = 30.0) -> InProcessInvoker:
    fn = Function(name="fn", source=Path("unused.py"), target="t", topics=("in",),
                  consumer_group="g", outputs={"out": ("*",)}, delivery=Delivery())
    invoker = InProcessInvoker(FunctionHost(fn, None, user=lambda e: [e.data, e.data]),
                               producer)  # type: ignore[arg-type]
    invoker.output.queue_timeout_s = queue_timeout_s
    return invoker


def _records(n: int) -> list[FakeMessage]:
    return [FakeMessage(topic="in", offset=i, value=orjson.dumps({"n": i}), headers=[
        ("ce_specversion", b"1.0"), ("ce_id", f"e{i}".encode()), ("ce_source", b"/t"),
        ("ce_type", b"t.created"), ("content-type", b"application/json")]) for i in range(n)]


def test_in_process_invoker_survives_repeated_buffer_errors() -> None:
    producer = FullQueue(full_for=25)  # the old code gave up after the second refusal
    outcomes = _invoker(producer).invoke([_records(5)], ordered=True)
    assert [failure for _msg, failure in outcomes] == [None] * 5
    assert [orjson.loads(r[2])["n"] for r in producer.records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert producer.refused == 25


def test_in_process_invoker_turns_a_queue_full_past_its_deadline_into_a_retry() -> None:
    producer = FullQueue(full_for=None)
    [(msg, failed)] = _invoker(producer, queue_timeout_s=0.02).invoke([_records(3)],
                                                                      ordered=True)
    assert msg.offset() == 0 and failed is not None  # ordered: the lane stops there
    assert failed.code == 503 and failed.retryable
    assert "local queue stayed full" in failed.message


# --------------------------------------------------------------------------- a real broker


class _Counting:
    """A real producer whose `BufferError`s are counted, to prove the queue was full."""

    def __init__(self, producer) -> None:
        self.producer = producer
        self.refused = 0

    def produce(self, *args, **kwargs) -> None:
        try:
            self.producer.produce(*args, **kwargs)
        except BufferError:
            self.refused += 1
            raise

    def poll(self, timeout: float = 0) -> int:
        return self.producer.poll(timeout)


@pytest.mark.stack
def test_a_full_queue_is_waited_out_on_a_real_broker(stack) -> None:
    from confluent_kafka import Producer

    from eventing.kafka import ensure_topics, producer_config
    from tests.helpers import unique
    from tests.pipeline import consume_all

    topic = unique("produce.full.")
    ensure_topics(stack.bootstrap, {topic: 1})
    producer = _Counting(Producer(producer_config(
        stack.bootstrap, **{"queue.buffering.max.messages": 4, "linger.ms": 20})))
    acks = Acks()
    for i in range(200):
        produce(producer, topic, f"{i}".encode(), on_delivery=acks)
        acks.sent()
    acks.seal()
    assert producer.producer.flush(30) == 0
    assert acks.wait(time.monotonic() + 30) is None
    assert producer.refused > 0  # the queue really was full, and nothing failed
    values = sorted(int(m.value()) for m in consume_all(stack.bootstrap, topic, 200))
    assert values == list(range(200))
