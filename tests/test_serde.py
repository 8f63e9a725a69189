"""Confluent-framed Avro: wire compatibility with confluent-kafka's serializers, precise
schema violations, registry caching and schema evolution. No registry server needed."""

from __future__ import annotations

import datetime
import decimal
import io
import json

import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import (
    MockSchemaRegistryClient,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro import parse_schema, schemaless_writer

from eventing.serde import (
    AvroSerde,
    SchemaNotFound,
    SchemaViolation,
    SerdeError,
    decode_data,
    decode_row,
    schema_id_of,
    subject_for,
)
from tests.helpers import FakeRegistryClient

PAYMENT = {
    "type": "record", "name": "Payment", "namespace": "com.example",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "count", "type": "int", "default": 1},
        {"name": "paid", "type": "boolean", "default": False},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "customer", "type": ["null", {
            "type": "record", "name": "Customer",
            "fields": [{"name": "zip", "type": "string"},
                       {"name": "tags", "type": {"type": "array", "items": "string"}}],
        }], "default": None},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["CARD", "CASH"]},
         "default": "CARD"},
        {"name": "attrs", "type": {"type": "map", "values": "long"}, "default": {}},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}, "default": 0},
    ],
}
GOOD = {"id": "p1", "amount": 12.5, "customer": {"zip": "75001", "tags": ["vip"]},
        "attrs": {"n": 3}}


@pytest.fixture
def registry():
    reg = FakeRegistryClient()
    reg.register("payments-value", PAYMENT)
    return reg


def test_wire_format_is_magic_byte_id_and_schemaless_avro(registry):
    value = AvroSerde(client=registry).encode("payments", GOOD)
    assert value[0] == 0
    assert int.from_bytes(value[1:5], "big") == 100 == schema_id_of(value)
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(PAYMENT), GOOD)
    assert value[5:] == body.getvalue()


def test_round_trip_fills_defaults(registry):
    serde = AvroSerde(client=registry)
    back = serde.decode(serde.encode("payments", GOOD))
    assert back["id"] == "p1" and back["amount"] == 12.5
    assert back["count"] == 1 and back["paid"] is False and back["kind"] == "CARD"
    assert back["customer"] == {"zip": "75001", "tags": ["vip"]}
    assert back["ts"] == datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def test_byte_compatible_with_confluent_avro_serializer_and_deserializer():
    client = MockSchemaRegistryClient({"url": "mock://serde-test"})
    client.register_schema("payments-value", Schema(json.dumps(PAYMENT), "AVRO"))
    ctx = SerializationContext("payments", MessageField.VALUE)
    serde = AvroSerde(client=client)
    ours = serde.encode("payments", GOOD)
    theirs_reader = AvroDeserializer(client)
    assert theirs_reader(ours, ctx) == serde.decode(ours)
    theirs = AvroSerializer(client, json.dumps(PAYMENT),
                            conf={"auto.register.schemas": False, "use.latest.version": True})
    assert theirs(GOOD, ctx) == ours
    assert serde.decode(theirs(GOOD, ctx))["customer"]["zip"] == "75001"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"amount": "12"}, "field 'amount': expected double, got str ('12')"),
        ({"amount": True}, "field 'amount': expected double, got boolean (True)"),
        ({"count": 1.0}, "field 'count': expected int, got float (1.0)"),
        ({"count": 2**31}, "field 'count': 2147483648 is out of range for int"),
        ({"paid": 1}, "field 'paid': expected boolean, got int (1)"),
        ({"note": 5}, "field 'note': expected null or string, got int (5)"),
        ({"customer": {"zip": "1", "tags": ["a", 2]}},
         "field 'customer.tags[1]': expected string, got int (2)"),
        ({"customer": {"tags": []}}, "field 'customer.zip': missing (required string)"),
        ({"kind": "WIRE"}, "field 'kind': 'WIRE' is not one of the symbols ['CARD', 'CASH']"),
        ({"attrs": {"n": "x"}}, "field \"attrs['n']\": expected long, got str ('x')"),
        ({"surprise": 1}, "field 'surprise': not in schema"),
        ({"id": None}, "field 'id': expected string, got null"),
    ],
)
def test_schema_violation_names_field_and_problem(registry, change, message):
    with pytest.raises(SchemaViolation) as err:
        AvroSerde(client=registry).encode("payments", {**GOOD, **change})
    assert str(err.value).startswith(message)
    assert isinstance(err.value, ValueError)
    assert err.value.subject == "payments-value"


def test_missing_required_field_and_wrong_top_level_type(registry):
    serde = AvroSerde(client=registry)
    with pytest.raises(SchemaViolation) as err:
        serde.encode("payments", {"amount": 1.0})
    assert (err.value.path, err.value.problem) == ("id", "missing (required string)")
    with pytest.raises(SchemaViolation, match="record: expected record com.example.Payment"):
        serde.encode("payments", [1, 2])


def test_logical_types_accept_python_values():
    reg = FakeRegistryClient()
    reg.register("t-value", {"type": "record", "name": "R", "fields": [
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal",
                                   "precision": 9, "scale": 2}},
    ]})
    serde = AvroSerde(client=reg)
    at = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC)
    back = serde.decode(serde.encode("t", {"at": at, "price": decimal.Decimal("9.99")}))
    assert back == {"at": at, "price": decimal.Decimal("9.99")}


def test_recursive_schema_validates():
    reg = FakeRegistryClient()
    reg.register("list-value", {"type": "record", "name": "Node", "fields": [
        {"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"], "default": None},
    ]})
    serde = AvroSerde(client=reg)
    good = {"v": 1, "next": {"v": 2, "next": None}}
    assert serde.decode(serde.encode("list", good)) == good
    with pytest.raises(SchemaViolation, match="field 'next.next.v': expected int"):
        serde.encode("list", {"v": 1, "next": {"v": 2, "next": {"v": "3"}}})


