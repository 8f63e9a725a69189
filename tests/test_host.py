"""The function host's HTTP contract, with Flask's test client and a fake producer.

What is pinned down here: one binary or structured CloudEvent per POST; 204 only after
every output is acknowledged; Reject → 422, other errors → 500 with the text, output
failures → 503; the batch mode's per-event results; and that the entry file is a real
functions-framework target configured only by the documented variables.
"""

from __future__ import annotations

import base64
import dataclasses
import threading
import time

import flask
import orjson
import pytest

from eventing.cloudevent import http as ce_http
from eventing.cloudevent import json as ce_json
from eventing.fn import env as host_env
from eventing.fn import host
from eventing.topology import Delivery, Function
from tests.helpers import ROOT, FakeProducer

FLAKY = ROOT / "tests" / "functions" / "flaky" / "main.py"
OUT = "payments.converted"


def payment(pid: str, merchant: str = "m1", amount: float = 10.0) -> dict:
    return {"payment_id": pid, "card_id": "card-7", "merchant_id": merchant, "amount": amount,
            "currency": "USD", "country": "DE", "event_time": 1_700_000_000_000}


def flaky_function(**changes) -> Function:
    fn = Function(name="flaky", source=FLAKY, target="flaky", topics=("in",),
                  consumer_group="g", outputs={OUT: ("*",)}, delivery=Delivery(), invoke="http")
    return dataclasses.replace(fn, **changes)


def client_for(producer: FakeProducer, function: Function | None = None, **kwargs):
    handle = host.make_handler(function or flaky_function(), "unused:9092", None,
                               producer_factory=lambda: producer, serde_factory=lambda: None,
                               **kwargs)
    app = flask.Flask("host-test")
    app.add_url_rule("/", "run", lambda: handle(flask.request), methods=["GET", "POST"])
    return app.test_client()


def binary(pid: str, merchant: str = "m1", **extra) -> tuple[dict[str, str], bytes]:
    headers = {"ce-specversion": "1.0", "ce-id": f"id-{pid}", "ce-source": "/test",
               "ce-type": "com.sluice.payment.valid", "ce-partitionkey": "card-7",
               "content-type": "application/json", **extra}
    return headers, orjson.dumps(payment(pid, merchant))


def event_obj(pid: str, merchant: str = "m1") -> dict:
    return {"specversion": "1.0", "id": f"id-{pid}", "source": "/test",
            "type": "com.sluice.payment.valid", "partitionkey": "card-7",
            "datacontenttype": "application/json", "data": payment(pid, merchant)}


def post_batch(client, objs: list, ordering: str | None = None):
    headers = {"content-type": ce_json.BATCH_JSON}
    if ordering:
        headers[host.ORDERING_HEADER] = ordering
    return client.post("/", data=orjson.dumps(objs), headers=headers)


# --------------------------------------------------------------------------- one event


def test_binary_event_is_run_and_its_output_produced_before_204():
    producer = FakeProducer()
    headers, body = binary("p1", kafkaheadertraceidentifier="t-1")  # > 20 chars: allowed
    resp = client_for(producer).post("/", data=body, headers=headers)
    assert resp.status_code == 204, resp.data
    assert producer.acked == [OUT]
    topic, key, value, out_headers = producer.records[0]
    assert topic == OUT and key == b"card-7"
    assert orjson.loads(value)["amount_eur"] == 9.2
    hdrs = dict(out_headers)
    assert hdrs["ce_type"] == b"com.sluice.payment.valid"
    assert hdrs["ce_source"] == b"/sluice/functions/flaky"


def test_structured_event_is_accepted():
    producer = FakeProducer()
    headers, body = ce_http.to_structured(ce_json.from_object(event_obj("p2")))
    resp = client_for(producer).post("/", data=body, headers=headers)
    assert resp.status_code == 204, resp.data
    assert len(producer.records) == 1


