"""Unit tests of eventing.telemetry.tracing and .traces: W3C rules, sampling, the hop
helpers' parent links, OTLP export to a local HTTP endpoint, the SQLite store, rendering."""

from __future__ import annotations

import http.server
import sqlite3
from pathlib import Path

import orjson
import pytest

from eventing.cloudevent import event as ce_event
from eventing.delivery.invoke import InProcessInvoker
from eventing.fn.api import Reject
from eventing.fn.runtime import FunctionHost
from eventing.telemetry import traces, tracing
from eventing.topology import Delivery, Function
from tests.helpers import FakeMessage, FakeProducer, http_server

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# --------------------------------------------------------------------------- W3C


@pytest.mark.parametrize("value,expected", [
    (TP, ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True)),
    (TP[:-2] + "00", ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", False)),
    ("01" + TP[2:] + "-future-field", ("0af7651916cd43dd8448eb211c80319c",
                                       "b7ad6b7169203331", True)),
    (TP.encode(), ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True)),
])
def test_valid_traceparents_parse(value, expected) -> None:
    assert tuple(tracing.parse_traceparent(value)) == expected


@pytest.mark.parametrize("value", [
    "ff" + TP[2:], TP.upper(), "00-" + "0" * 32 + TP[35:], TP[:36] + "0" * 16 + "-01",
    TP + "-extra", TP[:-1], "01" + TP[2:] + "x", TP.replace("-", "_"), "", None, 42,
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",
])
def test_invalid_traceparents_are_rejected(value) -> None:
    assert tracing.parse_traceparent(value) is None


def test_sanitize_drops_an_invalid_parent_and_its_state() -> None:
    attrs = {"traceparent": "ff" + TP[2:], "tracestate": "a=b"}
    assert tracing.sanitize(attrs) is None
    assert attrs == {}
    attrs = {"traceparent": TP, "tracestate": "a=b"}
    assert tracing.sanitize(attrs) is not None
    assert attrs == {"traceparent": TP, "tracestate": "a=b"}


# --------------------------------------------------------------------------- hops


class Recorder(tracing.Tracer):
    """A tracer that keeps finished spans instead of exporting them."""

    def __init__(self, sampling: float = 1.0) -> None:
        super().__init__(tracing.TracingSettings(
            endpoint=None, sampling=sampling, business_ids={"payment_id": "payment.id"}))
        self.enabled = True
        self.finished: list[tracing.Span] = []

    def _record(self, span: tracing.Span) -> None:
        self.finished.append(span)


def test_ingest_continues_a_valid_parent_and_writes_its_send_span() -> None:
    t = Recorder()
    attrs = {"id": "e1", "type": "t", "source": "/s", "traceparent": TP, "tracestate": "x=1"}
    server, send = t.ingest(attrs, {"payment_id": "p1"}, "payments.raw", 1)
    assert server.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert server.parent_id == "b7ad6b7169203331"
    assert send.parent_id == server.span_id
    assert attrs["traceparent"] == send.traceparent != TP
    assert attrs["tracestate"] == "x=1"
    a = tracing.span_attributes(send, t.business_ids)
    assert a["payment.id"] == "p1" and a["messaging.destination.name"] == "payments.raw"
    assert a["cloudevents.event_id"] == "e1" and a["messaging.system"] == "kafka"


def test_ingest_with_an_invalid_parent_starts_a_new_trace() -> None:
    t = Recorder()
    attrs = {"id": "e1", "traceparent": TP.upper(), "tracestate": "x=1"}
    server, send = t.ingest(attrs, None, "payments.raw", 1)
    assert server.parent_id is None
    assert server.trace_id != "0af7651916cd43dd8448eb211c80319c"
    assert "tracestate" not in attrs
    assert tracing.parse_traceparent(attrs["traceparent"]).span_id == send.span_id


