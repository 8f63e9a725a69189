"""How the dispatcher hands events to a function: in process, or over HTTP.

Every invoker gets work as lanes (one per partition, records in offset order) and
returns an outcome per record it attempted. In ordered mode it stops a lane at the
first failure, so nothing after a failing record runs before it succeeds or is
dead-lettered; in unordered mode it attempts every record it is given.

Outputs: the in-process invoker sends a function's outputs through
`eventing.fn.output.OutputProducer` on the dispatcher's producer (the dispatcher flushes
before committing); over HTTP the function's host sends them through the same class and
answers 2xx only after the broker acknowledged, as it must on Knative where the
KafkaSource drops replies. Both map failures with `eventing.fn.output.failure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Message, Producer

from eventing.cloudevent import kafka as ce_kafka
from eventing.fn.output import OutputProducer, failure
from eventing.fn.runtime import FunctionHost
from eventing.telemetry import tracing

# Knative retries these statuses; any other failure status goes straight to dead letter.
RETRYABLE_STATUS = frozenset({404, 408, 409, 429}) | frozenset(range(500, 600))


@dataclass(slots=True)
class Failure:
    """Why one delivery attempt failed, in the terms Knative dead-letters with."""

    code: int
    message: str
    retryable: bool = True
    span: Any = None  # the attempt's unfinished `process` span (telemetry.tracing), if traced


Outcome = tuple[Message, Failure | None]
Work = Sequence[Sequence[Message]]


class Invoker(Protocol):
    destination: str

    def invoke(self, lanes: Work, ordered: bool) -> list[Outcome]: ...

    def close(self) -> None: ...


def record_event(msg: Message, source_name: str):
    """The CloudEvent a KafkaSource would deliver for this record.

    Only the required attributes are checked (`validate=False`): records on Sluice's
    topics were validated where they entered (the gateway), and full validation cost
    ~2 us per record, the whole per-event budget. A record without them is wrapped as a
    non-CloudEvent record, as a KafkaSource does.
    """
    return ce_kafka.from_message(msg, source_name=source_name)


class InProcessInvoker:
    """Calls the function in this process: the fast path, no serialization between."""

    def __init__(self, host: FunctionHost, producer: Producer,
                 tracer: tracing.Tracer | None = None) -> None:
        self.host = host
        self.producer = producer
        self.output = OutputProducer(producer)  # this thread polls: it may serve reports
        self.destination = f"inprocess://{host.function.name}"
        self._source_name = host.function.name
        self.tracer = tracer or host.tracer

    def invoke(self, lanes: Work, ordered: bool) -> list[Outcome]:
        outcomes: list[Outcome] = []
        append = outcomes.append
        call = self.host.call
        send = self.output.send
        source_name = self._source_name
        from_message = ce_kafka.from_message  # `record_event`, without its call per record
        # A `process` span per attempt when tracing is on. A failed attempt's span rides
        # on its `Failure`; the dispatcher finishes it once it knows whether a retry or
        # the dead letter follows.
        process = self.tracer.process if self.tracer.enabled else None
        name = self.host.function.name
        group = self.host.function.consumer_group
        for lane in lanes:
            for msg in lane:
                event = from_message(msg, source_name=source_name)
                span = process(event, msg, name, group) if process is not None else None
                try:
                    records = call(event)
                    if records:
                        send(records)
                except Exception as exc:  # noqa: BLE001 - Reject, the function's, OutputFailed
                    code, message = failure(exc)
                    append((msg, Failure(code, message, code in RETRYABLE_STATUS, span)))
                    if ordered:
                        break
                    continue
                if span is not None:
                    span.finish()
                append((msg, None))
            self.producer.poll(0)
        return outcomes

    def produce_state(self) -> int:
        """Queue the keyed-state changes the function made since the last call (held by
        the host: `FunctionHost.defer_state`). The checkpoint calls this only after the
        outputs of those calls were acknowledged; returns how many records it queued."""
        records = self.host.take_state()
        if records:
            self.output.send(records)
        return len(records)

    def drop_state(self) -> None:
        """A rewind: the held changes belong to records that will be replayed."""
        self.host.pending_state.clear()

    def close(self) -> None:
        pass


def http_failure(status: int, body: bytes) -> Failure:
    return Failure(status, body[:1024].decode("utf-8", "replace"), status in RETRYABLE_STATUS)
