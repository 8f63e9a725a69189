"""The latency floor's hop: a plain confluent-kafka relay, consume -> produce, no framework.

One process per hop, as Sluice runs one process per function. It forwards each record's
key, value and headers unchanged to the output topic, so the records on the wire are the
size Sluice's are; offsets are committed by librdkafka's background auto-commit (what a
plain client does). `e2e_latency.py --relay` starts two of these in place of the two
`sluice run` processes and drives them at the same rate, so Sluice's latency is read as a
ratio of what the broker and the client settings allow.

    python relay.py --bootstrap B --input T1 --output T2 --group G
        [--linger-ms 5] [--consume-wait-ms 2] [--batch 500] [--fetch-wait-ms 10]

Stops on SIGTERM (flushing what is queued).
"""

from __future__ import annotations

import argparse
import signal
import threading

from common import ROOT  # noqa: F401 - puts the repo on sys.path
from confluent_kafka import Consumer, Producer

from eventing.kafka import consumer_config, producer_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("bootstrap", "input", "output", "group"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--linger-ms", type=float, default=5.0, help="producer linger.ms")
    p.add_argument("--consume-wait-ms", type=float, default=2.0,
                   help="consume() timeout: added to a hop's latency on a light stream")
    p.add_argument("--batch", type=int, default=500, help="consume() batch size")
    p.add_argument("--fetch-wait-ms", type=int, default=10, help="consumer fetch.wait.max.ms")
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer = Consumer(consumer_config(
        args.bootstrap, args.group, **{"enable.auto.commit": True,
                                       "fetch.wait.max.ms": args.fetch_wait_ms}))
    producer = Producer(producer_config(args.bootstrap, **{"linger.ms": args.linger_ms}))
    consumer.subscribe([args.input])
    produce, output, wait = producer.produce, args.output, args.consume_wait_ms / 1000
    while not stop.is_set():
        for msg in consumer.consume(args.batch, wait):
            if msg.error():
                continue
            try:
                produce(output, msg.value(), msg.key(), headers=msg.headers())
            except BufferError:
                producer.poll(0.05)
                produce(output, msg.value(), msg.key(), headers=msg.headers())
        producer.poll(0)
    producer.flush(10)
    consumer.close()


if __name__ == "__main__":
    main()