def test_answer_waits_for_the_broker_ack():
    producer = FakeProducer()
    producer.release.clear()
    client = client_for(producer)
    headers, body = binary("p3")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=client.post("/", data=body,
                                                                     headers=headers)))
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and "r" not in result, "answered before the output was acknowledged"
    assert len(producer.records) == 1  # produced, just not acknowledged yet
    producer.release.set()
    t.join(5)
    assert result["r"].status_code == 204


def test_unacknowledged_output_times_out_with_503():
    producer = FakeProducer()
    producer.release.clear()
    headers, body = binary("p4")
    resp = client_for(producer, ack_timeout_s=0.2).post("/", data=body, headers=headers)
    assert resp.status_code == 503
    assert b"not acknowledged" in resp.data


def test_delivery_error_is_503():
    producer = FakeProducer(error="Broker: Not enough in-sync replicas")
    headers, body = binary("p5")
    resp = client_for(producer).post("/", data=body, headers=headers)
    assert resp.status_code == 503
    assert b"Not enough in-sync replicas" in resp.data


def test_produce_exception_is_503():
    producer = FakeProducer(raise_on_produce=RuntimeError("local: unknown topic"))
    headers, body = binary("p6")
    resp = client_for(producer).post("/", data=body, headers=headers)
    assert resp.status_code == 503
    assert b"unknown topic" in resp.data


def test_function_error_is_500_with_its_text():
    producer = FakeProducer()
    headers, body = binary("p7", merchant="fail")
    resp = client_for(producer).post("/", data=body, headers=headers)
    assert resp.status_code == 500
    assert resp.data == b"RuntimeError: flaky failure for p7"
    assert producer.records == []


def test_reject_is_422():
    producer = FakeProducer()
    headers, body = binary("p8", merchant="reject")
    resp = client_for(producer).post("/", data=body, headers=headers)
    assert resp.status_code == 422
    assert resp.data == b"Reject: rejected p8"


def test_output_no_topic_takes_is_500():
    producer = FakeProducer()
    fn = flaky_function(outputs={OUT: ("com.other.type",)})
    headers, body = binary("p9")
    resp = client_for(producer, fn).post("/", data=body, headers=headers)
    assert resp.status_code == 500
    assert b"OutputError" in resp.data


