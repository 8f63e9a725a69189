"""What tracing costs the in-process dispatcher path, per event: SDK vs the previous recorder.

Runs the dispatcher's per-event work — `record_event` → `FunctionHost.call` (decode, user
function, route, encode) → `produce` — through `InProcessInvoker.invoke` in batches of
lanes, exactly as `Dispatcher.step` calls it, on N synthetic records with CloudEvents
headers, in these cases:

    off        tracing disabled (no endpoint)
    off+tp     tracing disabled, records carrying an unsampled traceparent (the baseline
               of `unsampled`: carrying the header costs the same traced or not)
    unsampled  every record carries an unsampled traceparent: the cost of "not this one"
    1%         root sampling ratio 0.01 (records carry no traceparent: the dispatcher
               decides; unsampled ones get an unsampled traceparent)
    10%        root sampling ratio 0.1
    100%       every trace recorded (three spans per event: process, function, send)

The Kafka client is replaced by a null producer so only framework CPU is measured; the
export thread's work (OTLP encoding and POSTing to a collector stand-in running in a
separate process) is included because it shares the GIL: CPU is this process's, every
thread. The same cases run, in the same invocation, against the previous hand-written
recorder (`eventing/` of `--baseline`, default the commit before the SDK switch, checked
out with `git archive` into a temporary folder and run in a child process), so both
columns come from one machine state.

    .venv/bin/python benchmarks/tracing_overhead.py [--events 50000] [--repeat 3]
        [--baseline REV | --no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# `--eventing-root DIR` (the child run) imports `eventing` from DIR instead of this tree.
_ROOT_FLAG = "--eventing-root"
_IMPORT_ROOT = (sys.argv[sys.argv.index(_ROOT_FLAG) + 1] if _ROOT_FLAG in sys.argv
                else str(ROOT))
sys.path.insert(0, _IMPORT_ROOT)

import orjson  # noqa: E402

from eventing.delivery.invoke import InProcessInvoker  # noqa: E402
from eventing.fn.runtime import FunctionHost  # noqa: E402
from eventing.telemetry import tracing  # noqa: E402
from eventing.topology import Delivery, Function  # noqa: E402

# The last commit with the hand-written recorder (OTLP/JSON, no SDK).
PREVIOUS_RECORDER = "4f1b56c8731d2214a3f896cff4f52b5f9995b188"
CASES = [  # name, root ratio (None: tracing off), traceparent of the records, baseline case
    ("off", None, None, "off"),
    ("off+tp", None, "unsampled", "off+tp"),
    ("unsampled", 1.0, "unsampled", "off+tp"),
    ("1%", 0.01, None, "off"),
    ("10%", 0.1, None, "off"),
    ("100%", 1.0, None, "off"),
]

PARTITIONS = 4
BATCH = 500
TOPIC = "payments.raw"


class FakeMessage:
    """The part of confluent_kafka.Message the dispatcher path reads."""

    __slots__ = ("_key", "_value", "_headers", "_partition", "_offset")

    def __init__(self, key: bytes, value: bytes, headers: list, partition: int,
                 offset: int) -> None:
        self._key, self._value, self._headers = key, value, headers
        self._partition, self._offset = partition, offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list:
        return self._headers

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_764_000_000_000)

    def error(self) -> None:
        return None


class NullProducer:
    def produce(self, *_a: Any, **_k: Any) -> None:
        pass

    def poll(self, _timeout: float = 0) -> int:
        return 0


def passthrough(event: Any) -> dict:
    p = event.data
    p["checked"] = True
    return p


def make_messages(n: int, *, traceparent: str | None) -> list[FakeMessage]:
    rnd = random.Random(7)
    out = []
    for i in range(n):
        p = {"payment_id": f"p-{i}", "card_id": f"card-{i % 500}", "merchant_id": "m-1",
             "amount": 10.0, "currency": "EUR", "country": "DE", "event_time": i}
        headers = [("ce_specversion", b"1.0"), ("ce_id", f"p-{i}".encode()),
                   ("ce_source", b"/bench"), ("ce_type", b"com.sluice.payment.created"),
                   ("ce_partitionkey", p["card_id"].encode()),
                   ("content-type", b"application/json")]
        if traceparent == "sampled":
            headers.append(("ce_traceparent", tracing.format_traceparent(
                f"{rnd.getrandbits(128):032x}", f"{rnd.getrandbits(64):016x}").encode()))
        elif traceparent == "unsampled":
            headers.append(("ce_traceparent", tracing.format_traceparent(
                f"{rnd.getrandbits(128):032x}", f"{rnd.getrandbits(64):016x}", False).encode()))
        elif traceparent == "ratio":
            headers.append(("ce_traceparent", tracing.format_traceparent(
                f"{rnd.getrandbits(128):032x}", f"{rnd.getrandbits(64):016x}",
                rnd.random() < 0.1).encode()))
        out.append(FakeMessage(p["card_id"].encode(), orjson.dumps(p), headers, i % PARTITIONS,
                               i // PARTITIONS))
    return out


def run_once(msgs: list[FakeMessage], tracer: tracing.Tracer) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread, export included)."""
    fn = Function(name="bench", source=Path(__file__), target="passthrough", topics=(TOPIC,),
                  consumer_group="bench", outputs={"payments.valid": ("*",)},
                  delivery=Delivery(), invoke="inprocess")
    host = FunctionHost(fn, None, user=passthrough, tracer=tracer)
    invoker = InProcessInvoker(host, NullProducer(), tracer)  # type: ignore[arg-type]
    lanes_all = [msgs[p::PARTITIONS] for p in range(PARTITIONS)]
    per_lane = BATCH // PARTITIONS
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(lanes_all[0]), per_lane):
        invoker.invoke([lane[i:i + per_lane] for lane in lanes_all], True)
    tracer.flush(30)  # the export work is part of the cost
    return time.perf_counter() - start, time.process_time() - cpu


