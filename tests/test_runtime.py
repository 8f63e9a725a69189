"""The function host: what a function's return value becomes on the wire."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.fn.runtime import FunctionHost, OutputError
from eventing.topology import Delivery, Function


class FakeSerde:
    """Confluent framing with JSON inside: enough to see what the host asks for."""

    fields = frozenset({"a", "b"})

    def writer_for(self, topic: str):
        if topic != "avro.out":
            from eventing.serde import SchemaNotFound

            raise SchemaNotFound("no schema")
        return object()

    def encode_lazy(self, topic: str, record: dict) -> bytes:
        return b"\x00\x00\x00\x00\x07" + repr(sorted(record.items())).encode()

    def decode(self, value: bytes):
        return {"a": 1}


def _host(outputs: dict, returns) -> FunctionHost:
    fn = Function(name="fn", source=Path("unused.py"), target="t", topics=("in",),
                  consumer_group="g", outputs=outputs, delivery=Delivery())
    return FunctionHost(fn, FakeSerde(), user=lambda event: returns(event))


def _input(**extra) -> object:
    return ce_event.make_event({"specversion": "1.0", "id": "e1", "source": "/s",
                                 "type": "t.created", "time": "2026-11-26T10:00:00Z",
                                 "partitionkey": "card-1",
                                 "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
                                 "datacontenttype": "application/json", **extra},
                                b'{"a": 1}')


@pytest.mark.parametrize("topic", ["avro.out", "json.out"])
def test_dict_fast_path_writes_what_the_event_path_writes(topic) -> None:
    host = _host({topic: ("*",)}, lambda e: {"a": 2, "b": 3})
    [fast] = host._outputs(_input(), {"a": 2, "b": 3})
    # The general path: build the event, inherit, encode.
    in_attrs = _input()._get_attributes()
    out = host._as_event({"a": 2, "b": 3}, in_attrs, 0)
    attrs = out._get_attributes()
    for name in ("partitionkey", "traceparent", "tracestate"):
        if name in in_attrs:
            attrs.setdefault(name, in_attrs[name])
    if topic == "avro.out":
        out.data = FakeSerde().encode_lazy(topic, out.data)
        attrs["datacontenttype"] = "application/avro"
    key, value, headers = ce_kafka.to_binary(out, validate=False)
    assert fast == (topic, key, value, headers)
    assert dict(headers)["ce_id"] == b"e1/fn/0" and key == b"card-1"


def test_unrouted_type_is_an_output_error() -> None:
    host = _host({"x": ("only.this",)}, None)
    with pytest.raises(OutputError, match="none of its outputs"):
        host._outputs(_input(), {"a": 1})


def test_a_functions_framework_target_is_called_without_its_pass_through_wrapper() -> None:
    """`@functions_framework.cloud_event` only forwards the call: the host calls what it
    wraps (one frame less per event) and the outputs stay the same; any other decorator
    stays in the call, since it may do something."""
    import functions_framework

    def convert(event):
        return {"a": event.data["a"] + 1}

    wrapped = functions_framework.cloud_event(convert)
    called: list[str] = []

    def logging_decorator(fn):
        def inner(event):
            called.append("decorator")
            return fn(event)
        return inner

    decorated = logging_decorator(convert)
    fn = Function(name="fn", source=Path("unused.py"), target="t", topics=("in",),
                  consumer_group="g", outputs={"avro.out": ("*",)}, delivery=Delivery())
    direct = FunctionHost(fn, FakeSerde(), user=wrapped)
    plain = FunctionHost(fn, FakeSerde(), user=convert)
    kept = FunctionHost(fn, FakeSerde(), user=decorated)
    assert direct.user is wrapped and direct._invoke is convert
    assert kept._invoke is decorated
    assert direct.call(_input()) == plain.call(_input()) == kept.call(_input())
    assert called == ["decorator"]
