"""W3C Trace Context Level 2, rule by rule: the parser (eventing.cloudevent.tracecontext)
and the gateway continuing a publisher's HTTP `traceparent`/`tracestate` headers.

The gateway cases use a disabled tracer, so the record's `ce_traceparent` is exactly the
context the gateway continued (absent: the trace restarted); one case with a recording
tracer shows the SERVER span's parent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from eventing.cloudevent import tracecontext as w3c
from eventing.telemetry import tracing
from tests.test_gateway import TYPE, Harness, payment

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
TP = f"00-{TRACE}-{SPAN}-01"


# --------------------------------------------------------------------------- traceparent

@pytest.mark.parametrize("value,flags", [
    (TP, 0x01),
    (TP[:-2] + "00", 0x00),
    (TP[:-2] + "03", 0x03),                       # sampled + random (Level 2)
    (TP[:-2] + "02", 0x02),                       # random only: not sampled
    (TP[:-2] + "ff", 0x03),                       # undefined bits are cleared
    (TP[:-2] + "09", 0x01),
    ("cc" + TP[2:], 0x01),                        # a later version parses as 00
    ("cc" + TP[2:] + "-what-the-future-will-be-like", 0x01),
    (" " + TP, 0x01), (TP + " ", 0x01), ("\t" + TP + "\t", 0x01), ("\t " + TP + " \t", 0x01),
    (TP.encode(), 0x01),
])
def test_valid_traceparent(value, flags) -> None:
    got = w3c.parse_traceparent(value)
    assert got == (TRACE, SPAN, flags)


@pytest.mark.parametrize("value", [
    "ff" + TP[2:],                                 # version ff is invalid
    TP + ".",                                      # version 00 is exactly 55 characters
    TP + "-what-the-future-will-be-like",          # ... even with a dash
    "cc" + TP[2:] + ".what-the-future-will-be-like",  # later version: only '-' may follow
    "cc" + TP[2:-1],                               # later version: still the 00 fields
    TP.upper(), TP.replace(TRACE, TRACE.upper()), TP.replace(SPAN, SPAN.upper()),
    TP[:-2] + "0A",                                # upper-case hex anywhere
    ".0" + TP[2:], "0." + TP[2:], TP.replace(TRACE, TRACE[:-1] + "."),
    TP.replace(SPAN, SPAN[:-1] + "."), TP[:-2] + "0.",  # illegal characters per field
    "0" + TP[2:], "000" + TP[2:],                  # version too short / too long
    TP.replace(TRACE, TRACE[:-1]), TP.replace(TRACE, TRACE + "0"),
    TP.replace(SPAN, SPAN[:-1]), TP.replace(SPAN, SPAN + "0"),
    TP[:-1], TP + "0",                             # flags too short / too long
    TP.replace(TRACE, "0" * 32), TP.replace(SPAN, "0" * 16),  # all-zero ids
    TP.replace("-", "_"), "", "   ", None, 42, b"\xff" + TP.encode()[1:],
    " \n" + TP,                                    # only space and tab are whitespace
])
def test_invalid_traceparent(value) -> None:
    assert w3c.parse_traceparent(value) is None


def test_repeated_traceparent_headers_are_invalid() -> None:
    assert w3c.traceparent_from_headers([TP]) == (TRACE, SPAN, 1)
    assert w3c.traceparent_from_headers([TP, TP]) is None           # two header fields
    assert w3c.traceparent_from_headers([f"{TP},{TP}"]) is None     # folded into one
    assert w3c.traceparent_from_headers([]) is None


def test_propagated_flags_keep_sampled_and_random_only() -> None:
    assert w3c.parse_traceparent(TP[:-2] + "ff").format() == TP[:-2] + "03"


# --------------------------------------------------------------------------- tracestate

@pytest.mark.parametrize("values,expected", [
    (["foo=1"], "foo=1"),
    (["foo=1,bar=2"], "foo=1,bar=2"),
    (["foo=1", "bar=2"], "foo=1,bar=2"),             # several header fields combine in order
    (["foo=1 , \tbar=2 "], "foo=1,bar=2"),           # OWS around members
    (["foo=1,,bar=2", ","], "foo=1,bar=2"),          # empty members are skipped
    (["tenant@vendor=x"], "tenant@vendor=x"),
    (["0tenant@vendor=x"], "0tenant@vendor=x"),      # tenant may start with a digit
    (["k_-*/9=v"], "k_-*/9=v"),
    (["foo= !\"#$%&'()*+-./0123456789:;<>?@AZ[\\]^_`az{|}~"],
     "foo= !\"#$%&'()*+-./0123456789:;<>?@AZ[\\]^_`az{|}~"),  # every allowed value char
    ([",".join(f"k{i}=v" for i in range(32))], ",".join(f"k{i}=v" for i in range(32))),
    (["a" * 256 + "=v"], "a" * 256 + "=v"),          # longest simple key
    (["t" * 241 + "@" + "v" * 14 + "=x"], "t" * 241 + "@" + "v" * 14 + "=x"),
    (["foo=" + "v" * 256], "foo=" + "v" * 256),      # longest value
    (["foo=a b "], "foo=a b"),                       # inner space kept, trailing one is OWS
])
def test_valid_tracestate(values, expected) -> None:
    assert w3c.parse_tracestate(values) == expected


@pytest.mark.parametrize("values", [
    [""], [" "], [","],                                 # empty: nothing to keep
    ["foo=1,foo=2"], ["foo=1", "foo=2"],                # a key twice
    ["Foo=1"], ["foo.bar=1"], ["1foo=1"], ["=1"],       # key grammar
    ["foo@=1"], ["@foo=1"], ["foo@@bar=1"], ["foo@bar@baz=1"], ["foo@1bar=1"],
    ["a" * 257 + "=v"],                                 # key too long
    ["t" * 242 + "@v=x"], ["t@" + "v" * 15 + "=x"],     # tenant / system too long
    ["foo"], ["foo=bar=baz"], ["foo="], ["foo=a,b"],    # value grammar
    ["foo=" + "v" * 257],                               # value too long
    ["foo=\x7f"], ["foo=é"],
    [",".join(f"k{i}=v" for i in range(33))],           # over 32 members
    [",".join(f"k{i}=v" for i in range(20)), ",".join(f"j{i}=v" for i in range(13))],
])
def test_invalid_tracestate_is_dropped_whole(values) -> None:
    assert w3c.parse_tracestate(values) is None


def test_sanitize_keeps_a_valid_parent_and_drops_what_breaks_rules() -> None:
    attrs: dict[str, Any] = {"traceparent": "ff" + TP[2:], "tracestate": "a=b"}
    assert w3c.sanitize_attributes(attrs) is None and attrs == {}
    attrs = {"traceparent": " " + TP[:-2] + "07", "tracestate": "a=b , c=d"}
    assert w3c.sanitize_attributes(attrs) == (TRACE, SPAN, 3)
    assert attrs == {"traceparent": TP[:-2] + "03", "tracestate": "a=b,c=d"}
    attrs = {"traceparent": TP, "tracestate": "a=b,a=c"}
    assert w3c.sanitize_attributes(attrs) is not None and attrs == {"traceparent": TP}


# --------------------------------------------------------------------------- the gateway

@pytest.fixture
def gw() -> Any:
    h = Harness()
    with TestClient(h.app) as client:
        h.client = client
        yield h


def _post(gw, headers: list[tuple[str, str]], ce: dict[str, str] | None = None) -> dict:
    base = [("ce-specversion", "1.0"), ("ce-id", "b1"), ("ce-source", "/test"),
            ("ce-type", TYPE), ("content-type", "application/json")]
    base += list((ce or {}).items())
    r = gw.client.post("/", content=orjson.dumps(payment()), headers=base + headers)
    assert r.status_code == 202, r.text
    return {k: v.decode() for k, v in gw.written[-1][3] if k.startswith("ce_trace")}


def test_gateway_continues_a_w3c_traceparent_header(gw) -> None:
    got = _post(gw, [("traceparent", TP), ("tracestate", "vendor=1")])
    assert got == {"ce_traceparent": TP, "ce_tracestate": "vendor=1"}


def test_gateway_header_names_are_case_insensitive(gw) -> None:
    assert _post(gw, [("TrAcEpArEnT", TP)]) == {"ce_traceparent": TP}


def test_gateway_restarts_on_repeated_traceparent_headers(gw) -> None:
    assert _post(gw, [("traceparent", TP), ("traceparent", TP[:-2] + "00")]) == {}


def test_gateway_restarts_on_an_invalid_header_and_ignores_its_tracestate(gw) -> None:
    assert _post(gw, [("traceparent", TP.upper()), ("tracestate", "a=1")]) == {}


def test_gateway_trims_whitespace_and_clears_undefined_flags(gw) -> None:
    assert _post(gw, [("traceparent", "\t" + TP[:-2] + "fe ")]) == {
        "ce_traceparent": TP[:-2] + "02"}


def test_gateway_combines_repeated_tracestate_headers(gw) -> None:
    got = _post(gw, [("traceparent", TP), ("tracestate", "a=1"), ("tracestate", "b=2")])
    assert got["ce_tracestate"] == "a=1,b=2"


def test_gateway_drops_an_invalid_tracestate_but_keeps_the_trace(gw) -> None:
    assert _post(gw, [("traceparent", TP), ("tracestate", "a=1,a=2")]) == {
        "ce_traceparent": TP}


def test_the_events_own_traceparent_wins_over_the_http_header(gw) -> None:
    own = f"00-{'1' * 32}-{'2' * 16}-01"
    got = _post(gw, [("traceparent", TP), ("tracestate", "http=1")],
                {"ce-traceparent": own, "ce-tracestate": "ce=1"})
    assert got == {"ce_traceparent": own, "ce_tracestate": "ce=1"}
    # An invalid event attribute falls back to the request's header.
    got = _post(gw, [("traceparent", TP)], {"ce-traceparent": "garbage"})
    assert got == {"ce_traceparent": TP}


def test_gateway_server_span_is_a_child_of_the_http_traceparent() -> None:
    mem = InMemorySpanExporter()
    tracer = tracing.Tracer(tracing.TracingSettings(), exporter=mem)
    h = Harness()
    h.gateway.tracer = tracer
    try:
        with TestClient(h.app) as client:
            h.client = client
            got = _post(h, [("traceparent", TP[:-2] + "03")])
        tracer.flush()
        spans = {s.name: s for s in mem.get_finished_spans()}
        server = spans["POST /"]
        assert f"{server.context.trace_id:032x}" == TRACE
        assert f"{server.parent.span_id:016x}" == SPAN and server.parent.is_remote
        send = spans["send payments.raw"]
        assert send.parent.span_id == server.context.span_id
        # The record carries the send span, with the incoming random flag kept.
        assert got["ce_traceparent"] == f"00-{TRACE}-{send.context.span_id:016x}-03"
    finally:
        tracer.shutdown()
