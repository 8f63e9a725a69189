"""End-to-end latency through two in-process functions, validate → convert, at a fixed rate.

Starts `sluice run --function validate` and `sluice run --function convert` as two
processes (one per function, as `sluice up` does) on a topology of fresh topics, then
produces binary-mode CloudEvents (Avro payments, as the gateway writes them) at `--rate`
for `--seconds`, and consumes the output topic in a thread of the same process. Latency
of an event = when its converted record was consumed − when its input was handed to the
producer (one process, one monotonic clock; the event id travels in `ce_id`, to which
each function appends `/<name>/0`). So it includes the input producer's linger, two
dispatcher hops (each: fetch wait, function, produce, flush, commit) and the output fetch.

Before the window, events are sent until one comes out the far end (both groups joined).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from common import CONVERT, ROOT, emit, tree_cpu_seconds
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.kafka import consumer_config, producer_config
from eventing.serde import AvroSerde
from tests.pipeline import payment

CURRENCIES = ("EUR", "USD", "GBP", "CHF", "JPY", "SEK", "PLN")


def records(serde: AvroSerde, topic: str, prefix: str, n: int) -> list[tuple]:
    out = []
    for i in range(n):
        p = payment(i, i % 1000, 1.0 + i % 997, CURRENCIES[i % len(CURRENCIES)])
        p["payment_id"] = f"{prefix}{i}"
        event = ce_event.make_event({
            "specversion": "1.0", "id": p["payment_id"], "source": "/bench",
            "type": "com.sluice.payment.created", "partitionkey": p["card_id"],
            "datacontenttype": "application/avro"}, serde.encode(topic, p))
        out.append(ce_kafka.to_binary(event))
    return out


def start_relays(args, tmp: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    """The floor: two plain confluent-kafka relays (relay.py) on the same topics."""
    procs = []
    for name, src, dst in (("relay1", args.input, args.mid), ("relay2", args.mid, args.output)):
        log = (tmp / f"{name}.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "relay.py"),
             "--bootstrap", args.bootstrap, "--input", src, "--output", dst,
             "--group", f"{args.group}-{name}", "--linger-ms", str(args.relay_linger_ms),
             "--consume-wait-ms", str(args.relay_wait_ms)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def start_functions(args, tmp: Path) -> list[subprocess.Popen]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONUNBUFFERED": "1"}
    if args.relay_linger_ms is not None:
        return start_relays(args, tmp, env)
    topology = tmp / "topology.yaml"
    delivery = {"ordering": "ordered", "deadLetterSink": args.dlq}
    tuning = {"batchSize": args.batch_size} if args.batch_size else {}
    topology.write_text(yaml.safe_dump({
        "topics": {args.input: {"partitions": 4}, args.mid: {"partitions": 4},
                   args.output: {"partitions": 4}, args.dlq: {"partitions": 1}},
        "functions": {
            "validate": {"source": str(ROOT / "functions" / "validate"), "topics": [args.input],
                         "outputs": [args.mid], "consumerGroup": f"{args.group}-validate",
                         "delivery": delivery, **tuning},
            "convert": {"source": str(CONVERT), "topics": [args.mid],
                        "outputs": [args.output], "consumerGroup": f"{args.group}-convert",
                        "delivery": delivery, **tuning},
        }}))
    whatif = [*(["--cap-ms", str(args.cap_ms)] if args.cap_ms is not None else []),
              *(["--linger-ms", str(args.linger_ms)] if args.linger_ms is not None else []),
              *(["--batch-wait-ms", str(args.batch_wait_ms)]
                if args.batch_wait_ms is not None else [])]
    procs = []
    for name in ("validate", "convert"):
        probe = ["--probe", str(tmp / f"{name}.probe.json")] if args.probe else []
        if args.sluice_root:  # another checkout's Sluice (e.g. before a change)
            launcher = [sys.executable, "-m", "eventing.cli"]
        elif not whatif and not probe:
            launcher = [str(Path(sys.executable).parent / "sluice")]
        else:  # the same CLI with dispatcher settings varied or timed (whatif_run.py)
            launcher = [sys.executable, str(Path(__file__).parent / "whatif_run.py"),
                        *whatif, *probe, "--"]
        log = (tmp / f"{name}.log").open("w")
        procs.append(subprocess.Popen(
            [*launcher, "--state-dir", str(tmp / "state"), "run", "--topology", str(topology),
             "--function", name,
             "--bootstrap", args.bootstrap, "--registry", args.registry],
            cwd=args.sluice_root or ROOT,
            env={**env, "PYTHONPATH": args.sluice_root} if args.sluice_root else env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


class Arrivals(threading.Thread):
    """Consumes a topic (assigned, no group) and stamps each event id: (arrival wall
    clock, the record's CreateTime), both in epoch seconds."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(consumer_config(bootstrap, group))
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.seen: dict[str, tuple[float, float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            # A short timeout: consume() waits for the whole batch or the timeout, and
            # that wait would count as latency.
            for msg in self.consumer.consume(1000, 0.002):
                now = time.time()
                if msg.error():
                    continue
                created = msg.timestamp()[1] / 1000
                for k, v in msg.headers() or ():
                    if k == "ce_id":
                        self.seen[v.decode().split("/", 1)[0]] = (now, created)
                        break
        self.consumer.close()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else -1.0


def hop(sent: dict[str, float], seen: dict[str, tuple[float, float]], pick) -> dict:
    got = [pick(seen[k]) - t for k, t in sent.items() if k in seen]
    return {"p50_ms": pct(got, 0.5), "p99_ms": pct(got, 0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("bootstrap", "registry", "input", "mid", "output", "dlq", "group"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--rate", type=int, default=5000, help="events per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--batch-size", type=int, help="topology batchSize (default: Sluice's)")
    p.add_argument("--cap-ms", type=float, help="what-if: cap the dispatcher's consume wait")
    p.add_argument("--linger-ms", type=float, help="what-if: the dispatcher producer's linger")
    p.add_argument("--batch-wait-ms", type=float, help="what-if: the dispatcher's idle wait")
    p.add_argument("--sluice-root", help="run `python -m eventing.cli` from this checkout "
                   "(before/after comparisons in one run; no what-ifs or probe)")
    p.add_argument("--probe", action="store_true",
                   help="time the parts of each dispatcher cycle (whatif_run.py --probe)")
    p.add_argument("--relay-linger-ms", type=float,
                   help="run the floor instead: two plain relays with this producer linger")
    p.add_argument("--relay-wait-ms", type=float, default=2.0,
                   help="the floor relays' consume() timeout")
    args = p.parse_args()
    total = int(args.rate * args.seconds)
    serde = AvroSerde(args.registry)
    warm = records(serde, args.input, "w", 200)
    window = records(serde, args.input, "e", total)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-e2e-"))
    procs = start_functions(args, tmp)
    producer = Producer(producer_config(args.bootstrap))
    arrivals = Arrivals(args.bootstrap, args.output, f"{args.group}-probe")
    middle = Arrivals(args.bootstrap, args.mid, f"{args.group}-probe-mid")
    arrivals.start()
    middle.start()
    try:
        deadline = time.monotonic() + args.timeout
        i = 0
        while not arrivals.seen:  # both groups joined and the chain works
            if time.monotonic() > deadline or any(pr.poll() is not None for pr in procs):
                raise SystemExit(f"no output during warm-up; logs in {tmp}")
            key, value, headers = warm[i % len(warm)]
            producer.produce(args.input, value, key, headers=headers)
            producer.poll(0)
            i += 1
            time.sleep(0.02)
        producer.flush(10)
        time.sleep(1.0)
        cpu0 = sum(tree_cpu_seconds(pr.pid) for pr in procs)
        sent: dict[str, float] = {}
        start = time.perf_counter()
        tick = 0.001
        n = 0
        while n < total:
            due = min(total, int((time.perf_counter() - start) * args.rate) + 1)
            while n < due:
                key, value, headers = window[n]
                sent[f"e{n}"] = time.time()
                producer.produce(args.input, value, key, headers=headers)
                n += 1
            producer.poll(0)
            time.sleep(tick)
        send_s = time.perf_counter() - start
        producer.flush(10)
        wait_until = time.monotonic() + 30
        while time.monotonic() < wait_until:
            if sum(1 for k in sent if k in arrivals.seen) >= total:
                break
            time.sleep(0.05)
        cpu1 = sum(tree_cpu_seconds(pr.pid) for pr in procs)
        lat = [arrivals.seen[k][0] - t for k, t in sent.items() if k in arrivals.seen]
        # Where the time goes: CreateTime of the validate output (mid) and of the convert
        # output are stamped by each function's producer when it produces.
        hops = {"to_validate_output_created": hop(sent, middle.seen, lambda a: a[1]),
                "to_convert_output_created": hop(sent, arrivals.seen, lambda a: a[1]),
                "to_validate_output_consumed": hop(sent, middle.seen, lambda a: a[0])}
        result = {"events": total, "received": len(lat), "send_seconds": send_s,
              "rate": args.rate, "cap_ms": args.cap_ms, "linger_ms": args.linger_ms,
              "batch_size": args.batch_size,
              "relay_linger_ms": args.relay_linger_ms,
              "relay_wait_ms": args.relay_wait_ms if args.relay_linger_ms is not None
              else None, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
              "p999_ms": pct(lat, 0.999), "max_ms": max(lat) * 1000 if lat else None,
              "functions_cpu_s": cpu1 - cpu0, "hops": hops}
    finally:
        for probe in (arrivals, middle):
            probe.stop.set()
            probe.join(5)
        for pr in procs:
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait(5)
    if args.probe and args.relay_linger_ms is None:
        probes = {}
        for name in ("validate", "convert"):
            f = tmp / f"{name}.probe.json"
            probes[name] = json.loads(f.read_text()) if f.exists() else None
        result["probe"] = probes
    emit(result)


if __name__ == "__main__":
    main()
