"""Schema parsing, validation and canonical forms (eventing.registry.schemas)."""

from __future__ import annotations

import json

import pytest

from eventing.registry.schemas import SchemaError, parse


def test_whitespace_and_key_order_do_not_matter() -> None:
    a = '{"type": "record", "name": "R", "fields": [{"name": "x", "type": "int"}]}'
    b = '{"fields":[{"type":{"type":"int"},"name":"x"}],\n "name":"R","type":"record"}'
    assert parse(a).canonical == parse(b).canonical
    assert json.loads(parse(a).canonical) == json.loads(a)


def test_defaults_and_docs_are_part_of_the_schema() -> None:
    a = {"type": "record", "name": "R", "fields": [{"name": "x", "type": "int", "default": 1}]}
    b = {"type": "record", "name": "R", "fields": [{"name": "x", "type": "int", "default": 2}]}
    assert parse(json.dumps(a)).canonical != parse(json.dumps(b)).canonical


def test_normalized_form_qualifies_names() -> None:
    a = {"type": "record", "name": "R", "namespace": "x.y", "fields": []}
    b = {"type": "record", "name": "x.y.R", "fields": []}
    assert parse(json.dumps(a)).canonical != parse(json.dumps(b)).canonical
    assert parse(json.dumps(a)).normalized == parse(json.dumps(b)).normalized


def test_primitive_names_parse() -> None:
    assert parse('"string"').canonical == '"string"'
    assert parse("long").canonical == '"long"'


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("{not json", "not JSON"),
    ('{"type": "nope"}', "unknown type"),
    ('{"type":"record","name":"R","fields":[{"name":"a","type":"int","default":"x"}]}',
     "Default value"),
    ('{"type":"record","name":"R","fields":[{"name":"a","type":"int"},'
     '{"name":"a","type":"long"}]}', "duplicate field name"),
    ('["int", "int"]', "duplicate"),
    ('{"type":"fixed","name":"F"}', "size"),
    ('{"type":"record","name":"1R","fields":[]}', "invalid name"),
    ('{"type":"enum","name":"E","symbols":["A","A"]}', "unique"),
    ('{"type":"record","name":"R","fields":[{"name":"a","type":"Missing"}]}', "Missing"),
])
def test_invalid_schemas_say_why(text: str, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        parse(text)


def test_referenced_types_resolve() -> None:
    money = parse('{"type":"record","name":"Money","namespace":"m","fields":[]}')
    parsed = parse('{"type":"record","name":"P","fields":[{"name":"p","type":"m.Money"}]}',
                   money.named)
    assert "m.Money" in parsed.named
