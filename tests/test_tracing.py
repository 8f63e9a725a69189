"""Unit tests of eventing.telemetry.tracing (the OpenTelemetry SDK behind Sluice's hops)
and .traces: parent links, sampling, user-code and instrumented-library spans inside the
function span, messaging attributes, OTLP export over HTTP/protobuf and gRPC to local
endpoints, `OTEL_*` configuration, the SQLite store, rendering.

The W3C Trace Context rules themselves are tested in test_tracecontext.py."""

from __future__ import annotations

import http.server
from concurrent import futures
from pathlib import Path

import pytest
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventing.cloudevent import event as ce_event
from eventing.delivery.invoke import InProcessInvoker
from eventing.fn.api import Reject
from eventing.fn.runtime import FunctionHost
from eventing.telemetry import tracing
from eventing.topology import Delivery, Function
from tests.helpers import FakeMessage, FakeProducer, free_port, http_server

TRACE = "0af7651916cd43dd8448eb211c80319c"
TP = f"00-{TRACE}-b7ad6b7169203331-01"


class Recorder:
    """A process tracer (`tracing.configure`) whose spans land in memory."""

    def __init__(self, sampling: float = 1.0) -> None:
        self.memory = InMemorySpanExporter()
        # Business ids come from a topology's traceIds; these tests declare payment_id.
        self.tracer = tracing.configure(tracing.TracingSettings(
            sampling=sampling, business_ids={"payment_id": "payment.id"}), exporter=self.memory)

    def spans(self) -> list:
        self.tracer.flush()
        return list(self.memory.get_finished_spans())

    def by_name(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for s in self.spans():
            out.setdefault(s.name, []).append(s)
        return out


@pytest.fixture
def rec():
    r = Recorder()
    yield r
    tracing.configure(tracing.TracingSettings())  # back to "no tracing" for other tests


def hexid(n: int, width: int = 16) -> str:
    return f"{n:0{width}x}"


# --------------------------------------------------------------------------- hops


def test_ingest_continues_a_valid_parent_and_writes_its_send_span(rec) -> None:
    t = rec.tracer
    attrs = {"id": "e1", "type": "t", "source": "/s", "traceparent": TP, "tracestate": "x=1"}
    server, send = t.ingest(attrs, {"payment_id": "p1"}, "payments.raw", 1)
    send.finish()
    server.finish()
    assert server.trace_id == TRACE and server.parent_id == "b7ad6b7169203331"
    assert attrs["traceparent"] == send.traceparent != TP
    assert attrs["tracestate"] == "x=1"
    spans = rec.by_name()
    (s_send,), (s_server,) = spans["send payments.raw"], spans["POST /"]
    assert s_send.parent.span_id == s_server.context.span_id
    assert s_send.kind == otel_trace.SpanKind.PRODUCER
    assert s_server.context.trace_state.get("x") == "1"
    a = s_send.attributes
    assert a["payment.id"] == "p1" and a["messaging.destination.name"] == "payments.raw"
    assert a["cloudevents.event_id"] == "e1" and a["messaging.system"] == "kafka"
    assert a["messaging.operation.type"] == "send"
    # Messaging attributes only on messaging spans: the SERVER span is HTTP.
    assert not any(k.startswith("messaging.") for k in s_server.attributes)
    assert s_server.attributes["http.request.method"] == "POST"
    assert s_server.resource.attributes["service.name"] == "sluice"


def test_ingest_with_an_invalid_parent_starts_a_new_trace(rec) -> None:
    attrs = {"id": "e1", "traceparent": TP.upper(), "tracestate": "x=1"}
    server, send = rec.tracer.ingest(attrs, None, "payments.raw", 1)
    assert server.parent_id is None and server.trace_id != TRACE
    assert "tracestate" not in attrs
    ctx = tracing.parse_traceparent(attrs["traceparent"])
    assert ctx.span_id == send.span_id and ctx.random  # our ids are random (Level 2 flag)


def test_unsampled_decisions_travel_and_record_nothing() -> None:
    r = Recorder(sampling=0.0)
    try:
        attrs = {"id": "e1"}
        assert r.tracer.ingest(attrs, None, "payments.raw", 1) is None
        ctx = tracing.parse_traceparent(attrs["traceparent"])
        assert ctx is not None and not ctx.sampled  # later hops keep the "no"
        unsampled = TP[:-2] + "00"
        attrs = {"id": "e1", "traceparent": unsampled}
        assert r.tracer.ingest(attrs, None, "payments.raw", 1) is None
        assert attrs["traceparent"] == unsampled
        assert r.spans() == []
    finally:
        tracing.configure(tracing.TracingSettings())


def test_root_sampling_ratio_is_honoured() -> None:
    r = Recorder(sampling=0.25)
    try:
        sampled = sum(r.tracer.ingest({"id": str(i)}, None, "t", None) is not None
                      for i in range(4000))
        assert 800 < sampled < 1200
    finally:
        tracing.configure(tracing.TracingSettings())


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


def test_in_process_hop_links_process_function_and_send_spans(rec) -> None:
    t = rec.tracer
    host = _function(lambda e: [e.data, e.data])  # fan-out: two outputs
    producer = FakeProducer()
    outcomes = InProcessInvoker(host, producer, t).invoke([[_msg()]], True)
    assert outcomes[0][1] is None
    spans = rec.by_name()
    (process,) = spans["process payments.raw"]
    (function,) = spans["validate"]
    sends = spans["send payments.valid"]
    assert hexid(process.parent.span_id) == "b7ad6b7169203331"
    assert process.kind == otel_trace.SpanKind.CONSUMER
    assert function.kind == otel_trace.SpanKind.INTERNAL
    assert function.parent.span_id == process.context.span_id
    assert [s.parent.span_id for s in sends] == [function.context.span_id] * 2
    assert {hexid(s.context.trace_id, 32) for s in rec.spans()} == {TRACE}
    written = [dict(h)["ce_traceparent"].decode() for _, _, _, h in producer.records]
    assert written == [f"00-{TRACE}-{hexid(s.context.span_id)}-01" for s in sends]
    a = process.attributes
    assert a["messaging.destination.partition.id"] == "2"
    assert a["messaging.kafka.offset"] == 41
    assert a["messaging.kafka.message.key"] == "card-1"
    assert a["messaging.consumer.group.name"] == "g-validate"
    assert a["payment.id"] == "p9" and a["sluice.function"] == "validate"
    assert not any(k.startswith("messaging.") for k in function.attributes)


def test_user_spans_and_an_instrumented_http_client_are_children_of_the_function(rec) -> None:
    """The function opens a span with the plain OpenTelemetry API and calls a local HTTP
    server through httpx instrumented by opentelemetry-instrumentation-httpx."""
    import httpx
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("traceparent"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_a):
            pass

    with http_server(Handler) as url:
        def user(event):
            with otel_trace.get_tracer("user.code").start_as_current_span("lookup"):
                with httpx.Client() as client:
                    HTTPXClientInstrumentor.instrument_client(client)
                    client.get(url + "/rates")
            return event.data

        host = _function(user)
        InProcessInvoker(host, FakeProducer(), rec.tracer).invoke([[_msg()]], True)
    spans = rec.by_name()
    (function,) = spans["validate"]
    (lookup,) = spans["lookup"]
    (client,) = spans["GET"]
    assert lookup.parent.span_id == function.context.span_id
    assert client.parent.span_id == lookup.context.span_id
    assert client.kind == otel_trace.SpanKind.CLIENT
    assert {hexid(s.context.trace_id, 32) for s in (function, lookup, client)} == {TRACE}
    # The server received the client span's context (the registered propagator).
    assert seen == [f"00-{TRACE}-{hexid(client.context.span_id)}-01"]


def test_user_spans_of_an_unsampled_event_stay_in_its_unsampled_trace(rec) -> None:
    made: list = []

    def user(event):
        with otel_trace.get_tracer("user.code").start_as_current_span("lookup") as span:
            made.append(span.get_span_context())
        return event.data

    InProcessInvoker(_function(user), FakeProducer(), rec.tracer).invoke(
        [[_msg(TP[:-2] + "00")]], True)
    (ctx,) = made
    assert hexid(ctx.trace_id, 32) == TRACE and not ctx.trace_flags.sampled
    assert rec.spans() == []


def test_the_propagator_reads_and_writes_cloudevents_and_kafka_headers(rec) -> None:
    event = ce_event.make_event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                                 "traceparent": TP, "tracestate": "a=1"})
    ctx = propagate.extract(event)
    sc = otel_trace.get_current_span(ctx).get_span_context()
    assert hexid(sc.trace_id, 32) == TRACE and sc.trace_state.get("a") == "1"
    headers: list = [("ce_traceparent", b"old")]
    propagate.inject(headers, ctx)
    assert headers == [("ce_traceparent", TP.encode()), ("ce_tracestate", b"a=1")]
    assert propagate.extract([("ce_traceparent", TP.encode()), ("ce_traceparent",
                                                                  TP.encode())]) == {}


