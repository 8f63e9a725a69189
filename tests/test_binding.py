"""CloudEvents bindings: the spec documents' own examples, round trips, KafkaSource-style
conversion of plain records, and malformed input. Unit tests, except the last one, which
round-trips through the test stack's broker (a `stack` test)."""

from __future__ import annotations

import base64
import time
import uuid
from datetime import UTC, datetime

import orjson
import pytest
from cloudevents.conversion import to_binary as sdk_to_binary
from cloudevents.http import CloudEvent
from cloudevents.http import from_http as sdk_from_http

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import http as ce_http
from eventing.cloudevent import json as ce_json
from eventing.cloudevent import kafka as ce_kafka

KW = dict(topic="mytopic", partition=3, offset=42, timestamp_ms=1522900584123)


def attrs_of(event: CloudEvent) -> dict:
    return dict(event.get_attributes())


# --------------------------------------------------------------- Kafka binding, spec 3.2.5


def test_kafka_binary_spec_example_encode_and_decode():
    event = ce_event.make_event(
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
    key, value, headers = ce_kafka.to_binary(event)
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
    back = ce_kafka.from_record(key, value, headers, **KW)
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
    event = ce_kafka.from_record(b"mykey", value, headers, **KW)
    assert event["type"] == "com.example.someevent"
    assert event["datacontenttype"] == "application/xml"
    assert event.data == b'<much wow="xml"/>'
    # the Python SDK's rule: a record key fills a missing partitionkey
    assert event["partitionkey"] == "mykey"


def test_kafka_structured_encode_is_json_event_format():
    event = ce_event.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "datacontenttype": "application/json", "partitionkey": "k"},
        b'{"a": 1}',
    )
    key, value, headers = ce_kafka.to_structured(event)
    assert key == b"k"
    assert headers == [("content-type", b"application/cloudevents+json; charset=utf-8")]
    obj = orjson.loads(value)
    assert obj["data"] == {"a": 1}  # JSON bytes embedded as JSON, not Base64
    assert obj["partitionkey"] == "k"
    back = ce_kafka.from_record(key, value, headers, **KW)
    assert back.get_attributes() == event.get_attributes()
    assert ce_event.json_data(back) == {"a": 1}  # re-encoded JSON: same value, not same bytes


def test_kafka_structured_binary_data_uses_data_base64():
    event = ce_event.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "datacontenttype": "application/vnd.apache.thrift.binary"},
        b"\xff\x00\x01",
    )
    _, value, headers = ce_kafka.to_structured(event)
    obj = orjson.loads(value)
    assert obj["data_base64"] == base64.b64encode(b"\xff\x00\x01").decode()
    assert "data" not in obj
    assert ce_kafka.from_record(None, value, headers, **KW) == event


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_kafka_round_trip_with_typed_extensions_and_no_data(mode):
    event = ce_event.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "time": "2024-05-01T12:00:00.5+02:00", "subject": "x", "traceparent": "00-ab-cd-01"},
        None,
    )
    enc = ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured
    key, value, headers = enc(event)
    assert key is None
    if mode == "binary":
        assert value is None  # no data = no value: a tombstone (spec 3.2.2)
    back = ce_kafka.from_record(key, value, headers, **KW)
    assert back == event


def test_binary_encodes_attribute_types_as_canonical_strings():
    event = ce_event.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
         "comexampleothervalue": 5, "flag": True, "blob": b"\x01\x02"},
        None,
    )
    _, _, headers = ce_kafka.to_binary(event)
    h = dict(headers)
    assert h["ce_comexampleothervalue"] == b"5"
    assert h["ce_flag"] == b"true"
    assert h["ce_blob"] == base64.b64encode(b"\x01\x02")


def test_binary_json_encodes_python_data_and_declares_json():
    event = ce_event.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1"},
                                {"amount": 1.5})
    _, value, headers = ce_kafka.to_binary(event)
    assert orjson.loads(value) == {"amount": 1.5}
    assert dict(headers)["content-type"] == b"application/json"
    non_json = ce_event.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                                    "datacontenttype": "text/plain"}, {"a": 1})
    with pytest.raises(ce_event.BindingError) as err:
        ce_kafka.to_binary(non_json)
    assert err.value.attribute == "data"


