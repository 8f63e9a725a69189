"""The CloudEvents Kafka protocol binding: the one module that knows `ce_*` header names.

Spec followed: CloudEvents v1.0.2 Kafka protocol binding (binary and structured content
modes). Records that are not CloudEvents become one the way Knative's KafkaSource does it
(eventing-kafka-broker `InvalidCloudEventInterceptor`), so functions see the same events
whether Sluice or a KafkaSource delivers them. Names follow the CloudEvents Python SDK
(`cloudevents.kafka`): `to_binary`, `to_structured`; `from_record` reads either mode.

Besides the general encoders, three fast paths keep other modules off the headers:
`to_binary_derived` (a function's dict output, on the in-process hot path),
`header_value`/`header_attributes` (what tracing reads from a record without decoding
it) and `to_dead_letter` (Knative's `knativeerror*` extensions, in the original mode).

- **Key mapping.** Encoders use the `partitionkey` extension as the record key (the
  spec's opt-in key mapper) and keep `partitionkey` in the headers as the spec requires.
  Decoders set `partitionkey` from a non-empty record key only when the event has none
  (as the Python SDK does); Knative's Java SDK leaves it unset. Non-CloudEvent records get
  both `key` and `partitionkey`, as Knative does.
- **Header values** are plain UTF-8 (binding 3.2.3), attribute values in their canonical
  string form (`eventing.cloudevent.event.attribute_string`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from cloudevents.http import CloudEvent

from eventing.cloudevent.event import (
    NON_CLOUDEVENT_TYPE,
    SPECVERSION,
    BindingError,
    attribute_string,
    data_bytes,
    format_timestamp_ms,
    make_event,
    partition_key,
    validate_attributes,
)
from eventing.cloudevent.json import (
    STRUCTURED_CONTENT_TYPE,
    STRUCTURED_JSON,
    from_json,
    to_json,
)

Headers = list[tuple[str, bytes]]
Record = tuple[bytes | None, bytes | None, Headers]  # (key, value, headers) to produce

ERROR_DATA_MAX = 1024  # Knative truncates knativeerrordata to 1 KiB

_STRUCTURED_CT_BYTES = STRUCTURED_CONTENT_TYPE.encode()
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


# --------------------------------------------------------------------------- encode


def to_binary(event: CloudEvent, *, key: bytes | None = None, validate: bool = True) -> Record:
    """Kafka binary content mode: `(key, value, headers)` for `Producer.produce`.

    Attributes become `ce_<name>` headers (UTF-8 canonical strings), `datacontenttype`
    becomes `content-type`, data becomes the value (bytes pass through; other data is
    JSON-encoded when the content type is JSON or absent, in which case
    `content-type: application/json` is declared). `key` defaults to `partitionkey`.
    Raises `BindingError` for invalid attributes or unencodable data.
    """
    attrs = event._get_attributes()
    if validate:
        validate_attributes(attrs, max_name_length=None)
    try:  # fast path: every value is a str (AttributeError otherwise)
        headers: Headers = [
            ("ce_" + name, value.encode())
            for name, value in attrs.items()
            if name != "datacontenttype"
        ]
    except AttributeError:
        headers = [
            ("ce_" + name, attribute_string(name, value).encode())
            for name, value in attrs.items()
            if value is not None and name != "datacontenttype"
        ]
    value_bytes, content_type = data_bytes(event.data, attrs.get("datacontenttype"))
    if content_type is not None:
        headers.append(("content-type", content_type.encode()))
    return (key if key is not None else partition_key(attrs)), value_bytes, headers


def to_structured(event: CloudEvent, *, key: bytes | None = None, validate: bool = True
                  ) -> Record:
    """Kafka structured content mode: the JSON event format as the value.

    Header `content-type: application/cloudevents+json; charset=utf-8`; bytes data goes in
    `data_base64` unless the content type declares JSON (then it is embedded as JSON).
    `key` defaults to `partitionkey`. Raises `BindingError` like `to_binary`.
    """
    attrs = event._get_attributes()
    if validate:
        validate_attributes(attrs, max_name_length=None)
    return (
        (key if key is not None else partition_key(attrs)),
        to_json(event),
        [("content-type", _STRUCTURED_CT_BYTES)],
    )


_SPECVERSION_HEADER = ("ce_specversion", SPECVERSION.encode())


def to_binary_derived(in_attrs: Mapping[str, Any], event_id: str, source: bytes,
                      value: bytes, content_type: bytes) -> Record:
    """Binary mode for an event derived from `in_attrs`, without building it (fast path).

    The record `to_binary(event, validate=False)` makes for an event with `event_id`,
    `source` (UTF-8), the input's `type`, `time`, `partitionkey`, `traceparent` and
    `tracestate`, `value` as data and `content_type`: what a function's returned dict
    becomes. It runs once per output on the in-process hot path, so the four inherited
    attributes are unrolled (measured: ~13% fewer instructions than a loop over them
    inside the caller, call included).
    """
    headers = [_SPECVERSION_HEADER, ("ce_id", event_id.encode()), ("ce_source", source),
               ("ce_type", in_attrs["type"].encode())]
    attr = in_attrs.get("time")
    if attr is not None:
        if type(attr) is not str:
            attr = attribute_string("time", attr)
        headers.append(("ce_time", attr.encode()))
    key = in_attrs.get("partitionkey")
    if key is not None:
        if type(key) is str:
            key = key.encode()
            headers.append(("ce_partitionkey", key))
        else:
            headers.append(("ce_partitionkey", attribute_string("partitionkey", key).encode()))
            key = partition_key(in_attrs)
    attr = in_attrs.get("traceparent")
    if attr is not None:
        if type(attr) is not str:
            attr = attribute_string("traceparent", attr)
        headers.append(("ce_traceparent", attr.encode()))
    attr = in_attrs.get("tracestate")
    if attr is not None:
        if type(attr) is not str:
            attr = attribute_string("tracestate", attr)
        headers.append(("ce_tracestate", attr.encode()))
    headers.append(("content-type", content_type))
    return key, value, headers


# Where a dead letter came from, beside Knative's three: what `sluice deadletters` shows
# and where `redrive` puts the event back. Removed again by `from_dead_letter`.
DEAD_LETTER_ORIGIN = ("sluiceerrortopic", "sluiceerrorpartition", "sluiceerroroffset",
                      "sluiceerrorattempts", "sluiceerrorfunction")
DEAD_LETTER_EXTENSIONS = ("knativeerrordest", "knativeerrorcode", "knativeerrordata",
                          *DEAD_LETTER_ORIGIN)


def to_dead_letter(event: CloudEvent, original_headers: Iterable[tuple[str, bytes | None]] | None,
                   *, destination: str, code: int, message: str,
                   origin: tuple[str, int, int, int, str] | None = None) -> Record:
    """The dead-letter record of a consumed record's `event`, as a KafkaSource writes it.

    Adds Knative's extensions to the event (`knativeerrordest` = `destination`,
    `knativeerrorcode`, `knativeerrordata` = `message` as UTF-8 cut to 1 KiB, Base64)
    and encodes it in the original record's content mode: structured when its
    `content-type` was `application/cloudevents...`, binary otherwise. The key is the
    event's `partitionkey` (the caller keeps the original key when there was one).
    `origin` = (topic, partition, offset, attempts, function) adds the `sluiceerror*`
    extensions, so the dead letter can be shown and redriven to where it came from.
    """
    attrs = event._get_attributes()
    attrs["knativeerrordest"] = destination
    attrs["knativeerrorcode"] = str(code)
    attrs["knativeerrordata"] = base64.b64encode(message.encode()[:ERROR_DATA_MAX]).decode()
    if origin is not None:
        for name, value in zip(DEAD_LETTER_ORIGIN, origin, strict=True):
            attrs[name] = str(value)
    structured = any(
        k.lower() == "content-type" and v and v.lower().startswith(b"application/cloudevents")
        for k, v in original_headers or ()
    )
    if structured:
        return to_structured(event, validate=False)
    return to_binary(event, validate=False)


def from_dead_letter(event: CloudEvent) -> tuple[CloudEvent, dict[str, str]]:
    """The original event of a dead letter, and the dead-letter extensions it carried
    (`knativeerrordata` decoded from Base64): the inverse of `to_dead_letter`."""
    attrs = dict(event._get_attributes())
    info = {name: str(attrs.pop(name)) for name in DEAD_LETTER_EXTENSIONS if name in attrs}
    if "knativeerrordata" in info:
        try:
            info["knativeerrordata"] = base64.b64decode(info["knativeerrordata"]).decode(
                "utf-8", "replace")
        except ValueError:
            pass
    return make_event(attrs, event.data), info


# --------------------------------------------------------------------------- header reads


def header_value(headers: Iterable[tuple[str, bytes | None]] | None,
                 attribute: str) -> bytes | None:
    """The raw `ce_<attribute>` header value of a binary-mode record (None when absent).

    For readers that need one attribute without decoding the record, such as tracing
    reading `traceparent` from every record a sink writes.
    """
    name = "ce_" + attribute
    for k, v in headers or ():
        if k == name:
            return v
    return None


def header_attributes(headers: Iterable[tuple[str, bytes | None]] | None,
                      attributes: Collection[str]) -> dict[str, str]:
    """The `attributes` a binary-mode record's headers carry, decoded as UTF-8 (replacing
    invalid bytes), without decoding the record; absent ones are left out."""
    out: dict[str, str] = {}
    names = _kafka_names
    for k, v in headers or ():
        attr = names.get(k)
        if attr is None:
            attr = _classify_kafka_header(k)
        if attr in attributes and v is not None:
            out[attr] = v.decode("utf-8", "replace")
    return out


# --------------------------------------------------------------------------- decode


def from_record(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    source_name: str = "sluice",
    namespace: str = "default",
    wrap_invalid: bool = False,
    validate: bool = True,
) -> CloudEvent:
    """Turn one consumed Kafka record into a CloudEvent (data left as bytes).

    Mode: structured if `content-type` starts with `application/cloudevents`
    (case-insensitive), binary if a `ce_specversion` header is present, otherwise the
    record is not a CloudEvent and is converted as Knative's KafkaSource does
    (`non_cloudevent`; `source_name` and `namespace` fill the source URI).

    A record that claims to be a CloudEvent but is invalid raises `BindingError`, unless
    `wrap_invalid` is set: then it is converted like a non-CloudEvent record, which is
    what a KafkaSource does. `validate=False` skips attribute checks for trusted topics.
    """
    header_attrs = _header_attrs(headers) if headers else {}
    attrs: dict[str, Any] = header_attrs or {}
    content_type = attrs.get("datacontenttype")
    try:
        if header_attrs is None:
            raise BindingError("a CloudEvents header is missing its value or is not UTF-8")
        if content_type is not None and content_type[:23].lower() == "application/cloudevents":
            event = _from_structured(content_type, value, validate)
            attrs = event._attributes
        elif "specversion" in attrs:
            if validate:
                validate_attributes(attrs, max_name_length=None)
            elif attrs["specversion"] != SPECVERSION or not (
                attrs.get("id") and attrs.get("source") and attrs.get("type")
            ):  # the cheap part of validation: what every consumer relies on
                raise BindingError("not a CloudEvent 1.0: specversion, id, source or type "
                                   "missing or empty")
            event = make_event(attrs, value)
        else:
            return non_cloudevent(
                key, value, headers, topic=topic, partition=partition, offset=offset,
                timestamp_ms=timestamp_ms, source_name=source_name, namespace=namespace,
            )
    except BindingError:
        if wrap_invalid:
            return non_cloudevent(
                key, value, headers, topic=topic, partition=partition, offset=offset,
                timestamp_ms=timestamp_ms, source_name=source_name, namespace=namespace,
            )
        raise
    if key and "partitionkey" not in attrs:
        attrs["partitionkey"] = key.decode("utf-8", "replace")
    return event


def from_message(msg: Any, *, source_name: str = "sluice") -> CloudEvent:
    """`from_record(..., wrap_invalid=True, validate=False)` of a consumed `Message`.

    The dispatcher's per-record path: a binary-mode record with the required attributes
    is read from its headers, value and key alone (three calls on the message, no
    keyword packing); anything else (structured mode, a non-CloudEvent record, a bad
    header) takes `from_record` with the record's topic, partition, offset and
    timestamp, so the result is the same event either way (the tests compare them).
    """
    headers = msg.headers()
    if headers:
        attrs = _header_attrs(headers) or {}
        content_type = attrs.get("datacontenttype")
        if (attrs.get("specversion") == SPECVERSION and attrs.get("id") and attrs.get("source")
                and attrs.get("type") and (content_type is None or content_type[:23].lower()
                                           != "application/cloudevents")):
            if "partitionkey" not in attrs:
                key = msg.key()
                if key:
                    attrs["partitionkey"] = key.decode("utf-8", "replace")
            return make_event(attrs, msg.value())
    ts_type, ts = msg.timestamp()
    return from_record(
        msg.key(), msg.value(), headers, topic=msg.topic(), partition=msg.partition(),
        offset=msg.offset(), timestamp_ms=ts if ts_type else None, source_name=source_name,
        wrap_invalid=True, validate=False)


def _header_attrs(headers: list[tuple[str, bytes | None]]) -> dict[str, Any] | None:
    """The CloudEvent attributes a record's headers carry, or None when one of them is
    None or not UTF-8 (the record then cannot be read in binary mode)."""
    attrs: dict[str, Any] = {}
    names = _kafka_names
    try:
        for name, raw in headers:
            attr = names.get(name)
            if attr is None:
                attr = _classify_kafka_header(name)
            if attr:
                attrs[attr] = raw.decode()  # type: ignore[union-attr]
    except (AttributeError, UnicodeDecodeError):
        return None
    return attrs


# Kafka header name -> attribute name ("" = not an attribute). `content-type` maps to
# `datacontenttype` (binding 3.2.1); a `ce_datacontenttype` header is ignored.
_kafka_names: dict[str, str] = {}


def _classify_kafka_header(name: str) -> str:
    if name[:3] == "ce_" and len(name) > 3:
        attr = name[3:].lower()
        if attr == "datacontenttype":
            attr = ""
    elif name.lower() == "content-type":
        attr = "datacontenttype"
    else:
        attr = ""
    if len(_kafka_names) < 4096:
        _kafka_names[name] = attr
    return attr


def _from_structured(content_type: str, value: bytes | None, validate: bool) -> CloudEvent:
    media = content_type.split(";", 1)[0].strip().lower()
    if media != STRUCTURED_JSON:
        raise BindingError(f"unsupported event format {media!r} (only {STRUCTURED_JSON})")
    if not value:
        raise BindingError("structured-mode record has no value")
    return from_json(value, validate=validate, max_name_length=None)


def non_cloudevent(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    source_name: str = "sluice",
    namespace: str = "default",
) -> CloudEvent:
    """Wrap a record that is not a CloudEvent, exactly as Knative's KafkaSource does.

    Type `dev.knative.kafka.event`, id `partition:<p>/offset:<o>`, subject
    `partition:<p>#<o>`; key -> `key` and `partitionkey` (UTF-8 string, invalid bytes
    replaced; empty = none), each header -> extension `kafkaheader<name>` (name
    lower-cased, all but a-z0-9 removed; value decoded as UTF-8) except `content-type`,
    which becomes `datacontenttype` (lower-cased). Time is the record timestamp (omitted
    if unknown).
    """
    attrs: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": f"partition:{partition}/offset:{offset}",
        "source": f"/apis/v1/namespaces/{namespace}/kafkasources/{source_name}#{topic}",
        "type": NON_CLOUDEVENT_TYPE,
        "subject": f"partition:{partition}#{offset}",
    }
    if timestamp_ms is not None and timestamp_ms >= 0:
        attrs["time"] = format_timestamp_ms(timestamp_ms)
    if key:
        text = key.decode("utf-8", "replace")
        attrs["partitionkey"] = text
        attrs["key"] = text
    content_type = None
    if headers:
        for name, raw in headers:
            if name.lower() == "content-type":
                content_type = raw
                continue
            attrs[_header_extension(name)] = "" if raw is None else raw.decode("utf-8", "replace")
    if content_type is not None:
        attrs["datacontenttype"] = content_type.decode("utf-8", "replace").lower()
    return make_event(attrs, value)


_header_names: dict[str, str] = {}


def _header_extension(name: str) -> str:
    ext = _header_names.get(name)
    if ext is None:
        ext = "kafkaheader" + _NOT_ALNUM.sub("", name.lower())
        if len(_header_names) > 4096:
            _header_names.clear()
        _header_names[name] = ext
    return ext