def test_unsampled_decisions_travel_and_record_nothing() -> None:
    t = Recorder(sampling=0.0)
    attrs = {"id": "e1"}
    assert t.ingest(attrs, None, "payments.raw", 1) is None
    ctx = tracing.parse_traceparent(attrs["traceparent"])
    assert ctx is not None and not ctx.sampled  # later hops keep the "no"
    t = Recorder(sampling=1.0)
    unsampled = TP[:-2] + "00"
    attrs = {"id": "e1", "traceparent": unsampled}
    assert t.ingest(attrs, None, "payments.raw", 1) is None
    assert attrs["traceparent"] == unsampled
    assert t.finished == []


def _function(user, outputs=("payments.valid",)) -> FunctionHost:
    fn = Function(name="validate", source=Path(__file__), target="x", topics=("payments.raw",),
                  consumer_group="g-validate", outputs={o: ("*",) for o in outputs},
                  delivery=Delivery(), invoke="inprocess")
    return FunctionHost(fn, None, user=user)


def _msg(tp: str | None = TP) -> FakeMessage:
    h = [("ce_specversion", b"1.0"), ("ce_id", b"e9"), ("ce_source", b"/s"),
         ("ce_type", b"com.x"), ("content-type", b"application/json")]
    if tp:
        h.append(("ce_traceparent", tp.encode()))
    return FakeMessage(topic="payments.raw", partition=2, offset=41, key=b"card-1",
                       value=b'{"payment_id": "p9"}', headers=h, timestamp_ms=1_764_000_000_000)


def test_in_process_hop_links_process_function_and_send_spans() -> None:
    t = Recorder()
    host = _function(lambda e: [e.data, e.data])  # fan-out: two outputs
    host.tracer = t
    producer = FakeProducer()
    outcomes = InProcessInvoker(host, producer, t).invoke([[_msg()]], True)
    assert outcomes[0][1] is None
    by_name: dict[str, list[tracing.Span]] = {}
    for s in t.finished:
        by_name.setdefault(s.name, []).append(s)
    (process,) = by_name["process payments.raw"]
    (function,) = by_name["validate"]
    sends = by_name["send payments.valid"]
    assert process.parent_id == "b7ad6b7169203331"
    assert process.kind == tracing.CONSUMER and function.kind == tracing.INTERNAL
    assert function.parent_id == process.span_id
    assert [s.parent_id for s in sends] == [function.span_id] * 2
    assert {s.trace_id for s in t.finished} == {"0af7651916cd43dd8448eb211c80319c"}
    written = [dict(h)["ce_traceparent"].decode() for _, _, _, h in producer.records]
    assert written == [s.traceparent for s in sends]  # each output carries its own span
    a = tracing.span_attributes(process, t.business_ids)
    assert a["messaging.kafka.destination.partition"] == 2
    assert a["messaging.kafka.message.offset"] == 41
    assert a["messaging.kafka.message.key"] == b"card-1"
    assert a["payment.id"] == "p9" and a["sluice.function"] == "validate"


def test_a_failed_attempt_hands_its_open_span_to_the_dispatcher() -> None:
    t = Recorder()

    def reject(_e):
        raise Reject("amount -5 outside")

    host = _function(reject)
    host.tracer = t
    ((_, failure),) = InProcessInvoker(host, FakeProducer(), t).invoke([[_msg()]], True)
    assert failure.code == 422 and failure.span is not None
    assert failure.span.end == 0  # still open: retry or dead letter decides
    (function,) = t.finished
    assert function.error == "Reject: amount -5 outside"
    attrs = {"id": "e9", "traceparent": TP}
    dead = t.dead_letter(failure.span, attrs, None, "sluice.deadletter", _msg(), "validate",
                         422, failure.message)
    assert dead.parent_id == failure.span.span_id and dead.error == failure.message
    assert attrs["traceparent"] == dead.traceparent


def test_records_without_context_get_a_root_and_disabled_tracing_costs_nothing() -> None:
    t = Recorder()
    event = ce_event.make_event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"})
    span = t.process(event, _msg(None), "validate", "g")
    assert span.parent_id is None and event["traceparent"] == span.traceparent
    off = tracing.Tracer()
    assert not off.enabled
    assert off.process(event, _msg(None), "validate", "g") is None


