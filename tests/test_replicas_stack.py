"""Two replicas of a function with keyed state in one consumer group, rebalanced mid-stream.

A second `sluice run` of the same function joins while events flow (the group moves
partitions to it; the stream goes on until both have produced outputs), then the first
one stops (all partitions move to the second). Keyed state must
follow its partitions through the changelog (`eventing.fn.state` restores on every
assignment): every key's count must end at exactly the number of events sent for it,
nothing lost, nothing counted twice, and every count from 1 up must have been emitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from eventing.kafka import consumer_config, ensure_topics, producer_config
from tests.helpers import ROOT, stop_process, unique, wait_until

COUNTER = ROOT / "tests" / "functions" / "counter"
KEYS = 24
PHASE = 600  # events before the second replica joins, and after the first leaves


def start_replica(topology: Path, stack, tmp: Path, n: int) -> subprocess.Popen:
    log = (tmp / f"replica-{n}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "eventing.cli", "--state-dir", str(tmp / "state"), "run",
         "--topology", str(topology), "--function", "counter", "--bootstrap", stack.bootstrap,
         "--registry", stack.registry_url],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)


class Outputs:
    """Everything on the output topic so far: per key, the counts emitted."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(consumer_config(bootstrap, unique("probe-")))
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(4)])
        self.counts: dict[str, list[int]] = defaultdict(list)
        self.pids: dict[int, int] = defaultdict(int)  # process -> outputs, events >= since
        self.since = 0

    def read(self) -> dict[str, list[int]]:
        for msg in self.consumer.consume(5000, 0.2):
            if msg.error() is None:
                v = orjson.loads(msg.value())
                self.counts[v["key"]].append(v["n"])
                if int(v["id"].rsplit("-", 1)[1]) >= self.since:
                    self.pids[v["pid"]] += 1
        return self.counts


def test_keyed_state_follows_partitions_across_rebalances(stack, tmp_path) -> None:
    run = unique("rep")
    src, out, dlq = f"{run}.in", f"{run}.out", f"{run}.dlq"
    ensure_topics(stack.bootstrap, {src: 4, out: 4, dlq: 1})
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump({
        "topics": {src: {"partitions": 4}, out: {"partitions": 4}, dlq: {"partitions": 1}},
        "functions": {"counter": {
            "source": str(COUNTER), "topics": [src], "outputs": [out],
            "consumerGroup": f"{run}-counter",
            "delivery": {"ordering": "ordered", "deadLetterSink": dlq}}}}))
    producer = Producer(producer_config(stack.bootstrap))
    sent: dict[str, int] = defaultdict(int)
    outputs = Outputs(stack.bootstrap, out)

    def send(n: int, start: int) -> None:
        for i in range(start, start + n):
            key = f"{run}-k{i % KEYS}"
            producer.produce(src, json.dumps({"i": i}).encode(), key.encode(), headers=[
                ("ce_specversion", b"1.0"), ("ce_id", f"{run}-{i}".encode()),
                ("ce_source", b"/test"), ("ce_type", b"test.count"),
                ("ce_partitionkey", key.encode()), ("content-type", b"application/json")])
            sent[key] += 1
            if i % 50 == 0:
                producer.poll(0)
                time.sleep(0.02)  # a stream, not one burst: rebalances land mid-stream
        assert producer.flush(30) == 0

    def caught_up() -> bool:
        counts = outputs.read()
        return all(max(counts.get(k, [0])) >= n for k, n in sent.items())

    first = start_replica(topology, stack, tmp_path, 1)
    second = None
    try:
        send(PHASE, 0)
        wait_until(caught_up, 90, "replica 1 to count phase 1")
        second = start_replica(topology, stack, tmp_path, 2)  # joins: rebalance
        outputs.since = sent_total = PHASE
        deadline = time.monotonic() + 90
        while True:  # the stream goes on until both replicas have produced outputs
            send(100, sent_total)
            sent_total += 100
            outputs.read()
            if len(outputs.pids) == 2 or time.monotonic() > deadline:
                break
        assert len(outputs.pids) == 2, "the second replica never got partitions"
        stop_process(first, timeout=30, group=True)  # leaves: rebalance again
        send(PHASE, sent_total)
        sent_total += PHASE
        wait_until(caught_up, 120, "replica 2 to count every key to its end")
        time.sleep(1.0)
        counts = outputs.read()
    finally:
        stop_process(first, timeout=30, group=True)
        if second is not None:
            stop_process(second, timeout=30, group=True)
    logs = "\n".join((tmp_path / f"replica-{n}.log").read_text()[-2000:] for n in (1, 2))
    assert len(sent) == KEYS and sum(sent.values()) == sent_total
    for key, n in sent.items():
        emitted = counts[key]
        assert max(emitted) == n, f"{key}: counted {max(emitted)} of {n} events\n{logs}"
        assert set(emitted) == set(range(1, n + 1)), f"{key}: counts missing\n{logs}"

