"""Traces on the real stack: gateway → validate → enrich → score, dead letters, and the
W3C `traceparent` rules at the edge, read back with `sluice trace` (a subprocess)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from eventing.ingest.publish import Publisher
from eventing.stack.settings import Ports
from eventing.telemetry.tracing import parse_traceparent
from functions.generate import EVENT_TYPE, reference
from tests.helpers import sluice
from tests.pipeline import consume_all, headers_of

pytestmark = pytest.mark.stack

CHAIN = [  # (service, operation) from the gateway to the scored output, each a child
    ("sluice-gateway", "POST /"),
    ("sluice-gateway", "send payments.raw"),
    ("sluice-validate", "process payments.raw"),
    ("sluice-validate", "validate"),
    ("sluice-validate", "send payments.valid"),
    ("sluice-enrich", "process payments.valid"),
    ("sluice-enrich", "enrich"),
    ("sluice-enrich", "send payments.enriched"),
    ("sluice-score", "process payments.enriched"),
    ("sluice-score", "score"),
    ("sluice-score", "send payments.scored"),
]


def _offset(stack) -> int:
    return stack.ports.broker - Ports().broker


def _trace(stack, ref: str, *, wait: float = 20, min_services: int = 0,
           check: bool = True) -> list[dict]:
    """`sluice trace REF --json --wait`, retried until `min_services` services show up."""
    for _ in range(5):
        proc = sluice("trace", ref, "--json", "--wait", str(wait), state_dir=stack.state_dir,
                      offset=_offset(stack), check=check, timeout=wait + 60)
        if proc.returncode != 0:
            return []
        traces = json.loads(proc.stdout)
        services = {s["service"] for t in traces for s in t["spans"]}
        if len(services) >= min_services:
            return traces
    return traces


def _payment(pid: str, card: str, country: str = "DE", amount: float = 12.5,
             event_time: int | None = None) -> dict:
    # Now: validate rejects an event_time more than a day ahead (or negative).
    event_time = int(time.time() * 1000) if event_time is None else event_time
    return {"payment_id": pid, "card_id": card, "merchant_id": "m-0001", "amount": amount,
            "currency": "EUR", "country": country, "event_time": event_time}


def _event(p: dict) -> dict:
    return {"specversion": "1.0", "id": p["payment_id"], "source": "/tests/traces",
            "type": EVENT_TYPE, "partitionkey": p["card_id"],
            "datacontenttype": "application/json", "data": p}


def _post_binary(stack, event_id: str, card: str, extra: dict[str, str]) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/tests/traces",
               "ce-type": EVENT_TYPE, "ce-partitionkey": card,
               "content-type": "application/json", **extra}
    body = json.dumps(_payment(event_id, card)).encode()
    r = httpx.post(stack.gateway_url, headers=headers, content=body, timeout=30)
    assert r.status_code == 202, r.text


def _raw_record_headers(stack, event_id: str) -> dict[str, str]:
    got = consume_all(stack.bootstrap, "payments.raw", 1, timeout=60, settle=0.5,
                      match=lambda m: headers_of(m).get("ce_id") == event_id)
    assert len(got) == 1
    return headers_of(got[0])


def _by_name(spans: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in spans:
        out.setdefault(s["name"], []).append(s)
    return out


def test_a_payment_is_one_trace_through_gateway_and_every_function(pipeline) -> None:
    pid = f"trace-{uuid.uuid4().hex[:8]}"
    card = sorted(reference().cards)[-1]
    with Publisher(pipeline.gateway_url) as pub:
        pub.send(_event(_payment(pid, card)))

    traces = _trace(pipeline, pid, min_services=4)
    assert len(traces) == 1, [t["trace_id"] for t in traces]
    spans = traces[0]["spans"]
    by_id = {s["span_id"]: s for s in spans}
    names = _by_name(spans)
    chain = []
    for service, op in CHAIN:
        assert op in names, f"missing span {op!r}; have {sorted(names)}"
        (span,) = names[op]
        assert span["service"] == service
        assert span["status"] != "error"
        chain.append(span)
    assert chain[0]["parent_id"] is None  # no traceparent came in: the gateway is the root
    for parent, child in zip(chain, chain[1:], strict=False):
        assert child["parent_id"] == parent["span_id"], f"{child['name']} under {parent['name']}?"
        assert child["trace_id"] == parent["trace_id"]
    for s in spans:
        assert s["parent_id"] is None or s["parent_id"] in by_id
        if "sluice.sink" not in s["attributes"]:  # sinks see headers, not decoded data
            assert s["attributes"].get("payment.id") == pid
    process = names["process payments.raw"][0]["attributes"]
    assert process["messaging.system"] == "kafka"
    assert process["messaging.destination.name"] == "payments.raw"
    assert process["messaging.kafka.message.key"] == card
    assert process["messaging.destination.partition.id"].isdigit()  # semconv: a string
    assert isinstance(process["messaging.kafka.offset"], int)
    assert process["messaging.consumer.group.name"] == "sluice-validate"
    # Messaging attributes only on messaging spans.
    for name in ("POST /", "validate"):
        assert not any(k.startswith("messaging.") for k in names[name][0]["attributes"])
    assert process["cloudevents.event_id"] == pid
    assert process["cloudevents.event_type"] == EVENT_TYPE
    assert process["sluice.function"] == "validate"
    sent = names["send payments.raw"][0]["attributes"]
    assert "messaging.kafka.offset" in sent  # from the broker's acknowledgement

    # Found the same way by trace id and by payment id; the text waterfall is indented.
    assert _trace(pipeline, traces[0]["trace_id"], wait=1)[0]["trace_id"] == traces[0]["trace_id"]
    text = sluice("trace", pid, state_dir=pipeline.state_dir, offset=_offset(pipeline)).stdout
    assert f"trace {traces[0]['trace_id']}" in text
    assert "      validate" in text and "sluice-score" in text


def test_the_sinks_writes_join_the_payments_trace(pipeline) -> None:
    """The lake sink and the real-time table each add a span under score's send span."""
    pid = f"sink-{uuid.uuid4().hex[:8]}"
    card = sorted(reference().cards)[-2]
    with Publisher(pipeline.gateway_url) as pub:
        pub.send(_event(_payment(pid, card)))
    traces = _trace(pipeline, pid, wait=30, min_services=6)
    assert len(traces) == 1
    spans = traces[0]["spans"]
    names = _by_name(spans)
    (send,) = names["send payments.scored"]
    sinks = {s["service"]: s for s in spans if s["service"] in ("sluice-lake-sink",
                                                                 "sluice-realtime")}
    assert set(sinks) == {"sluice-lake-sink", "sluice-realtime"}, sorted(
        {s["service"] for s in spans})
    for span in sinks.values():
        assert span["parent_id"] == send["span_id"]
        assert span["attributes"]["sluice.sink"] in ("lake", "realtime")
        assert span["status"] != "error"
    assert sinks["sluice-lake-sink"]["attributes"]["db.collection.name"] == "payments_scored"