def test_sink_span_makes_one_span_per_sampled_record() -> None:
    t = Recorder()
    msgs = [_msg(), _msg(TP[:-2] + "00"), _msg(None)]
    with t.sink_span("lake", msgs, table="sluice.payments_scored") as spans:
        assert len(spans) == 1
    (span,) = t.finished
    assert span.parent_id == "b7ad6b7169203331" and span.name == "write sluice.payments_scored"
    with pytest.raises(RuntimeError), t.sink_span("lake", [_msg()]):
        raise RuntimeError("commit failed")
    assert t.finished[-1].error == "commit failed"


# --------------------------------------------------------------------------- export


@pytest.fixture
def collector():
    bodies: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            bodies.append(orjson.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_a):
            pass

    with http_server(Handler) as url:
        yield url, bodies


def test_spans_are_exported_as_otlp_json(collector) -> None:
    url, bodies = collector
    t = tracing.Tracer(tracing.TracingSettings(endpoint=url, service_name="svc",
                                               business_ids={"payment_id": "payment.id"}))
    try:
        attrs = {"id": "e1", "type": "t", "source": "/s", "traceparent": TP}
        server, send = t.ingest(attrs, {"payment_id": "p1"}, "payments.raw", 1)
        send.fail("broker down", "kafka")
        send.finish()
        server.finish()
        t.flush()
    finally:
        t.shutdown()
    spans = traces.parse_resource_spans(bodies[0]["resourceSpans"])
    assert {s.service for s in spans} == {"svc"}
    failed = next(s for s in spans if s.name == "send payments.raw")
    assert failed.status == "error" and failed.errors() == ["broker down"]
    assert failed.kind == "producer" and failed.attributes["payment.id"] == "p1"
    assert t.exported == 2 and t.dropped == 0


def test_an_unreachable_collector_drops_spans_without_raising() -> None:
    t = tracing.Tracer(tracing.TracingSettings(endpoint="http://127.0.0.1:9", timeout_s=0.5))
    try:
        pair = t.ingest({"id": "e"}, None, "x", 1)
        pair[1].finish()
        t.flush()
        assert t.dropped == 1
    finally:
        t.shutdown()


# --------------------------------------------------------------------------- store


def _stored(trace_id, span_id, parent, name, start, **attrs) -> traces.StoredSpan:
    return traces.StoredSpan(trace_id, span_id, parent, "svc", name, "internal", start,
                             start + 1_000_000, "error" if "err" in attrs else "unset",
                             attrs.pop("err", ""), attrs)


def test_store_indexes_by_trace_event_and_payment_id_and_renders_a_tree(tmp_path) -> None:
    # The topology's traceIds decide which business ids are indexed.
    store = traces.TraceStore(tmp_path / "t.db",
                              ref_attributes=traces.ref_attributes(["payment.id"]))
    tid = "a" * 32
    store.add([
        _stored(tid, "1" * 16, None, "POST /", 0, **{"cloudevents.event_id": "e1"}),
        _stored(tid, "2" * 16, "1" * 16, "send payments.raw", 100,
                **{"payment.id": "p1", "messaging.destination.name": "payments.raw",
                   "messaging.kafka.destination.partition": 3,
                   "messaging.kafka.message.offset": 7}),
        _stored(tid, "3" * 16, "2" * 16, "process payments.raw", 200, err="boom"),
    ], {("sluice.traces", 0): 5})
    reader = traces.TraceStore(tmp_path / "t.db", readonly=True)  # another connection
    for ref in (tid, "e1", "p1"):
        assert list(reader.lookup(ref)) == [tid]
    assert reader.lookup("nope") == {}
    assert store.offsets("sluice.traces") == {0: 5}
    text = traces.render(reader.lookup("p1"))
    lines = text.splitlines()
    assert "  send payments.raw" in lines[3] and "payments.raw[3]@7" in lines[3]
    assert "    process payments.raw" in lines[4] and "! boom" in lines[5]
    data = traces.as_json(reader.lookup("e1"))
    assert [s["depth"] for s in data[0]["spans"]] == [0, 1, 2]
    with pytest.raises(sqlite3.OperationalError):
        reader.add([_stored(tid, "4" * 16, None, "x", 0)])  # read-only
    reader.close()
    store.close()
