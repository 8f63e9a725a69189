"""The fraud pipeline end to end: throughput, event-to-queryable latency, query latency.

    .venv/bin/python benchmarks/pipeline_bench.py                  # ~5-10 min on 2 cores
    .venv/bin/python benchmarks/pipeline_bench.py --events 20000 --lake-rows 1000000

It starts its own stack (`sluice up --storage memory --no-generator`, port offset 28200,
state in /tmp/sluice-pipeline-bench) and stops it (`down --purge`) at the end, also on
failure; `--keep` leaves it running. Figures are printed (and written with `--json`);
nothing is asserted.

1. **Throughput**: `--events` generator payments (1% fraud, event times compressed to
   20/s) published through the gateway as fast as the shipped `Publisher` goes (batches
   of 500, 4 in flight); timed from the
   first publish to the last record in `payments.scored`, so it is the slowest stage's
   rate (gateway -> validate -> enrich -> score, each its own process) while all of them
   share the machine with the broker, object store, lake sink and real-time server. Also
   when the lake sink and the real-time table had caught up.
2. **Latency**: `--latency-rate` payments/s for `--latency-seconds`, in batches every
   20 ms (sent on schedule, up to 16 requests in flight); per payment, from the gateway's
   202 (broker acknowledged) to the first poll of the real-time server that returns its
   row (`POST /query`, polled continuously; the poll's own duration is part of the figure
   and printed too), split into its parts by the Kafka timestamps of every hop
   (`latency`'s `parts_ms`).
3. **Query latency on the lake**: `--lake-rows` synthetic scored rows (5,000 cards, 600
   merchants, event times over the last 24 h in time order, like the sink writes them)
   appended with pyiceberg in `--append-rows` appends to a separate table
   `sluice.payments_scored_bench` (bounded by `--lake-budget-s`), then the three example
   queries of `functions.queries.EXAMPLES` through the real-time server, with the tables
   renamed to the bench table (so the real-time ones run on the lake too), and the
   README's three (`sluice query "SELECT ..."` blocks: README 1 risky merchants, 2 fraud
   rate by country per hour on the lake only, 3 a card's timeline); cold run and median
   of `--repeat` warm runs. Each also "as shipped", on the stack's own (small) tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eventing.stack.settings import StackSettings, load_settings  # noqa: E402
from functions.generate import Generator, event_for, reference  # noqa: E402

SCORED_TOPIC = "payments.scored"
BENCH_TABLE = "payments_scored_bench"


# --------------------------------------------------------------------------- stack


def sluice(state: Path, offset: int, *args: str, timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "eventing.cli", "--state-dir", str(state),
           "--port-offset", str(offset), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"sluice {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def metric(url: str, name: str) -> float:
    text = httpx.get(url, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


# --------------------------------------------------------------------------- 1. throughput


def _payments(n: int, seed: int, fraud_share: float = 0.01, sim_rate: float = 20.0) -> list:
    gen = Generator(reference(), seed=seed, fraud_share=fraud_share,
                    id_prefix=f"bench{uuid.uuid4().hex[:6]}")
    end = int(time.time() * 1000)
    start = end - int(n * 1000 / sim_rate)
    return [gen.next(start + int(i * 1000 / sim_rate))[0] for i in range(n)]


class ScoredWatcher:
    """Notes when each payment id of a prefix first appears in `payments.scored`."""

    def __init__(self, settings: StackSettings, prefix: str) -> None:
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        from eventing.kafka import consumer_config

        self.prefix = prefix.encode()
        self.seen: dict[bytes, float] = {}
        self.consumer = Consumer(consumer_config(settings.bootstrap, f"bench-{uuid.uuid4()}"))
        parts = self.consumer.list_topics(SCORED_TOPIC, timeout=10).topics[SCORED_TOPIC]
        self.consumer.assign([TopicPartition(SCORED_TOPIC, p, OFFSET_END)
                              for p in parts.partitions])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for msg in self.consumer.consume(5000, 0.1):
                if msg.error():
                    continue
                for name, value in msg.headers() or []:
                    if name == "ce_id":
                        if value.startswith(self.prefix) and value not in self.seen:
                            self.seen[value] = time.perf_counter()
                        break
        self.consumer.close()


def throughput(settings: StackSettings, n: int, concurrency: int = 4) -> dict:
    """`n` example payments through the gateway from the shipped `Publisher` (batches of
    500, `concurrency` in flight), timed to the last record in `payments.scored`."""
    from eventing.ingest.publish import Publisher

    payments = _payments(n, seed=101)
    prefix = payments[0]["payment_id"].rsplit("-", 1)[0]
    watcher = ScoredWatcher(settings, prefix)
    watcher.thread.start()
    time.sleep(1.0)  # the watcher's first fetch
    lake_url = f"http://{settings.host}:{settings.ports.lake_metrics}/metrics"
    rt_url = settings.realtime_url + "/metrics"
    lake0 = metric(lake_url, "sluice_lake_rows_written")
    rt0 = metric(rt_url, "sluice_realtime_rows_ingested")
    accepted: list[float] = []

    def publish(part: list[dict]) -> None:
        with Publisher(settings.gateway_url, timeout=120, concurrency=concurrency) as pub:
            pub.send_many((event_for(p) for p in part), batch_size=500)
        accepted.append(time.perf_counter())

    t0 = time.perf_counter()
    threads = [threading.Thread(target=publish, args=(payments,))]
    for t in threads:
        t.start()
    lake_done = rt_done = None
    deadline = time.monotonic() + max(120.0, n / 200)
    while time.monotonic() < deadline:
        now = time.perf_counter()
        if lake_done is None and metric(lake_url, "sluice_lake_rows_written") - lake0 >= n:
            lake_done = now
        if rt_done is None and metric(rt_url, "sluice_realtime_rows_ingested") - rt0 >= n:
            rt_done = now
        if len(watcher.seen) >= n and lake_done and rt_done:
            break
        time.sleep(0.25)
    for t in threads:
        t.join()
    watcher.stop.set()
    watcher.thread.join(5)
    times = sorted(watcher.seen.values())
    scored = len(times)
    out = {"events": n, "scored": scored,
           "publish_s": round(max(accepted) - t0, 2),
           "gateway_accept_ev_s": round(n / (max(accepted) - t0)),
           "last_scored_s": round(times[-1] - t0, 2) if times else None,
           "pipeline_ev_s": round(scored / (times[-1] - t0)) if times else None,
           "lake_caught_up_s": round(lake_done - t0, 2) if lake_done else None,
           "realtime_caught_up_s": round(rt_done - t0, 2) if rt_done else None}
    if scored >= 10:
        lo, hi = times[int(scored * 0.1)], times[int(scored * 0.9)]
        out["steady_ev_s_10_90"] = round(0.8 * scored / (hi - lo)) if hi > lo else None
    return out


# --------------------------------------------------------------------------- 2. latency


HOPS = ("payments.raw", "payments.valid", "payments.enriched", "payments.scored")


class TopicTimes:
    """Per payment id, the Kafka timestamp (the producer's create time, epoch ms) of its
    record in each topic of the fraud path, read from the topics' ends as they fill.

    Function outputs carry derived ids (`<payment id>/<function>/<n>`), so the payment id
    is the part before the first `/`. A record's timestamp is taken when its producer
    queued it, so the gap between two topics is: the earlier producer's linger and the
    broker's write, the consumer's fetch wait, the dispatcher and the function.
    """

    def __init__(self, settings: StackSettings, topics: tuple[str, ...] = HOPS) -> None:
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        from eventing.kafka import consumer_config

        self.times: dict[str, dict[str, int]] = {t: {} for t in topics}
        self.consumer = Consumer(consumer_config(settings.bootstrap, f"bench-{uuid.uuid4()}"))
        meta = self.consumer.list_topics(timeout=10).topics
        self.consumer.assign([TopicPartition(t, p, OFFSET_END) for t in topics
                              for p in meta[t].partitions])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for msg in self.consumer.consume(5000, 0.05):
                if msg.error():
                    continue
                for name, value in msg.headers() or []:
                    if name == "ce_id":
                        pid = value.decode().split("/", 1)[0]
                        self.times[msg.topic()].setdefault(pid, msg.timestamp()[1])
                        break
        self.consumer.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def _spread(values: list[float]) -> dict:
    return ({"p50": round(pct(values, 50), 1), "p99": round(pct(values, 99), 1), "n": len(values)}
            if values else {"n": 0})


def latency(settings: StackSettings, rate: float, seconds: float) -> dict:
    """Gateway 202 -> row returned by the real-time server, per payment, with its parts.

    `parts` splits it, per payment, on the Kafka timestamps of its record in every topic
    of the path (`TopicTimes`) and the client's clock (same machine, `time.time`):
    `gateway_ack` raw record queued -> 202 received (linger, broker ack, the answer),
    `raw_to_valid`, `valid_to_enriched`, `enriched_to_scored` (each: the previous
    producer's linger and write, the fetch wait, the dispatcher and the function),
    `scored_to_row` (score's linger and write, the real-time server's fetch wait, its
    consume batching and INSERT, and the poll that found the row) and `poll` (how long
    each poll query took: a row is seen at the end of the first poll after it landed).
    """
    from eventing.ingest.publish import Publisher

    n = int(rate * seconds)
    payments = _payments(n, seed=202)
    per_batch = max(1, int(rate / 50))
    accepted: dict[str, float] = {}
    accepted_wall: dict[str, float] = {}
    seen: dict[str, float] = {}
    seen_wall: dict[str, float] = {}
    polls: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    topic_times = TopicTimes(settings)
    time.sleep(1.0)  # the watcher's first fetch, so it reads from the ends

    def publish() -> None:
        """A batch every 20 ms on schedule, each on its own request: the next one does not
        wait for the previous answer, so a slow ack does not lower the offered rate."""
        from concurrent.futures import ThreadPoolExecutor

        def send(pub: Publisher, batch: list[dict]) -> None:
            pub.send_many([event_for(p) for p in batch], batch_size=per_batch)
            t, wall = time.perf_counter(), time.time()
            with lock:
                for p in batch:
                    accepted[p["payment_id"]] = t
                    accepted_wall[p["payment_id"]] = wall

        start = time.perf_counter()
        try:
            with Publisher(settings.gateway_url, concurrency=1) as pub, \
                    ThreadPoolExecutor(16) as pool:
                for i in range(0, n, per_batch):
                    wait = start + (i / rate) - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    pool.submit(send, pub, payments[i:i + per_batch])
        finally:
            done.set()  # the poller's 30 s drain starts even when publishing failed

    def poll() -> None:
        client = httpx.Client(timeout=30)
        deadline = None
        while True:
            with lock:
                pending = [i for i in accepted if i not in seen]
            if not pending:
                if done.is_set():
                    return
                time.sleep(0.002)
                continue
            if done.is_set():
                deadline = deadline or time.monotonic() + 30
                if time.monotonic() > deadline:
                    return
            in_list = ", ".join(f"'{i}'" for i in pending[:2000])
            t0 = time.perf_counter()
            resp = client.post(settings.realtime_url + "/query", json={
                "sql": f"SELECT payment_id FROM payments_scored_rt WHERE payment_id IN "
                       f"({in_list})", "engine": "duckdb", "max_rows": 5000})
            t1, wall = time.perf_counter(), time.time()
            polls.append(t1 - t0)
            for (pid,) in resp.json()["rows"]:
                if pid not in seen:
                    seen[pid] = t1
                    seen_wall[pid] = wall

    threads = [threading.Thread(target=publish), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.5)
    topic_times.close()
    lat = [(seen[i] - accepted[i]) * 1000 for i in accepted if i in seen]
    raw, valid, enriched, scored = (topic_times.times[t] for t in HOPS)

    def gaps(later: dict[str, float], earlier: dict[str, float]) -> list[float]:
        return [later[i] - earlier[i] for i in accepted if i in later and i in earlier]

    ms = {i: w * 1000 for i, w in accepted_wall.items()}
    seen_ms = {i: w * 1000 for i, w in seen_wall.items()}
    parts = {"gateway_ack": _spread(gaps(ms, raw)),
             "raw_to_valid": _spread(gaps(valid, raw)),
             "valid_to_enriched": _spread(gaps(enriched, valid)),
             "enriched_to_scored": _spread(gaps(scored, enriched)),
             "scored_to_row": _spread(gaps(seen_ms, scored)),
             "poll": _spread([x * 1000 for x in polls])}
    return {"rate": rate, "seconds": seconds, "events": n, "queryable": len(lat),
            "p50_ms": round(pct(lat, 50), 1) if lat else None,
            "p99_ms": round(pct(lat, 99), 1) if lat else None,
            "max_ms": round(max(lat), 1) if lat else None,
            "poll_p50_ms": round(pct(polls, 50) * 1000, 1) if polls else None,
            "poll_p99_ms": round(pct(polls, 99) * 1000, 1) if polls else None,
            "load_avg_1m": round(os.getloadavg()[0], 1), "parts_ms": parts}


# --------------------------------------------------------------------------- 3. lake queries


class SyntheticRows:
    """Scored rows without numpy (not installed): one random pool of `pool` rows built with
    `random`, rotated for every append (so appends differ), with fresh payment ids,
    offsets and event times spread over each append's time slice."""

    def __init__(self, pool: int, seed: int = 7) -> None:
        import pyarrow as pa

        rng = random.Random(seed)
        ref = reference()
        cards = sorted(ref.cards)
        merchants = sorted(ref.merchants)
        weights = [1.0 / (i + 1) ** 0.8 for i in range(len(merchants))]
        ci = [rng.randrange(len(cards)) for _ in range(pool)]
        mi = rng.choices(range(len(merchants)), weights, k=pool)
        amount = [round(rng.lognormvariate(3.7, 0.9), 2) for _ in range(pool)]
        score = rng.choices([0.0, 10.0, 15.0, 45.0, 55.0, 70.0, 80.0, 100.0],
                            [0.9, 0.05, 0.01, 0.015, 0.005, 0.008, 0.007, 0.005], k=pool)
        country = [ref.merchants[merchants[m]][1] for m in mi]
        home = [ref.cards[cards[c]] for c in ci]
        count_1m = [rng.randint(1, 2) for _ in range(pool)]
        reasons = {100.0: "velocity_1m,card_testing,velocity_10m", 80.0: "velocity_1m,card_testing",
                   70.0: "impossible_travel,foreign_country", 55.0: "card_testing,foreign_country",
                   45.0: "card_testing", 15.0: "large_amount", 10.0: "foreign_country", 0.0: ""}
        self.pool = pool
        self.columns = {
            "card_id": pa.array([cards[c] for c in ci], pa.string()),
            "merchant_id": pa.array([merchants[m] for m in mi], pa.string()),
            "amount": pa.array(amount), "currency": pa.array(["EUR"] * pool, pa.string()),
            "country": pa.array(country, pa.string()), "amount_eur": pa.array(amount),
            "merchant_category": pa.array([ref.merchants[merchants[m]][0] for m in mi],
                                          pa.string()),
            "card_home_country": pa.array(home, pa.string()),
            "count_1m": pa.array(count_1m, pa.int32()), "amount_1m": pa.array(amount),
            "count_10m": pa.array([2 * c for c in count_1m], pa.int32()),
            "amount_10m": pa.array([2 * a for a in amount]),
            "distinct_merchants_10m": pa.array(count_1m, pa.int32()),
            "country_mismatch": pa.array([c != h for c, h in zip(country, home, strict=True)]),
            "late": pa.array([False] * pool), "score": pa.array(score),
            "decision": pa.array(["decline" if x >= 70 else "review" if x >= 40 else "approve"
                                  for x in score], pa.string()),
            "reasons": pa.array([reasons[x] for x in score], pa.string()),
        }

    def batch(self, schema, start: int, n: int, t_from_ms: int, t_to_ms: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        n = min(n, self.pool)
        shift = (start * 7919) % self.pool
        cols = {k: pa.concat_arrays([v[shift:], v[:shift]])[:n] for k, v in self.columns.items()}
        seq = pa.array(range(start, start + n), pa.int64())
        cols["payment_id"] = pc.binary_join_element_wise(
            "bench-", pc.utf8_lpad(pc.cast(seq, pa.string()), 10, "0"), "")
        cols["kafka_offset"] = seq
        cols["kafka_partition"] = pc.cast(pc.bit_wise_and(seq, 3), pa.int32())
        step = pc.divide(pc.multiply(pa.array(range(n), pa.int64()), t_to_ms - t_from_ms), n)
        cols["event_time"] = pc.add(step, t_from_ms).cast(pa.timestamp("ms", tz="UTC"))
        return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in schema], schema=schema)


def write_lake(settings: StackSettings, rows: int, per_append: int, budget_s: float) -> dict:
    from eventing.tables.lake import open_table
    from eventing.tables.lakehouse import LakeConfig, catalog

    lake = LakeConfig.from_settings(settings)
    avro = json.loads((ROOT / "schemas" / "payments.scored.avsc").read_text())
    table = open_table(catalog(lake), lake.qualified(BENCH_TABLE), avro, "event_time")
    schema = table.schema().as_arrow()
    t0 = time.monotonic()
    pool = SyntheticRows(min(rows, per_append))
    print(f"    random pool of {pool.pool:,} rows in {time.monotonic() - t0:.1f}s", flush=True)
    now = int(time.time() * 1000)
    t_from, span = now - 86_400_000, 86_400_000
    written, appends, append_s = 0, 0, []
    while written < rows and time.monotonic() - t0 < budget_s:
        n = min(per_append, rows - written)
        lo = t_from + span * written // rows
        hi = t_from + span * (written + n) // rows
        batch = pool.batch(schema, written, n, lo, hi)
        t1 = time.monotonic()
        table.append(batch)
        append_s.append(time.monotonic() - t1)
        written += batch.num_rows
        appends += 1
        print(f"    lake: {written:,} / {rows:,} rows ({time.monotonic() - t0:.0f}s)",
              flush=True)
    table.refresh()
    summary = table.current_snapshot().summary
    return {"rows": written, "appends": appends,
            "data_files": int(summary["total-data-files"]),
            "bytes": int(summary["total-files-size"]),
            "write_s": round(time.monotonic() - t0, 1),
            "append_p50_s": round(statistics.median(append_s), 2) if append_s else None}


def time_queries(settings: StackSettings, repeat: int, card: str) -> dict:
    from functions.queries import EXAMPLES

    client = httpx.Client(timeout=600)
    out = {}
    variants = {}
    readme = [q for q in re.findall(r'sluice query "(.*?)"', (ROOT / "README.md").read_text(),
                                    re.S) if q.lstrip().upper().startswith("SELECT")]
    queries = {f"README {i + 1}": q.replace("card-00042", card) for i, q in enumerate(readme)}
    queries |= {name: sql.replace("card-42", card) for name, sql in EXAMPLES.items()}
    for name, sql in queries.items():
        bench = re.sub(r"\bpayments_scored(?:_rt)?\b", BENCH_TABLE, sql)
        variants[f"{name} (lake, bench table)"] = bench
        variants[f"{name} (as shipped)"] = sql
    for label, sql in variants.items():
        walls, executes, rows = [], [], None
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            resp = client.post(settings.realtime_url + "/query", json={"sql": sql})
            walls.append((time.perf_counter() - t0) * 1000)
            body = resp.json()
            if resp.status_code != 200:
                rows = f"error: {body.get('message')}"
                break
            executes.append(body["timing_ms"]["execute"])
            rows = len(body["rows"])
        warm = walls[1:] or walls
        out[label] = {"rows": rows, "cold_ms": round(walls[0], 1),
                      "warm_p50_ms": round(statistics.median(warm), 1),
                      "warm_max_ms": round(max(warm), 1),
                      "execute_p50_ms": round(statistics.median(executes[1:] or executes), 1)
                      if executes else None}
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir", default="/tmp/sluice-pipeline-bench")
    ap.add_argument("--port-offset", type=int, default=28200)
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    ap.add_argument("--events", type=int, default=50_000, help="throughput run size")
    ap.add_argument("--latency-rate", type=float, nargs="+", default=[20.0, 200.0, 1000.0])
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--lake-rows", type=int, default=10_000_000)
    ap.add_argument("--append-rows", type=int, default=1_000_000)
    ap.add_argument("--lake-budget-s", type=float, default=600.0,
                    help="stop appending after this long; queries run on what was written")
    ap.add_argument("--repeat", type=int, default=5, help="warm runs per query")
    ap.add_argument("--trace-sampling", type=float, default=1.0,
                    help="share of traces recorded (sluice up --trace-sampling); tracing "
                         "every event costs ~95 us of CPU per hop")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["throughput", "latency", "lake"])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    state = Path(args.state_dir)
    figures: dict = {"load_avg_start": os.getloadavg()}
    print(f"starting the stack (offset {args.port_offset}, state {state}) ...", flush=True)
    sluice(state, args.port_offset, "up", "--storage", "memory", "--no-generator",
           "--trace-sampling", str(args.trace_sampling))
    settings = load_settings(state_dir=state, port_offset=args.port_offset,
                             broker_storage="memory")
    try:
        if "throughput" not in args.skip:
            print(f"1. throughput: {args.events:,} payments ...", flush=True)
            figures["throughput"] = throughput(settings, args.events)
            print("   ", figures["throughput"], flush=True)
        if "latency" not in args.skip:
            figures["latency"] = []
            for rate in args.latency_rate:
                print(f"2. latency at {rate:g}/s for {args.latency_seconds:g}s ...", flush=True)
                figures["latency"].append(latency(settings, rate, args.latency_seconds))
                print("   ", figures["latency"][-1], flush=True)
        if "lake" not in args.skip:
            print(f"3. writing {args.lake_rows:,} rows to sluice.{BENCH_TABLE} ...", flush=True)
            figures["lake_write"] = write_lake(settings, args.lake_rows, args.append_rows,
                                               args.lake_budget_s)
            print("   ", figures["lake_write"], flush=True)
            figures["queries"] = time_queries(settings, args.repeat, "card-00042")
            for label, f in figures["queries"].items():
                print(f"    {label}: {f}", flush=True)
        figures["load_avg_end"] = os.getloadavg()
    finally:
        if not args.keep:
            sluice(state, args.port_offset, "down", "--purge")
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
