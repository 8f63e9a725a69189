"""Cold start of a function: process start -> its first event processed, in process and over HTTP.

The issue's target is <= 1 s for both (a scaled-to-zero function must not stall its
partition for long when an event arrives). Two measurements, each on fresh topics and a
fresh consumer group, with the event already waiting:

- **in process**: `sluice run --function convert` (what `sluice up` runs per function)
  is started; the figure is the first output record's CreateTime (stamped by the
  function's producer when it produced) minus the moment before `Popen`. It includes
  interpreter start, imports, topology load, the consumer group join (Tansu holds a join
  for half of `session.timeout.ms`), the fetch, the call and the produce.
- **behind HTTP**: the function's functions-framework host (`eventing.fn.env` entry
  file and `serve_command`, as its container runs it) is started; this process then
  POSTs the waiting event the way the dispatcher does (binary mode) every 10 ms until
  it gets a 2xx, which the host sends only after the output record was acknowledged.
  The dispatcher (a KafkaSource on a cluster) is already running then, so its group
  join is not part of this figure. `listening_s` says when the port first accepted.

Standalone: `.venv/bin/python benchmarks/cold_start.py --bootstrap B --registry R`;
`benchmarks/run.py` calls `measure` (rows "cold start").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE / "contenders")):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import CONVERT, CONVERTED_SCHEMA  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402

from eventing import topology as topo  # noqa: E402
from eventing.cloudevent import http as ce_http  # noqa: E402
from eventing.cloudevent import kafka as ce_kafka  # noqa: E402
from eventing.fn import env as host_env  # noqa: E402
from eventing.kafka import consumer_config, ensure_topics, producer_config  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.pipeline import register  # noqa: E402

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]
MODES = ("inprocess", "http")



def _topology(work: Path, run: str) -> tuple[Path, dict[str, str]]:
    ids = {"input": f"bench.cold.{run}.in", "output": f"bench.cold.{run}.out",
           "dlq": f"bench.cold.{run}.dlq", "group": f"bench-cold-{run}"}
    path = work / f"topology-{run}.yaml"
    path.write_text(yaml.safe_dump({
        "topics": {ids["input"]: {"partitions": 1}, ids["output"]: {"partitions": 1},
                   ids["dlq"]: {"partitions": 1}},
        "functions": {"convert": {
            "source": str(CONVERT), "topics": [ids["input"]], "outputs": [ids["output"]],
            "consumerGroup": ids["group"],
            "delivery": {"ordering": "ordered", "deadLetterSink": ids["dlq"]}}}}))
    return path, ids


def _first_output(bootstrap: str, topic: str, deadline: float) -> float | None:
    """CreateTime (epoch s) of the first record on `topic`, or None by the deadline."""
    consumer = Consumer(consumer_config(bootstrap, f"bench-cold-probe-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(10, 0.05):
                if msg.error() is None:
                    return msg.timestamp()[1] / 1000
        return None
    finally:
        consumer.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONUNBUFFERED": "1"}


def inprocess_once(bootstrap: str, registry: str, record: Record, work: Path,
                   timeout: float = 60.0) -> dict[str, Any]:
    """`sluice run` start -> first output produced, with the input record already waiting."""
    run = uuid.uuid4().hex[:8]
    topology, ids = _topology(work, run)
    ensure_topics(bootstrap, {ids["input"]: 1, ids["output"]: 1, ids["dlq"]: 1})
    register(registry, ids["input"], "payments.raw.avsc")
    register(registry, ids["output"], CONVERTED_SCHEMA)
    producer = Producer(producer_config(bootstrap))
    key, value, headers = record
    producer.produce(ids["input"], value, key, headers=headers)
    if producer.flush(10):
        raise RuntimeError("could not produce the waiting event")
    log = (work / f"cold-inprocess-{run}.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "sluice"), "--state-dir", str(work / "state"),
         "run", "--topology", str(topology), "--function", "convert",
         "--bootstrap", bootstrap, "--registry", registry],
        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        created = _first_output(bootstrap, ids["output"], time.monotonic() + timeout)
    finally:
        _stop(proc)
    return {"mode": "inprocess", "first_output_s": None if created is None else created - t0,
            "topics": [ids["input"], ids["output"], ids["dlq"]], "log": log.name}


def http_once(bootstrap: str, registry: str, record: Record, work: Path,
              timeout: float = 60.0) -> dict[str, Any]:
    """Host process start -> first 2xx for the waiting event (its output acknowledged)."""
    run = uuid.uuid4().hex[:8]
    topology, ids = _topology(work, run)
    ensure_topics(bootstrap, {ids["output"]: 1})  # no input topic: this process delivers
    register(registry, ids["output"], CONVERTED_SCHEMA)
    function = topo.load(topology).function("convert")
    entry = host_env.write_entry_file(function, work / f"entry-{run}.py", bootstrap, registry)
    port = free_port()
    argv = host_env.serve_command(
        entry, port, executable=str(Path(sys.executable).parent / "functions-framework"))
    key, value, headers = record
    event = ce_kafka.from_record(key, value, headers, topic=ids["input"], partition=0,
                                 offset=0, timestamp_ms=None, validate=False)
    http_headers, body = ce_http.to_binary(event, validate=False)
    log = (work / f"cold-http-{run}.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen(argv, env=_env(), cwd=work, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    listening = done = None
    last = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                conn.connect()
                listening = listening or time.time()
                conn.request("POST", "/", body=body, headers=http_headers)
                resp = conn.getresponse()
                last = f"{resp.status} {resp.read()[:200]!r}"
                conn.close()
                if 200 <= resp.status < 300:
                    done = time.time()
                    break
            except OSError as exc:
                last = str(exc)
            time.sleep(0.01)
    finally:
        _stop(proc)
    return {"mode": "http", "first_output_s": None if done is None else done - t0,
            "listening_s": None if listening is None else listening - t0,
            "last_answer": last, "topics": [ids["output"]],
            "log": log.name}


def measure(bootstrap: str, registry: str, record: Record, repeat: int = 3,
            work: Path | None = None, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Median over `repeat` cold starts per mode (alternating modes); every run listed.

    `record` is one binary-mode CloudEvent payment as Kafka carries it (key, value,
    headers), Avro behind the `payments.raw` schema id. Topics created here are returned
    under `topics` for the caller to delete.
    """
    work = work or Path(tempfile.mkdtemp(prefix="sluice-cold-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    once = {"inprocess": inprocess_once, "http": http_once}
    for _ in range(repeat):
        for mode in modes:
            runs[mode].append(once[mode](bootstrap, registry, record, work))
    out: dict[str, Any] = {"repeat": repeat, "runs": runs,
                           "topics": [t for rs in runs.values() for r in rs for t in r["topics"]]}
    for mode, rs in runs.items():
        got = [r["first_output_s"] for r in rs if r["first_output_s"] is not None]
        out[mode] = {"first_output_s": statistics.median(got) if got else None,
                     "completed": len(got), "runs": len(rs)}
        if mode == "http":
            up = [r["listening_s"] for r in rs if r["listening_s"] is not None]
            out[mode]["listening_s"] = statistics.median(up) if up else None
    return out


def main() -> int:
    from eventing.cloudevent import event as ce_event
    from eventing.serde import AvroSerde
    from tests.pipeline import payment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    topic = f"bench.cold.seed.{uuid.uuid4().hex[:8]}"
    register(args.registry, topic, "payments.raw.avsc")
    pay = payment(1, 1, 12.5, "USD")
    event = ce_event.make_event({
        "specversion": "1.0", "id": pay["payment_id"], "source": "/bench",
        "type": "com.sluice.payment.created", "partitionkey": pay["card_id"],
        "datacontenttype": "application/avro"}, AvroSerde(args.registry).encode(topic, pay))
    print(json.dumps(measure(args.bootstrap, args.registry, ce_kafka.to_binary(event),
                             args.repeat), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
