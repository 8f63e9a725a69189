"""Traces for every hop of an event, recorded by the OpenTelemetry SDK.

Other modules call the hop helpers of `Tracer` (`ingest`, `process`, `function`, `send`,
`dead_letter`, `sink_span`) and never touch OpenTelemetry objects themselves; the W3C
header rules and every header/attribute name live in `eventing.cloudevent.tracecontext`,
the propagator that carries context through events in `eventing.telemetry.propagation`.

## The SDK, configured the standard way

Each Sluice process has one `TracerProvider` with a `Resource` (`service.name`,
`service.version`, `sluice.function`, `sluice.topology`, plus `OTEL_RESOURCE_ATTRIBUTES`),
a `ParentBased(TraceIdRatioBased(ratio))` sampler (or the one `OTEL_TRACES_SAMPLER`
names), a `BatchSpanProcessor` and an OTLP exporter: HTTP/protobuf or gRPC, with
`OTEL_EXPORTER_OTLP_HEADERS`. `settings_from_env` reads the standard `OTEL_*` variables
once, at the edge (`eventing.cli.edge`, `eventing.fn.env`); command-line flags override
them. `configure` also installs the provider and the CloudEvents propagator as the
OpenTelemetry API's globals, so code that uses only the API (a user function calling
`trace.get_tracer(__name__).start_as_current_span(...)`, an instrumented HTTP client or
database driver) records into the same pipeline and continues the same trace.

## Propagation

Context travels in the CloudEvents distributed-tracing extension (`traceparent`,
`tracestate`), on Kafka the `ce_traceparent` / `ce_tracestate` headers, so it crosses
every topic and fan-out. Each hop writes ITS OWN span context into what it sends on:

    POST / (SERVER, gateway)                      parent: the publisher's context, if valid
      send payments.raw (PRODUCER)                -> ce_traceparent of the record
        process payments.raw (CONSUMER, one per delivery attempt; failed ones carry the error)
          validate (INTERNAL, the function; the current span while user code runs)
            GET http://... (CLIENT, an instrumented library inside the function)
            send payments.valid (PRODUCER)        -> ce_traceparent of the output
          send sluice.deadletter (PRODUCER)       after the last failed attempt, with the error

## What it costs, and the cheap check in front

An SDK span costs ~15-20 µs of CPU on a quiet 2-core machine and 40-65 µs under the
shared machine's usual load (plus protobuf encoding on the export thread): several times
the previous hand-written recorder's span, so recording stays a sampling decision. What
keeps an UNSAMPLED event near free is a check before any OpenTelemetry call: a record
whose `traceparent` has the sampled bit clear is recognised by a few string comparisons
(`tracecontext.is_unsampled`) and passes through with no span, no context object and no
id parsing; a root (no incoming context) is decided from its new trace id exactly as
`TraceIdRatioBased` would decide it, without building an SDK span. The user function of
an unsampled event still runs "inside" that context: the global tracer the API hands to
user code reads the event's unsampled `traceparent` lazily, only when user code opens a
span. benchmarks/tracing_overhead.py measures each case against the previous, hand-written
recorder.

## Messaging semantic conventions

Only messaging spans (`process`, `send`, sink `write`) carry `messaging.*` attributes
(`messaging.system`, `messaging.operation.type`/`.name`, `messaging.destination.name`,
`messaging.consumer.group.name`, `messaging.destination.partition.id`,
`messaging.kafka.offset`, `messaging.kafka.message.key`, `messaging.message.id`); the
gateway's SERVER span carries `http.*`, the function span `sluice.function`. Every span
of an event carries `cloudevents.event_id`/`_type`/`_source` and the attributes of
`TracingSettings.data_attributes` (a hook: extra attributes from the event's data, by
default `payment_id` -> `payment.id` until topology-declared business ids replace it).

## Hook for sinks

    with tracing.get_tracer().sink_span("lake", messages, table="sluice.payments_scored"):
        table.append(rows)

makes one CONSUMER span `write <table>` per sampled record of the batch (child of the
record's `ce_traceparent`), all timed by the block; an exception marks them failed and
propagates. Unsampled records and a disabled tracer cost one header scan per record.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace import sampling as otel_sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from eventing.cloudevent import kafka as ce_kafka
from eventing.cloudevent import tracecontext as w3c

log = logging.getLogger("sluice.tracing")

INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = (
    SpanKind.INTERNAL, SpanKind.SERVER, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER)
SCOPE = "eventing.telemetry.tracing"
# Business ids come from the topology (`traceIds`), never from the platform.
DEFAULT_BUSINESS_IDS: Mapping[str, str] = {}
PROTOCOLS = ("http/protobuf", "grpc")

# Re-exported for callers and tests: the W3C rules live in eventing.cloudevent.tracecontext.
parse_traceparent = w3c.parse_traceparent
format_traceparent = w3c.format_traceparent
_unsampled = w3c.is_unsampled
_UNSAMPLED_FLAGS = w3c._UNSAMPLED_FLAGS  # the hot paths inline `is_unsampled`
_TP = w3c.TRACEPARENT
_time_ns = time.time_ns
_TRACE_ID_LIMIT = (1 << 64) - 1


def business_id_attributes(ids: Mapping[str, str]) -> Callable[[Any], dict[str, Any]]:
    """The default `data_attributes` hook: copy the named fields of dict data to attributes."""
    items = tuple(ids.items())

    def attributes(data: Any) -> dict[str, Any]:
        if type(data) is not dict:
            return {}
        out = {}
        for name, attr in items:
            v = data.get(name)
            if v is not None:
                out[attr] = v if type(v) in (str, int, float, bool) else str(v)
        return out

    return attributes


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TracingSettings:
    """How a process traces; resolved once at the edge (flags over `OTEL_*` variables).

    `endpoint` is the collector's OTLP base URL (`http://127.0.0.1:4318` for
    `http/protobuf`, `http://127.0.0.1:4317` for `grpc`); None records nothing (invalid
    `traceparent`s are still dropped, valid ones still travel). `traces_endpoint` is a
    full traces URL (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), used as given. `sampler` is an
    `OTEL_TRACES_SAMPLER` name (default `parentbased_traceidratio` with `sampling`).
    `data_attributes` is the hook that turns an event's data into extra span attributes
    (default: `business_ids`, the topology's `traceIds`, e.g. `order_id` -> `order.id`).
    """

    endpoint: str | None = None
    traces_endpoint: str | None = None
    protocol: str = "http/protobuf"
    headers: Mapping[str, str] = field(default_factory=dict)
    service_name: str = "sluice"
    service_version: str | None = None
    resource: Mapping[str, str] = field(default_factory=dict)
    sampler: str = "parentbased_traceidratio"
    sampling: float = 1.0
    business_ids: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_BUSINESS_IDS))
    data_attributes: Callable[[Any], Mapping[str, Any]] | None = None
    export_interval_s: float = 0.2
    max_queue: int = 65_536
    max_batch: int = 2048
    timeout_s: float = 5.0


def _parse_pairs(text: str, what: str) -> dict[str, str]:
    """`k=v,k2=v2` (percent-decoded), as OTEL_RESOURCE_ATTRIBUTES and _HEADERS spell them."""
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: {item.strip()!r} is not key=value")
        out[unquote(key.strip())] = unquote(value.strip())
    return out


SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")


def settings_from_env(env: Mapping[str, str], default_service: str, **given: Any,
                      ) -> TracingSettings:
    """`TracingSettings` from the standard OpenTelemetry variables; `given` (flags) win.

    Read: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _PROTOCOL, _HEADERS, _TIMEOUT,
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG,
    OTEL_SDK_DISABLED. Raises ValueError naming the variable when one is malformed.
    """
    def get(name: str) -> str | None:
        return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")

    values: dict[str, Any] = {"service_name": env.get("OTEL_SERVICE_NAME") or default_service}
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        values["traces_endpoint"] = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        values["endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    protocol = (get("PROTOCOL") or "http/protobuf").strip().lower()
    if protocol == "http/json":
        protocol = "http/protobuf"  # the SDK exports protobuf; every collector takes both
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use one of "
                         f"{', '.join(PROTOCOLS)}")
    values["protocol"] = protocol
    if get("HEADERS"):
        values["headers"] = _parse_pairs(get("HEADERS") or "", "OTEL_EXPORTER_OTLP_HEADERS")
    if get("TIMEOUT"):
        try:
            values["timeout_s"] = float(get("TIMEOUT") or 0) / 1000
        except ValueError:
            raise ValueError("OTEL_EXPORTER_OTLP_TIMEOUT must be milliseconds") from None
    if env.get("OTEL_RESOURCE_ATTRIBUTES"):
        values["resource"] = _parse_pairs(env["OTEL_RESOURCE_ATTRIBUTES"],
                                          "OTEL_RESOURCE_ATTRIBUTES")
    sampler = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_traceidratio").strip().lower()
    if sampler not in SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER={sampler!r}: use one of {', '.join(SAMPLERS)}")
    values["sampler"] = sampler
    if env.get("OTEL_TRACES_SAMPLER_ARG"):
        try:
            values["sampling"] = float(env["OTEL_TRACES_SAMPLER_ARG"])
        except ValueError:
            raise ValueError("OTEL_TRACES_SAMPLER_ARG must be a number in [0, 1]") from None
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        values["endpoint"] = values["traces_endpoint"] = None
    values.update({k: v for k, v in given.items() if v is not None})
    return TracingSettings(**values)


def _sampler(settings: TracingSettings) -> otel_sampling.Sampler:
    ratio = max(0.0, min(1.0, settings.sampling))
    return {
        "always_on": lambda: otel_sampling.ALWAYS_ON,
        "always_off": lambda: otel_sampling.ALWAYS_OFF,
        "traceidratio": lambda: otel_sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: otel_sampling.ParentBased(otel_sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: otel_sampling.ParentBased(otel_sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: otel_sampling.ParentBased(
            otel_sampling.TraceIdRatioBased(ratio)),
    }[settings.sampler]()


def make_exporter(settings: TracingSettings) -> SpanExporter:
    """The OTLP exporter `settings` ask for (HTTP/protobuf or gRPC)."""
    headers = dict(settings.headers) or None
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        endpoint = settings.traces_endpoint or settings.endpoint or ""
        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"),
                            headers=headers, timeout=settings.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    url = settings.traces_endpoint
    if not url:
        base = (settings.endpoint or "").rstrip("/")
        url = base if base.endswith("/v1/traces") else base + "/v1/traces"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"OTLP endpoint {url!r}: use http://host:port")
    return HttpExporter(endpoint=url, headers=headers, timeout=settings.timeout_s)


class _Counting(SpanExporter):
    """Counts what the real exporter took and what it refused (`Tracer.exported/dropped`)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter must not kill the export thread
            log.warning("trace export failed: %s", exc)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _IdGenerator(RandomIdGenerator):
    """Random ids, except that a root whose trace id the tracer already drew (to decide its
    sampling cheaply) gets exactly that id, so the SDK's sampler decides the same way."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def preset(self) -> int | None:
        return getattr(self._local, "preset", None)

    @preset.setter
    def preset(self, value: int | None) -> None:
        self._local.preset = value

    def generate_trace_id(self) -> int:
        preset = getattr(self._local, "preset", None)
        if preset is not None:
            self._local.preset = None
            return preset
        return super().generate_trace_id()


# --------------------------------------------------------------------------- spans


def _hex_ids(sc: SpanContext) -> tuple[str, str]:
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"


class Span:
    """A recording SDK span and the bits a hop needs again (its `traceparent`, the data).

    Hop code calls `set`, `fail`, `delivered` and `finish`; nothing else of the SDK.
    """

    __slots__ = ("otel", "trace_id", "span_id", "parent_id", "flags", "traceparent", "data",
                 "late")

    def __init__(self, otel: Any, parent_id: str | None, data: Any = None) -> None:
        self.otel = otel
        sc = otel.get_span_context()
        self.trace_id, self.span_id = _hex_ids(sc)
        self.parent_id = parent_id
        self.flags = int(sc.trace_flags)
        self.traceparent = w3c.format_traceparent(self.trace_id, self.span_id, self.flags)
        self.data = data
        self.late: Callable[[Any], Mapping[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self.otel.name

    def set(self, key: str, value: Any) -> Span:
        self.otel.set_attribute(key, value)
        return self

    def fail(self, message: str, error_type: str | None = None) -> Span:
        """Mark the span failed: ERROR status, an `exception` event, `error.type`."""
        kind = error_type or "error"
        self.otel.add_event("exception", {"exception.type": kind, "exception.message": message})
        self.otel.set_attribute("error.type", kind)
        self.otel.set_status(Status(StatusCode.ERROR, message))
        return self

    def delivered(self, msg: Any) -> Span:
        """The broker acknowledged the record this span sent: its own partition and offset."""
        try:
            self.otel.set_attribute("messaging.destination.partition.id", str(msg.partition()))
            self.otel.set_attribute("messaging.kafka.offset", msg.offset())
        except Exception:  # noqa: BLE001 - a span is never worth a crash
            pass
        return self

    def finish(self, end: int | None = None) -> None:
        late = self.late
        if late is not None:  # data decoded after the span started (a `process` span)
            self.late = None
            extra = late(_event_data(self.data))
            if extra:
                self.otel.set_attributes(extra)
        self.otel.end(end)


# --------------------------------------------------------------------------- attributes


_EVENT_ATTRS = (("id", "cloudevents.event_id"), ("type", "cloudevents.event_type"),
                ("source", "cloudevents.event_source"))


def _event_attributes(out: dict[str, Any], event: Mapping[str, Any] | None) -> None:
    if event:
        for name, attr in _EVENT_ATTRS:
            v = event.get(name)
            if v is not None:
                out[attr] = v if type(v) is str else str(v)


def _message_attributes(out: dict[str, Any], msg: Any, event: Mapping[str, Any] | None,
                        ) -> None:
    """Kafka record attributes (messaging spans only)."""
    try:
        out["messaging.destination.partition.id"] = str(msg.partition())
        out["messaging.kafka.offset"] = msg.offset()
        key = msg.key()
    except Exception:  # noqa: BLE001
        return
    if key is not None:
        out["messaging.kafka.message.key"] = key.decode("utf-8", "replace") \
            if type(key) is bytes else str(key)
    if event and event.get("id") is not None:
        out["messaging.message.id"] = str(event["id"])


def _event_data(data: Any) -> Any:
    if data is not None and hasattr(data, "_get_attributes"):
        data = data.data
    if type(data) is not dict:
        data = getattr(data, "value", data)  # the gateway's already-parsed JSON
    return data


# --------------------------------------------------------------------------- the tracer


class Tracer:
    """Records spans of one process through the OpenTelemetry SDK; `enabled` False records
    nothing. `exporter` replaces the OTLP exporter (tests: an in-memory one)."""

    def __init__(self, settings: TracingSettings | None = None, *,
                 exporter: SpanExporter | None = None) -> None:
        self.settings = settings = settings or TracingSettings()
        self.enabled = bool(settings.endpoint or settings.traces_endpoint or exporter)
        self.sampling = max(0.0, min(1.0, settings.sampling))
        self.data_attributes = settings.data_attributes or business_id_attributes(
            settings.business_ids)
        self.provider: TracerProvider | None = None
        self._exporter: _Counting | None = None
        self._base: dict[tuple, dict[str, Any]] = {}
        self._local = threading.local()  # the unsampled parent a user function runs in
        self._root_bound: int | None = None
        if not self.enabled:
            return
        sampler = _sampler(settings)
        root = sampler._root if isinstance(sampler, otel_sampling.ParentBased) else None
        if isinstance(root, otel_sampling.TraceIdRatioBased):
            self._root_bound = root.bound  # the cheap root decision (see the docstring)
        attrs = {"service.name": settings.service_name,
                 "service.version": settings.service_version or _version()}
        attrs.update(settings.resource)
        self._ids = _IdGenerator()
        self.provider = TracerProvider(resource=Resource.create(attrs), sampler=sampler,
                                       id_generator=self._ids)
        self._exporter = _Counting(exporter or make_exporter(settings))
        self.provider.add_span_processor(BatchSpanProcessor(
            self._exporter, max_queue_size=settings.max_queue,
            schedule_delay_millis=settings.export_interval_s * 1000,
            max_export_batch_size=min(settings.max_batch, settings.max_queue),
            export_timeout_millis=settings.timeout_s * 1000))
        self.otel = self.provider.get_tracer(SCOPE)

    # ---------------------------------------------------------------- bookkeeping

    @property
    def exported(self) -> int:
        return self._exporter.exported if self._exporter else 0

    @property
    def dropped(self) -> int:
        return self._exporter.failed if self._exporter else 0

    def flush(self, timeout: float = 5.0) -> None:
        """Export every finished span now (tests, shutdown)."""
        if self.provider is not None:
            self.provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
            self.provider = None
        self.enabled = False

    # ---------------------------------------------------------------- generic

    def _root_sampled(self) -> tuple[str, bool] | None:
        """A new trace id and the root sampler's decision on it, decided without the SDK
        when the sampler is the (default) ratio one; None: ask the SDK."""
        bound = self._root_bound
        if bound is None:
            return None
        while True:
            n = random.getrandbits(128)
            if n:
                return f"{n:032x}", (n & _TRACE_ID_LIMIT) < bound

    def _start(self, name: str, kind: SpanKind, parent: w3c.TraceParent | None,
               tracestate: str | bytes | None, attributes: dict[str, Any],
               start: int | None = None, trace_id: str | None = None) -> Span | None:
        """An SDK span, child of `parent` (remote) or a root; None when not sampled.

        `tracestate` may be a record header's raw bytes (`ce_kafka.header_value`, the
        sinks): the SDK's parser takes text only, and a sampled record carrying one
        crashed the sink that wrote it (found in a CI run)."""
        if isinstance(tracestate, bytes):
            tracestate = tracestate.decode("utf-8", "replace")
        if parent is not None:
            ctx = otel_trace.set_span_in_context(NonRecordingSpan(SpanContext(
                int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                trace_flags=TraceFlags(parent.flags),
                trace_state=TraceState.from_header([tracestate]) if tracestate else None)))
        else:
            ctx = otel_context.Context()  # an explicit empty context: a root, whatever is current
            if trace_id is not None:  # a root whose id was drawn (and decided) cheaply
                self._ids.preset = int(trace_id, 16)
        otel = self.otel.start_span(name, ctx, kind, attributes, start_time=start)
        if not otel.is_recording():
            return None
        return Span(otel, parent.span_id if parent is not None else None)

    def base(self, *parts: Any, **attrs: Any) -> dict[str, Any]:
        """A cached attribute dict shared by many spans of one kind (`parts` is the key)."""
        got = self._base.get(parts)
        if got is None:
            got = self._base[parts] = attrs
        return got

    def _attributes(self, base: dict[str, Any], event: Mapping[str, Any] | None, data: Any,
                    msg: Any = None) -> dict[str, Any]:
        out = dict(base)
        _event_attributes(out, event)
        if msg is not None:
            _message_attributes(out, msg, event)
        d = _event_data(data)
        if d is not None:
            extra = self.data_attributes(d)
            if extra:
                out.update(extra)
        return out

    def _new_root_context(self, attrs: dict[str, Any]) -> tuple[str | None, bool]:
        """Roll the root decision; when unsampled, write an unsampled `traceparent` so later
        hops keep the "no". Returns (trace id decided cheaply or None, sampled)."""
        decided = self._root_sampled()
        if decided is None:
            return None, True  # the SDK decides in start_span
        trace_id, sampled = decided
        if not sampled:
            attrs[w3c.TRACEPARENT] = w3c.format_traceparent(
                trace_id, f"{random.getrandbits(64) | 1:016x}", w3c.RANDOM)
        return trace_id, sampled

    # ---------------------------------------------------------------- hops

    def ingest(self, attrs: dict[str, Any], data: Any, topic: str, start: int | None,
               http_parent: tuple[w3c.TraceParent, str | None] | None = None,
               ) -> tuple[Span, Span] | None:
        """Gateway, one event: settle its context, make (SERVER, PRODUCER send) spans and
        write the send span's context into `attrs["traceparent"]`.

        The event's own valid `traceparent` wins over `http_parent` (the request's W3C
        headers; see eventing.cloudevent.tracecontext for the precedence). Without
        recording (disabled or unsampled) the event still carries a context: the one it
        came with, the request's, or a new unsampled root.
        """
        parent = w3c.sanitize_attributes(attrs)
        if parent is None and http_parent is not None:
            parent = http_parent[0]
            attrs[w3c.TRACEPARENT] = parent.format()
            if http_parent[1]:
                attrs[w3c.TRACESTATE] = http_parent[1]
        if not self.enabled:
            return None
        if parent is not None and not parent.sampled:
            return None
        trace_id = None
        if parent is None:
            trace_id, sampled = self._new_root_context(attrs)
            if not sampled:
                return None
        server = self._start("POST /", SERVER, parent, attrs.get(w3c.TRACESTATE),
                             self._attributes(self.base("ingest", **{
                                 "http.request.method": "POST", "http.route": "/",
                                 "sluice.component": "gateway"}), attrs, data),
                             start, trace_id)
        if server is None:
            if parent is None:
                attrs[w3c.TRACEPARENT] = w3c.format_traceparent(
                    f"{random.getrandbits(128) | 1:032x}", f"{random.getrandbits(64) | 1:016x}",
                    w3c.RANDOM)
            return None
        server.data = data
        send = self._child(server, "send " + topic, PRODUCER, self._attributes(
            self.base("send", topic, **{
                "messaging.system": "kafka", "messaging.operation.type": "send",
                "messaging.operation.name": "send", "messaging.destination.name": topic}),
            attrs, data))
        send.data = data
        attrs[w3c.TRACEPARENT] = send.traceparent
        return server, send

    def _child(self, parent: Span, name: str, kind: SpanKind, attributes: dict[str, Any],
               ) -> Span:
        ctx = otel_trace.set_span_in_context(parent.otel)
        span = Span(self.otel.start_span(name, ctx, kind, attributes), parent.span_id)
        return span

    def process(self, event: Any, msg: Any, function: str, group: str) -> Span | None:
        """Dispatcher, one delivery attempt of one record: a CONSUMER `process` span.

        The event's `traceparent` becomes the span's, so the function runs as its child.
        """
        if not self.enabled:
            return None
        attrs = event._get_attributes()
        tp = attrs.get(_TP)
        if tp is not None and type(tp) is str and len(tp) == 55 and tp[54] in _UNSAMPLED_FLAGS \
                and tp[:3] == "00-":
            return None  # the cheap check (tracecontext.is_unsampled, inlined): no SDK call
        parent = w3c.sanitize_attributes(attrs) if tp is not None else None
        trace_id = None
        if parent is None:
            trace_id, sampled = self._new_root_context(attrs)
            if not sampled:
                return None
        elif not parent.sampled:
            return None
        topic = msg.topic()
        base = self._base.get(("process", topic, function))
        if base is None:
            base = self.base("process", topic, function, **{
                "messaging.system": "kafka", "messaging.operation.type": "process",
                "messaging.operation.name": "process", "messaging.destination.name": topic,
                "messaging.consumer.group.name": group, "sluice.function": function})
        span = self._start("process " + topic, CONSUMER, parent, attrs.get(w3c.TRACESTATE),
                           self._attributes(base, attrs, event, msg), None, trace_id)
        if span is None:
            if parent is None:
                attrs[w3c.TRACEPARENT] = w3c.format_traceparent(
                    f"{random.getrandbits(128) | 1:032x}", f"{random.getrandbits(64) | 1:016x}",
                    w3c.RANDOM)
            return None
        span.data = event
        span.late = self.data_attributes  # the record's data is decoded later, by the host
        attrs[w3c.TRACEPARENT] = span.traceparent
        self._local.last = span  # `function` finds its parent here without a parse
        return span

    def function(self, event: Any, name: str) -> Span | None:
        """The user function running on `event` (INTERNAL span, child of its context).

        Unsampled (no span), the event's context is still the parent of API spans that
        user code opens (`pending_parent`); `enter`/`leave` make a returned span current.
        """
        if not self.enabled:
            return None
        tp = event._get_attributes().get(_TP)
        self._local.pending = tp  # read by API spans only if user code opens one
        if tp is None or (type(tp) is str and len(tp) == 55 and tp[54] in _UNSAMPLED_FLAGS
                          and tp[:3] == "00-"):
            return None  # the cheap check, inlined
        attrs = event._get_attributes()
        last = getattr(self._local, "last", None)
        if last is not None and last.traceparent is tp:
            parent = w3c.TraceParent(last.trace_id, last.span_id, last.flags)
        else:
            parent = w3c.parse_traceparent(tp)
            if parent is None or not parent.sampled:
                return None
        base = self._base.get(("function", name))
        if base is None:
            base = self.base("function", name, **{"sluice.function": name})
        span = self._start(name, INTERNAL, parent, attrs.get(w3c.TRACESTATE),
                           self._attributes(base, attrs, None))
        if span is not None:
            span.data = event
            span.late = self.data_attributes  # the host decodes the data after this
        return span

    def enter(self, span: Span) -> Any:
        """Make `span` the current OpenTelemetry span (while the user function runs), so
        spans the code opens through the API are its children; `leave(token)` after."""
        return otel_context.attach(otel_trace.set_span_in_context(span.otel))

    def leave(self, token: Any) -> None:
        otel_context.detach(token)

    def pending_parent(self) -> Any:
        """The OpenTelemetry context of the event whose function runs in this thread without
        a span of its own (unsampled), built only when user code asks; None otherwise."""
        tp = getattr(self._local, "pending", None)
        if tp is None:
            return None
        parent = w3c.parse_traceparent(tp)
        if parent is None:
            return None
        return otel_trace.set_span_in_context(NonRecordingSpan(SpanContext(
            int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
            trace_flags=TraceFlags(parent.flags))))

    def send(self, parent: Span, attrs: dict[str, Any], data: Any, topic: str) -> Span:
        """An output record about to be produced: PRODUCER `send` span, child of `parent`;
        its context goes into the output's `traceparent`."""
        base = self._base.get(("send", topic))
        if base is None:
            base = self.base("send", topic, **{
                "messaging.system": "kafka", "messaging.operation.type": "send",
                "messaging.operation.name": "send", "messaging.destination.name": topic})
        span = self._child(parent, "send " + topic, PRODUCER,
                           self._attributes(base, attrs, data if data is not None
                                            else parent.data))
        attrs[w3c.TRACEPARENT] = span.traceparent
        return span

    def dead_letter(self, parent: Span | None, attrs: dict[str, Any], data: Any, topic: str,
                    msg: Any, function: str, code: int, message: str) -> Span | None:
        """The dead-letter produce of a record (ERROR span with the failure), child of its
        last failed attempt; its context goes into the dead letter's `traceparent`.

        The span describes the dead-letter record: its partition and offset are set by
        `Span.delivered` from the dead letter's own delivery report; the source record's
        position goes to `sluice.source.*`.
        """
        if not self.enabled:
            return None
        base = self.base("dead_letter", topic, function, **{
            "messaging.system": "kafka", "messaging.operation.type": "send",
            "messaging.operation.name": "send", "messaging.destination.name": topic,
            "sluice.function": function, "sluice.dead_letter": True})
        span_data = parent.data if parent is not None and parent.data is not None else data
        attributes = self._attributes(base, attrs, span_data)
        try:
            attributes["sluice.source.topic"] = msg.topic()
            attributes["sluice.source.partition"] = msg.partition()
            attributes["sluice.source.offset"] = msg.offset()
        except Exception:  # noqa: BLE001
            pass
        attributes["sluice.error.code"] = code
        if parent is not None:
            span = self._child(parent, "send " + topic, PRODUCER, attributes)
        else:
            ctx = w3c.parse_traceparent(attrs.get(w3c.TRACEPARENT))
            if ctx is None or not ctx.sampled:
                return None
            span = self._start("send " + topic, PRODUCER, ctx, attrs.get(w3c.TRACESTATE),
                               attributes)
            if span is None:
                return None
        span.fail(message, f"http.{code}" if code else "error")
        attrs[w3c.TRACEPARENT] = span.traceparent
        return span

    @contextlib.contextmanager
    def sink_span(self, sink: str, messages: Sequence[Any], *, table: str | None = None,
                  ) -> Iterator[list[Span]]:
        """Spans for a sink writing a batch of records (see the module docstring).

        Yields the spans (empty when nothing is sampled); a raised exception marks them
        failed and propagates.
        """
        spans: list[Span] = []
        if self.enabled:
            start = _time_ns()
            for msg in messages:
                headers = msg.headers()
                tp = ce_kafka.header_value(headers, w3c.TRACEPARENT)
                ctx = w3c.parse_traceparent(tp)
                if ctx is None or not ctx.sampled:
                    continue
                topic = msg.topic()
                base = self.base("sink", sink, topic, table, **{
                    "messaging.system": "kafka", "messaging.operation.type": "process",
                    "messaging.operation.name": "process", "messaging.destination.name": topic,
                    "messaging.batch.message_count": len(messages), "sluice.sink": sink,
                    **({"db.collection.name": table} if table else {})})
                event = _header_attrs(msg)
                attributes = self._attributes(base, event, None, msg)
                attributes["messaging.batch.message_count"] = len(messages)
                span = self._start(f"write {table or topic}", CONSUMER, ctx,
                                   ce_kafka.header_value(headers, w3c.TRACESTATE),
                                   attributes, start)
                if span is not None:
                    spans.append(span)
        try:
            yield spans
        except BaseException as exc:
            for span in spans:
                span.fail(str(exc)[:1024], type(exc).__name__)
                span.finish()
            raise
        end = _time_ns()
        for span in spans:
            span.finish(end)


