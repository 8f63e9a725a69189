"""The functions-framework baseline's target: the job as a bare `@cloud_event` function.

What a team writes without Sluice when a KafkaSource POSTs each record to their function:
functions-framework drops the return value, so the function produces its output itself
(fastavro, one confluent-kafka producer per worker with the floor's `eventing.kafka`
settings, created lazily: the app is imported before gunicorn forks) and waits for the
broker's acknowledgement before answering 2xx, since a KafkaSource drops replies and
would not resend an event whose output was lost.
Configured by the environment `ff_baseline.py` sets (PYTHONPATH: the repository and
benchmarks/contenders): BENCH_BOOTSTRAP, BENCH_OUTPUT,
BENCH_OUTPUT_SCHEMA_ID, BENCH_RAW_SCHEMA, BENCH_OUT_SCHEMA (paths of .avsc files).
An event of type `bench.warmup` only builds the producer (outside the timed window).
"""

from __future__ import annotations

import json
import os
import threading
from io import BytesIO
from pathlib import Path

import functions_framework
from cloudevents.http import CloudEvent
from common import EUR_PER_UNIT  # benchmarks/contenders on PYTHONPATH (ff_baseline.py)
from confluent_kafka import Producer
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from eventing.kafka import producer_config

READER = parse_schema(json.loads(Path(os.environ["BENCH_RAW_SCHEMA"]).read_text()))
WRITER = parse_schema(json.loads(Path(os.environ["BENCH_OUT_SCHEMA"]).read_text()))
PREFIX = b"\x00" + int(os.environ["BENCH_OUTPUT_SCHEMA_ID"]).to_bytes(4, "big")
OUTPUT = os.environ["BENCH_OUTPUT"]
_lock = threading.Lock()
_producer: Producer | None = None


def producer() -> Producer:
    """One producer per worker process, made on first use (after gunicorn's fork)."""
    global _producer
    with _lock:
        if _producer is None:
            _producer = Producer(producer_config(os.environ["BENCH_BOOTSTRAP"]))
        return _producer


@functions_framework.cloud_event
def convert(event: CloudEvent) -> None:
    out = producer()
    if event["type"] == "bench.warmup":
        return
    buf = BytesIO(event.data)
    buf.seek(5)
    rec = schemaless_reader(buf, READER, None)
    if rec["amount"] <= 0:
        return
    rec["amount_eur"] = round(rec["amount"] * EUR_PER_UNIT[rec["currency"]], 2)
    value = BytesIO()
    value.write(PREFIX)
    schemaless_writer(value, WRITER, rec)
    errors: list[object] = []
    out.produce(OUTPUT, value.getvalue(), event.get("partitionkey"),
                on_delivery=lambda err, _msg: errors.append(err) if err else None)
    if out.flush(30) or errors:  # acknowledged before 2xx: the reply is all the sender sees
        raise RuntimeError(f"output not acknowledged: {errors}")
