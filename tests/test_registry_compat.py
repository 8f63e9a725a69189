"""Avro compatibility rules (eventing.registry.compat), no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from eventing.registry.compat import LEVELS, check, check_level
from eventing.registry.schemas import parse


def avro(obj: Any) -> Any:
    return parse(json.dumps(obj))


def record(*fields: dict[str, Any], name: str = "Payment", **extra: Any) -> Any:
    return avro({"type": "record", "name": name, "namespace": "t", "fields": list(fields),
                 **extra})


def enum(symbols: list[str], **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": "Status", "symbols": symbols, **extra}


A = {"name": "a", "type": "int"}
B_DEFAULT = {"name": "b", "type": "string", "default": ""}
B_REQUIRED = {"name": "b", "type": "string"}

# case -> (old schema, new schema, new reads old (BACKWARD ok), old reads new (FORWARD ok))
CASES: dict[str, tuple[Any, Any, bool, bool]] = {
    "field added with default": (record(A), record(A, B_DEFAULT), True, True),
    "field added without default": (record(A), record(A, B_REQUIRED), False, True),
    "field with default removed": (record(A, B_DEFAULT), record(A), True, True),
    "field without default removed": (record(A, B_REQUIRED), record(A), True, False),
    "int promoted to long": (
        record(A), record({"name": "a", "type": "long"}), True, False),
    "long demoted to int": (
        record({"name": "a", "type": "long"}), record(A), False, True),
    "enum symbol added": (
        record({"name": "s", "type": enum(["A", "B"])}),
        record({"name": "s", "type": enum(["A", "B", "C"])}), True, False),
    "enum symbol removed": (
        record({"name": "s", "type": enum(["A", "B", "C"])}),
        record({"name": "s", "type": enum(["A", "B"])}), False, True),
    "enum symbol added, reader enum has default": (
        record({"name": "s", "type": enum(["A", "B"], default="A")}),
        record({"name": "s", "type": enum(["A", "B", "C"], default="A")}), True, True),
    "union widened": (
        record({"name": "u", "type": ["null", "string"]}),
        record({"name": "u", "type": ["null", "string", "int"]}), True, False),
    "union narrowed": (
        record({"name": "u", "type": ["null", "string", "int"]}),
        record({"name": "u", "type": ["null", "string"]}), False, True),
    "plain type made nullable": (
        record({"name": "u", "type": "string"}),
        record({"name": "u", "type": ["null", "string"]}), True, False),
}


def expected(level: str, backward_ok: bool, forward_ok: bool) -> bool:
    base = level.removesuffix("_TRANSITIVE")
    return {
        "NONE": True, "BACKWARD": backward_ok, "FORWARD": forward_ok,
        "FULL": backward_ok and forward_ok,
    }[base]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_level_on_each_change(level: str, case: str) -> None:
    old, new, backward_ok, forward_ok = CASES[case]
    messages = check_level(level, new, [(1, old)])
    assert (messages == []) == expected(level, backward_ok, forward_ok), messages


def history(*schemas: Any) -> list[tuple[int, Any]]:
    return list(enumerate(schemas, start=1))


def test_backward_transitive_sees_the_oldest_version() -> None:
    # v3 reads v2 (b present) but not v1 (b missing, no default).
    versions = history(record(A), record(A, B_DEFAULT))
    v3 = record(A, B_REQUIRED)
    assert check_level("BACKWARD", v3, versions) == []
    messages = check_level("BACKWARD_TRANSITIVE", v3, versions)
    assert any("READER_FIELD_MISSING_DEFAULT_VALUE" in m for m in messages)
    assert "{oldSchemaVersion: 1}" in messages
    assert "{oldSchemaVersion: 2}" not in messages


def test_forward_transitive_sees_the_oldest_version() -> None:
    # v1 requires b; v2 gives it a default; v3 drops it: v2 reads v3, v1 cannot.
    versions = history(record(A, B_REQUIRED), record(A, B_DEFAULT))
    v3 = record(A)
    assert check_level("FORWARD", v3, versions) == []
    messages = check_level("FORWARD_TRANSITIVE", v3, versions)
    assert "{oldSchemaVersion: 1}" in messages
    assert "{compatibility: 'FORWARD_TRANSITIVE'}" in messages


def test_full_transitive_sees_the_oldest_version() -> None:
    versions = history(record(A), record(A, B_DEFAULT))
    v3 = record(A, B_REQUIRED)
    assert check_level("FULL", v3, versions) == []
    assert check_level("FULL_TRANSITIVE", v3, versions) != []


def test_non_transitive_ignores_versions_before_the_latest() -> None:
    versions = history(record(A, B_REQUIRED), record(A))
    # latest (v2) has no b: adding b with default is fine even though v1 had it required
    assert check_level("FORWARD", record(A, B_DEFAULT), versions) == []


def test_messages_name_field_path_and_reason() -> None:
    old = record({"name": "customer", "type": {
        "type": "record", "name": "Customer", "fields": [{"name": "age", "type": "long"}]}})
    new = record({"name": "customer", "type": {
        "type": "record", "name": "Customer", "fields": [{"name": "age", "type": "int"}]}})
    [inc] = check(new, old)
    assert inc.kind == "TYPE_MISMATCH"
    assert inc.field == "customer.age"
    assert inc.path == "/fields/0/type/fields/0/type"
    assert "INT" in inc.message and "LONG" in inc.message
    [message, *_] = check_level("BACKWARD", new, [(1, old)])
    assert "customer.age" in message and "TYPE_MISMATCH" in message


@pytest.mark.parametrize("writer,reader", [
    ("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"),
    ("long", "double"), ("float", "double"), ("string", "bytes"), ("bytes", "string"),
])
def test_promotions_allowed(writer: str, reader: str) -> None:
    assert check(avro(reader), avro(writer)) == []


@pytest.mark.parametrize("writer,reader", [
    ("long", "int"), ("double", "float"), ("float", "long"), ("string", "int"),
    ("boolean", "int"), ("null", "string"),
])
def test_other_type_changes_refused(writer: str, reader: str) -> None:
    [inc] = check(avro(reader), avro(writer))
    assert inc.kind == "TYPE_MISMATCH"


def test_field_renamed_with_alias_is_read() -> None:
    old = record({"name": "amount", "type": "long"})
    new = record({"name": "total", "type": "long", "aliases": ["amount"]})
    assert check(new, old) == []
    renamed_without_alias = record({"name": "total", "type": "long"})
    [inc] = check(renamed_without_alias, old)
    assert inc.kind == "READER_FIELD_MISSING_DEFAULT_VALUE" and inc.field == "total"


def test_record_name_change_needs_alias() -> None:
    old = record(A, name="Payment")
    [inc] = check(record(A, name="Charge"), old)
    assert inc.kind == "NAME_MISMATCH"
    assert check(record(A, name="Charge", aliases=["t.Payment"]), old) == []


def test_fixed_size_and_name() -> None:
    def fixed(size: int, name: str = "Hash") -> Any:
        return avro({"type": "fixed", "name": name, "size": size})

    assert check(fixed(16), fixed(16)) == []
    assert [i.kind for i in check(fixed(32), fixed(16))] == ["FIXED_SIZE_MISMATCH"]
    assert [i.kind for i in check(fixed(16, "Other"), fixed(16))] == ["NAME_MISMATCH"]


def test_arrays_and_maps_recurse() -> None:
    assert check(avro({"type": "array", "items": "long"}),
                 avro({"type": "array", "items": "int"})) == []
    [inc] = check(avro({"type": "map", "values": "int"}), avro({"type": "map", "values": "long"}))
    assert inc.path == "/values" and inc.kind == "TYPE_MISMATCH"
    assert [i.kind for i in check(avro({"type": "map", "values": "int"}),
                                  avro({"type": "array", "items": "int"}))] == ["TYPE_MISMATCH"]


def test_union_branch_errors_say_which_branch() -> None:
    [inc] = check(avro(["null", "string"]), avro(["null", "string", "int"]))
    assert inc.kind == "MISSING_UNION_BRANCH" and inc.path == "/2" and "INT" in inc.message
    [inc] = check(avro(["null", "string"]), avro("int"))
    assert inc.kind == "MISSING_UNION_BRANCH"
    # writer union vs plain reader: each branch must be readable
    assert check(avro("long"), avro(["int", "long"])) == []
    assert [i.kind for i in check(avro("string"), avro(["null", "string"]))] == [
        "MISSING_UNION_BRANCH"]


def test_union_branch_promotion() -> None:
    assert check(avro(["null", "long"]), avro(["null", "int"])) == []


def test_recursive_types_terminate_and_are_checked() -> None:
    def linked(value_type: str) -> Any:
        return avro({"type": "record", "name": "Node", "fields": [
            {"name": "value", "type": value_type},
            {"name": "next", "type": ["null", "Node"], "default": None},
        ]})

    assert check(linked("long"), linked("int")) == []
    assert {i.kind for i in check(linked("int"), linked("long"))} == {"TYPE_MISMATCH"}


def test_named_type_reused_by_reference() -> None:
    money = {"type": "record", "name": "Money", "fields": [{"name": "cents", "type": "int"}]}
    old = record({"name": "price", "type": money}, {"name": "tax", "type": "Money"})
    money_long = {**money, "fields": [{"name": "cents", "type": "long"}]}
    new = record({"name": "price", "type": money_long}, {"name": "tax", "type": "Money"})
    assert check(new, old) == []
    fields = {i.field for i in check(old, new)}
    assert fields == {"price.cents", "tax.cents"}


def test_decimal_scale_change_refused() -> None:
    def dec(scale: int) -> Any:
        return avro({"type": "bytes", "logicalType": "decimal", "precision": 10,
                     "scale": scale})

    assert check(dec(2), dec(2)) == []
    assert [i.kind for i in check(dec(3), dec(2))] == ["TYPE_MISMATCH"]


def test_unknown_level_rejected() -> None:
    with pytest.raises(ValueError):
        check_level("SIDEWAYS", record(A), [(1, record(A))])