def test_record_key_sets_partitionkey_only_when_missing():
    event = ce_event.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                                 "partitionkey": "explicit"}, b"x")
    key, value, headers = ce_kafka.to_binary(event, key=b"other")
    assert key == b"other"
    assert ce_kafka.from_record(key, value, headers, **KW)["partitionkey"] == "explicit"
    plain = ce_event.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1"},
                                b"x")
    _, value, headers = ce_kafka.to_binary(plain)
    assert ce_kafka.from_record(b"acct-7", value, headers, **KW)["partitionkey"] == "acct-7"
    assert "partitionkey" not in ce_kafka.from_record(None, value, headers, **KW)


def test_decode_reads_records_from_the_python_sdk():
    from cloudevents.kafka import to_binary

    event = CloudEvent({"type": "t", "source": "/s", "id": "1", "partitionkey": "pk",
                        "datacontenttype": "application/json"}, {"a": 1})
    msg = to_binary(event)  # note: the SDK drops the ce_partitionkey header
    back = ce_kafka.from_record(msg.key.encode(), msg.value, list(msg.headers.items()), **KW)
    assert back["partitionkey"] == "pk"
    assert back["id"] == "1"
    assert orjson.loads(back.data) == {"a": 1}


# --------------------------------------------------------------- non-CloudEvent records


def test_plain_record_becomes_knative_kafka_event():
    headers = [("X-Request_ID", b"r-1"), ("content-type", b"Application/JSON"),
               ("traceparent", b"00-aa-bb-01")]
    event = ce_kafka.from_record(b"acct-42", b'{"v": 1}', headers, source_name="payments-src",
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
    ce_event.validate_attributes(event.get_attributes(), max_name_length=None)


def test_plain_record_without_key_timestamp_or_headers():
    event = ce_kafka.from_record(b"", b"raw", None, topic="t", partition=0, offset=0,
                                 timestamp_ms=None)
    assert "key" not in event and "partitionkey" not in event and "time" not in event
    assert event["source"] == "/apis/v1/namespaces/default/kafkasources/sluice#t"
    assert event.data == b"raw"


def test_invalid_cloudevent_record_raises_or_is_wrapped():
    headers = [("ce_specversion", b"0.3"), ("ce_id", b"1"), ("ce_source", b"/s"),
               ("ce_type", b"t")]
    with pytest.raises(ce_event.BindingError) as err:
        ce_kafka.from_record(None, b"x", headers, **KW)
    assert err.value.attribute == "specversion"
    wrapped = ce_kafka.from_record(None, b"x", headers, wrap_invalid=True, **KW)
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
    with pytest.raises(ce_event.BindingError) as err:
        ce_kafka.from_record(None, value, headers, **KW)
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
    event = ce_http.from_http(headers, b'{"appinfoA": "abc"}')
    assert attrs_of(event) == {
        "specversion": "1.0",
        "type": "com.example.someevent",
        "time": "2018-04-05T03:56:24Z",
        "id": "1234-1234-1234",
        "source": "/mycontext/subcontext",
        "datacontenttype": "application/json; charset=utf-8",
    }
    assert ce_event.json_data(event) == {"appinfoA": "abc"}


def test_http_structured_spec_example():
    body = orjson.dumps({
        "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",
        "subject": None, "id": "C234-1234-1234", "time": "2018-04-05T17:31:00Z",
        "comexampleextension1": "value", "comexampleothervalue": 5,
        "datacontenttype": "application/json",
        "data": {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True},
    })
    event = ce_http.from_http({"content-type": "application/cloudevents+json; charset=utf-8"}, body)
    assert "subject" not in event  # null = unset
    assert event["comexampleothervalue"] == 5
    assert ce_event.json_data(event) == {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True}
    # ... and the same event re-encoded in HTTP binary mode, as the JSON format spec shows
    headers, body = ce_http.to_binary(event)
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
    event = ce_http.from_http({"content-type": "application/cloudevents+json"}, body)
    headers, http_body = ce_http.to_binary(event)
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
    assert ce_http.mode(headers) == "batch"
    with pytest.raises(ce_event.BindingError):
        ce_http.from_http(headers, body)
    events = ce_http.from_batch(body)
    assert [e["id"] for e in events] == ["B234-1234-1234", "C234-1234-1234"]
    assert events[0].data == b"\x0b\x00\x01"
    assert ce_event.json_data(events[1])["appinfoB"] == 123
    assert ce_http.from_batch(b"[]") == []
    _, batch_body = ce_http.to_batch(events)
    assert ce_http.from_batch(batch_body) == events


def test_batch_errors_name_the_event_and_attribute():
    body = orjson.dumps([
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "1"},
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "2",
         "time": "2018-13-01T00:00:00Z"},
    ])
    with pytest.raises(ce_event.BindingError) as err:
        ce_http.from_batch(body)
    assert (err.value.index, err.value.attribute) == (1, "time")
    assert str(err.value).startswith("event[1]: attribute 'time'")
    with pytest.raises(ce_event.BindingError, match="JSON array"):
        ce_http.from_batch(b'{"specversion": "1.0"}')


