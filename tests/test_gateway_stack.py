"""The gateway against the real stack (`stack` fixture: Tansu broker + registry), run as
`sluice gateway` subprocesses on free loopback ports with a test topology that routes
to a topic of its own. Records are read back with confluent-kafka's AvroDeserializer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from eventing.ingest.publish import GatewayError, Publisher
from eventing.kafka import consumer_config
from tests.helpers import ROOT, free_port, stop_process

pytestmark = pytest.mark.stack

SCHEMA = (ROOT / "schemas" / "payments.raw.avsc").read_text()
TYPE = "com.sluice.test.payment"
TOKEN = "gw-test-" + uuid.uuid4().hex
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PARTITIONS = 4
MAX_BODY = 65536
AUTH = {"authorization": f"Bearer {TOKEN}"}
BATCH = {"content-type": "application/cloudevents-batch+json", **AUTH}
STRUCTURED = {"content-type": "application/cloudevents+json", **AUTH}


def payment(i: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"payment_id": f"p{i}", "card_id": f"c{i % 7}", "merchant_id": "m1",
            "amount": 10.0 + i, "currency": "EUR", "country": "DE",
            "event_time": 1_700_000_000_000 + i, **overrides}


def event(event_id: str, i: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": "/tests/gateway", "type": TYPE,
            "partitionkey": f"card-{i % 7}", "data": payment(i), **overrides}


def start_gateway(tmp: Path, *, bootstrap: str, registry: str, topology: Path,
                  token: str | None = None, extra: list[str] | None = None,
                  wait_ready: bool = True) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "eventing.cli", "--state-dir", str(tmp / "state"), "gateway",
            "--port", str(port), "--bootstrap", bootstrap, "--registry", registry,
            "--topology", str(topology), *(extra or [])]
    if token:
        (tmp / "token").write_text(token + "\n")
        argv += ["--token-file", str(tmp / "token")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    log = open(tmp / f"gateway-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    path = "/readyz" if wait_ready else "/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {(tmp / f'gateway-{port}.log').read_text()}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_process(proc)
    raise AssertionError(f"gateway not ready: {(tmp / f'gateway-{port}.log').read_text()}")


@pytest.fixture(scope="module")
def topic(stack) -> str:
    """A topic of this module's own, with the payments schema registered for it."""
    name = f"gwtest.payments.{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{stack.registry_url}/subjects/{name}-value/versions",
                   json={"schema": SCHEMA}, timeout=10)
    assert r.status_code == 200, r.text
    return name


@pytest.fixture(scope="module")
def topology(tmp_path_factory, topic) -> Path:
    path = tmp_path_factory.mktemp("gw") / "topology.yaml"
    path.write_text(yaml.safe_dump({
        "gateway": {"routes": {TYPE: topic}, "maxBodyBytes": MAX_BODY},
        "topics": {topic: {"partitions": PARTITIONS}},
    }))
    return path


@pytest.fixture(scope="module")
def gateway(stack, topology, tmp_path_factory) -> Iterator[str]:
    proc, url = start_gateway(tmp_path_factory.mktemp("gwproc"), bootstrap=stack.bootstrap,
                              registry=stack.registry_url, topology=topology, token=TOKEN)
    try:
        yield url
    finally:
        stop_process(proc)


class TopicReader:
    """Reads the test topic from the beginning (assigned partitions, no group join)."""

    def __init__(self, stack, topic: str) -> None:
        self.topic = topic
        self.consumer = Consumer(consumer_config(stack.bootstrap, f"gwtest-{uuid.uuid4().hex}"))
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                              for p in range(PARTITIONS)])
        self.deserialize = AvroDeserializer(SchemaRegistryClient({"url": stack.registry_url}))
        self.records: dict[str, Any] = {}  # ce_id -> message

    def read_until(self, done: Callable[[dict[str, Any]], bool], timeout: float = 20.0,
                   settle: float = 0.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        settled_at: float | None = None
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(500, 0.2):
                assert msg.error() is None, msg.error()
                self.records[dict(msg.headers())["ce_id"].decode()] = msg
            if done(self.records):
                settled_at = settled_at or time.monotonic()
                if time.monotonic() - settled_at >= settle:
                    return self.records
        raise AssertionError(f"timed out; have {len(self.records)} records")

    def value(self, msg: Any) -> dict[str, Any]:
        return self.deserialize(msg.value(), SerializationContext(self.topic, MessageField.VALUE))

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture(scope="module")
def reader(stack, topic, gateway) -> Iterator[TopicReader]:
    r = TopicReader(stack, topic)
    yield r
    r.close()


REJECTED_IDS: list[str] = []


def post(url: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(url + "/", content=content, headers=headers, timeout=30)


# ------------------------------------------------------------------------- accepted


def test_accepted_events_are_in_the_topic_as_avro(gateway, reader):
    run = uuid.uuid4().hex[:6]
    binary = {"ce-specversion": "1.0", "ce-id": f"{run}-bin", "ce-source": "/tests/gateway",
              "ce-type": TYPE, "ce-partitionkey": "card-42", "ce-traceparent": TRACEPARENT,
              "ce-tracestate": "sluice=1", "content-type": "application/json", **AUTH}
    r = post(gateway, payment(42), binary)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "ids": [f"{run}-bin"]}
    r = post(gateway, event(f"{run}-st", 5), STRUCTURED)
    assert r.status_code == 202, r.text
    batch_ids = [f"{run}-b{i}" for i in range(20)]
    r = post(gateway, [event(eid, i) for i, eid in enumerate(batch_ids)], BATCH)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 20, "ids": batch_ids}

    wanted = {f"{run}-bin", f"{run}-st", *batch_ids}
    records = reader.read_until(lambda recs: wanted <= set(recs))
    msg = records[f"{run}-bin"]
    headers = dict(msg.headers())
    assert msg.key() == b"card-42"
    assert headers["content-type"] == b"application/avro"
    assert headers["ce_type"] == TYPE.encode() and headers["ce_source"] == b"/tests/gateway"
    assert headers["ce_traceparent"] == TRACEPARENT.encode()
    assert headers["ce_tracestate"] == b"sluice=1"
    assert reader.value(msg) == payment(42)
    assert reader.value(records[f"{run}-st"]) == payment(5)
    assert [reader.value(records[e])["payment_id"] for e in batch_ids] == [
        f"p{i}" for i in range(20)]
    # per-key order: events with the same key keep their batch order within a partition
    same_key = [records[e] for i, e in enumerate(batch_ids) if i % 7 == 3]
    assert len({m.partition() for m in same_key}) == 1
    assert [m.offset() for m in same_key] == sorted(m.offset() for m in same_key)


