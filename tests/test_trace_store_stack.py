"""The trace store on the real stack: a payment's spans arrive through rotel without a
byte of them on the broker, and `sluice trace` finds the trace by search."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient

from eventing import topology as topo
from eventing.ingest.publish import Publisher
from eventing.kafka import admin_config
from eventing.stack.process import ProcessDir
from eventing.stack.settings import Ports
from functions.generate import EVENT_TYPE, reference
from tests.helpers import sluice
from tests.pipeline import consume_all

pytestmark = pytest.mark.stack


def test_spans_reach_the_store_through_rotel_and_never_the_broker(pipeline) -> None:
    offset = pipeline.ports.broker - Ports().broker
    pid = f"store-{uuid.uuid4().hex[:8]}"
    card = sorted(reference().cards)[-3]
    payment = {"payment_id": pid, "card_id": card, "merchant_id": "m-0001", "amount": 9.5,
               "currency": "EUR", "country": "DE", "event_time": int(time.time() * 1000)}
    with Publisher(pipeline.gateway_url) as pub:
        pub.send({"specversion": "1.0", "id": pid, "source": "/tests/store", "type": EVENT_TYPE,
                  "partitionkey": card, "datacontenttype": "application/json",
                  "data": payment})
    proc = sluice("trace", pid, "--json", "--wait", "30", state_dir=pipeline.state_dir,
                  offset=offset, timeout=120)
    (trace,) = json.loads(proc.stdout)
    assert {"sluice-gateway", "sluice-validate"} <= {s["service"] for s in trace["spans"]}

    # Found by search too: the function it ran, within the last minutes.
    listed = json.loads(sluice("trace", "--function", "validate", "--since", "10m", "--json",
                               "--limit", "1000", state_dir=pipeline.state_dir,
                               offset=offset).stdout)
    assert trace["trace_id"] in {t["trace_id"] for t in listed}
    assert all(t["start_ns"] > 0 and "validate" in t["functions"] for t in listed)

    # The collector has no broker to write to, and no topic of the broker holds a span
    # (other tests share this stack and create topics of their own: no name is assumed).
    collector = ProcessDir(pipeline.state_dir).record("collector")
    assert collector is not None
    assert pipeline.bootstrap not in collector.argv and "kafka" not in collector.argv
    assert pipeline.tracestore_url in collector.argv
    topics = set(AdminClient(admin_config(pipeline.bootstrap)).list_topics(timeout=10).topics)
    assert "sluice.traces" not in topics
    expected = topo.load(pipeline.topology_path).all_topics().keys() | {pipeline.schemas_topic}
    for topic in sorted(topics & set(expected)) + sorted(t for t in topics if
                                                         t.endswith(".state")):
        assert consume_all(pipeline.bootstrap, topic, 1, timeout=5, match=_looks_like_spans) == []


def _looks_like_spans(msg) -> bool:
    value = msg.value() or b""
    return b"resourceSpans" in value or b"scopeSpans" in value or b"traceId" in value