_SPAN_EVENT_ATTRS = frozenset({"id", "type", "source", "partitionkey"})


def _header_attrs(msg: Any) -> dict[str, Any]:
    return ce_kafka.header_attributes(msg.headers(), _SPAN_EVENT_ATTRS)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sluice")
    except Exception:  # noqa: BLE001
        return "0"


def exemplar(span: Span | None) -> dict[str, str] | None:
    """An OpenMetrics exemplar label set for a histogram observation made inside `span`."""
    if span is None:
        return None
    return {"trace_id": span.trace_id, "span_id": span.span_id}


def record_exemplar(msg: Any) -> dict[str, str] | None:
    """Exemplar labels for an observation about a Kafka record: its trace, when sampled."""
    ctx = w3c.parse_traceparent(ce_kafka.header_value(msg.headers(), w3c.TRACEPARENT))
    if ctx is None or not ctx.sampled:
        return None
    return {"trace_id": ctx.trace_id, "span_id": ctx.span_id}


# --------------------------------------------------------------------------- the API's globals


class _ApiTracer(otel_trace.Tracer):
    """What `opentelemetry.trace.get_tracer()` returns in a Sluice process: delegates to the
    process's current `Tracer` (so a test or a re-`configure` swaps it cleanly), and gives
    spans opened with no current span the parent of the event being handled."""

    def __init__(self, name: str, version: str | None, schema_url: str | None,
                 attributes: Any) -> None:
        self._args = (name, version, schema_url, attributes)
        self._cache: tuple[Any, Any] = (None, None)

    def _target(self) -> tuple[Tracer, Any]:
        t = _TRACER
        owner, target = self._cache
        if owner is not t:
            if t.provider is None:
                target = otel_trace.NoOpTracer()
            else:
                name, version, schema_url, attributes = self._args
                target = t.provider.get_tracer(name, version, schema_url, attributes)
            self._cache = (t, target)
        return t, target

    def _context(self, t: Tracer, context: Any) -> Any:
        if context is None and not otel_trace.get_current_span().get_span_context().is_valid:
            return t.pending_parent()
        return context

    def start_span(self, name: str, context: Any = None, *args: Any, **kwargs: Any) -> Any:
        t, target = self._target()
        return target.start_span(name, self._context(t, context), *args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(self, name: str, context: Any = None, *args: Any,
                              **kwargs: Any) -> Iterator[Any]:
        t, target = self._target()
        with target.start_as_current_span(name, self._context(t, context), *args,
                                          **kwargs) as span:
            yield span


class _ApiProvider(otel_trace.TracerProvider):
    def get_tracer(self, instrumenting_module_name: str,
                   instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Any = None) -> otel_trace.Tracer:
        return _ApiTracer(instrumenting_module_name, instrumenting_library_version,
                          schema_url, attributes)


_API_INSTALLED = False


def install_api_globals() -> None:
    """Make the OpenTelemetry API's global tracer provider and propagator Sluice's (once)."""
    global _API_INSTALLED
    if _API_INSTALLED:
        return
    from opentelemetry import propagate

    from eventing.telemetry.propagation import propagator

    otel_trace.set_tracer_provider(_ApiProvider())
    propagate.set_global_textmap(propagator())
    _API_INSTALLED = True


# --------------------------------------------------------------------------- the process


_TRACER = Tracer()


def configure(settings: TracingSettings, *, exporter: SpanExporter | None = None) -> Tracer:
    """Make `settings` this process's tracing (called once, at the edge; tests may again)."""
    global _TRACER
    _TRACER.shutdown()
    _TRACER = Tracer(settings, exporter=exporter)
    install_api_globals()
    atexit.register(_TRACER.shutdown)
    return _TRACER


def get_tracer() -> Tracer:
    """The process's tracer (disabled unless `configure` was called)."""
    return _TRACER


def sink_span(sink: str, messages: Sequence[Any], *, table: str | None = None):
    """`get_tracer().sink_span(...)`: the hook for lake and real-time sink writes."""
    return _TRACER.sink_span(sink, messages, table=table)
