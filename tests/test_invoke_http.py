"""Functions over HTTP on the real stack: a functions-framework process hosting a function,
fed one binary CloudEvent per POST (what a KafkaSource sends) or in batches, by the real
dispatcher. Outputs must be in Kafka before the 2xx; failures must end in the dead-letter
topic with Knative's error extensions.

Also: `HttpInvoker` against a small in-test HTTP server, for the protocol details that
do not need Kafka (connection errors, batch results, per-lane ordering).
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from eventing import topology as topo
from eventing.cloudevent import event as ce_event
from eventing.cloudevent import json as ce_json
from eventing.cloudevent import kafka as ce_kafka
from eventing.delivery.http import HttpInvoker
from eventing.delivery.runner import RunSettings, build
from eventing.fn import env as host_env
from eventing.fn import host
from eventing.kafka import consumer_config, ensure_topics, producer_config
from eventing.serde import AvroSerde
from eventing.topology import Delivery, Function
from tests.helpers import ROOT, FakeMessage, free_port, http_server, stop_process, unique
from tests.pipeline import CONVERT, CONVERTED_SCHEMA, headers_of, register

VENV_BIN = Path(sys.executable).parent
FLAKY = ROOT / "tests" / "functions" / "flaky" / "main.py"
OUT = "payments.converted"


def payments(prefix: str, n: int, merchant=lambda i: f"m-{i % 7}") -> list[dict]:
    return [{"payment_id": f"{prefix}-{i}", "card_id": f"card-{i % 13}",
             "merchant_id": merchant(i), "amount": 10.0 + i, "currency": "USD",
             "country": "DE", "event_time": 1_764_000_000_000 + i} for i in range(n)]


def produce(bootstrap: str, serde: AvroSerde, topic: str, rows: list[dict]) -> None:
    """Binary-mode CloudEvents with Avro data, as the gateway writes them."""
    producer = Producer(producer_config(bootstrap))
    for p in rows:
        event = ce_event.make_event({
            "specversion": "1.0", "id": p["payment_id"], "source": "/tests",
            "type": "com.sluice.payment.valid", "partitionkey": p["card_id"],
            "datacontenttype": "application/avro"}, serde.encode("payments.valid", p))
        key, value, headers = ce_kafka.to_binary(event)
        producer.produce(topic, value, key, headers=headers)
    assert producer.flush(30) == 0


def read(bootstrap: str, topic: str, keep, expected: int, timeout: float = 30.0) -> list:
    """Records of `topic` (all partitions, from the start) for which `keep(msg)` holds.

    Assigns partitions directly (no group join), so it sees what the broker has now.
    """
    consumer = Consumer(consumer_config(bootstrap, unique("check-")))
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    got = []
    deadline = time.monotonic() + timeout
    idle_since = None
    while time.monotonic() < deadline:
        batch = consumer.consume(1000, 0.2)
        got += [m for m in batch if not m.error() and keep(m)]
        if len(got) >= expected:
            idle_since = idle_since or time.monotonic()
            if not batch and time.monotonic() - idle_since > 0.5:
                break  # a little longer for unexpected extras
    consumer.close()
    return got


def source_id(msg) -> str:
    """The input event id an output came from (outputs get `<input id>/<function>/<n>`)."""
    return headers_of(msg).get("ce_id", "").split("/", 1)[0]


# --------------------------------------------------------------------------- servers


class FunctionServer:
    """A function served by `functions-framework` in its own process, as on Knative."""

    def __init__(self, function: Function, bootstrap: str, registry_url: str, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        entry = host_env.write_entry_file(function, tmp / f"entry_{function.name}.py",
                                          bootstrap, registry_url)
        argv = host_env.serve_command(entry, self.port,
                                      executable=str(VENV_BIN / "functions-framework"))
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
               "PYTHONUNBUFFERED": "1"}
        self.log = (tmp / f"{function.name}.log").open("w")
        self.proc = subprocess.Popen(argv, env=env, cwd=tmp, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (tmp / f"{function.name}.log").read_text()
            try:
                if httpx.get(self.url, timeout=1).status_code == 405:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"function server on {self.url} did not start")

    def stop(self) -> None:
        stop_process(self.proc, group=True)  # gunicorn master and its worker, started here
        self.log.close()


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> topo.Topology:
    """The benchmarks' `convert` function (payments.valid -> payments.converted)."""
    path = tmp_path_factory.mktemp("topology") / "topology.yaml"
    path.write_text(f"""
functions:
  convert:
    source: {CONVERT}
    topics: [payments.valid]
    outputs: [payments.converted]
    delivery: {{deadLetterSink: sluice.deadletter}}
""")
    return topo.load(path)