def test_a_failed_attempt_hands_its_open_span_to_the_dispatcher(rec) -> None:
    t = rec.tracer

    def reject(_e):
        raise Reject("amount -5 outside")

    host = _function(reject)
    ((_, failure),) = InProcessInvoker(host, FakeProducer(), t).invoke([[_msg()]], True)
    assert failure.code == 422 and failure.span is not None
    (function,) = rec.spans()  # the process span is still open: retry or dead letter decides
    assert function.status.description == "Reject: amount -5 outside"
    attrs = {"id": "e9", "traceparent": TP}
    source = _msg()
    dead = t.dead_letter(failure.span, attrs, None, "sluice.deadletter", source, "validate",
                         422, failure.message)
    assert dead.parent_id == failure.span.span_id
    assert attrs["traceparent"] == dead.traceparent
    dead.delivered(FakeMessage(topic="sluice.deadletter", partition=0, offset=7))
    dead.finish()
    (dl,) = rec.by_name()["send sluice.deadletter"]
    a = dl.attributes
    # The dead-letter record's own position; the source record's under sluice.source.*.
    assert a["messaging.destination.name"] == "sluice.deadletter"
    assert a["messaging.destination.partition.id"] == "0" and a["messaging.kafka.offset"] == 7
    assert a["sluice.source.partition"] == 2 and a["sluice.source.offset"] == 41
    assert dl.status.status_code == otel_trace.StatusCode.ERROR