def test_fan_out_keeps_one_trace_and_each_output_carries_its_send_span(pipeline) -> None:
    cards = reference().cards
    card = next(c for c in sorted(cards, reverse=True) if cards[c] == "FR")
    run = uuid.uuid4().hex[:8]
    t0 = int(time.time() * 1000) - 2 * 60_000  # recent: validate refuses the far future
    home, abroad = (_payment(f"fan-{run}-{i}", card, country=c, event_time=t0 + i * 60_000)
                    for i, c in enumerate(("FR", "US")))
    with Publisher(pipeline.gateway_url) as pub:
        assert pub.send_many([_event(home), _event(abroad)]) == 2
    # Impossible travel (FR then US within 30 minutes) scores 70: scored + fraud alert.
    traces = _trace(pipeline, abroad["payment_id"], min_services=4)
    spans = traces[0]["spans"]
    names = _by_name(spans)
    assert "send alerts.fraud" in names, sorted(names)
    (score,) = names["score"]
    (scored,) = names["send payments.scored"]
    (alert,) = names["send alerts.fraud"]
    assert scored["parent_id"] == alert["parent_id"] == score["span_id"]
    alert_id = f"alert-{abroad['payment_id']}"
    msgs = consume_all(pipeline.bootstrap, "alerts.fraud", 1, timeout=60, settle=0.5,
                       match=lambda m: headers_of(m).get("ce_id") == alert_id)
    ctx = parse_traceparent(headers_of(msgs[0])["ce_traceparent"])
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id) == (traces[0]["trace_id"], alert["span_id"])