@pytest.fixture(scope="module")
def serde(stack) -> AvroSerde:
    ensure_topics(stack.bootstrap, {OUT: 4, "payments.valid": 4})
    register(stack.registry_url, OUT, CONVERTED_SCHEMA)  # benchmark code: `up` does not
    return AvroSerde(stack.registry_url)


@pytest.fixture(scope="module")
def convert_server(stack, topology, serde, tmp_path_factory) -> Iterator[FunctionServer]:
    server = FunctionServer(topology.function("convert"), stack.bootstrap, stack.registry_url,
                            tmp_path_factory.mktemp("fn-convert"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def flaky_server(stack, topology, serde, tmp_path_factory) -> Iterator[FunctionServer]:
    fn = dataclasses.replace(topology.function("convert"), name="flaky", source=FLAKY,
                             target="flaky")
    server = FunctionServer(fn, stack.bootstrap, stack.registry_url,
                            tmp_path_factory.mktemp("fn-flaky"))
    yield server
    server.stop()


# --------------------------------------------------------------------------- the host


@pytest.mark.stack
def test_binary_event_output_is_in_kafka_when_the_2xx_returns(stack, serde, convert_server):
    pid = unique("pay-")
    row = payments(pid, 1)[0]
    headers = {"ce-specversion": "1.0", "ce-id": "partition:0/offset:41",
               "ce-source": "/apis/v1/namespaces/default/kafkasources/convert#payments.valid",
               "ce-type": "com.sluice.payment.valid", "ce-partitionkey": row["card_id"],
               "ce-traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
               "content-type": "application/avro"}
    resp = httpx.post(convert_server.url, headers=headers,
                      content=serde.encode("payments.valid", row), timeout=30)
    assert resp.status_code == 204, resp.text
    # Assigned reads see the broker's state now: the output must already be there.
    out = read(stack.bootstrap, OUT, lambda m: serde.decode(m.value())["payment_id"] == row[
        "payment_id"], 1, timeout=5)
    assert len(out) == 1
    value = serde.decode(out[0].value())
    assert value["amount_eur"] == round(row["amount"] * 0.92, 2)
    hdrs = headers_of(out[0])
    assert out[0].key() == row["card_id"].encode()
    assert hdrs["ce_type"] == "com.sluice.payment.valid"
    assert hdrs["ce_source"] == "/sluice/functions/convert"
    assert hdrs["ce_traceparent"] == headers["ce-traceparent"]
    assert hdrs["content-type"] == "application/avro"


@pytest.mark.stack
def test_host_failures_map_to_knative_statuses(serde, flaky_server):
    rows = payments(unique("st-"), 3, merchant=lambda i: ["fail", "reject", "ok"][i])

    def post(row):
        return httpx.post(flaky_server.url, content=serde.encode("payments.valid", row),
                          headers={"ce-specversion": "1.0", "ce-id": row["payment_id"],
                                   "ce-source": "/t", "ce-type": "t",
                                   "content-type": "application/avro"}, timeout=30)

    fail, reject, ok = (post(r) for r in rows)
    assert (fail.status_code, fail.text) == (500, f"RuntimeError: flaky failure for "
                                                  f"{rows[0]['payment_id']}")
    assert reject.status_code == 422
    assert ok.status_code == 204


# --------------------------------------------------------------------------- dispatcher


def run_dispatcher(stack, function: Function, expected: int,
                   timeout: float = 120) -> tuple[object, float]:
    """Run a dispatcher until `expected` records are done; returns (stats, seconds)."""
    dispatcher = build(function, RunSettings(stack.bootstrap, stack.registry_url))
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert dispatcher.assigned.wait(30), "no partitions assigned"
        start = time.monotonic()
        deadline = start + timeout
        stats = dispatcher.stats
        while stats.succeeded + stats.dead_lettered < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(30)
    assert stats.succeeded + stats.dead_lettered >= expected, stats
    return stats, elapsed


def http_function(topology, url: str, mode: str, src: str, dlq: str, **changes) -> Function:
    return dataclasses.replace(
        topology.function("convert"), topics=(src,), consumer_group=unique("g-http-"),
        invoke=mode, url=url,
        delivery=Delivery(ordering="ordered", retry=2, backoff_delay="PT0.05S",
                          timeout="PT30S", dead_letter_sink=dlq),
        **changes)


@pytest.mark.stack
@pytest.mark.parametrize("mode", ["http", "http-batch"])
def test_dispatcher_delivers_over_http_in_order(stack, serde, topology, convert_server, mode):
    n = 600
    src, dlq, prefix = unique("http-in-"), unique("http-dlq-"), unique("ord-")
    ensure_topics(stack.bootstrap, {src: 4, dlq: 1})
    rows = payments(prefix, n)
    produce(stack.bootstrap, serde, src, rows)
    fn = http_function(topology, convert_server.url, mode, src, dlq, batch_size=100)

    stats, elapsed = run_dispatcher(stack, fn, n)
    print(f"\n{mode}: {n} events in {elapsed:.2f}s = {n / elapsed:,.0f} events/s")
    assert (stats.succeeded, stats.dead_lettered, stats.failed_attempts) == (n, 0, 0)

    out = read(stack.bootstrap, OUT, lambda m: source_id(m).startswith(prefix), n)
    values = [serde.decode(m.value()) for m in out]
    assert sorted(v["payment_id"] for v in values) == sorted(r["payment_id"] for r in rows)
    by_card: dict[str, list[int]] = defaultdict(list)
    for _m, v in sorted(zip(out, values, strict=True),
                       key=lambda mv: (mv[0].partition(), mv[0].offset())):
        by_card[v["card_id"]].append(v["event_time"])
    assert all(times == sorted(times) for times in by_card.values()), "per-key order broken"


@pytest.mark.stack
@pytest.mark.parametrize("mode", ["http", "http-batch"])
def test_failures_end_in_dead_letter_with_knative_extensions(
        stack, serde, topology, flaky_server, mode):
    n = 90

    def merchant(i: int) -> str:
        return "fail" if i % 10 == 3 else "reject" if i % 15 == 7 else f"m-{i}"

    src, dlq, prefix = unique("flaky-in-"), unique("flaky-dlq-"), unique("fl-")
    ensure_topics(stack.bootstrap, {src: 4, dlq: 1})
    rows = payments(prefix, n, merchant)
    produce(stack.bootstrap, serde, src, rows)
    fn = http_function(topology, flaky_server.url, mode, src, dlq, name="flaky",
                       source=FLAKY, target="flaky", batch_size=20)
    fails = {r["payment_id"] for r in rows if r["merchant_id"] == "fail"}
    rejects = {r["payment_id"] for r in rows if r["merchant_id"] == "reject"}

    stats, _ = run_dispatcher(stack, fn, n)
    assert stats.dead_lettered == len(fails) + len(rejects)
    assert stats.succeeded == n - len(fails) - len(rejects)
    assert stats.retries == 2 * len(fails)  # Reject is not retried

    dead = read(stack.bootstrap, dlq, lambda m: True, len(fails) + len(rejects))
    seen = {}
    for msg in dead:
        h = headers_of(msg)
        pid = serde.decode(msg.value())["payment_id"]  # the original record, unchanged
        assert h["ce_id"] == pid and h["content-type"] == "application/avro"
        assert h["ce_knativeerrordest"] == flaky_server.url
        seen[pid] = (h["ce_knativeerrorcode"],
                     base64.b64decode(h["ce_knativeerrordata"]).decode())
    assert seen == {
        **{p: ("500", f"RuntimeError: flaky failure for {p}") for p in fails},
        **{p: ("422", f"Reject: rejected {p}") for p in rejects},
    }
    good = read(stack.bootstrap, OUT, lambda m: source_id(m).startswith(prefix), n - len(seen))
    assert sorted(source_id(m) for m in good) == sorted(
        {r["payment_id"] for r in rows} - set(seen))


# --------------------------------------------------------------------------- protocol


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers as configured per request; records what it received."""

    protocol_version = "HTTP/1.1"
    requests: list = []
    answer = staticmethod(lambda headers, body: (204, b""))
    drop_after_reply = False

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).requests.append((dict(self.headers), body))
        status, reply = type(self).answer(self.headers, body)
        self.send_response(status)
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
        if type(self).drop_after_reply:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Rec", (_Recorder,), {"requests": []})
    with http_server(handler) as url:
        yield url + "/", handler


def fake_msg(partition: int, offset: int, value: bytes, headers=None) -> FakeMessage:
    """A payments.valid record, as `record_event` reads it."""
    return FakeMessage(topic="payments.valid", partition=partition, offset=offset, key=b"k",
                       value=value, headers=headers, timestamp_ms=1_764_000_000_123)


def fn_for(url: str, **changes) -> Function:
    fn = Function(name="conv", source=FLAKY, target="flaky", topics=("payments.valid",),
                  consumer_group="g", outputs={}, delivery=Delivery(timeout="PT2S"),
                  invoke="http", url=url)
    return dataclasses.replace(fn, **changes)


def test_per_event_post_is_what_a_kafkasource_sends(recorder):
    url, rec = recorder
    raw = b"\x00\x00\x00\x00\x01avro-bytes"
    msgs = [fake_msg(0, 5, raw, [("ce_specversion", b"1.0"), ("ce_id", b"e1"),
                            ("ce_source", b"/s"), ("ce_type", b"t"),
                            ("content-type", b"application/avro")]),
            fake_msg(1, 9, b"plain", [("trace", b"x")])]  # not a CloudEvent: wrapped like Knative
    invoker = HttpInvoker(fn_for(url), url)
    try:
        outcomes = invoker.invoke([[msgs[0]], [msgs[1]]], ordered=True)
    finally:
        invoker.close()
    assert [f for _, f in outcomes] == [None, None]
    by_id = {h["ce-id"]: (h, b) for h, b in rec.requests}
    h, body = by_id["e1"]
    assert body == raw and h["content-type"] == "application/avro"
    assert h["ce-partitionkey"] == "k"
    h, body = by_id["partition:1/offset:9"]
    assert body == b"plain" and h["ce-type"] == "dev.knative.kafka.event"
    assert h["ce-source"] == "/apis/v1/namespaces/default/kafkasources/conv#payments.valid"
    assert h["ce-kafkaheadertrace"] == "x" and h["ce-key"] == "k"


def test_ordered_lane_stops_at_first_failure_unordered_does_not(recorder):
    url, rec = recorder
    rec.answer = staticmethod(lambda headers, body: (500, b"nope") if body == b"2"
                              else (429, b"slow") if body == b"4" else (200, b""))
    lane_a = [fake_msg(0, i, str(i).encode()) for i in range(4)]  # 2 fails
    lane_b = [fake_msg(1, i, str(i + 4).encode()) for i in range(2)]  # 4 fails
    invoker = HttpInvoker(fn_for(url), url)
    try:
        ordered = invoker.invoke([lane_a, lane_b], ordered=True)
        rec.requests.clear()
        unordered = invoker.invoke([lane_a, lane_b], ordered=False)
    finally:
        invoker.close()
    assert [(m.value(), f and (f.code, f.message, f.retryable)) for m, f in ordered] == [
        (b"0", None), (b"1", None), (b"2", (500, "nope", True)), (b"4", (429, "slow", True))]
    assert len(unordered) == 6 and len(rec.requests) == 6
    assert sum(f is not None for _, f in unordered) == 2


def test_batch_results_map_to_outcomes(recorder):
    url, rec = recorder

    def answer(headers, body):
        n = len(orjson.loads(body))
        results = [{"status": 200}, {"status": 422, "error": "Reject: bad"}] + [
            {"status": 0}] * (n - 2)
        return 200, orjson.dumps({"results": results})

    rec.answer = staticmethod(answer)
    lane = [fake_msg(0, i, b"{}", [("content-type", b"application/json")]) for i in range(5)]
    invoker = HttpInvoker(fn_for(url, batch_size=3), url, batched=True)
    try:
        outcomes = invoker.invoke([lane], ordered=True)
    finally:
        invoker.close()
    assert len(rec.requests) == 1  # the lane stopped: second chunk never sent
    headers, body = rec.requests[0]
    assert headers["content-type"].startswith(ce_json.BATCH_JSON)
    assert headers[host.ORDERING_HEADER] == "ordered"
    assert len(orjson.loads(body)) == 3
    assert [(m.offset(), f and (f.code, f.retryable)) for m, f in outcomes] == [
        (0, None), (1, (422, False))]


def test_connection_error_is_a_retryable_500():
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens
    for batched in (False, True):
        invoker = HttpInvoker(fn_for(url), url, batched=batched)
        try:
            (msg, failure), = invoker.invoke([[fake_msg(0, 0, b"x")]], ordered=True)
        finally:
            invoker.close()
        assert failure.code == 500 and failure.retryable
        assert failure.message.startswith("dispatch error: ConnectionRefusedError")


def test_connection_closed_while_idle_is_reopened(recorder):
    """gunicorn closes idle keep-alive connections; the next POST must not fail for it."""
    url, rec = recorder
    rec.drop_after_reply = True  # close silently, without `Connection: close`
    invoker = HttpInvoker(fn_for(url, max_in_flight=1), url)
    try:
        outcomes = [invoker.invoke([[fake_msg(0, i, b"x")]], ordered=True) for i in range(3)]
    finally:
        invoker.close()
    assert [f for (_, f), in outcomes] == [None, None, None]
    assert len(rec.requests) == 3