def collector_stand_in() -> tuple[subprocess.Popen, str]:
    """An OTLP/HTTP endpoint in another process that answers 200 and discards the body."""
    code = textwrap.dedent("""
        import http.server, sys
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            def log_message(self, *a):
                pass
        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        print(s.server_address[1], flush=True)
        s.serve_forever()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())  # type: ignore[union-attr]
    return proc, f"http://127.0.0.1:{port}"


def measure(events: int, repeat: int, endpoint: str) -> dict[str, dict[str, float]]:
    """CPU and wall µs per event and spans exported, per case, with the imported tracing."""
    out: dict[str, dict[str, float]] = {}
    for name, ratio, tp, _base in CASES:
        msgs = make_messages(events, traceparent=tp)
        walls, cpus, spans = [], [], 0
        for _ in range(repeat):
            tracer = tracing.Tracer(tracing.TracingSettings(
                endpoint=endpoint if ratio is not None else None, sampling=ratio or 1.0,
                service_name="bench", max_queue=3 * events + 1))
            wall, cpu = run_once(msgs, tracer)
            walls.append(wall)
            cpus.append(cpu)
            spans = tracer.exported + tracer.dropped
            tracer.shutdown()
        out[name] = {"wall_us": statistics.median(walls) / events * 1e6,
                     "cpu_us": statistics.median(cpus) / events * 1e6, "spans": spans}
    return out


def baseline(rev: str, events: int, repeat: int, endpoint: str) -> dict[str, Any] | None:
    """The same cases against `eventing/` of `rev`, in a child process."""
    with tempfile.TemporaryDirectory(prefix="sluice-tracing-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "eventing"],
                                 capture_output=True)
        if archive.returncode != 0:
            print(f"baseline {rev}: {archive.stderr.decode().strip()} (skipped)")
            return None
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--events", str(events), "--repeat",
             str(repeat), "--endpoint", endpoint, _ROOT_FLAG, tmp],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tmp})
        if child.returncode != 0:
            print(f"baseline {rev} failed:\n{child.stderr[-2000:]}")
            return None
        return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", default=PREVIOUS_RECORDER,
                    help="git revision whose eventing/ is the previous recorder")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument(_ROOT_FLAG, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.events, args.repeat, args.endpoint)))
        return
    server, endpoint = collector_stand_in()
    try:
        sdk = measure(args.events, args.repeat, endpoint)
        old = None if args.no_baseline else baseline(args.baseline, args.events, args.repeat,
                                                     endpoint)
    finally:
        server.terminate()
        server.wait()
    n = args.events
    print(f"in-process dispatcher path, {n} events, batches of {BATCH}, median of "
          f"{args.repeat}; CPU = this process, export thread included; overhead = CPU - "
          "off (for `unsampled`: - off+tp, tracing off on the same records)")
    head = f"{'case':<10} {'SDK CPU us/ev':>14} {'SDK overhead':>13} {'spans':>7}"
    if old:
        head += f" {'previous CPU':>13} {'prev overhead':>14} {'SDK / prev':>11}"
    print(head)
    for name, _ratio, _tp, base in CASES:
        s = sdk[name]
        over_s = s["cpu_us"] - sdk[base]["cpu_us"]
        line = f"{name:<10} {s['cpu_us']:>14.2f} {over_s:>13.2f} {int(s['spans']):>7}"
        if old:
            o = old[name]
            over_o = o["cpu_us"] - old[base]["cpu_us"]
            ratio = f"{over_s / over_o:.1f}x" if name != base and over_o > 0.05 else "-"
            line += f" {o['cpu_us']:>13.2f} {over_o:>14.2f} {ratio:>11}"
        print(line)
    if old:
        print(f"previous = the hand-written recorder of {args.baseline[:12]} (OTLP/JSON)")


if __name__ == "__main__":
    main()
