"""What tracing costs the in-process dispatcher path, per event.

Runs the dispatcher's per-event work — `record_event` → `FunctionHost.call` (decode, user
function, route, encode) → `produce` — through `InProcessInvoker.invoke` in batches of
lanes, exactly as `Dispatcher.step` calls it, on N synthetic records with CloudEvents
headers and a `traceparent`, with:

    off        tracing disabled (no endpoint)
    on         100% of traces recorded and exported (OTLP/JSON over HTTP)
    10%        a 10% root sampling ratio (records carry no traceparent: the dispatcher
               rolls the dice; unsampled ones get an unsampled traceparent)
    10% (parent) records carrying an incoming traceparent, 10% of them sampled
    0%         every record carries an unsampled traceparent: the cost of "not this one"

The Kafka client is replaced by a null producer so only framework CPU is measured; the
export thread's work (building OTLP/JSON, POSTing to a collector stand-in running in a
separate process) is included because it shares the GIL. It also times one OpenTelemetry
SDK span for comparison.

    .venv/bin/python benchmarks/tracing_overhead.py [--events 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from eventing.delivery.invoke import InProcessInvoker  # noqa: E402
from eventing.fn.runtime import FunctionHost  # noqa: E402
from eventing.telemetry import tracing  # noqa: E402
from eventing.topology import Delivery, Function  # noqa: E402

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
    """An OTLP/HTTP endpoint in another process that answers 200 and discards."""
    code = textwrap.dedent("""
        import http.server, sys
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
            def log_message(self, *a):
                pass
        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        print(s.server_address[1], flush=True)
        s.serve_forever()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())  # type: ignore[union-attr]
    return proc, f"http://127.0.0.1:{port}"


def sdk_span_us(n: int = 20_000) -> float:
    """One OpenTelemetry SDK span with the attributes a `process` span carries."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Null(SpanExporter):
        def export(self, spans):  # noqa: ANN001, ANN202
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Null(), max_queue_size=n + 1))
    t = provider.get_tracer("bench")
    attrs = {"messaging.system": "kafka", "messaging.destination.name": TOPIC,
             "messaging.kafka.destination.partition": 1, "messaging.kafka.message.offset": 5,
             "cloudevents.event_id": "p-1", "sluice.function": "bench"}
    start = time.perf_counter()
    for _ in range(n):
        with t.start_as_current_span("process payments.raw", kind=trace.SpanKind.CONSUMER,
                                     attributes=attrs):
            pass
    provider.force_flush()
    elapsed = time.perf_counter() - start
    provider.shutdown()
    return elapsed / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    server, endpoint = collector_stand_in()
    try:
        cases = [
            ("off", None, 1.0, None),
            ("on (100%)", endpoint, 1.0, None),
            ("10% root ratio", endpoint, 0.1, None),
            ("10% parent-sampled", endpoint, 1.0, "ratio"),
            ("100% parent-sampled", endpoint, 1.0, "sampled"),
            ("0% (unsampled parents)", endpoint, 1.0, "unsampled"),
        ]
        results: dict[str, float] = {}
        cpus: dict[str, float] = {}
        spans: dict[str, int] = {}
        for name, ep, ratio, tp in cases:
            msgs = make_messages(args.events, traceparent=tp)
            times, cpu_times = [], []
            for _ in range(args.repeat):
                tracer = tracing.Tracer(tracing.TracingSettings(
                    endpoint=ep, sampling=ratio, service_name="bench", max_queue=10**7))
                wall, cpu = run_once(msgs, tracer)
                times.append(wall)
                cpu_times.append(cpu)
                spans[name] = tracer.exported + tracer.dropped
                tracer.shutdown()
            results[name] = statistics.median(times)
            cpus[name] = statistics.median(cpu_times)
        base, base_cpu = results["off"], cpus["off"]
        n = args.events
        print(f"in-process dispatcher path, {n} events, batches of {BATCH}, "
              f"median of {args.repeat}; CPU = this process, export thread included")
        print(f"{'case':<22} {'events/s':>10} {'wall us/ev':>10} {'CPU us/ev':>10} "
              f"{'CPU overhead us/ev':>19} {'spans':>8}")
        for name, t in results.items():
            print(f"{name:<22} {n / t:>10,.0f} {t / n * 1e6:>10.2f} {cpus[name] / n * 1e6:>10.2f} "
                  f"{(cpus[name] - base_cpu) / n * 1e6:>19.2f} {spans.get(name, 0):>8}")
        del base
        print(f"OpenTelemetry SDK: {sdk_span_us():.1f} us per span "
              "(BatchSpanProcessor, null exporter)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