def test_a_dead_lettered_payment_shows_the_failed_attempt_and_the_dead_letter(pipeline) -> None:
    pid = f"tracebad-{uuid.uuid4().hex[:8]}"
    with Publisher(pipeline.gateway_url) as pub:
        pub.send(_event(_payment(pid, "card-00001", amount=-5.0)))
    traces = _trace(pipeline, pid, min_services=2)
    assert len(traces) == 1
    spans = traces[0]["spans"]
    names = _by_name(spans)
    (attempt,) = names["process payments.raw"]  # Reject: no retries
    assert attempt["status"] == "error"
    assert any("amount -5.0 outside" in e for e in attempt["errors"])
    assert attempt["attributes"]["sluice.delivery.outcome"] == "dead_letter"
    (dead,) = names["send sluice.deadletter"]
    assert dead["parent_id"] == attempt["span_id"]
    assert dead["status"] == "error"
    assert dead["attributes"]["sluice.error.code"] == 422
    assert dead["attributes"]["payment.id"] == pid
    assert "send payments.valid" not in names
    # The dead letter continues the trace: its traceparent is the dead-letter span.
    got = consume_all(pipeline.bootstrap, "sluice.deadletter", 1, timeout=60, settle=0.5,
                      match=lambda m: headers_of(m).get("ce_id") == pid)
    ctx = parse_traceparent(headers_of(got[0])["ce_traceparent"])
    assert ctx is not None and ctx.span_id == dead["span_id"]
    # The span describes the dead-letter record itself, not the source record.
    assert dead["attributes"]["messaging.destination.partition.id"] == str(got[0].partition())
    assert dead["attributes"]["messaging.kafka.offset"] == got[0].offset()
    assert dead["attributes"]["sluice.source.offset"] == attempt["attributes"][
        "messaging.kafka.offset"]

    text = sluice("trace", pid, state_dir=pipeline.state_dir, offset=_offset(pipeline)).stdout
    assert "send sluice.deadletter" in text
    assert "! Reject: amount -5.0 outside" in text


def test_a_publishers_valid_traceparent_is_continued(pipeline) -> None:
    eid = f"tracein-{uuid.uuid4().hex[:8]}"
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    _post_binary(pipeline, eid, "card-00002", {
        "ce-traceparent": f"00-{trace_id}-{parent}-01", "ce-tracestate": "vendor=abc"})
    traces = _trace(pipeline, eid, min_services=4)
    assert [t["trace_id"] for t in traces] == [trace_id]
    (server,) = _by_name(traces[0]["spans"])["POST /"]
    assert server["parent_id"] == parent  # the gateway span is the publisher's child
    (send,) = _by_name(traces[0]["spans"])["send payments.raw"]
    h = _raw_record_headers(pipeline, eid)
    assert h["ce_traceparent"] == f"00-{trace_id}-{send['span_id']}-01"
    assert h["ce_tracestate"] == "vendor=abc"


def test_a_publishers_w3c_traceparent_http_header_is_continued(pipeline) -> None:
    """An OpenTelemetry-instrumented HTTP publisher sends `traceparent`/`tracestate`
    headers, not `ce-traceparent`: the gateway continues that trace (Level 2 rules)."""
    eid = f"tracehttp-{uuid.uuid4().hex[:8]}"
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    _post_binary(pipeline, eid, "card-00002", {
        "traceparent": f"00-{trace_id}-{parent}-03", "tracestate": "vendor=abc"})
    traces = _trace(pipeline, eid, min_services=4)
    assert [t["trace_id"] for t in traces] == [trace_id]
    (server,) = _by_name(traces[0]["spans"])["POST /"]
    assert server["parent_id"] == parent
    (send,) = _by_name(traces[0]["spans"])["send payments.raw"]
    h = _raw_record_headers(pipeline, eid)
    assert h["ce_traceparent"] == f"00-{trace_id}-{send['span_id']}-03"  # random flag kept
    assert h["ce_tracestate"] == "vendor=abc"


def test_an_unsampled_traceparent_is_obeyed_and_propagated(pipeline) -> None:
    eid = f"traceoff-{uuid.uuid4().hex[:8]}"
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    _post_binary(pipeline, eid, "card-00003", {"ce-traceparent": f"00-{trace_id}-{parent}-00"})
    h = _raw_record_headers(pipeline, eid)
    assert h["ce_traceparent"] == f"00-{trace_id}-{parent}-00"
    assert _trace(pipeline, eid, wait=3, check=False) == []


BAD_TRACEPARENTS = [
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",   # version ff
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",   # all-zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",   # all-zero parent id
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",   # upper-case hex
    "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",     # trace id too short
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",  # v00 with extra field
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",   # not hex
    "garbage",
]


@pytest.mark.parametrize("bad", BAD_TRACEPARENTS)
def test_a_malformed_traceparent_starts_a_new_trace_and_is_not_propagated(pipeline,
                                                                         bad: str) -> None:
    eid = f"tracebadtp-{uuid.uuid4().hex[:8]}"
    _post_binary(pipeline, eid, "card-00004", {"ce-traceparent": bad,
                                                "ce-tracestate": "vendor=leak"})
    h = _raw_record_headers(pipeline, eid)
    assert h["ce_traceparent"] != bad
    ctx = parse_traceparent(h["ce_traceparent"])
    assert ctx is not None and ctx.sampled
    assert ctx.trace_id not in bad.lower()
    assert "ce_tracestate" not in h  # the invalid parent's state goes with it
    traces = _trace(pipeline, eid, min_services=2)
    assert [t["trace_id"] for t in traces] == [ctx.trace_id]
    (server,) = _by_name(traces[0]["spans"])["POST /"]
    assert server["parent_id"] is None