def test_lookups_are_cached_by_subject_and_id(registry):
    serde = AvroSerde(client=registry)
    values = [serde.encode("payments", GOOD) for _ in range(5)]
    assert registry.calls["latest"] == 1
    reader = AvroSerde(client=registry)
    for value in values:
        reader.decode(value)
    assert registry.calls["by_id"] == 1
    # the writer's own schema is known to its reader side without a fetch
    serde.decode(values[0])
    assert registry.calls["by_id"] == 1


def test_new_schema_version_is_used_after_ttl_or_invalidate_and_old_values_still_decode(
    registry,
):
    serde = AvroSerde(client=registry, subject_ttl_s=3600)
    v1 = serde.encode("payments", GOOD)
    evolved = {**PAYMENT, "fields": [*PAYMENT["fields"],
                                     {"name": "channel", "type": "string", "default": "web"}]}
    v2_id = registry.register("payments-value", evolved)
    assert schema_id_of(serde.encode("payments", GOOD)) == 100  # cached until invalidated
    serde.invalidate("payments")
    v2 = serde.encode("payments", {**GOOD, "channel": "app"})
    assert schema_id_of(v2) == v2_id
    assert serde.decode(v2)["channel"] == "app"
    assert "channel" not in serde.decode(v1)
    no_cache = AvroSerde(client=registry, subject_ttl_s=0)
    no_cache.encode("payments", GOOD)
    no_cache.encode("payments", GOOD)
    assert registry.calls["latest"] == 4


def test_decode_errors(registry):
    serde = AvroSerde(client=registry)
    good = serde.encode("payments", GOOD)
    with pytest.raises(SerdeError, match="magic byte 0"):
        serde.decode(b"\x07" + good[1:])
    with pytest.raises(SerdeError, match="GUID"):
        serde.decode(b"\x01" + good[1:])
    with pytest.raises(SerdeError, match="magic byte 0"):
        serde.decode(b"\x00\x00")
    with pytest.raises(SerdeError, match="does not decode"):
        serde.decode(good[:9])
    with pytest.raises(SchemaNotFound, match="schema id 999"):
        serde.decode(b"\x00" + (999).to_bytes(4, "big") + good[5:])
    with pytest.raises(SchemaNotFound, match="'orders-value'"):
        serde.encode("orders", {})


def test_unknown_subject_with_the_confluent_client_is_schema_not_found():
    serde = AvroSerde(client=MockSchemaRegistryClient({"url": "mock://serde-404"}))
    with pytest.raises(SchemaNotFound):
        serde.encode("nothing", {})


def test_validate_false_still_reports_unwritable_records(registry):
    serde = AvroSerde(client=registry)
    with pytest.raises(SchemaViolation, match="cannot encode"):
        serde.encode("payments", {**GOOD, "amount": "x"}, validate=False)


def test_constructor_needs_a_registry():
    with pytest.raises(ValueError):
        AvroSerde()
    assert AvroSerde("http://127.0.0.1:1").client is not None  # no request until a lookup


# --------------------------------------------------------------------------- decode_data


def test_subject_for_is_topic_name_strategy():
    assert subject_for("payments.raw") == "payments.raw-value"


@pytest.mark.parametrize("content_type", [
    "application/avro", "avro/binary", "application/vnd.apache.avro+binary",
    "Application/Avro; charset=binary", None, ""])
def test_decode_data_reads_avro_by_content_type_or_magic_byte(registry, content_type):
    serde = AvroSerde(client=registry)
    assert decode_data(content_type, serde.encode("payments", GOOD), serde)["id"] == "p1"


@pytest.mark.parametrize("content_type", [
    "application/json", "text/json; charset=utf-8", "application/cloudevents+json", None])
def test_decode_data_parses_json_and_absent_content_type(content_type):
    assert decode_data(content_type, b'{"a": [1]}', None) == {"a": [1]}
    assert decode_data(content_type, bytearray(b"2"), None) == 2
    assert decode_data(content_type, b"", None) is None


def test_decode_data_keeps_other_bytes_and_parsed_values():
    assert decode_data("text/plain", b"\x00raw", None) == b"\x00raw"
    assert decode_data("application/json", {"parsed": True}, None) == {"parsed": True}
    assert decode_data("application/avro", None, None) is None


def test_decode_data_errors_are_serde_errors(registry):
    with pytest.raises(SerdeError, match="not valid JSON"):
        decode_data("application/json", b"{nope", None)
    with pytest.raises(SerdeError, match="no schema registry"):
        decode_data(None, b"\x00\x00\x00\x00\x64", None)
    with pytest.raises(SerdeError, match="magic byte"):
        decode_data("application/avro", b"{}", AvroSerde(client=registry))


def test_decode_row_checks_json_rows_against_the_topic_schema(registry):
    serde = AvroSerde(client=registry)
    assert decode_row("application/avro", serde.encode("payments", GOOD), serde,
                      "payments")["id"] == "p1"
    assert decode_row(None, json.dumps(GOOD).encode(), serde, "payments") == GOOD
    assert decode_row("application/json", GOOD, serde, "payments") == GOOD
    with pytest.raises(SchemaViolation, match="amount"):
        decode_row("application/json", b'{"id": "p1", "amount": "12"}', serde, "payments")
    with pytest.raises(SerdeError, match="not a record"):
        decode_row("application/json", b"[1]", serde, "payments")
    with pytest.raises(SerdeError, match="not a record"):
        decode_row("text/plain", b"p1", serde, "payments")