# ------------------------------------------------------------------------- rejected


def _bad(eid: str) -> str:
    REJECTED_IDS.append(eid)
    return eid


def test_every_bad_input_gets_its_status_and_reason(gateway):
    run = uuid.uuid4().hex[:6]
    cases: list[tuple[str, Any, dict[str, str], int, Callable[[dict], bool]]] = []

    def case(name, body, headers, status, check):
        cases.append((name, body, headers, status, check))

    bin_headers = {"ce-specversion": "1.0", "ce-source": "/t", "ce-type": TYPE,
                   "content-type": "application/json", **AUTH}
    case("missing type", payment(), {**{k: v for k, v in bin_headers.items()
                                        if k != "ce-type"}, "ce-id": _bad(f"{run}-1")},
         400, lambda b: b["attribute"] == "type" and "missing" in b["reason"])
    case("bad time", payment(), {**bin_headers, "ce-id": _bad(f"{run}-2"), "ce-time": "noon"},
         400, lambda b: b["attribute"] == "time")
    case("bad json", b"{nope", {**bin_headers, "ce-id": _bad(f"{run}-3")},
         400, lambda b: b["attribute"] == "data")
    case("old specversion", event(_bad(f"{run}-4"), specversion="0.3"),
         STRUCTURED, 400, lambda b: b["attribute"] == "specversion")
    case("content type", b"hello", {"content-type": "text/plain", **AUTH},
         415, lambda b: "application/cloudevents-batch+json" in b["reason"])
    case("too large", [event(f"{run}-big-{i}", i) for i in range(400)], BATCH,
         413, lambda b: str(MAX_BODY) in b["reason"])
    case("schema", event(_bad(f"{run}-5"), data=payment(amount="12")), STRUCTURED,
         422, lambda b: b["field"] == "amount" and "double" in b["reason"])
    case("missing field", event(_bad(f"{run}-6"), data={"payment_id": "x"}), STRUCTURED,
         422, lambda b: b["field"] == "card_id")
    case("unknown type", event(_bad(f"{run}-7"), type="com.nobody"), STRUCTURED,
         422, lambda b: b["attribute"] == "type" and TYPE in b["reason"])
    case("no token", event(_bad(f"{run}-8")), {"content-type": "application/cloudevents+json"},
         401, lambda b: "missing" in b["reason"])
    case("wrong token", event(_bad(f"{run}-9")),
         {"content-type": "application/cloudevents+json", "authorization": "Bearer nope"},
         401, lambda b: "invalid" in b["reason"])
    batch = [event(_bad(f"{run}-aon-{i}"), i) for i in range(5)]
    batch[3]["data"]["currency"] = 978
    case("all-or-nothing batch", batch, BATCH, 422,
         lambda b: [e["index"] for e in b["events"]] == [3] and b["events"][0]["field"]
         == "currency" and "none was written" in b["reason"])
    for name, body, headers, status, check in cases:
        r = post(gateway, body, headers)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        answer = r.json()
        assert answer["error"] and answer["reason"], name
        assert check(answer), f"{name}: {answer}"
        if status == 401:
            assert r.headers["www-authenticate"].startswith("Bearer"), name
            assert TOKEN not in r.text
        if status == 413:
            REJECTED_IDS.extend(e["id"] for e in body)


