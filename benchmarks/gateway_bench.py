"""Gateway throughput and ack latency against a running local stack (loopback only).

Starts `sluice gateway` on a free port with a topology that routes to a fresh topic of its
own (schema `payments.raw.avsc` registered for it, topic deleted at the end), then:

- binary mode: `--events` single-event POSTs from `--concurrency` concurrent httpx async
  clients, then the same from a minimal raw HTTP/1.1 client (httpx's own CPU cost per
  request exceeds the gateway's on a small machine, so this shows the gateway's share);
- batch mode: `--batch-events` events in `--batch-size` batches, `--batch-concurrency`
  requests in flight.

`publisher_rate(...)` is the other side: the example's payments through
`eventing.ingest.publish.Publisher` (what `sluice publish --file` and `sluice generate`
use) into a running stack's own gateway, with the CPU each part spent per event, so
"the publisher keeps up" is checked with the client that ships, not a raw one:

    .venv/bin/python benchmarks/gateway_bench.py --publisher --state-dir /tmp/s \
        --port-offset 23000 --events 50000 --publisher-concurrency 1 4

Every 202 means the broker acknowledged (acks=all), so request latency is ack latency.
Bounded by counts and by `--max-seconds` per phase. The client runs on the same machine
and competes for the same cores: read the figures as a floor.

    .venv/bin/python benchmarks/gateway_bench.py --port-offset 23000 --state-dir /tmp/s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.contenders.common import tree_cpu_seconds  # noqa: E402
from eventing.stack.process import ProcessDir, is_alive  # noqa: E402
from eventing.stack.settings import load_settings  # noqa: E402

TYPE = "com.sluice.bench.payment"


def payment(i: int) -> dict:
    return {"payment_id": f"p{i}", "card_id": f"c{i % 1000}", "merchant_id": f"m{i % 50}",
            "amount": 1.0 + i % 500, "currency": "EUR", "country": "DE",
            "event_time": 1_700_000_000_000 + i}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def binary_request(i: int) -> tuple[dict[str, str], bytes]:
    headers = {"ce-specversion": "1.0", "ce-id": f"b{i}", "ce-source": "/bench",
               "ce-type": TYPE, "ce-partitionkey": f"c{i % 1000}",
               "content-type": "application/json"}
    return headers, orjson.dumps(payment(i))


async def binary_phase(url: str, events: int, concurrency: int, max_s: float,
                       client_kind: str = "httpx") -> dict:
    """One event per request, `concurrency` clients each with its own keep-alive connection.

    `httpx`: one `httpx.AsyncClient` per worker (one shared pool of 32 connections costs
    twice the client CPU). `raw`: a minimal HTTP/1.1 client on asyncio streams, to show
    what the gateway takes when the client costs ~nothing (httpx spends ~2 ms of CPU per
    request here, more than the gateway).
    """
    latencies: list[float] = []
    errors = 0
    counter = iter(range(events))
    deadline = time.monotonic() + max_s
    host, port = url.split("//", 1)[1].rstrip("/").split(":")

    async def httpx_worker() -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=30) as client:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                headers, body = binary_request(i)
                t0 = time.perf_counter()
                r = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 202:
                    errors += 1

    async def raw_worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                headers, body = binary_request(i)
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                t0 = time.perf_counter()
                writer.write(f"POST / HTTP/1.1\r\nhost: {host}\r\n{head}content-length: "
                             f"{len(body)}\r\n\r\n".encode() + body)
                answer = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in answer.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if not answer.startswith(b"HTTP/1.1 202"):
                    errors += 1
        finally:
            writer.close()

    worker = httpx_worker if client_kind == "httpx" else raw_worker
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ok = len(latencies) - errors
    return {"events": ok, "errors": errors, "seconds": elapsed, "ev_s": ok / elapsed,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}


async def batch_phase(url: str, events: int, batch_size: int, concurrency: int,
                      max_s: float) -> dict:
    latencies: list[float] = []
    accepted = errors = 0
    starts = iter(range(0, events, batch_size))
    deadline = time.monotonic() + max_s
    headers = {"content-type": "application/cloudevents-batch+json"}
    async with httpx.AsyncClient(timeout=60) as client:
        async def worker() -> None:
            nonlocal accepted, errors
            for start in starts:
                if time.monotonic() > deadline:
                    return
                body = orjson.dumps([
                    {"specversion": "1.0", "id": f"s{i}", "source": "/bench", "type": TYPE,
                     "partitionkey": f"c{i % 1000}", "data": payment(i)}
                    for i in range(start, min(start + batch_size, events))])
                t0 = time.perf_counter()
                r = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - t0)
                if r.status_code == 202:
                    accepted += r.json()["accepted"]
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"events": accepted, "errors": errors, "seconds": elapsed,
            "ev_s": accepted / elapsed, "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99)}


def part_cpu_seconds(state_dir: Path) -> dict[str, float]:
    """CPU seconds (user + system, with children) each live part of a stack has used."""
    return {r.name: tree_cpu_seconds(r.pid) for r in ProcessDir(state_dir).records()
            if is_alive(r)}


def example_events(n: int, seed: int = 303) -> list[dict]:
    """`n` of the example's payment CloudEvents (`functions/generate.py`, 1% fraud), event
    times spread over the last `n / 20` seconds so validate accepts them all."""
    from functions.generate import Generator, event_for, reference

    gen = Generator(reference(), seed=seed, id_prefix=f"pub{uuid.uuid4().hex[:6]}")
    now = int(time.time() * 1000)
    return [event_for(gen.next(now - (n - i) * 50)[0]) for i in range(n)]


def publisher_rate(gateway_url: str, events: int = 50_000, *, batch_size: int = 500,
                   concurrency: int = 4, state_dir: Path | None = None,
                   token: str | None = None) -> dict:
    """The shipped `Publisher` sending `events` example payments to a running gateway.

    Returns ev/s (first request to last answer), the client's own CPU per event (the
    events are built before the clock starts: generating them is `generator_us_per_ev`,
    measured apart), the load average, and, with the stack's `state_dir`, the CPU each
    part used per event meanwhile (functions and sinks keep consuming as it runs, so
    that is the whole pipeline's cost of the traffic, measured while it was offered).
    """
    from eventing.ingest.publish import Publisher

    g0 = time.process_time()
    payload = example_events(events)
    generator_us = (time.process_time() - g0) / events * 1e6
    parts0 = part_cpu_seconds(state_dir) if state_dir else {}
    cpu0, t0 = time.process_time(), time.perf_counter()
    with Publisher(gateway_url, token, concurrency=concurrency, timeout=120) as pub:
        sent = pub.send_many(payload, batch_size=batch_size)
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    parts1 = part_cpu_seconds(state_dir) if state_dir else {}
    return {"events": sent, "batch_size": batch_size, "concurrency": concurrency,
            "seconds": round(elapsed, 2), "ev_s": round(sent / elapsed),
            "client_us_per_ev": round(client_cpu / sent * 1e6, 1),
            "generator_us_per_ev": round(generator_us, 1),
            "load_avg_1m": round(os.getloadavg()[0], 1),
            "part_cpu_us_per_ev": {name: round((parts1[name] - parts0[name]) / sent * 1e6, 1)
                                   for name in sorted(parts1) if name in parts0},
            "part_cores": {name: round((parts1[name] - parts0[name]) / elapsed, 2)
                           for name in sorted(parts1) if name in parts0}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", help="state folder of the running stack")
    p.add_argument("--port-offset", type=int, default=0)
    p.add_argument("--events", type=int, default=20_000, help="binary-mode events")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--batch-events", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--batch-concurrency", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per phase")
    p.add_argument("--runs", type=int, default=1, help="repeat both phases; medians reported")
    p.add_argument("--publisher", action="store_true",
                   help="measure `publisher_rate` into the stack's own gateway instead")
    p.add_argument("--publisher-concurrency", dest="levels", type=int,
                   nargs="+", default=[1, 4], help="--publisher: requests in flight, one "
                   "run each (alternated over --runs)")
    args = p.parse_args()

    stack = load_settings(state_dir=args.state_dir, port_offset=args.port_offset).with_saved()
    if stack.host != "127.0.0.1":
        raise SystemExit("loopback only")
    if args.publisher:
        for _ in range(args.runs):
            for level in args.levels:
                print(publisher_rate(stack.gateway_url, args.events, batch_size=args.batch_size,
                                     concurrency=level, state_dir=stack.state_dir), flush=True)
        return 0
    topic = f"bench.gateway.{uuid.uuid4().hex[:8]}"
    schema = (ROOT / "schemas" / "payments.raw.avsc").read_text()
    r = httpx.post(f"{stack.registry_url}/subjects/{topic}-value/versions",
                   json={"schema": schema}, timeout=10)
    r.raise_for_status()
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    topology = tmp / "topology.yaml"
    topology.write_text(yaml.safe_dump({
        "gateway": {"routes": {TYPE: topic}, "maxBodyBytes": 4 * 1024 * 1024},
        "topics": {topic: {"partitions": 4}}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventing.cli", "--state-dir", str(tmp / "state"), "gateway",
         "--port", str(port), "--bootstrap", stack.bootstrap, "--registry", stack.registry_url,
         "--topology", str(topology), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"gateway did not get ready; log in {tmp / 'gateway.log'}")
            time.sleep(0.1)
        # warm-up: schema fetch, connections, topic metadata
        asyncio.run(binary_phase(url, 500, 8, 10))
        results: dict[str, list[dict]] = {"binary": [], "binary-raw": [], "batch": []}
        for _ in range(args.runs):
            results["binary"].append(asyncio.run(
                binary_phase(url, args.events, args.concurrency, args.max_seconds)))
            results["binary-raw"].append(asyncio.run(
                binary_phase(url, args.events, args.concurrency, args.max_seconds, "raw")))
            results["batch"].append(asyncio.run(
                batch_phase(url, args.batch_events, args.batch_size, args.batch_concurrency,
                            args.max_seconds)))
        print(f"gateway {url} -> topic {topic} (4 partitions, acks=all), {os.cpu_count()} cores")
        for mode, runs in results.items():
            what = (f"{args.batch_concurrency} httpx clients, {args.batch_size} ev/request"
                    if mode == "batch" else
                    f"{args.concurrency} {'raw' if mode.endswith('raw') else 'httpx'} "
                    "clients, 1 ev/request")
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {mode:<10} {what:<36} {med['ev_s']:>9.0f} ev/s  "
                  f"ack latency p50 {med['p50_ms']:.1f} ms  p99 {med['p99_ms']:.1f} ms  "
                  f"({int(med['events'])} events, {int(med['errors'])} errors, "
                  f"{med['seconds']:.1f} s, median of {len(runs)})")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        from confluent_kafka.admin import AdminClient

        from eventing.kafka import admin_config

        admin = AdminClient(admin_config(stack.bootstrap))
        for fut in admin.delete_topics([topic], operation_timeout=10).values():
            try:
                fut.result(10)
            except Exception as exc:  # noqa: BLE001 - best effort cleanup
                print(f"note: could not delete {topic}: {exc}", file=sys.stderr)
        httpx.delete(f"{stack.registry_url}/subjects/{topic}-value", timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
