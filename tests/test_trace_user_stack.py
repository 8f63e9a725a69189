"""User code joins the event's trace on the real stack: a function's own API span and an
instrumented HTTP client call (to a local server) appear inside the function span in
`sluice trace`, exported by the SDK over OTLP to the stack's collector (rotel) and read
back from the trace store by the CLI (a subprocess)."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import uuid

import pytest
from confluent_kafka import Producer

from eventing import topology as topo
from eventing.delivery.runner import RunSettings, build
from eventing.kafka import producer_config
from eventing.serde import AvroSerde
from eventing.stack.settings import Ports
from eventing.telemetry import tracing
from tests.helpers import ROOT, http_server, sluice, unique
from tests.pipeline import payment, payment_record, register, setup_topics

pytestmark = pytest.mark.stack


def test_user_spans_and_an_instrumented_client_call_appear_inside_the_function_span(
        stack, tmp_path, monkeypatch) -> None:
    seen: list[str | None] = []

    class Rates(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("traceparent"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_a):
            pass

    raw, out, dlq = unique("raw."), unique("out."), unique("dlq.")
    setup_topics(stack.bootstrap, {raw: 1, out: 1, dlq: 1})
    register(stack.registry_url, raw, "payments.raw.avsc")
    register(stack.registry_url, out, "payments.raw.avsc")
    path = tmp_path / "topology.yaml"
    path.write_text(f"""
functions:
  traced:
    source: {ROOT / "tests" / "functions" / "traced"}
    target: traced
    topics: [{raw}]
    consumerGroup: {unique("g-traced-")}
    outputs: [{out}]
    delivery:
      deadLetterSink: {dlq}
""")
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    serde = AvroSerde(stack.registry_url)
    key, value, headers = payment_record(serde, raw, payment(1, card=1))
    producer = Producer(producer_config(stack.bootstrap))
    producer.produce(raw, value, key, headers=[
        *headers, ("ce_traceparent", f"00-{trace_id}-{parent}-01".encode())])
    assert producer.flush(30) == 0

    with http_server(Rates) as url:
        monkeypatch.setitem(os.environ, "SLUICE_TEST_RATES_URL", url + "/rates")
        tracer = tracing.configure(tracing.TracingSettings(
            endpoint=stack.otlp_http_url, service_name="sluice-traced"))
        try:
            function = topo.load(path).function("traced")
            dispatcher = build(function, RunSettings(stack.bootstrap, stack.registry_url))
            stop = threading.Event()
            thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
            thread.start()
            deadline = time.monotonic() + 90
            while dispatcher.stats.succeeded < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            stop.set()
            thread.join(30)
            assert dispatcher.stats.succeeded == 1
            tracer.flush()
            assert tracer.exported >= 5 and tracer.dropped == 0
        finally:
            tracing.configure(tracing.TracingSettings())

    offset = stack.ports.broker - Ports().broker
    spans: dict[str, dict] = {}
    for _ in range(10):
        proc = sluice("trace", trace_id, "--json", "--wait", "20", state_dir=stack.state_dir,
                      offset=offset, check=False, timeout=90)
        traces = json.loads(proc.stdout) if proc.returncode == 0 else []
        spans = {s["name"]: s for t in traces for s in t["spans"]}
        if {"lookup rates", "GET"} <= set(spans):
            break
        time.sleep(1)
    process = spans[f"process {raw}"]
    fn = spans["traced"]
    lookup = spans["lookup rates"]
    client = spans["GET"]
    assert process["parent_id"] == parent  # the producer's context is continued
    assert fn["parent_id"] == process["span_id"]
    assert lookup["parent_id"] == fn["span_id"]  # the user's own span
    assert client["parent_id"] == lookup["span_id"]  # the instrumented library's span
    assert client["kind"] == "client" and lookup["service"] == "sluice-traced"
    assert seen == [f"00-{trace_id}-{client['span_id']}-01"]  # context went over HTTP too


def test_prometheus_stores_trace_id_exemplars_that_lead_to_a_trace(pipeline) -> None:
    """A latency bucket scraped by the local Prometheus (exemplar storage on) carries the
    trace id of a request; `sluice trace` finds that trace."""
    import httpx

    from functions.generate import EVENT_TYPE

    eid = f"exemplar-{uuid.uuid4().hex[:8]}"
    r = httpx.post(pipeline.gateway_url, headers={
        "ce-specversion": "1.0", "ce-id": eid, "ce-source": "/tests/exemplars",
        "ce-type": EVENT_TYPE, "ce-partitionkey": "card-00001",
        "content-type": "application/json"}, content=json.dumps({
            "payment_id": eid, "card_id": "card-00001", "merchant_id": "m-0001",
            "amount": 3.5, "currency": "EUR", "country": "DE",
            "event_time": int(time.time() * 1000)}).encode(), timeout=30)
    assert r.status_code == 202, r.text
    query = 'sluice_gateway_request_duration_seconds_bucket{code="202"}'
    trace_ids: set[str] = set()
    deadline = time.monotonic() + 60
    while not trace_ids and time.monotonic() < deadline:
        time.sleep(2)
        got = httpx.get(f"{pipeline.prometheus_url}/api/v1/query_exemplars", params={
            "query": query, "start": time.time() - 600, "end": time.time() + 60},
            timeout=10).json()
        assert got["status"] == "success", got
        trace_ids = {e["labels"]["trace_id"] for series in got["data"]
                     for e in series["exemplars"] if "trace_id" in e["labels"]}
    assert trace_ids, "no exemplar with a trace_id reached Prometheus"
    offset = pipeline.ports.broker - Ports().broker
    trace_id = sorted(trace_ids)[0]
    proc = sluice("trace", trace_id, "--json", "--wait", "20", state_dir=pipeline.state_dir,
                  offset=offset, check=False, timeout=90)
    assert proc.returncode == 0, proc.stderr
    traces = json.loads(proc.stdout)
    assert [t["trace_id"] for t in traces] == [trace_id]
    assert any(s["name"] == "POST /" for s in traces[0]["spans"])