def test_streamed_body_over_the_limit_is_413(gateway):
    def chunks() -> Iterator[bytes]:  # no Content-Length: the gateway counts while reading
        yield b"["
        for i in range(400):
            yield orjson.dumps(event(_bad(f"stream-{uuid.uuid4().hex[:6]}-{i}"), i)) + b","
        yield orjson.dumps(event(_bad(f"stream-last-{uuid.uuid4().hex[:6]}"))) + b"]"

    r = httpx.post(gateway + "/", content=chunks(), headers=BATCH, timeout=30)
    assert r.status_code == 413 and "received" in r.json()["reason"]


def test_nothing_from_rejected_requests_reaches_the_topic(gateway, reader):
    """Sentinels written after every rejection: once each partition shows one, everything
    acknowledged before it has been read, so a missing rejected id is really absent."""
    assert REJECTED_IDS, "run with the rejection tests"
    run = uuid.uuid4().hex[:6]
    sentinels = [event(f"{run}-sentinel-{i}", i) | {"partitionkey": f"s{i}"} for i in range(40)]
    assert post(gateway, sentinels, BATCH).status_code == 202
    ids = {s["id"] for s in sentinels}
    records = reader.read_until(lambda recs: ids <= set(recs), settle=1.0)
    assert {records[i].partition() for i in ids} == set(range(PARTITIONS))
    leaked = set(REJECTED_IDS) & set(records)
    assert not leaked, f"rejected events found in the topic: {sorted(leaked)[:5]}"


# ------------------------------------------------------------------------- broker down


def test_unreachable_broker_is_503(stack, topology, tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc, url = start_gateway(tmp_path, bootstrap=dead, registry=stack.registry_url,
                              topology=topology, extra=["--message-timeout-ms", "2000"],
                              wait_ready=False)
    try:
        r = httpx.get(url + "/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unreachable")
        assert r.json()["checks"]["registry"] == "ok"
        started = time.monotonic()
        r = post(url, event("dead-1"), {"content-type": "application/cloudevents+json"})
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "broker_unavailable"
        assert int(r.headers["retry-after"]) > 0
        assert time.monotonic() - started < 10  # bounded by message.timeout.ms
        # Once known down, it answers at once without queueing anything.
        # "unreachable" is only the known-down answer (`Producer.send` raises it before
        # producing); a queued record would fail with a delivery error instead.
        time.sleep(2.5)
        r = post(url, [event("dead-2"), event("dead-3")],
                 {"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 503 and "unreachable" in r.json()["reason"]
        metrics = httpx.get(url + "/metrics").text
        assert 'sluice_gateway_events_total{outcome="failed"' in metrics
    finally:
        stop_process(proc)


# ------------------------------------------------------------------------- publish


def test_publisher_and_cli_publish(gateway, reader, tmp_path, stack):
    run = uuid.uuid4().hex[:6]
    with Publisher(gateway, TOKEN) as pub:
        first = pub.send({"type": TYPE, "data": payment(1), "partitionkey": "k1"})
        seen: list[int] = []
        n = pub.send_many(({"id": f"{run}-{i}", "type": TYPE, "data": payment(i)}
                           for i in range(1200)), batch_size=500, progress=seen.append)
        # 500 events are ~150 KB, over this gateway's 64 KiB limit: halved until they fit
        assert n == 1200 and seen[-1] == 1200 and seen == sorted(seen) and len(seen) > 3
        with pytest.raises(GatewayError) as info:
            pub.send({"type": "com.unknown", "data": {}})
        assert info.value.status == 422 and TYPE in info.value.reason

    lines = [orjson.dumps({"type": TYPE, "id": f"{run}-f{i}", "data": payment(i)})
             for i in range(300)]
    f = tmp_path / "events.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    cli = [sys.executable, "-m", "eventing.cli", "--state-dir", str(tmp_path / "st"),
           "publish", "--gateway", gateway]
    raw = subprocess.run([*cli, "--file", str(f), "--batch-size", "100"], cwd=ROOT,
                         env={**env, "SLUICE_GATEWAY_TOKEN": TOKEN}, capture_output=True,
                         timeout=60)
    assert raw.returncode == 0, raw.stderr
    assert b"\r300/300 events  " in raw.stderr and raw.stderr.endswith(b" ev/s\n")
    assert raw.stderr.count(b"\r300/300") == 1
    proc = subprocess.run([*cli, "--type", TYPE, "--data", orjson.dumps(payment(9)).decode(),
                           "--id", f"{run}-one", "--key", "kk"], cwd=ROOT,
                          env={**env, "SLUICE_GATEWAY_TOKEN": TOKEN}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{run}-one", proc.stderr
    proc = subprocess.run([*cli, "--type", TYPE, "--data", '{"amount": 1}'], cwd=ROOT,
                          env={**env, "SLUICE_GATEWAY_TOKEN": TOKEN}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "422" in proc.stderr and "schema_violation" in proc.stderr
    proc = subprocess.run([*cli, "--type", TYPE, "--data", "{}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "401" in proc.stderr

    wanted = {first, f"{run}-one", *(f"{run}-{i}" for i in range(1200)),
              *(f"{run}-f{i}" for i in range(300))}
    records = reader.read_until(lambda recs: wanted <= set(recs))
    assert records[f"{run}-one"].key() == b"kk"
    assert reader.value(records[f"{run}-f299"]) == payment(299)