def test_records_without_context_get_a_root_and_disabled_tracing_costs_nothing(rec) -> None:
    event = ce_event.make_event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"})
    span = rec.tracer.process(event, _msg(None), "validate", "g")
    assert span.parent_id is None and event["traceparent"] == span.traceparent
    off = tracing.Tracer()
    assert not off.enabled
    assert off.process(event, _msg(None), "validate", "g") is None


def test_sink_span_makes_one_span_per_sampled_record(rec) -> None:
    t = rec.tracer
    msgs = [_msg(), _msg(TP[:-2] + "00"), _msg(None)]
    with t.sink_span("lake", msgs, table="sluice.payments_scored") as spans:
        assert len(spans) == 1
    (span,) = rec.spans()
    assert hexid(span.parent.span_id) == "b7ad6b7169203331"
    assert span.name == "write sluice.payments_scored"
    assert span.attributes["messaging.batch.message_count"] == 3
    with pytest.raises(RuntimeError), t.sink_span("lake", [_msg()]):
        raise RuntimeError("commit failed")
    assert rec.spans()[-1].status.description == "commit failed"


# --------------------------------------------------------------------------- configuration


def test_settings_from_the_standard_otel_variables() -> None:
    s = tracing.settings_from_env({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20x,tenant=a",
        "OTEL_SERVICE_NAME": "svc", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=dev",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }, "default")
    assert s.endpoint == "http://127.0.0.1:4317" and s.protocol == "grpc"
    assert s.headers == {"authorization": "Bearer x", "tenant": "a"}
    assert s.service_name == "svc" and s.sampling == 0.1
    assert s.resource == {"deployment.environment": "dev"}
    # Flags win over the environment; nothing set means no endpoint.
    s = tracing.settings_from_env({"OTEL_TRACES_SAMPLER_ARG": "0.1"}, "default", sampling=0.5)
    assert s.sampling == 0.5 and s.endpoint is None and s.service_name == "default"
    for bad in ({"OTEL_EXPORTER_OTLP_PROTOCOL": "udp"}, {"OTEL_TRACES_SAMPLER": "sometimes"},
                {"OTEL_TRACES_SAMPLER_ARG": "half"}, {"OTEL_RESOURCE_ATTRIBUTES": "novalue"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tracing.settings_from_env(bad, "x")


# --------------------------------------------------------------------------- export


@pytest.fixture
def collector():
    bodies: list[tuple[str, bytes, dict]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            bodies.append((self.path, body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_a):
            pass

    with http_server(Handler) as url:
        yield url, bodies


def _emit(t: tracing.Tracer) -> None:
    attrs = {"id": "e1", "type": "t", "source": "/s", "traceparent": TP}
    server, send = t.ingest(attrs, {"payment_id": "p1"}, "payments.raw", 1)
    send.fail("broker down", "kafka")
    send.finish()
    server.finish()
    t.flush()


def test_spans_are_exported_as_otlp_protobuf_over_http(collector) -> None:
    url, bodies = collector
    t = tracing.Tracer(tracing.TracingSettings(
        endpoint=url, service_name="svc", headers={"x-tenant": "a"},
        resource={"sluice.function": "validate"}))
    try:
        _emit(t)
    finally:
        t.shutdown()
    path, body, headers = bodies[0]
    assert path == "/v1/traces" and headers["content-type"] == "application/x-protobuf"
    assert headers["x-tenant"] == "a"
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    (rs,) = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert resource["service.name"] == "svc" and resource["sluice.function"] == "validate"
    spans = {s.name: s for s in rs.scope_spans[0].spans}
    failed = spans["send payments.raw"]
    assert failed.status.code == 2 and failed.status.message == "broker down"
    assert failed.trace_id.hex() == TRACE
    assert t.exported == 2 and t.dropped == 0


def test_spans_are_exported_over_grpc() -> None:
    import grpc

    got: list = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802
            got.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        t = tracing.Tracer(tracing.TracingSettings(endpoint=f"http://127.0.0.1:{port}",
                                                   protocol="grpc", service_name="svc"))
        try:
            _emit(t)
        finally:
            t.shutdown()
    finally:
        server.stop(0)
    names = {s.name for r in got for rs in r.resource_spans for ss in rs.scope_spans
             for s in ss.spans}
    assert names == {"POST /", "send payments.raw"}
    assert t.exported == 2


def test_an_unreachable_collector_drops_spans_without_raising() -> None:
    t = tracing.Tracer(tracing.TracingSettings(endpoint=f"http://127.0.0.1:{free_port()}",
                                               timeout_s=0.5))
    try:
        pair = t.ingest({"id": "e"}, None, "x", 1)
        pair[1].finish()
        t.flush()
        assert t.dropped == 1 and t.exported == 0
    finally:
        t.shutdown()