def test_http_percent_encoding_spec_example():
    event = ce_event.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                                 "subject": "Euro \u20ac \U0001F600"}, None)
    headers, body = ce_http.to_binary(event)
    assert headers["ce-subject"] == "Euro%20%E2%82%AC%20%F0%9F%98%80"
    assert body == b""
    base = {"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": "1"}
    assert ce_http.from_http(headers, body)["subject"] == "Euro \u20ac \U0001F600"
    # lower-case hex and double-quoted values (older senders) are accepted
    assert ce_http.from_http({**base, "ce-subject": "a%c3%a9"}, b"")["subject"] == "a\u00e9"
    assert ce_http.from_http({**base, "ce-subject": '"say \\"hi\\""'}, b"")["subject"] == 'say "hi"'
    # overlong encoding of U+0020 (the spec's example)
    with pytest.raises(ce_event.BindingError) as err:
        ce_http.from_http({**base, "ce-subject": "%C0%A0"}, b"")
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
    with pytest.raises(ce_event.BindingError) as err:
        ce_http.from_http(headers, body)
    assert err.value.attribute == attribute
    assert fragment in str(err.value)


def test_long_extension_names_are_accepted_from_kafka():
    """Knative's kafkaheader<name> breaks the 20-character SHOULD; records must still read."""
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"/s"),
               ("ce_type", b"t"), ("ce_kafkaheadertraceparent", b"x")]
    assert ce_kafka.from_record(None, b"", headers, **KW)["kafkaheadertraceparent"] == "x"


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
        ce_event.validate_attributes(attrs)
    else:
        with pytest.raises(ce_event.BindingError) as err:
            ce_event.validate_attributes(attrs)
        assert err.value.attribute == "time"


# --------------------------------------------------------------- the fast constructor


def test_make_event_equals_a_normally_constructed_event():
    attrs = {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
             "time": "2018-04-05T17:31:00Z", "traceparent": "00-aa-bb-01"}
    fast = ce_event.make_event(dict(attrs), b"payload")
    slow = CloudEvent(dict(attrs), b"payload")
    assert fast == slow and slow == fast
    assert type(fast) is CloudEvent
    assert fast.get_attributes() == slow.get_attributes()
    assert fast.data == slow.data and fast.get_data() == slow.get_data()
    assert fast["id"] == "1" and "traceparent" in fast and len(fast) == len(slow)
    fast["subject"] = "s"
    assert fast["subject"] == "s" and fast != slow
    # the SDK's own serialiser accepts it like any other event
    assert sdk_to_binary(ce_event.make_event(dict(attrs), b"p")) == sdk_to_binary(
        CloudEvent(dict(attrs), b"p"))


def test_http_interop_with_the_cloudevents_sdk():
    event = ce_event.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
                                 "datacontenttype": "application/json"}, b'{"a": 1}')
    headers, body = ce_http.to_binary(event)
    sdk_event = sdk_from_http(headers, body)
    assert sdk_event["id"] == "1" and sdk_event.data == {"a": 1}
    sdk_headers, sdk_body = sdk_to_binary(CloudEvent({"type": "t", "source": "/s"}, {"a": 1}))
    ours = ce_http.from_http(sdk_headers, sdk_body)
    assert ce_event.json_data(ours) == {"a": 1}


# --------------------------------------------------------------- fast paths, batch parts


def _traced_input() -> CloudEvent:
    return ce_event.make_event({
        "specversion": "1.0", "id": "in-1", "source": "/s", "type": "t",
        "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "partitionkey": 7,
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "k=v",
        "subject": "not inherited"}, b"x")


