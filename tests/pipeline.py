"""Helpers for tests that drive real records through real topics."""

from __future__ import annotations

import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.kafka import consumer_config, ensure_topics, producer_config
from eventing.serde import subject_for
from tests.helpers import ROOT, unique

SCHEMAS = ROOT / "schemas"
# The benchmarks' job (payments -> amount in EUR), which some tests run as a plain function:
# benchmark code, so `sluice up` does not register its schema; the tests that use it do.
CONVERT = ROOT / "benchmarks" / "convert"
CONVERTED_SCHEMA = ROOT / "benchmarks" / "schemas" / "payments.converted.avsc"


def register(registry_url: str, topic: str, schema_file: str | Path) -> int:
    """Register a schema for `topic`: a file name under schemas/, or a path."""
    path = schema_file if isinstance(schema_file, Path) else SCHEMAS / schema_file
    client = SchemaRegistryClient({"url": registry_url})
    return client.register_schema(subject_for(topic), Schema(path.read_text(), "AVRO"))


def payment(i: int, card: int, amount: float = 10.0, currency: str = "EUR") -> dict:
    return {"payment_id": f"p-{i}", "card_id": f"card-{card}", "merchant_id": f"m-{i % 50}",
            "amount": amount, "currency": currency, "country": "DE",
            "event_time": 1_764_000_000_000 + i}


def payment_record(serde, topic: str, p: dict, *, source: str = "/tests",
                   type: str = "com.sluice.payment.created"):
    """(key, value, headers) of a payment as the gateway writes it: binary-mode
    CloudEvent, Avro data, keyed by card."""
    event = ce_event.make_event({
        "specversion": "1.0", "id": p["payment_id"], "source": source, "type": type,
        "partitionkey": p["card_id"], "datacontenttype": "application/avro",
    }, serde.encode(topic, p))
    return ce_kafka.to_binary(event)


def produce_payments(bootstrap: str, serde, topic: str, payments: list[dict]) -> None:
    producer = Producer(producer_config(bootstrap))
    for p in payments:
        key, value, headers = payment_record(serde, topic, p)
        producer.produce(topic, value, key, headers=headers)
        producer.poll(0)
    assert producer.flush(30) == 0


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 60,
                settle: float = 1.0, match=None) -> list:
    """Consume until `expected` records arrived (then `settle` s more for extras).

    With `match`, only records for which it returns true are kept and counted.
    """
    # Direct assignment, no group: a group join takes seconds on Tansu.
    consumer = Consumer(consumer_config(bootstrap, unique("check-")))
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    got = []
    deadline = time.monotonic() + timeout
    extra_until = None
    while time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.2):
            if not msg.error() and (match is None or match(msg)):
                got.append(msg)
        if len(got) >= expected and extra_until is None:
            extra_until = time.monotonic() + settle
        if extra_until is not None and time.monotonic() > extra_until:
            break
    consumer.close()
    return got


def write_topology(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def headers_of(msg) -> dict[str, str]:
    return {k: v.decode() for k, v in (msg.headers() or [])}


def setup_topics(bootstrap: str, topics: dict[str, int]) -> None:
    ensure_topics(bootstrap, topics)


