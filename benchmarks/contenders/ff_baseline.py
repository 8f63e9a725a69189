"""The functions-framework baseline: a minimal consumer POSTing each record to a bare target.

What Sluice's per-event HTTP mode must beat (the issue: "per-event >= the
functions-framework baseline"): no Sluice code on the event path. A confluent-kafka
consumer (the `eventing.kafka` client settings, as the floor) reads batches; each record
goes as one binary-mode CloudEvent (`ce_*` headers -> `ce-*`, as a KafkaSource sends it)
to a plain functions-framework server running `ff_target/main.py`, which decodes,
converts, produces and waits for the ack before its 2xx. The partitions of a batch are
POSTed concurrently, one keep-alive connection and one record at a time each (per-partition
order, as Sluice's `ordering: ordered` lanes); offsets are committed after each batch.
A non-2xx stops the run (a baseline has no retries to measure).

CPU is this process plus the functions-framework server's processes over the window.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import CONVERTED_SCHEMA, ROOT, SCHEMAS, Clock, emit, job_args, latest_schema_id
from confluent_kafka import Consumer

from eventing.kafka import consumer_config
from tests.helpers import free_port

TARGET = Path(__file__).resolve().parent / "ff_target" / "main.py"



def http_headers(kafka_headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka binary-mode CloudEvent headers -> HTTP binary mode (`ce_x` -> `ce-x`)."""
    out = {}
    for name, value in kafka_headers or ():
        key = "ce-" + name[3:] if name.startswith("ce_") else name
        out[key] = value.decode() if isinstance(value, bytes) else value
    return out


def start_server(args, tmp: Path) -> tuple[subprocess.Popen, int]:
    """functions-framework serving the bare target; returns once a warm-up event got 2xx."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).resolve().parent)]),
           "BENCH_BOOTSTRAP": args.bootstrap, "BENCH_OUTPUT": args.output,
           "BENCH_OUTPUT_SCHEMA_ID": str(latest_schema_id(args.registry,
                                                          f"{args.output}-value")),
           "BENCH_RAW_SCHEMA": str(SCHEMAS / "payments.raw.avsc"),
           "BENCH_OUT_SCHEMA": str(CONVERTED_SCHEMA)}
    log = (tmp / "ff-server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "functions-framework"), "--source", str(TARGET),
         "--target", "convert", "--signature-type", "cloudevent", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    warmup = {"ce-specversion": "1.0", "ce-id": "warmup", "ce-source": "/bench",
              "ce-type": "bench.warmup", "content-type": "application/octet-stream"}
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)  # its own session: nothing else would stop it
            raise SystemExit(f"functions-framework did not start: "
                             f"{(tmp / 'ff-server.log').read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("POST", "/", body=b"", headers=warmup)
            status = conn.getresponse().status
            conn.close()
            if 200 <= status < 300:
                return proc, port
        except OSError:
            time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Lane:
    """One keep-alive connection posting one partition's records in order."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post_all(self, msgs: list) -> None:
        for msg in msgs:
            self.conn.request("POST", "/", body=msg.value(), headers=http_headers(msg.headers()))
            resp = self.conn.getresponse()
            body = resp.read()
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"target answered {resp.status}: {body[:200]!r}")


def main() -> None:
    args = job_args(__doc__.splitlines()[0]).parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-ff-baseline-"))
    server, port = start_server(args, tmp)
    try:
        consumer = Consumer(consumer_config(args.bootstrap, args.group))
        consumer.subscribe([args.input])
        lanes: dict[int, Lane] = {}
        pool = ThreadPoolExecutor(max_workers=8)
        clock = Clock(extra_pids=(server.pid,))
        seen = 0
        deadline = time.monotonic() + args.timeout
        while seen < args.events and time.monotonic() < deadline:
            msgs = [m for m in consumer.consume(500, 0.1) if not m.error()]
            if not msgs:
                continue
            clock.start()
            by_partition: dict[int, list] = {}
            for m in msgs:
                by_partition.setdefault(m.partition(), []).append(m)
            tasks = [pool.submit(lanes.setdefault(p, Lane(port)).post_all, ms)
                     for p, ms in by_partition.items()]
            for task in tasks:
                task.result()
            consumer.commit(asynchronous=True)
            seen += len(msgs)
        clock.stop()  # every output was acknowledged before its POST answered
        consumer.close()
        pool.shutdown()
        emit(clock.result(seen))
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