def test_derived_record_is_what_to_binary_makes_of_the_derived_event():
    in_attrs = _traced_input()._get_attributes()
    fast = ce_kafka.to_binary_derived(in_attrs, "in-1/fn/0", b"/fn", b'{"a":1}',
                                      b"application/json")
    event = ce_event.make_event({
        "specversion": "1.0", "id": "in-1/fn/0", "source": "/fn", "type": "t",
        **{n: in_attrs[n] for n in ("time", "partitionkey", "traceparent", "tracestate")},
        "datacontenttype": "application/json"}, b'{"a":1}')
    assert fast == ce_kafka.to_binary(event, validate=False)
    assert fast[0] == b"7" and dict(fast[2])["ce_time"] == b"2026-01-02T03:04:05Z"


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_dead_letter_adds_knative_extensions_in_the_original_mode(mode):
    event = ce_event.make_event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                                 "datacontenttype": "application/json"}, b'{"a": 1}')
    encode = ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured
    key, value, headers = encode(event)
    consumed = ce_kafka.from_record(key, value, headers, **KW)
    message = "x" * 2000
    _, dl_value, dl_headers = ce_kafka.to_dead_letter(
        consumed, headers, destination="http://fn", code=500, message=message)
    back = ce_kafka.from_record(None, dl_value, dl_headers, **KW)
    assert dict(dl_headers)["content-type"].startswith(
        b"application/cloudevents" if mode == "structured" else b"application/json")
    assert back["knativeerrordest"] == "http://fn" and back["knativeerrorcode"] == "500"
    assert base64.b64decode(back["knativeerrordata"]) == b"x" * ce_kafka.ERROR_DATA_MAX
    assert ce_event.json_data(back) == {"a": 1}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_dead_letter_origin_round_trips_to_the_original_event(mode):
    event = ce_event.make_event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                                 "partitionkey": "k", "datacontenttype": "application/json"},
                                b'{"a": 1}')
    encode = ce_kafka.to_binary if mode == "binary" else ce_kafka.to_structured
    key, value, headers = encode(event)
    consumed = ce_kafka.from_record(key, value, headers, **KW)
    _, dl_value, dl_headers = ce_kafka.to_dead_letter(
        consumed, headers, destination="inprocess://fn", code=422, message="Reject: no",
        origin=("in.topic", 3, 42, 4, "fn"))
    letter = ce_kafka.from_record(None, dl_value, dl_headers, **KW)
    original, info = ce_kafka.from_dead_letter(letter)
    assert info == {"knativeerrordest": "inprocess://fn", "knativeerrorcode": "422",
                    "knativeerrordata": "Reject: no", "sluiceerrortopic": "in.topic",
                    "sluiceerrorpartition": "3", "sluiceerroroffset": "42",
                    "sluiceerrorattempts": "4", "sluiceerrorfunction": "fn"}
    attrs = original._get_attributes()
    assert not any(n.startswith(("knativeerror", "sluiceerror")) for n in attrs)
    assert attrs["id"] == "1" and attrs["partitionkey"] == "k"
    assert ce_event.json_data(original) == {"a": 1}


def test_header_reads_take_attributes_without_decoding_the_record():
    _, _, headers = ce_kafka.to_binary(_traced_input())
    traceparent = _traced_input()["traceparent"].encode()
    assert ce_kafka.header_value(headers, "traceparent") == traceparent
    assert ce_kafka.header_value(headers, "missing") is None
    assert ce_kafka.header_value(None, "traceparent") is None
    assert ce_kafka.header_attributes(headers, {"id", "type", "partitionkey", "nope"}) == {
        "id": "in-1", "type": "t", "partitionkey": "7"}


