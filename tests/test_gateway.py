"""Gateway and publisher unit tests: Starlette's TestClient, a fake producer, and the real
`AvroSerde` over an in-memory registry client. The same cases against the real broker
and registry are in test_gateway_stack.py."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError
from starlette.testclient import TestClient

from eventing.ingest.gateway import Gateway, GatewaySettings
from eventing.ingest.publish import GatewayError, Progress, Publisher, one_event, read_jsonl
from eventing.serde import AvroSerde, subject_for
from tests.helpers import ROOT, FakeProducer, FakeRegistryClient

SCHEMA = (ROOT / "schemas" / "payments.raw.avsc").read_text()
TYPE = "com.sluice.payment.created"
TOPIC = "payments.raw"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def payment(i: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"payment_id": f"p{i}", "card_id": "c1", "merchant_id": "m1", "amount": 12.5,
            "currency": "EUR", "country": "DE", "event_time": 1_700_000_000_000 + i,
            **overrides}


def structured(i: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "/test", "type": TYPE,
            "data": payment(i), **overrides}


class Harness:
    def __init__(self, token: str | None = None, max_body_bytes: int = 4096,
                 **settings: Any) -> None:
        self.registry = FakeRegistryClient()
        self.registry.register(subject_for(TOPIC), SCHEMA, schema_id=7)
        self.serde = AvroSerde(client=self.registry)
        self.producer: FakeProducer | None = None
        self.registry_up = True
        settings = GatewaySettings(bootstrap="unused:1", registry_url="http://unused",
                                   routes={TYPE: TOPIC}, max_body_bytes=max_body_bytes,
                                   token=token, **settings)

        def factory(error_cb: Any) -> FakeProducer:
            self.producer = FakeProducer(error_cb=error_cb, topics=(TOPIC,))
            return self.producer

        def probe() -> None:
            if not self.registry_up:
                raise ConnectionError("registry down")

        self.gateway = Gateway(settings, producer_factory=factory, serde=self.serde,
                               registry_probe=probe)
        self.app = self.gateway.app

    @property
    def written(self) -> list[tuple]:
        assert self.producer is not None
        return self.producer.written


@pytest.fixture
def gw() -> Any:
    h = Harness()
    with TestClient(h.app) as client:
        h.client = client
        yield h


def binary_headers(**extra: str) -> dict[str, str]:
    return {"ce-specversion": "1.0", "ce-id": "b1", "ce-source": "/test", "ce-type": TYPE,
            "content-type": "application/json", **extra}


# ------------------------------------------------------------------------- accepted


def test_binary_event_is_written_as_avro_after_ack(gw):
    r = gw.client.post("/", content=orjson.dumps(payment()),
                       headers=binary_headers(**{"ce-partitionkey": "card-1",
                                                 "ce-traceparent": TRACEPARENT,
                                                 "ce-tracestate": "k=v"}))
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "ids": ["b1"]}
    [(topic, key, value, headers)] = gw.written
    assert topic == TOPIC and key == b"card-1"
    h = dict(headers)
    assert h["content-type"] == b"application/avro"
    assert h["ce_traceparent"] == TRACEPARENT.encode() and h["ce_tracestate"] == b"k=v"
    assert h["ce_id"] == b"b1" and h["ce_type"] == TYPE.encode()
    assert value[:5] == b"\x00\x00\x00\x00\x07"  # Confluent framing, schema id 7
    assert gw.serde.decode(value) == payment()


def test_structured_event_is_accepted(gw):
    r = gw.client.post("/", content=orjson.dumps(structured(partitionkey="k9")),
                       headers={"content-type": "application/cloudevents+json"})
    assert r.status_code == 202, r.text
    assert r.json()["ids"] == ["e1"]
    [(topic, key, value, _)] = gw.written
    assert key == b"k9" and gw.serde.decode(value) == payment(1)


def test_batch_is_accepted_in_order(gw):
    body = orjson.dumps([structured(i) for i in range(5)])
    r = gw.client.post("/", content=body,
                       headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 5, "ids": [f"e{i}" for i in range(5)]}
    assert [gw.serde.decode(w[2])["payment_id"] for w in gw.written] == [
        f"p{i}" for i in range(5)]


# ------------------------------------------------------------------------- rejected


def test_missing_attribute_is_named(gw):
    headers = binary_headers()
    del headers["ce-type"]
    r = gw.client.post("/", content=orjson.dumps(payment()), headers=headers)
    assert r.status_code == 400
    assert r.json()["attribute"] == "type" and "missing" in r.json()["reason"]
    assert gw.written == []


def test_invalid_attribute_is_named(gw):
    r = gw.client.post("/", content=orjson.dumps(payment()),
                       headers=binary_headers(**{"ce-time": "yesterday"}))
    assert r.status_code == 400 and r.json()["attribute"] == "time"


def test_not_a_cloudevent_and_bad_json(gw):
    r = gw.client.post("/", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["attribute"] == "specversion"
    r = gw.client.post("/", content=b"{nope", headers={"content-type":
                                                      "application/cloudevents+json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_event"
    r = gw.client.post("/", content=b"{nope", headers=binary_headers())
    assert r.status_code == 400 and r.json()["attribute"] == "data"
    assert gw.written == []


def test_unsupported_content_types(gw):
    r = gw.client.post("/", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert "application/cloudevents+json" in r.json()["reason"]
    assert "application/cloudevents-batch+json" in r.json()["accepted"]
    r = gw.client.post("/", content=b"x", headers={"content-type": "application/cloudevents+xml"})
    assert r.status_code == 415
    ev = structured(datacontenttype="text/plain", data="hello")
    r = gw.client.post("/", content=orjson.dumps(ev),
                       headers={"content-type": "application/cloudevents+json"})
    assert r.status_code == 415 and r.json()["attribute"] == "datacontenttype"
    assert gw.written == []


def test_body_over_limit_by_length_and_by_stream(gw):
    big = b"[" + b" " * 5000 + b"]"
    r = gw.client.post("/", content=big,
                       headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 413 and r.json()["limit"] == 4096
    assert "Content-Length" in r.json()["reason"]

    def chunks():  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 1000

    r = gw.client.post("/", content=chunks(),
                       headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 413 and "received" in r.json()["reason"]
    assert gw.written == []


def test_schema_violation_names_the_field(gw):
    for data, field in [(payment(amount="12"), "amount"),
                        ({k: v for k, v in payment().items() if k != "currency"}, "currency"),
                        (payment(extra=1), "extra")]:
        r = gw.client.post("/", content=orjson.dumps(data), headers=binary_headers())
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "schema_violation" and r.json()["field"] == field
        assert repr(field) in r.json()["reason"]
    assert gw.written == []


def test_unknown_type_names_the_known_types(gw):
    r = gw.client.post("/", content=orjson.dumps(payment()),
                       headers=binary_headers(**{"ce-type": "com.other"}))
    assert r.status_code == 422
    body = r.json()
    assert body["attribute"] == "type" and body["known_types"] == [TYPE]
    assert TYPE in body["reason"] and "com.other" in body["reason"]


def test_batch_is_all_or_nothing(gw):
    events = [structured(0), structured(1, data=payment(1, amount="bad")), structured(2)]
    r = gw.client.post("/", content=orjson.dumps(events),
                       headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert [e["index"] for e in body["events"]] == [1]
    assert body["events"][0]["field"] == "amount"
    assert gw.written == []


def test_batch_lists_every_bad_event(gw):
    events = [structured(0, type="x.unknown"), structured(1), {"id": "2"},
              structured(3, data=payment(3, amount=None)), 7]
    r = gw.client.post("/", content=orjson.dumps(events),
                       headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 400  # a malformed event among them
    got = {e["index"]: e for e in r.json()["events"]}
    assert sorted(got) == [0, 2, 3, 4]
    assert got[0]["error"] == "unknown_type" and got[3]["field"] == "amount"
    assert got[2]["attribute"] == "specversion" and got[4]["error"] == "malformed_event"
    assert "4 of 5" in r.json()["reason"]
    r = gw.client.post("/", content=b'{"a": 1}',
                       headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 400 and "array" in r.json()["reason"]
    assert gw.written == []


def test_token_required_when_configured():
    h = Harness(token="s3cret-token")
    with TestClient(h.app) as client:
        body = orjson.dumps(payment())
        r = client.post("/", content=body, headers=binary_headers())
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "missing" in r.json()["reason"]
        r = client.post("/", content=body,
                        headers=binary_headers(authorization="Bearer wrong"))
        assert r.status_code == 401 and "invalid" in r.json()["reason"]
        assert "s3cret" not in r.text
        assert h.written == []
        r = client.post("/", content=body,
                        headers=binary_headers(authorization="Bearer s3cret-token"))
        assert r.status_code == 202
        assert client.get("/healthz").status_code == 200  # probes need no token
    assert "s3cret" not in repr(GatewaySettings("b", "r", {}, token="s3cret"))


def test_broker_failure_is_503_with_retry_after(gw):
    gw.producer.error = KafkaError(KafkaError._MSG_TIMED_OUT)
    r = gw.client.post("/", content=orjson.dumps(payment()), headers=binary_headers())
    assert r.status_code == 503
    assert r.json()["error"] == "broker_unavailable" and "retry" in r.json()["reason"].lower()
    assert int(r.headers["retry-after"]) > 0
    assert 'outcome="failed",topic="payments.raw"} 1.0' in gw.client.get("/metrics").text


def test_known_down_broker_fails_fast_without_producing(gw):
    gw.producer.reachable = False
    gw.producer.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    deadline = time.monotonic() + 5
    bridge = gw.gateway.bridge
    while bridge.state != "down" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bridge.state == "down"
    r = gw.client.post("/", content=orjson.dumps(payment()), headers=binary_headers())
    assert r.status_code == 503 and "unreachable" in r.json()["reason"]
    assert gw.producer.queued == [] and gw.written == []
    gw.producer.reachable = True  # the probe notices the broker is back
    while bridge.state != "up" and time.monotonic() < deadline + 5:
        time.sleep(0.02)
    r = gw.client.post("/", content=orjson.dumps(payment()), headers=binary_headers())
    assert r.status_code == 202


def test_registry_down_is_503(gw):
    gw.registry.down = True
    gw.serde.invalidate()
    r = gw.client.post("/", content=orjson.dumps(payment()), headers=binary_headers())
    assert r.status_code == 503 and r.json()["error"] == "registry_unavailable"
    assert "retry-after" in r.headers


def test_route_without_schema_is_a_server_error(gw):
    gw.registry.subjects.clear()
    gw.serde.invalidate()
    r = gw.client.post("/", content=orjson.dumps(payment()), headers=binary_headers())
    assert r.status_code == 500 and r.json()["error"] == "no_schema"


def test_probes_and_metrics(gw):
    assert gw.client.get("/healthz").json() == {"status": "ok"}
    r = gw.client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    gw.registry_up = False
    r = gw.client.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["checks"]["registry"].startswith("unreachable")
    gw.registry_up = True
    gw.producer.topics = {}
    r = gw.client.get("/readyz")
    assert r.status_code == 503 and TOPIC in r.json()["checks"]["broker"]
    gw.producer.topics = {TOPIC: None}
    gw.producer.reachable = False
    assert gw.client.get("/readyz").status_code == 503

    gw.client.post("/", content=orjson.dumps([structured(i) for i in range(3)]),
                   headers={"content-type": "application/cloudevents-batch+json"})
    gw.client.post("/", content=orjson.dumps(payment(amount="x")), headers=binary_headers())
    text = gw.client.get("/metrics").text
    assert 'sluice_gateway_events_total{outcome="accepted",topic="payments.raw"} 3.0' in text
    assert 'sluice_gateway_events_total{outcome="rejected",topic="payments.raw"} 1.0' in text
    assert 'sluice_gateway_request_duration_seconds_count{code="202",mode="batch"} 1.0' in text
    assert "sluice_gateway_batch_size_sum 3.0" in text


# ------------------------------------------------------------------------- publisher


def test_publisher_send_and_send_many(gw):
    pub = Publisher("http://testserver", client=gw.client)
    event_id = pub.send({"type": TYPE, "data": payment(1)})
    assert dict(gw.written[-1][3])["ce_specversion"] == b"1.0"
    assert dict(gw.written[-1][3])["ce_id"] == event_id.encode()
    seen: list[int] = []
    n = pub.send_many(({"type": TYPE, "data": payment(i)} for i in range(7)), batch_size=3,
                      progress=seen.append)
    # batches in flight answer in any order: the totals count up, ending at 7
    assert n == 7 and len(seen) == 3 and seen == sorted(seen) and seen[-1] == 7
    assert len(gw.written) == 8
    assert dict(gw.written[-1][3])["ce_source"] == b"/sluice/publish"


def test_publisher_reports_bad_event_index_in_the_stream(gw):
    pub = Publisher("http://testserver", client=gw.client)
    events = [{"type": TYPE, "data": payment(i)} for i in range(5)]
    events[4]["data"]["amount"] = "nope"
    with pytest.raises(GatewayError) as info:
        pub.send_many(events, batch_size=2)
    assert info.value.status == 422
    assert [e["index"] for e in info.value.events] == [4]
    assert info.value.events[0]["field"] == "amount"
    assert len(gw.written) == 4  # earlier batches stay; the rejected one wrote nothing


def test_publisher_keeps_batches_in_flight_and_reports_the_first_rejected():
    """One request at a time left the publisher idle for every broker ack (1.4K ev/s of
    example payments with the gateway at 8% of a core). Each batch here blocks until 4
    are in the gateway at once: sent one by one, the barrier would break."""
    import httpx

    barrier = threading.Barrier(4, timeout=20)
    started: list[int] = []
    lock = threading.Lock()

    def gateway(request: httpx.Request) -> httpx.Response:
        batch = orjson.loads(request.content)
        first = int(batch[0]["id"])
        with lock:
            started.append(first)
        if first < 16:
            barrier.wait()  # raises BrokenBarrierError unless 4 requests overlap
        if first == 20:
            return httpx.Response(422, json={"error": "invalid_batch", "reason": "bad",
                                             "events": [{"index": 1, "reason": "bad"}]})
        return httpx.Response(202, json={"accepted": len(batch)})

    client = httpx.Client(transport=httpx.MockTransport(gateway))
    pub = Publisher("http://gw", client=client, concurrency=4)
    seen: list[int] = []
    events = ({"id": str(i), "type": TYPE, "data": payment(i)} for i in range(40))
    with pytest.raises(GatewayError) as info:
        pub.send_many(events, batch_size=2, progress=seen.append)
    assert info.value.status == 422 and [e["index"] for e in info.value.events] == [21]
    assert seen == sorted(seen) and seen[-1] >= 20  # every batch before it was accepted
    assert max(started) <= 20 + 2 * 4  # nothing started beyond those already in flight
    pub.concurrency = 1  # one at a time still works, in order
    started.clear()
    assert pub.send_many([{"id": str(100 + i), "type": TYPE} for i in range(6)],
                         batch_size=2) == 6
    assert started == [100, 102, 104]


def test_publisher_retries_503(gw):
    gw.producer.error = KafkaError(KafkaError._MSG_TIMED_OUT)

    def heal() -> None:
        time.sleep(0.3)
        gw.producer.error = None

    threading.Thread(target=heal).start()
    pub = Publisher("http://testserver", client=gw.client, retries=5)
    assert pub.send({"type": TYPE, "data": payment()})
    pub.retries = 0
    gw.producer.error = KafkaError(KafkaError._MSG_TIMED_OUT)
    with pytest.raises(GatewayError) as info:
        pub.send({"type": TYPE, "data": payment()})
    assert info.value.status == 503


def test_cli_helpers(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps({"type": TYPE}) + "\n\n" + json.dumps({"type": TYPE}) + "\n")
    count, events, lines = read_jsonl(str(f))
    assert count == 2 and len(list(events)) == 2 and lines == [1, 3]
    f.write_text(json.dumps({"type": TYPE}) + "\n{broken\n")
    with pytest.raises(ValueError, match=":2: not valid JSON"):
        read_jsonl(str(f))
    ev = one_event(TYPE, None, '{"a": 1}', key="k")
    assert ev["partitionkey"] == "k" and ev["data"] == {"a": 1} and ev["id"]
    with pytest.raises(ValueError, match="--data"):
        one_event(TYPE, "/s", "{nope")
    out = io.StringIO()
    progress = Progress(50000, out)
    progress(12000)
    assert out.getvalue().startswith("\r12000/50000 events  ") and "ev/s" in out.getvalue()


def test_publisher_splits_batches_over_the_body_limit(gw):
    pub = Publisher("http://testserver", client=gw.client)
    seen: list[int] = []
    n = pub.send_many(({"type": TYPE, "data": payment(i)} for i in range(40)), batch_size=40,
                      progress=seen.append)  # ~12 KB per batch against a 4 KiB limit
    assert n == 40 and len(gw.written) == 40 and seen[-1] == 40 and len(seen) > 2
    assert [gw.serde.decode(w[2])["payment_id"] for w in gw.written] == [
        f"p{i}" for i in range(40)]


def test_bridge_resolves_every_request_under_concurrency():
    """Requests created while the poll thread hands over finished ones are not lost."""
    from eventing.ingest.gateway import DeliveryBridge

    class Trickle(FakeProducer):
        def poll(self, timeout: float) -> int:  # one delivery per poll: many hand-overs
            with self.lock:
                item = self.queued.pop(0) if self.queued else None
            if item is None:
                time.sleep(0.0005)
                return 0
            item[4](None, None)
            time.sleep(0.0002)  # librdkafka's poll releases the GIL: let the loop run
            return 1

    async def main() -> list[float]:
        bridge = DeliveryBridge(Trickle(), asyncio.get_running_loop(), poll_timeout=0.001)
        bridge.start()
        try:
            async def one(i: int) -> float:
                await asyncio.sleep(0.0005 * (i % 2))  # two waves, queued deep
                t0 = time.perf_counter()
                await bridge.send([(TOPIC, None, b"v", [])], timeout_s=2.0)
                return time.perf_counter() - t0
            return await asyncio.gather(*(one(i) for i in range(400)))
        finally:
            bridge.close(1)

    latencies = asyncio.run(main())
    assert len(latencies) == 400 and max(latencies) < 2.0