def test_not_a_cloudevent_is_400_and_get_is_405():
    client = client_for(FakeProducer())
    resp = client.post("/", data=b"{}", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert b"specversion" in resp.data
    assert client.get("/").status_code == 405


# --------------------------------------------------------------------------- batches


def test_batch_ordered_stops_at_first_failure():
    producer = FakeProducer()
    objs = [event_obj("b1"), event_obj("b2", "fail"), event_obj("b3")]
    resp = post_batch(client_for(producer), objs, "ordered")
    assert resp.status_code == 200
    results = orjson.loads(resp.data)["results"]
    assert results == [{"status": 200},
                       {"status": 500, "error": "RuntimeError: flaky failure for b2"},
                       {"status": 0}]
    assert [orjson.loads(r[2])["payment_id"] for r in producer.records] == ["b1"]


def test_batch_unordered_runs_every_event():
    producer = FakeProducer()
    objs = [event_obj("u1"), event_obj("u2", "reject"), event_obj("u3"), {"id": "x"}]
    resp = post_batch(client_for(producer), objs, "unordered")
    results = orjson.loads(resp.data)["results"]
    assert [r["status"] for r in results] == [200, 422, 200, 400]
    assert results[3]["error"].startswith("not a CloudEvent: event[3]")
    assert sorted(orjson.loads(r[2])["payment_id"] for r in producer.records) == ["u1", "u3"]


def test_batch_output_failure_marks_only_produced_events():
    producer = FakeProducer(error="Broker: timed out")
    resp = post_batch(client_for(producer), [event_obj("f1"), event_obj("f2")])
    results = orjson.loads(resp.data)["results"]
    assert [r["status"] for r in results] == [503, 503]
    assert "timed out" in results[0]["error"]


def test_batch_rejects_bad_ordering_and_non_arrays():
    client = client_for(FakeProducer())
    assert post_batch(client, [], "sideways").status_code == 400
    resp = client.post("/", data=b'{"a": 1}', headers={"content-type": ce_json.BATCH_JSON})
    assert resp.status_code == 400


def test_batch_avro_data_travels_as_base64():
    """Binary data (Avro) in a batch arrives as `data_base64` and reaches the serde."""

    class Serde:
        def decode(self, value: bytes) -> dict:
            assert value == b"\x00avro"
            return payment("a1")

        def encode_lazy(self, topic: str, record: dict) -> bytes:
            return b"\x00enc" + record["payment_id"].encode()

        def writer_for(self, topic: str):
            return object()

    producer = FakeProducer()
    handle = host.make_handler(flaky_function(), "unused:9092", None,
                               producer_factory=lambda: producer, serde_factory=Serde)
    app = flask.Flask("host-avro")
    app.add_url_rule("/", "run", lambda: handle(flask.request), methods=["POST"])
    obj = {**event_obj("a1"), "datacontenttype": "application/avro"}
    del obj["data"]
    obj["data_base64"] = base64.b64encode(b"\x00avro").decode()
    resp = post_batch(app.test_client(), [obj])
    assert orjson.loads(resp.data)["results"] == [{"status": 200}]
    assert producer.records[0][2] == b"\x00enca1"
    assert dict(producer.records[0][3])["content-type"] == b"application/avro"


# --------------------------------------------------------------------------- configuration


def test_env_round_trip():
    fn = flaky_function(outputs={OUT: ("a", "b"), "other": ("*",)})
    env = host_env.function_env(fn, "127.0.0.1:9092", "http://127.0.0.1:8081")
    assert set(env) == set(host_env.ENV_NAMES)
    back, bootstrap, registry = host_env.function_from_env(env)
    assert (back.name, back.source, back.target, back.outputs) == (
        fn.name, fn.source, fn.target, fn.outputs)
    assert (bootstrap, registry) == ("127.0.0.1:9092", "http://127.0.0.1:8081")


def test_env_needs_bootstrap_when_there_are_outputs():
    env = host_env.function_env(flaky_function(), None, None)
    with pytest.raises(host_env.HostConfigError, match=host_env.ENV_BOOTSTRAP):
        host_env.function_from_env(env)
    with pytest.raises(host_env.HostConfigError, match=host_env.ENV_SOURCE):
        host_env.function_from_env({})


@pytest.mark.parametrize("baked", [True, False])
def test_entry_file_is_a_functions_framework_http_target(tmp_path, monkeypatch, baked):
    """The real functions-framework app loads the entry file (env or baked values)."""
    import functions_framework

    for name in ("FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE"):
        monkeypatch.delenv(name, raising=False)  # create_app sets these; restore after
    fn = flaky_function(outputs={})  # no outputs: no Kafka needed for this check
    if baked:
        entry = host_env.write_entry_file(fn, tmp_path / "entry_baked.py", None, None)
    else:
        for name, value in host_env.function_env(fn, None, None).items():
            monkeypatch.setenv(name, value)
        entry = host_env.write_entry_file(None, tmp_path / "entry_env.py")
    assert host_env.serve_command(entry, 8080)[1:5] == ["--source", str(entry), "--target",
                                                        "handle"]
    app = functions_framework.create_app(host_env.ENTRY_TARGET, str(entry), "http")
    client = app.test_client()
    headers, body = binary("e1")
    resp = client.post("/", data=body, headers=headers)  # returns an event, no outputs
    assert resp.status_code == 500 and b"OutputError" in resp.data
    headers, body = binary("e2", merchant="reject")
    assert client.post("/", data=body, headers=headers).status_code == 422
    assert client.get("/").status_code == 405