def test_batch_parts_keep_positions_and_json_values():
    items = ce_http.batch_items(orjson.dumps([
        {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": {"a": 1}},
        {"specversion": "1.0", "id": "", "source": "/s", "type": "t"},
    ]))
    event = ce_json.from_object(items[0], keep_json=True, index=0)
    assert event.data == {"a": 1} and ce_event.json_data(event) == {"a": 1}
    assert event["datacontenttype"] == "application/json"
    with pytest.raises(ce_event.BindingError) as err:
        ce_json.from_object(items[1], index=1)
    assert (err.value.index, err.value.attribute) == (1, "id")
    with pytest.raises(ce_event.BindingError, match="not valid JSON"):
        ce_http.batch_items(b"[")


def test_batch_item_sends_bytes_that_are_not_json_as_base64():
    """A KafkaSource-style record: arbitrary bytes, no content type (JSON is implied)."""
    raw = ce_kafka.from_record(b"k", b"\xffnot json", [("origin", b"legacy")], **KW)
    with pytest.raises(ce_event.BindingError):
        ce_json.to_object(raw)
    headers, body = ce_http.batch_message([ce_http.to_batch_item(raw)])
    assert ce_http.mode(headers) == "batch"
    [back] = ce_http.from_batch(body, max_name_length=None)
    assert back.data == b"\xffnot json" and back == raw


# --------------------------------------------------------------- real broker


@pytest.mark.stack
def test_round_trip_through_a_real_broker(stack):
    from confluent_kafka import Consumer, Producer, TopicPartition

    from eventing.kafka import consumer_config, ensure_topics, producer_config

    bootstrap = stack.bootstrap
    topic = f"binding-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: 1})
    binary = ce_event.make_event({"specversion": "1.0", "type": "t", "source": "/s", "id": "b1",
                                  "datacontenttype": "application/avro", "partitionkey": "k1"},
                                 b"\x00avro")
    structured = ce_event.make_event(
        {"specversion": "1.0", "type": "t", "source": "/s", "id": "s1"}, b'{"x": 1}')
    producer = Producer(producer_config(bootstrap))
    for encode, event in ((ce_kafka.to_binary, binary), (ce_kafka.to_structured, structured)):
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
        got.append(ce_kafka.from_record(
            msg.key(), msg.value(), msg.headers(), topic=msg.topic(),
            partition=msg.partition(), offset=msg.offset(), timestamp_ms=msg.timestamp()[1],
        ))
    consumer.close()
    assert len(got) == 3
    assert got[0] == binary
    assert got[1]["id"] == "s1" and ce_event.json_data(got[1]) == {"x": 1}
    assert got[2]["type"] == "dev.knative.kafka.event"
    assert got[2]["id"] == "partition:0/offset:2"
    assert got[2]["kafkaheaderorigin"] == "legacy" and got[2]["key"] == "pk"


class _Message:
    """The parts of `confluent_kafka.Message` `from_message` may read."""

    def __init__(self, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes | None]] | None) -> None:
        self._key, self._value, self._headers = key, value, headers

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._headers

    def topic(self) -> str:
        return "payments.raw"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 41

    def timestamp(self) -> tuple[int, int]:
        return (1, 1764150000000)


_BINARY = [("ce_specversion", b"1.0"), ("ce_id", b"p-1"), ("ce_source", b"/shop"),
           ("ce_type", b"com.sluice.payment.created"), ("content-type", b"application/avro")]


@pytest.mark.parametrize("key,value,headers", [
    (b"card-1", b"\x00\x00\x00\x00\x01abc", _BINARY),                          # binary, key
    (None, b"v", [*_BINARY, ("ce_partitionkey", b"card-2")]),                  # own key
    (b"k", b"v", [h for h in _BINARY if h[0] != "ce_id"]),                     # invalid
    (b"k", b"v", [*_BINARY[:1], ("ce_id", None), *_BINARY[2:]]),               # None header
    (b"k", b"v", [*_BINARY[:1], ("ce_id", b"\xff"), *_BINARY[2:]]),            # not UTF-8
    (b"k", b"v", [("x-trace", b"1")]),                                         # not a CE
    (None, b"v", None),                                                        # no headers
    (b"k", orjson.dumps({"specversion": "1.0", "id": "s-1", "source": "/s", "type": "t",
                         "data": {"a": 1}}),
     [("content-type", b"application/cloudevents+json")]),                     # structured
    (b"k", b"v", [*_BINARY[:4], ("content-type", b"application/cloudevents+json")]),
])
def test_from_message_is_what_from_record_makes_of_the_same_record(key, value, headers):
    """The dispatcher's fast path must deliver exactly the event the general decoder does,
    binary records and every fallback (invalid, not a CloudEvent, structured) alike."""
    msg = _Message(key, value, headers)
    fast = ce_kafka.from_message(msg, source_name="fn")
    slow = ce_kafka.from_record(key, value, headers, topic="payments.raw", partition=3,
                                offset=41, timestamp_ms=1764150000000, source_name="fn",
                                wrap_invalid=True, validate=False)
    assert fast._get_attributes() == slow._get_attributes()
    assert fast.data == slow.data
