"""A test function that traces the way user code does: only the OpenTelemetry API and an
instrumented HTTP client (opentelemetry-instrumentation-httpx), nothing of Sluice's.

It looks up "rates" at `SLUICE_TEST_RATES_URL` (a local server the test runs) inside a
span of its own; both spans must land inside the function span of the event's trace."""

from __future__ import annotations

import os

import functions_framework
import httpx
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

TRACER = trace.get_tracer(__name__)  # at import time, before Sluice configures tracing
CLIENT = httpx.Client(timeout=10)
HTTPXClientInstrumentor.instrument_client(CLIENT)


@functions_framework.cloud_event
def traced(event):
    with TRACER.start_as_current_span("lookup rates") as span:
        span.set_attribute("rates.source", "local")
        CLIENT.get(os.environ["SLUICE_TEST_RATES_URL"]).raise_for_status()
    return event.data
