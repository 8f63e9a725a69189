"""The OpenTelemetry propagator for the CloudEvents distributed-tracing extension.

Registered as the API's global text-map propagator (`tracing.install_api_globals`), so
`opentelemetry.propagate.inject/extract` - what user code and instrumented libraries call -
read and write the same context Sluice does, by the W3C Level 2 rules of
`eventing.cloudevent.tracecontext`:

- a mapping carrier (CloudEvent attributes, HTTP headers) holds `traceparent`/`tracestate`
  (the extension's attribute names are also the W3C HTTP header names);
- a CloudEvent (anything with `_get_attributes`) is read and written through its attributes;
- a list of `(name, bytes)` pairs is a Kafka record's headers: `ce_traceparent`/`ce_tracestate`.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from eventing.cloudevent import tracecontext as w3c


def _values(carrier: Any, name: str, kafka_name: str, getter: Getter) -> list[str]:
    if hasattr(carrier, "_get_attributes"):
        v = carrier._get_attributes().get(name)
        return [v] if v is not None else []
    if isinstance(carrier, list):
        return [v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
                for k, v in carrier if k == kafka_name and v is not None]
    return list(getter.get(carrier, name) or [])


class CloudEventsPropagator(TextMapPropagator):
    """W3C trace context in CloudEvents attributes, HTTP headers or Kafka headers."""

    def extract(self, carrier: CarrierT, context: Context | None = None,
                getter: Getter = default_getter) -> Context:
        if context is None:
            context = Context()
        parent = w3c.traceparent_from_headers(
            _values(carrier, w3c.TRACEPARENT, w3c.KAFKA_TRACEPARENT, getter))
        if parent is None:
            return context
        state = w3c.parse_tracestate(
            _values(carrier, w3c.TRACESTATE, w3c.KAFKA_TRACESTATE, getter))
        span_context = SpanContext(
            int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
            trace_flags=TraceFlags(parent.flags),
            trace_state=TraceState.from_header([state]) if state else None)
        return trace.set_span_in_context(NonRecordingSpan(span_context), context)

    def inject(self, carrier: CarrierT, context: Context | None = None,
               setter: Setter = default_setter) -> None:
        sc = trace.get_current_span(context).get_span_context()
        if not sc.is_valid:
            return
        tp = w3c.format_traceparent(f"{sc.trace_id:032x}", f"{sc.span_id:016x}",
                                    int(sc.trace_flags))
        ts = sc.trace_state.to_header() if sc.trace_state else ""
        if hasattr(carrier, "_get_attributes"):
            attrs = carrier._get_attributes()
            attrs[w3c.TRACEPARENT] = tp
            if ts:
                attrs[w3c.TRACESTATE] = ts
            return
        if isinstance(carrier, list):
            carrier[:] = [(k, v) for k, v in carrier
                          if k not in (w3c.KAFKA_TRACEPARENT, w3c.KAFKA_TRACESTATE)]
            carrier.append((w3c.KAFKA_TRACEPARENT, tp.encode()))
            if ts:
                carrier.append((w3c.KAFKA_TRACESTATE, ts.encode()))
            return
        setter.set(carrier, w3c.TRACEPARENT, tp)
        if ts:
            setter.set(carrier, w3c.TRACESTATE, ts)

    @property
    def fields(self) -> set[str]:
        return {w3c.TRACEPARENT, w3c.TRACESTATE}


class _HeaderBaggage(W3CBaggagePropagator):
    """W3C baggage for HTTP header carriers only (events and Kafka headers carry none)."""

    def extract(self, carrier: CarrierT, context: Context | None = None,
                getter: Getter = default_getter) -> Context:
        if isinstance(carrier, list) or hasattr(carrier, "_get_attributes"):
            return context if context is not None else Context()
        return super().extract(carrier, context, getter)

    def inject(self, carrier: CarrierT, context: Context | None = None,
               setter: Setter = default_setter) -> None:
        if isinstance(carrier, list) or hasattr(carrier, "_get_attributes"):
            return
        super().inject(carrier, context, setter)


def propagator() -> TextMapPropagator:
    """What a Sluice process registers: the CloudEvents/W3C trace context plus W3C baggage."""
    return CompositePropagator([CloudEventsPropagator(), _HeaderBaggage()])
