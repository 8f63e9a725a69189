"""What holding keyed state until the outputs are acknowledged costs the example's `score`.

Why: the in-process dispatcher now produces a function's state changes at its commit,
after the outputs' flush (`eventing.delivery.checkpoint`, step 3), instead of with each
event's outputs. This runs the same generator traffic (enriched by the example's own
`enrich`) through the real `FunctionHost` and `InProcessInvoker` with `score`, both ways,
with a producer that counts and drops records, a commit (flush, state, flush) every
batch as the dispatcher's, and reports CPU time per event (`time.process_time`, not
wall clock: the machine is shared) and changelog records per event. No broker: the
extra flush's round trip is not in these figures (see benchmarks/README.md).

    .venv/bin/python benchmarks/state_order.py [--events 20000] [--batch 500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from cloudevents.http import CloudEvent

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eventing.fn.runtime import FunctionHost, load_target  # noqa: E402
from eventing.topology import load  # noqa: E402
from functions.generate import Generator, reference  # noqa: E402


class Producer:
    """Counts records per topic and drops them."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def produce(self, topic: str, *args: object, **kwargs: object) -> None:
        self.sent[topic] = self.sent.get(topic, 0) + 1

    def poll(self, *_: object) -> int:
        return 0

    def flush(self, *_: object) -> int:
        return 0


def enriched(events: int, seed: int) -> list[dict]:
    """Generator payments at the `up` rate per card, through the example's `enrich`."""
    enrich = load_target(ROOT / "functions" / "enrich" / "main.py", "enrich")
    gen = Generator(reference(), seed=seed, fraud_share=0.02, id_prefix="bench")
    start = 1_764_150_000_000
    out = []
    for i in range(events):
        p, _ = gen.next(start + i * 50)  # 20 payments/s, as `sluice up`
        out.append(enrich(CloudEvent({"type": "t", "source": "s", "id": p["payment_id"]}, p)))
    return out


def run(payments: list[dict], batch: int, defer: bool) -> tuple[float, dict[str, int]]:
    """CPU seconds and records per topic for `payments` through score, one way."""
    from eventing.delivery.invoke import InProcessInvoker

    function = load(ROOT / "functions" / "topology.yaml").function("score")
    host = FunctionHost(function, None, defer_state=defer)
    for st in host.stores:
        st._data.clear()
        st._dirty.clear()
    producer = Producer()
    invoker = InProcessInvoker(host, producer)  # type: ignore[arg-type]
    call, send = host.call, invoker.output.send
    t0 = time.process_time()
    for i in range(0, len(payments), batch):
        for p in payments[i:i + batch]:
            event = CloudEvent({"type": "com.sluice.payment.enriched", "source": "/b",
                                "id": p["payment_id"], "partitionkey": p["card_id"]}, dict(p))
            records = call(event)
            if records:
                send(records)
        producer.flush()
        if invoker.produce_state():
            producer.flush()
    return time.process_time() - t0, producer.sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    payments = enriched(args.events, seed=7)
    cpu: dict[bool, list[float]] = {False: [], True: []}
    sent: dict[bool, dict[str, int]] = {}
    for _ in range(args.repeat):  # alternate, so drift in the machine hits both alike
        for defer in (False, True):
            seconds, sent[defer] = run(payments, args.batch, defer)
            cpu[defer].append(seconds)
    for defer, label in ((False, "state with each event"), (True, "state after outputs")):
        us = statistics.median(cpu[defer]) / args.events * 1e6
        per = sent[defer].get("score.state", 0) / args.events
        print(f"{label:24} {us:7.1f} µs CPU/event (median of {args.repeat})  "
              f"changelog records/event {per:.3f}  outputs {sent[defer].get('payments.scored')}")


if __name__ == "__main__":
    main()
