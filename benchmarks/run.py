"""Every row of the issue's figures table in one run, each next to its floor or peer.

    .venv/bin/python benchmarks/run.py [--events 300000] [--repeat 3] [--json FILE]
    .venv/bin/python benchmarks/run.py --quick        # small counts: checks it all works
        [--bootstrap HOST:PORT --registry URL]   # an existing stack instead of our own

Without `--bootstrap` it starts a local stack (`sluice up --storage memory --no-pipeline`
on `--port-offset`, default 26000, state in `--state-dir`) and stops it (`down --purge`)
at the end. Everything is on loopback, bounded in count and time, and stops by itself.

The job, the same for every contender: N Avro payments (`schemas/payments.raw.avsc`,
keyed by card id, 4 partitions, ~5% with a non-positive amount), produced beforehand as
binary-mode CloudEvents exactly as `tests/pipeline.produce_payments` does → decode →
drop non-positive amounts → add `amount_eur` → encode (`benchmarks/schemas/
payments.converted.avsc`, registered here for each output topic) →
produce. Timed from the first record consumed to the last output acknowledged. Every run
gets fresh topics and a fresh consumer group; its output topic is read back and counted
here, so a contender that drops or duplicates records is flagged, not just timed.

Contenders (each one process; see benchmarks/contenders/ and README.md):
  floor            confluent-kafka + fastavro, one loop               (--repeat runs)
  quix             Quix Streams 3.28.1 in benchmarks/.venv-quix        (--repeat runs)
  sluice           Dispatcher + benchmarks/convert in process          (--repeat runs)
  sluice-http-batch  Dispatcher → functions-framework host, batches    (--batch-events)
  sluice-http      Dispatcher → functions-framework host, one POST/event (--http-events)
  ff-baseline      a minimal consumer POSTing each record to a bare functions-framework
                   target (contenders/ff_baseline.py)                   (--http-events)
then the gateway (benchmarks/gateway_bench.py), end-to-end latency through validate →
convert at a fixed rate next to two plain relays (the latency floor), cold start
(benchmarks/cold_start.py), 1 vs 2 replicas (benchmarks/replicas_bench.py), and, with
the example pipeline added to the stack (`sluice up --no-generator --trace-sampling
0.01`), gateway 202 → row queryable and the whole fraud pipeline's rate
(benchmarks/pipeline_bench.py's `latency` and `throughput`). It ends with one summary
table (benchmarks/summary.py): row, Sluice's figure, reference, ratio, target met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "contenders"))

import cold_start  # noqa: E402
import pipeline_bench  # noqa: E402
import replicas_bench  # noqa: E402
import summary  # noqa: E402
from common import CONVERT, CONVERTED_SCHEMA  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from eventing.cloudevent import event as ce_event  # noqa: E402
from eventing.cloudevent import kafka as ce_kafka  # noqa: E402
from eventing.kafka import admin_config, consumer_config, ensure_topics, producer_config  # noqa: E402,I001
from eventing.serde import AvroSerde, subject_for  # noqa: E402
from tests.pipeline import payment, register  # noqa: E402

VENV_PY = Path(sys.executable)
QUIX_PY = HERE / ".venv-quix" / "bin" / "python"
CURRENCIES = ("EUR", "USD", "GBP", "CHF", "JPY", "SEK", "PLN")
SUBPROCESS_GRACE_S = 90.0
REPLICA_WARMUP_MARGIN = 5_000  # input records kept for the replicas' warm-up
ALL_PARTS = ["floor", "quix", "sluice", "sluice-http-batch", "sluice-http", "ff-baseline",
             "gateway", "latency", "cold-start", "replicas", "queryable", "pipeline"]
# --quick: small counts, every row still measured (a smoke test, not figures)
QUICK = {"events": 5_000, "repeat": 1, "http_events": 300, "batch_events": 2_000,
         "latency_seconds": 2.0, "relay_lingers": "20", "gateway_events": 500,
         "gateway_batch_events": 2_000, "cold_repeat": 1, "replica_events": 3_000,
         "queryable_seconds": 2.0, "pipeline_events": 2_000, "job_timeout": 120.0}


# --------------------------------------------------------------------------- the input


def payments(n: int) -> list[dict]:
    """N payments over 1,000 cards and 7 currencies; every 20th amount is <= 0 (5%)."""
    rows = []
    for i in range(n):
        amount = 1.0 + (i * 7919 % 100_000) / 100
        if i % 20 == 0:
            amount = 0.0 if i % 40 == 0 else -amount
        rows.append(payment(i, i % 1000, amount, CURRENCIES[i % len(CURRENCIES)]))
    return rows


class Input:
    """The input records, encoded once the way `tests.pipeline.produce_payments` does
    (make_event → serde.encode → ce_kafka.to_binary) and replayed into each fresh topic."""

    def __init__(self, serde: AvroSerde, topic: str, n: int) -> None:
        self.rows = payments(n)
        self.records = []
        for p in self.rows:
            event = ce_event.make_event({
                "specversion": "1.0", "id": p["payment_id"], "source": "/tests",
                "type": "com.sluice.payment.created", "partitionkey": p["card_id"],
                "datacontenttype": "application/avro",
            }, serde.encode(topic, p))
            self.records.append(ce_kafka.to_binary(event))
        self.schema_prefix = self.records[0][1][:5]

    def expected_outputs(self, n: int) -> int:
        return sum(1 for p in self.rows[:n] if p["amount"] > 0)

    def produce(self, bootstrap: str, topic: str, n: int) -> None:
        producer = Producer(producer_config(bootstrap))
        produce = producer.produce
        for key, value, headers in self.records[:n]:
            try:
                produce(topic, value, key, headers=headers)
            except BufferError:
                producer.poll(0.1)
                produce(topic, value, key, headers=headers)
            producer.poll(0)
        if producer.flush(60):
            raise SystemExit(f"could not produce the input to {topic}")


# --------------------------------------------------------------------------- one run


class Bench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, registry: str,
                 parts: set[str]) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.registry = registry
        self.serde = AvroSerde(registry)
        self.admin = AdminClient(admin_config(bootstrap))
        self.logs = Path(args.log_dir)
        self.logs.mkdir(parents=True, exist_ok=True)
        topic = self.fresh("bench.seed")["input"]
        register(registry, topic, "payments.raw.avsc")
        n = max(args.events, args.http_events, args.batch_events,
                args.replica_events + REPLICA_WARMUP_MARGIN if "replicas" in parts else 0)
        print(f"encoding {n:,} input records ...", flush=True)
        self.input = Input(self.serde, topic, n)
        self.drop_subjects([subject_for(topic)])

    @staticmethod
    def fresh(name: str) -> dict[str, str]:
        run = uuid.uuid4().hex[:8]
        base = f"bench.{name}.{run}"
        return {"input": f"{base}.in", "output": f"{base}.out", "dlq": f"{base}.dlq",
                "group": f"bench-{name}-{run}", "run": run}

    def prepare(self, ids: dict[str, str], n: int) -> None:
        ensure_topics(self.bootstrap, {ids["input"]: 4, ids["output"]: 4, ids["dlq"]: 1})
        sid = register(self.registry, ids["input"], "payments.raw.avsc")
        if self.input.schema_prefix != b"\x00" + sid.to_bytes(4, "big"):
            raise SystemExit("payments.raw got a new schema id; rerun on a fresh registry")
        register(self.registry, ids["output"], CONVERTED_SCHEMA)
        self.input.produce(self.bootstrap, ids["input"], n)

    def cleanup(self, ids: dict[str, str], extra_topics: tuple[str, ...] = ()) -> None:
        self.drop_topics([ids["input"], ids["output"], ids["dlq"], *extra_topics])

    def drop_topics(self, topics: list[str]) -> None:
        """Delete topics and their subjects (best effort: a leftover is reported)."""
        for fut in self.admin.delete_topics(topics, operation_timeout=10).values():
            try:
                fut.result(15)
            except Exception as exc:  # noqa: BLE001 - best effort, reported
                print(f"  note: topic not deleted: {exc}", file=sys.stderr)
        self.drop_subjects([subject_for(t) for t in topics])

    def drop_subjects(self, subjects: list[str]) -> None:
        import httpx

        for s in subjects:
            for q in ("", "?permanent=true"):
                try:
                    httpx.delete(f"{self.registry}/subjects/{s}{q}", timeout=5)
                except httpx.HTTPError:
                    pass

    def count_outputs(self, topic: str, expected: int) -> int:
        """Read the output topic back (assigned, no group) and check one value."""
        consumer = Consumer(consumer_config(self.bootstrap, f"bench-check-{uuid.uuid4().hex}"))
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        count, checked = 0, False
        deadline = time.monotonic() + 120
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            msgs = consumer.consume(5000, 0.2)
            if msgs:
                idle_since = time.monotonic()
            for m in msgs:
                if m.error():
                    continue
                count += 1
                if not checked:
                    v = self.serde.decode(m.value())
                    rate = v["amount_eur"] / v["amount"]
                    assert v["amount"] > 0 and 0 < rate < 2, v
                    checked = True
            # past the expected count, wait a little for duplicates; before it, longer
            if time.monotonic() - idle_since > (1.0 if count >= expected else 5.0):
                break
        consumer.close()
        return count

    def run_job(self, name: str, argv: list[str], n: int) -> dict[str, Any]:
        ids = self.fresh(name)
        self.prepare(ids, n)
        cmd = [*argv, "--bootstrap", self.bootstrap, "--registry", self.registry,
               "--input", ids["input"], "--output", ids["output"], "--dlq", ids["dlq"],
               "--group", ids["group"], "--events", str(n),
               "--timeout", str(self.args.job_timeout)]
        try:
            result = run_contender(cmd, self.logs / f"{name}-{ids['run']}.log",
                                   self.args.job_timeout + SUBPROCESS_GRACE_S)
            expected = self.input.expected_outputs(n)
            result["expected_outputs"] = expected
            result["output_records"] = self.count_outputs(ids["output"], expected)
            result["ok"] = (result["events"] == n and result["output_records"] == expected)
        finally:
            self.cleanup(ids)
        return result


def run_contender(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run one contender process; its `RESULT {json}` line is the result."""
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=fh, text=True,
                              timeout=timeout, check=False)
        fh.write(proc.stdout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{cmd[1]} exited {proc.returncode} without a result; see {log}")


# --------------------------------------------------------------------------- reporting


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median figures over the runs of one contender."""
    def med(f):
        return statistics.median(f(r) for r in runs)

    return {
        "events": runs[0]["events"], "runs": len(runs),
        "seconds": med(lambda r: r["seconds"]),
        "ev_s": med(lambda r: r["events"] / r["seconds"]),
        "cpu_s": med(lambda r: r["cpu_s"]),
        "cpu_us": med(lambda r: r["cpu_s"] / r["events"] * 1e6),
        "ok": all(r.get("ok") for r in runs),
        "outputs": [r.get("output_records") for r in runs],
        "expected": runs[0].get("expected_outputs"),
    }


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    floor = rows.get("floor")
    head = (f"{'contender':<18} {'events':>8} {'runs':>4} {'seconds':>8} {'events/s':>9} "
            f"{'x floor':>8} {'CPU s':>7} {'CPU us/ev':>10} {'x floor':>8}  outputs")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        ratio_rate = f"{r['ev_s'] / floor['ev_s']:.3f}" if floor else "-"
        ratio_cpu = f"{r['cpu_us'] / floor['cpu_us']:.2f}" if floor else "-"
        check = "ok" if r["ok"] else f"MISMATCH {r['outputs']} vs {r['expected']}"
        print(f"{name:<18} {r['events']:>8,} {r['runs']:>4} {r['seconds']:>8.2f} "
              f"{r['ev_s']:>9,.0f} {ratio_rate:>8} {r['cpu_s']:>7.2f} {r['cpu_us']:>10.1f} "
              f"{ratio_cpu:>8}  {check}")


# --------------------------------------------------------------------------- the stack


def sluice(args: argparse.Namespace, *command: str) -> None:
    cmd = [str(VENV_PY.parent / "sluice"), "--state-dir", args.state_dir,
           "--port-offset", str(args.port_offset), *command]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=180)


def stack_endpoints(args: argparse.Namespace) -> tuple[str, str]:
    from eventing.stack.settings import load_settings

    s = load_settings(state_dir=args.state_dir, port_offset=args.port_offset).with_saved()
    if s.host != "127.0.0.1":
        raise SystemExit("loopback only")
    return s.bootstrap, s.registry_url


# --------------------------------------------------------------------------- extras


def gateway(args: argparse.Namespace) -> list[str]:
    """benchmarks/gateway_bench.py against the same stack; its summary lines."""
    script = HERE / "gateway_bench.py"
    if not script.exists():
        return ["gateway_bench.py not present: skipped"]
    cmd = [str(VENV_PY), str(script), "--state-dir", args.state_dir,
           "--port-offset", str(args.port_offset), "--events", str(args.gateway_events),
           "--batch-events", str(args.gateway_batch_events), "--max-seconds", "60"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    (Path(args.log_dir) / "gateway.log").write_text(proc.stdout + proc.stderr)
    lines = [ln.rstrip() for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not any(re.search(r"ev/s", ln) for ln in lines):
        return [f"gateway_bench.py failed (exit {proc.returncode}); see "
                f"{Path(args.log_dir) / 'gateway.log'}"]
    return lines


def latency(bench: Bench, args: argparse.Namespace, batch_size: int | None = None,
            relay_linger_ms: float | None = None, extra: tuple[str, ...] = ()
            ) -> dict[str, Any]:
    """validate -> convert through two `sluice run` processes at `--rate`; or, with
    `relay_linger_ms`, the floor: two plain relays (contenders/relay.py) on the same path."""
    ids = bench.fresh("e2e")
    mid = ids["input"].replace(".in", ".mid")
    ensure_topics(bench.bootstrap, {ids["input"]: 4, mid: 4, ids["output"]: 4, ids["dlq"]: 1})
    register(bench.registry, ids["input"], "payments.raw.avsc")
    register(bench.registry, mid, "payments.valid.avsc")
    register(bench.registry, ids["output"], CONVERTED_SCHEMA)
    cmd = [str(VENV_PY), str(HERE / "contenders" / "e2e_latency.py"),
           "--bootstrap", bench.bootstrap, "--registry", bench.registry,
           "--input", ids["input"], "--mid", mid, "--output", ids["output"],
           "--dlq", ids["dlq"], "--group", ids["group"], "--rate", str(args.rate),
           "--seconds", str(args.latency_seconds),
           *(["--batch-size", str(batch_size)] if batch_size else []),
           *(["--relay-linger-ms", str(relay_linger_ms), "--relay-wait-ms",
              str(args.relay_wait_ms)] if relay_linger_ms is not None else ["--probe"]),
           *extra]
    try:
        return run_contender(cmd, bench.logs / f"e2e-{ids['run']}.log", 240)
    finally:
        bench.cleanup(ids, (mid,))


def attempt(report: dict[str, Any], part: str, fn: Callable[..., Any], *args: Any,
            **kwargs: Any) -> Any:
    """Run one part; if it raises, note it under `report["errors"][part]` and go on, so
    one broken part costs its own rows (shown as FAILED), not the whole run's table."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the summary and the JSON
        report.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"
        print(f"  {part} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        traceback.print_exc()
        return None


def cold(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Row 7: benchmarks/cold_start.py, both modes, on the bench's own input record."""
    record = next(r for r, p in zip(bench.input.records, bench.input.rows, strict=False)
                  if p["amount"] > 0)
    result = cold_start.measure(bench.bootstrap, bench.registry, record, args.cold_repeat,
                                Path(args.log_dir) / "cold-start")
    bench.drop_topics(result["topics"])
    return result


def replicas(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Row 8: benchmarks/replicas_bench.py with 1 then 2 processes of the convert function."""
    positive = [p["amount"] > 0 for p in bench.input.rows]
    out = {}
    for n in (1, 2):
        print(f"  {n} replica(s), {args.replica_events:,} events ...", flush=True)
        r = replicas_bench.measure(bench.bootstrap, bench.registry, bench.input.records,
                                   positive, args.replica_events, n,
                                   timeout=args.job_timeout)
        bench.drop_topics(r["topics"])
        print(f"    {r['ev_s']:,.0f} ev/s, {r['cpu_us']:.1f} CPU us/ev, outputs "
              f"{r['output_records']}/{r['expected_outputs']}, per replica "
              f"{r['per_replica_events']}", flush=True)
        out[str(n)] = r
    return out


def pipeline_settings(args: argparse.Namespace, own_stack: bool) -> Any:
    """The stack's settings with the example pipeline running (added to our own stack by a
    second `up`, as a user adds it; at 1% of traces recorded, the issue's condition)."""
    from eventing.stack.health import http_status
    from eventing.stack.settings import load_settings

    if own_stack:
        sluice(args, "up", "--no-generator", "--trace-sampling", str(args.trace_sampling))
    settings = load_settings(state_dir=args.state_dir, port_offset=args.port_offset,
                             broker_storage="memory").with_saved()
    # pipeline_bench's publishers would fail in a thread and leave its poller waiting
    if http_status(settings.gateway_url + "/healthz") != 200:
        raise RuntimeError(f"no gateway at {settings.gateway_url}: give --state-dir and "
                           "--port-offset of a stack running the example pipeline, or let "
                           "run.py start its own stack")
    return settings


def profile(bench: Bench, args: argparse.Namespace) -> None:
    import pstats

    out = Path(args.log_dir) / "sluice-inprocess.pstats"
    r = bench.run_job("sluice-prof", [str(VENV_PY), str(HERE / "contenders" /
                                                         "sluice_dispatch.py"),
                                      "--invoke", "inprocess", "--profile", str(out)],
                      args.events)
    print(f"\ncProfile of Sluice in process ({r['events']:,} events, "
          f"{r['events'] / r['seconds']:,.0f} ev/s under the profiler; stats in {out})")
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(22)
    stats.sort_stats("cumulative").print_stats(
        r"(step|invoke|call|record_event|from_record|to_binary|to_binary_derived|_finish_cycle|"
        r"decode_data|encode|decode|make_event|_as_event|_accept|_drop_done|_due_work|flush|"
        r"commit)\b", 25)


# --------------------------------------------------------------------------- main


def check_rates() -> None:
    from common import EUR_PER_UNIT

    from eventing.fn.runtime import load_target

    fn = load_target(CONVERT / "main.py", "convert")
    table = sys.modules[fn.__module__].EUR_PER_UNIT
    if table != EUR_PER_UNIT:
        raise SystemExit("benchmarks/contenders/common.py EUR_PER_UNIT differs from "
                         "benchmarks/convert: update the copy")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=300_000, help="throughput contenders")
    p.add_argument("--repeat", type=int, default=3, help="runs of floor, quix, sluice")
    p.add_argument("--http-events", type=int, default=5_000, help="HTTP per-event mode")
    p.add_argument("--batch-events", type=int, default=50_000, help="HTTP batch mode")
    p.add_argument("--bootstrap", help="use this broker instead of starting a stack")
    p.add_argument("--registry", help="schema registry URL (with --bootstrap)")
    p.add_argument("--state-dir", default="/tmp/sluice-bench-state",
                   help="state of the stack run.py starts (or of yours, for the gateway)")
    p.add_argument("--port-offset", type=int, default=26000)
    p.add_argument("--only", action="append", choices=[*ALL_PARTS, "profile"],
                   help="run only these parts (repeatable); default all but profile; rows "
                        "not run show 'not run' in the summary")
    p.add_argument("--quick", action="store_true",
                   help="small counts for every part (a smoke test of the whole run, ~5 min; "
                        "its figures mean nothing): " + ", ".join(
                            f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--profile", action="store_true", help="also cProfile Sluice in process")
    p.add_argument("--what-if", action="store_true",
                   help="also measure latency with the topology's batchSize at 100: the "
                        "dispatcher waits for a full batch or 100 ms per hop")
    p.add_argument("--rate", type=int, default=5000, help="latency: events per second")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--relay-lingers", default="5,10,20",
                   help="latency floor: producer linger.ms values tried for the plain relays "
                        "(comma-separated; the best p99 is the floor)")
    p.add_argument("--sluice-whatif", action="append",
                   help="latency what-if (repeatable): also run Sluice with these "
                        "contenders/whatif_run.py flags, e.g. '--linger-ms 5' or "
                        "'--batch-wait-ms 5'")
    p.add_argument("--relay-wait-ms", type=float, default=2.0,
                   help="latency floor: the relays' consume() timeout")
    p.add_argument("--gateway-events", type=int, default=10_000)
    p.add_argument("--gateway-batch-events", type=int, default=200_000)
    p.add_argument("--job-timeout", type=float, default=300.0, help="per contender run")
    p.add_argument("--cold-repeat", type=int, default=3,
                   help="cold starts per mode (in process, HTTP); the median is reported")
    p.add_argument("--replica-events", type=int, default=100_000,
                   help="records through 1, then 2 replicas of the convert function")
    p.add_argument("--queryable-rate", type=float, default=1000.0,
                   help="gateway 202 -> real-time row: payments per second")
    p.add_argument("--queryable-seconds", type=float, default=20.0)
    p.add_argument("--pipeline-events", type=int, default=50_000,
                   help="whole fraud pipeline: payments published through the gateway")
    p.add_argument("--trace-sampling", type=float, default=0.01,
                   help="share of traces the example pipeline records (the issue: 1%%)")
    p.add_argument("--log-dir", default="/tmp/sluice-bench-logs")
    p.add_argument("--before", help="also run the in-process throughput and latency "
                   "contenders from this checkout of Sluice (e.g. a `git archive` of the "
                   "base commit), side by side in the same run")
    p.add_argument("--json", help="also write all results to this file")
    args = p.parse_args()
    if args.quick:  # small counts, except where a flag was given explicitly
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    parts = set(args.only or ALL_PARTS)
    if args.profile:
        parts.add("profile")
    if bool(args.bootstrap) != bool(args.registry):
        p.error("--bootstrap and --registry go together")
    check_rates()
    setup_errors: dict[str, str] = {}
    if "quix" in parts and not QUIX_PY.exists():
        try:
            subprocess.run(["bash", str(HERE / "setup_quix.sh")], check=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:  # its rows say FAILED
            setup_errors["quix"] = f"setup_quix.sh: {exc}"
            parts.discard("quix")

    own_stack = not args.bootstrap
    # SIGTERM (a test's timeout, a CI stop) unwinds like Ctrl-C: `down --purge` still runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if own_stack:
        sluice(args, "up", "--storage", "memory", "--no-pipeline")
        bootstrap, registry = stack_endpoints(args)
    else:
        bootstrap, registry = args.bootstrap, args.registry
    report: dict[str, Any] = {"events": args.events, "bootstrap": bootstrap,
                              "quick": args.quick, "parts": sorted(parts)}
    if setup_errors:
        report["errors"] = setup_errors
    try:
        bench = Bench(args, bootstrap, registry, parts)
        py = str(VENV_PY)
        disp = str(HERE / "contenders" / "sluice_dispatch.py")
        jobs = {
            "floor": ([py, str(HERE / "contenders" / "floor.py")], args.events, args.repeat),
            "quix": ([str(QUIX_PY), str(HERE / "quix_job.py")], args.events, args.repeat),
            "sluice": ([py, disp, "--invoke", "inprocess"], args.events, args.repeat),
            **({"sluice-before": ([py, str(Path(args.before) / "benchmarks" / "contenders" /
                                            "sluice_dispatch.py"), "--invoke", "inprocess"],
                                  args.events, args.repeat)} if args.before else {}),
            "sluice-http-batch": ([py, disp, "--invoke", "http-batch"], args.batch_events, 1),
            "sluice-http": ([py, disp, "--invoke", "http"], args.http_events, 1),
            "ff-baseline": ([py, str(HERE / "contenders" / "ff_baseline.py")],
                            args.http_events, 1),
        }
        jobs = {k: v for k, v in jobs.items()
                if k in parts or (k == "sluice-before" and "sluice" in parts)}
        runs: dict[str, list[dict]] = {k: [] for k in jobs}
        # Round-robin the repeated contenders so drift (broker memory, heat) hits all alike.
        for rep in range(max((v[2] for v in jobs.values()), default=0)):
            for name, (argv, n, repeat) in jobs.items():
                if rep >= repeat:
                    continue
                print(f"run {rep + 1}: {name} ({n:,} events) ...", flush=True)
                r = attempt(report, name, bench.run_job, name, argv, n)
                if r is None:
                    continue
                runs[name].append(r)
                print(f"  {r['events'] / r['seconds']:,.0f} ev/s, "
                      f"{r['cpu_s'] / r['events'] * 1e6:.1f} CPU us/ev, "
                      f"outputs {r['output_records']}/{r['expected_outputs']}", flush=True)
        rows = {name: summarize(rs) for name, rs in runs.items() if rs}
        report["runs"], report["rows"] = runs, rows
        if "gateway" in parts:
            print("gateway ...", flush=True)
            report["gateway"] = gateway(args) if (own_stack or args.state_dir) else [
                "skipped: needs --state-dir of the stack"]
        if "latency" in parts:
            print(f"end-to-end latency at {args.rate:,} ev/s ...", flush=True)
            floors = {}
            for linger in (float(x) for x in args.relay_lingers.split(",") if x.strip()):
                print(f"  floor relays, linger.ms {linger:g} ...", flush=True)
                got = attempt(report, "latency", latency, bench, args, relay_linger_ms=linger)
                if got is not None:
                    floors[linger] = got
            report["latency_floor"] = floors
            print("  sluice ...", flush=True)
            if (got := attempt(report, "latency", latency, bench, args)) is not None:
                report["latency"] = got
            if args.before:
                print(f"  sluice from {args.before} (before) ...", flush=True)
                report["latency_before"] = {**latency(bench, args, extra=(
                    "--sluice-root", args.before)), "whatif": f"BEFORE: Sluice of {args.before}"}
            for i, whatif in enumerate(args.sluice_whatif or []):
                print(f"  what-if: Sluice with {whatif} ...", flush=True)
                report[f"latency_whatif{i}"] = {**latency(bench, args, extra=tuple(
                    whatif.split())), "whatif": f"WHAT-IF {whatif}"}
            if args.what_if:
                print("  what-if: batchSize 100 ...", flush=True)
                report["latency_batch100"] = latency(bench, args, batch_size=100)
        if report.get("latency_floor"):
            complete = [r for r in report["latency_floor"].values()
                        if r["received"] == r["events"]] or list(report["latency_floor"].values())
            report["latency_floor_best"] = min(complete, key=lambda r: r["p99_ms"])
        if "cold-start" in parts:
            print(f"cold start, {args.cold_repeat} per mode ...", flush=True)
            if (got := attempt(report, "cold-start", cold, bench, args)) is not None:
                report["cold_start"] = got
                print("  " + ", ".join(f"{m}: {got[m]}" for m in cold_start.MODES), flush=True)
        if "replicas" in parts:
            print("scale out: 1 vs 2 replicas ...", flush=True)
            if (got := attempt(report, "replicas", replicas, bench, args)) is not None:
                report["replicas"] = got
        if {"queryable", "pipeline"} & parts:
            print(f"adding the example pipeline (traces {args.trace_sampling:g}) ...",
                  flush=True)
            settings = attempt(report, "queryable", pipeline_settings, args, own_stack)
            if settings is None:
                report["errors"]["pipeline"] = report["errors"]["queryable"]
            if settings is not None and "queryable" in parts:
                print(f"gateway 202 -> queryable at {args.queryable_rate:g}/s for "
                      f"{args.queryable_seconds:g}s ...", flush=True)
                got = attempt(report, "queryable", pipeline_bench.latency,
                              settings, args.queryable_rate, args.queryable_seconds)
                if got is not None:
                    report["queryable"] = got
                    print("  ", got, flush=True)
            if settings is not None and "pipeline" in parts:
                print(f"whole pipeline: {args.pipeline_events:,} payments ...", flush=True)
                got = attempt(report, "pipeline", pipeline_bench.throughput,
                              settings, args.pipeline_events)
                if got is not None:
                    report["pipeline"] = got
                    print("  ", got, flush=True)

        print(f"\nThe job on {bootstrap}: Avro payments, 4 partitions, ~5% dropped; "
              f"median of runs; ratios against the floor of this run")
        print_table(rows)
        if "sluice-http" in rows:
            print(f"  sluice-http ran {rows['sluice-http']['events']:,} events (not "
                  f"{args.events:,}): at ~1K ev/s the full count would take minutes; "
                  "events/s and CPU/event are rates and compare directly.")
        if "sluice-http-batch" in rows:
            print(f"  sluice-http-batch ran {rows['sluice-http-batch']['events']:,} events.")
        print("  CPU = process CPU time over the timed window (all threads); for HTTP it "
              "adds the functions-framework server processes.")
        if "gateway" in report:
            print("\nGateway (benchmarks/gateway_bench.py):")
            for line in report["gateway"]:
                print("  " + line)
        if report.get("latency_floor"):
            print(f"\nLatency floor: two plain confluent-kafka relays (consume -> produce, "
                  f"each its own process, consume wait {args.relay_wait_ms:g} ms), "
                  f"{args.rate:,} ev/s for {args.latency_seconds:g} s, produce -> consumed:")
            for linger, r in report["latency_floor"].items():
                print(f"  linger.ms {linger:>4g}: received {r['received']:,}/{r['events']:,}  "
                      f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                      f"p99.9 {r['p999_ms']:.1f} ms  relays CPU "
                      f"{r['functions_cpu_s'] / r['events'] * 1e6:.0f} us/event (both)")
            best = report["latency_floor_best"]
            if "latency" in report:
                lat = report["latency"]
                print(f"  Sluice / best floor (linger {best['relay_linger_ms']:g}): p50 "
                      f"{lat['p50_ms'] / best['p50_ms']:.2f}x  p99 "
                      f"{lat['p99_ms'] / best['p99_ms']:.2f}x")
        for key in [k for k in report if k.startswith("latency") and "floor" not in k]:
            lat = report[key]
            what = ("" if key == "latency" else
                    f" — WHAT-IF, topology batchSize {lat['batch_size']}"
                    if lat.get("batch_size") else
                    f" — {lat.get('whatif')}")
            print(f"\nEnd-to-end latency, validate → convert in process (two `sluice run` "
                  f"processes), {lat['rate']:,} ev/s for {args.latency_seconds:g} s{what}:")
            print(f"  received {lat['received']:,}/{lat['events']:,}  p50 {lat['p50_ms']:.1f} ms"
                  f"  p99 {lat['p99_ms']:.1f} ms  p99.9 {lat['p999_ms']:.1f} ms  "
                  f"max {lat['max_ms']:.1f} ms  functions CPU "
                  f"{lat['functions_cpu_s'] / lat['events'] * 1e6:.0f} us/event (both)")
            for name, h in lat.get("hops", {}).items():
                print(f"    produce → {name.removeprefix('to_').replace('_', ' '):<24} "
                      f"p50 {h['p50_ms']:.1f} ms  p99 {h['p99_ms']:.1f} ms")
            for fn, cycle in (lat.get("probe") or {}).items():
                if not cycle:
                    continue
                print(f"    {fn} cycle parts (ms, p50/p99/max, calls): " + "; ".join(
                    f"{part} {v['p50']}/{v['p99']}/{v['max']} x{v['calls']}"
                    for part, v in cycle.items() if part != "batch")
                    + (f"; records per consume p50 {cycle['batch']['p50']:g}"
                       if "batch" in cycle else ""))
        if "profile" in parts:
            profile(bench, args)
        table = summary.rows(report)
        report["summary"] = [row.as_dict() for row in table]
        print(f"\nSummary: the issue's figures table (this run; load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; "
              f"{'QUICK counts: not figures' if args.quick else 'default counts'})")
        print(summary.table(table))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    finally:
        if own_stack:
            sluice(args, "down", "--purge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
