"""Does a kill -9 leave state changes in the broker without their outputs? Counted on Tansu.

Why: `eventing.delivery.checkpoint` step 3 holds keyed-state changes until the outputs
of the same events are acknowledged. Before, each event's state record was produced
right after its output on the same producer; this measures whether a crash really can
land between the two on the local broker, or whether that gap is only theory.

A child process produces, for event i of 8 keys, an output record then a state record
(as the dispatcher's producer: linger.ms 20, acks all, a flush every 50 ms), in one of
two modes: `together` (the old order) or `after` (state produced only after a flush
acknowledged the outputs, latest per key, the new order). The parent kills it with
SIGKILL at a random moment, reads both topics back and counts "orphans": events whose
state record is in the broker while their output is not. Needs a running broker:

    .venv/bin/python benchmarks/state_gap.py --bootstrap 127.0.0.1:9092 [--trials 10]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402

from eventing.kafka import (  # noqa: E402
    STREAM_PRODUCER,
    consumer_config,
    ensure_topics,
    producer_config,
)

KEYS = 8
COMMIT_INTERVAL_S = 0.05  # the dispatcher's


def child(bootstrap: str, run: str, mode: str) -> None:
    """Produce outputs and state until killed, in `mode` order."""
    producer = Producer(producer_config(bootstrap, **STREAM_PRODUCER))
    held: dict[bytes, bytes] = {}
    last = time.monotonic()
    i = 0
    announced = False
    while True:
        key = f"k{i % KEYS}".encode()
        value = str(i).encode()
        producer.produce(f"{run}.out", value, key)
        if mode == "together":
            producer.produce(f"{run}.state", value, key)
        else:
            held[key] = value  # latest per key; the key's window includes every event
        i += 1
        if i % 20 == 0:
            producer.poll(0)
            time.sleep(0.002)  # ~5-8K events/s on a shared core
        if time.monotonic() - last >= COMMIT_INTERVAL_S:
            producer.flush(30)
            if not announced:
                print("ready", flush=True)  # the parent's random kill starts from here
                announced = True
            if held:
                for k, v in held.items():
                    producer.produce(f"{run}.state", v, k)
                held.clear()
                producer.flush(30)
            last = time.monotonic()


def read_all(bootstrap: str, topic: str) -> list[tuple[bytes, int]]:
    """Every (key, event number) in `topic`, read until 2 s pass with nothing new."""
    consumer = Consumer(consumer_config(bootstrap, f"gap-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(4)])
    out: list[tuple[bytes, int]] = []
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 2.0:
        msgs = [m for m in consumer.consume(5000, 0.2) if m.error() is None]
        if msgs:
            idle_since = time.monotonic()
        out.extend((m.key(), int(m.value())) for m in msgs)
    consumer.close()
    return out


def trial(bootstrap: str, mode: str, rng: random.Random) -> tuple[int, int]:
    """(events whose state is in the broker but whose output is not, outputs written)."""
    run = f"gap{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {f"{run}.out": 4, f"{run}.state": 4})
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--run", run,
                             "--bootstrap", bootstrap], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.5 + rng.random() * 2.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    outputs = {n for _, n in read_all(bootstrap, f"{run}.out")}
    # A state record of event n says: the key's window holds every event <= n of that key.
    state = read_all(bootstrap, f"{run}.state")
    orphans = set()
    for _key, n in state:
        orphans |= {m for m in range(n % KEYS, n + 1, KEYS) if m not in outputs}
    return len(orphans), len(outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--child", choices=("together", "after"))
    ap.add_argument("--run")
    args = ap.parse_args()
    if args.child:
        child(args.bootstrap, args.run, args.child)
        return
    rng = random.Random(13)
    for mode in ("together", "after"):
        results = [trial(args.bootstrap, mode, rng) for _ in range(args.trials)]
        hit = sum(1 for o, _ in results if o)
        print(f"{mode:9} kills leaving orphan state: {hit}/{args.trials}; orphans per kill "
              f"{[o for o, _ in results]}; outputs written per kill {[w for _, w in results]}")


if __name__ == "__main__":
    main()
