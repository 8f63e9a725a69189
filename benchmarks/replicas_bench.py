"""Scale out: the same function as 1 and as 2 processes in one consumer group, ev/s and CPU/event.

What `sluice up --replicas NAME=N` runs: N `sluice run --function NAME` processes sharing
the function's consumer group, so the broker spreads the partitions over them. Here the
function is the benchmarks' job (`benchmarks/convert`, in process) on fresh 4-partition
topics, so the figures compare with `run.py`'s throughput rows.

One measurement (`measure`): start N processes (each with its metrics port); produce
warm-up records until every process has processed at least one (all joined, partitions
spread; Tansu's group description lists no members, so the processes' own
`sluice_function_events_succeeded_total` says it); then produce `events` records as
fast as the producer goes and time from the first of them to the moment the output
topic holds every expected output (read here, assigned, no group). CPU is the user+system
time of the N processes over that window (/proc), divided by `events`.

On 2 cores shared with the broker and this process, a second replica can add little
throughput: the figure says how much, and whether CPU per event grows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE / "contenders")):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import CONVERT, CONVERTED_SCHEMA, tree_cpu_seconds  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402

from eventing.kafka import consumer_config, ensure_topics, producer_config  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.pipeline import register  # noqa: E402

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]
SUCCEEDED = "sluice_function_events_succeeded_total"



def succeeded(port: int) -> float | None:
    """The replica's processed-records counter, or None while it does not answer."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(SUCCEEDED))


def _produce(producer: Producer, topic: str, records: Sequence[Record]) -> None:
    for key, value, headers in records:
        try:
            producer.produce(topic, value, key, headers=headers)
        except BufferError:
            producer.poll(0.1)
            producer.produce(topic, value, key, headers=headers)
        producer.poll(0)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def measure(bootstrap: str, registry: str, records: Sequence[Record], positive: Sequence[bool],
            events: int, replicas: int, work: Path | None = None,
            timeout: float = 300.0) -> dict[str, Any]:
    """ev/s and CPU/event of `replicas` processes of the convert function over `events`.

    `records` are binary-mode payment records (Avro behind the `payments.raw` schema id),
    `positive[i]` says whether records[i] yields an output (amount > 0). Warm-up records
    come from the front of `records`, the timed ones right after them, so `records` needs
    `events` plus a margin (warm-up stops at `len(records) - events`). Returns the figures
    and the topics it created (`topics`, for the caller to delete).
    """
    work = work or Path(tempfile.mkdtemp(prefix="sluice-replicas-"))
    work.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    src, out, dlq = f"bench.rep.{run}.in", f"bench.rep.{run}.out", f"bench.rep.{run}.dlq"
    ensure_topics(bootstrap, {src: 4, out: 4, dlq: 1})
    register(registry, src, "payments.raw.avsc")
    register(registry, out, CONVERTED_SCHEMA)
    topology = work / f"topology-{run}.yaml"
    topology.write_text(yaml.safe_dump({
        "topics": {src: {"partitions": 4}, out: {"partitions": 4}, dlq: {"partitions": 1}},
        "functions": {"convert": {
            "source": str(CONVERT), "topics": [src], "outputs": [out],
            "consumerGroup": f"bench-rep-{run}",
            "delivery": {"ordering": "ordered", "deadLetterSink": dlq}}}}))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONUNBUFFERED": "1"}
    ports = [free_port() for _ in range(replicas)]
    procs = []
    for i, port in enumerate(ports):
        log = (work / f"replica-{run}-{i + 1}.log").open("w")
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "sluice"), "--state-dir", str(work / "state"),
             "run", "--topology", str(topology), "--function", "convert",
             "--bootstrap", bootstrap, "--registry", registry,
             "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    producer = Producer(producer_config(bootstrap))
    result: dict[str, Any] = {"replicas": replicas, "events": events, "topics": [src, out, dlq],
                              "logs": str(work)}
    try:
        deadline = time.monotonic() + timeout
        warm = 0
        max_warm = len(records) - events
        while True:  # warm-up: every replica joined and processed something
            counts = [succeeded(p) for p in ports]
            if all(c for c in counts):
                break
            if any(pr.poll() is not None for pr in procs):
                raise RuntimeError(f"a replica exited during warm-up; logs in {work}")
            if time.monotonic() > deadline or warm + 20 > max_warm:
                raise RuntimeError(f"replicas not all processing after {warm} warm-up "
                                   f"records ({counts}); logs in {work}")
            _produce(producer, src, records[warm:warm + 20])
            producer.flush(10)
            warm += 20
            time.sleep(0.2)
        before = [succeeded(p) or 0.0 for p in ports]
        expected = sum(1 for ok in positive[:warm + events] if ok)
        checker = Consumer(consumer_config(bootstrap, f"bench-rep-check-{run}"))
        checker.assign([TopicPartition(out, p, OFFSET_BEGINNING) for p in range(4)])
        cpu0 = sum(tree_cpu_seconds(pr.pid) for pr in procs)
        t0 = time.perf_counter()
        _produce(producer, src, records[warm:warm + events])
        producer.flush(60)
        seen, t_last = 0, t0
        while seen < expected and time.monotonic() < deadline:
            msgs = [m for m in checker.consume(5000, 0.05) if m.error() is None]
            if msgs:
                seen += len(msgs)
                t_last = time.perf_counter()
        cpu1 = sum(tree_cpu_seconds(pr.pid) for pr in procs)
        after = [succeeded(p) or 0.0 for p in ports]
        checker.close()
        seconds = t_last - t0
        result.update({
            "warmup_records": warm, "expected_outputs": expected, "output_records": seen,
            "ok": seen == expected, "seconds": seconds,
            "ev_s": events / seconds if seconds > 0 else None,
            "cpu_s": cpu1 - cpu0, "cpu_us": (cpu1 - cpu0) / events * 1e6,
            "per_replica_events": [a - b for a, b in zip(after, before, strict=True)]})
    finally:
        for proc in procs:
            _stop(proc)
    return result
