"""The floor: the job as one loop on the raw clients, no framework.

confluent-kafka consumes batches; fastavro decodes each value schemaless (skipping the
5-byte Confluent prefix), the loop drops non-positive amounts, adds `amount_eur`,
encodes schemaless behind the output subject's prefix and produces with the input's key
and headers (so records on the wire are the size Sluice's are). One flush at the end.
No commits, no retries, no dead letters: what any framework adds is measured against this.
"""

from __future__ import annotations

import time
from io import BytesIO

from common import (
    CONVERTED_SCHEMA,
    EUR_PER_UNIT,
    SCHEMAS,
    Clock,
    emit,
    job_args,
    latest_schema_id,
    schema,
)
from confluent_kafka import Consumer, Producer
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from eventing.kafka import consumer_config, producer_config


def main() -> None:
    args = job_args(__doc__.splitlines()[0]).parse_args()
    reader = parse_schema(schema(SCHEMAS / "payments.raw.avsc"))
    writer = parse_schema(schema(CONVERTED_SCHEMA))
    prefix = b"\x00" + latest_schema_id(args.registry, f"{args.output}-value").to_bytes(4, "big")
    consumer = Consumer(consumer_config(args.bootstrap, args.group))
    producer = Producer(producer_config(args.bootstrap))
    consumer.subscribe([args.input])
    clock = Clock()
    produce, output = producer.produce, args.output
    seen = produced = 0
    deadline = time.monotonic() + args.timeout
    while seen < args.events and time.monotonic() < deadline:
        msgs = consumer.consume(500, 0.1)
        if not msgs:
            continue
        clock.start()
        for msg in msgs:
            if msg.error():
                continue
            seen += 1
            buf = BytesIO(msg.value())
            buf.seek(5)
            rec = schemaless_reader(buf, reader, None)
            amount = rec["amount"]
            if amount <= 0:
                continue
            rec["amount_eur"] = round(amount * EUR_PER_UNIT[rec["currency"]], 2)
            out = BytesIO()
            out.write(prefix)
            schemaless_writer(out, writer, rec)
            try:
                produce(output, out.getvalue(), msg.key(), headers=msg.headers())
            except BufferError:
                producer.poll(0.05)
                produce(output, out.getvalue(), msg.key(), headers=msg.headers())
            produced += 1
        producer.poll(0)
    left = producer.flush(60)
    clock.stop()
    consumer.close()
    emit(clock.result(seen, outputs=produced, unacked=left))


if __name__ == "__main__":
    main()
