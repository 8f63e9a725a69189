"""The CloudEvents JSON event format: events to and from JSON objects and bytes.

Spec followed: CloudEvents v1.0.2 JSON event format. It is the body of structured content
mode on every binding (`eventing.cloudevent.kafka`, `.http`) and the member format of the
HTTP batch (`eventing.cloudevent.http.from_batch`). Data read from JSON is returned as
bytes, like every decoder of the package (`data` re-encoded as JSON, `data_base64`
decoded), unless a caller that needs the value asks for it parsed (`keep_json`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from cloudevents.http import CloudEvent

from eventing.cloudevent.event import (
    MAX_NAME_LENGTH,
    BindingError,
    attribute_string,
    is_json_content_type,
    make_event,
    validate_attributes,
)

STRUCTURED_JSON = "application/cloudevents+json"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
BATCH_JSON = "application/cloudevents-batch+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json; charset=utf-8"


def parse(body: bytes | str) -> Any:
    """Parse a JSON body; `BindingError` (no attribute) when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BindingError(f"body is not valid JSON: {exc}") from None


def serialize(obj: Any) -> bytes:
    """Encode `to_object` output (or a list of them); `BindingError` for unencodable data."""
    try:
        return orjson.dumps(obj)
    except TypeError as exc:
        raise BindingError(f"cannot encode as JSON: {exc}", attribute="data") from None


def to_object(event: CloudEvent) -> dict[str, Any]:
    """The event in the JSON event format, as a dict ready for `orjson.dumps`.

    Bytes data is embedded as JSON when the content type declares JSON (or is absent:
    Sluice keeps JSON payloads as bytes) and as `data_base64` otherwise. Raises
    `BindingError` (attribute "data") when JSON-declared bytes are not JSON.
    """
    attrs = event._get_attributes()
    obj: dict[str, Any] = {
        name: _attribute_json(name, value) for name, value in attrs.items() if value is not None
    }
    data = event.data
    if data is None:
        return obj
    content_type = attrs.get("datacontenttype")
    if isinstance(data, bytes | bytearray | memoryview):
        if is_json_content_type(content_type):
            try:
                obj["data"] = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise BindingError(
                    f"datacontenttype declares JSON but data is not JSON: {exc}",
                    attribute="data",
                ) from None
        else:
            obj["data_base64"] = base64.b64encode(data).decode("ascii")
    elif is_json_content_type(content_type) or type(data) is str:
        obj["data"] = data
    else:
        raise BindingError(
            f"{type(data).__name__} data needs a JSON datacontenttype, got {content_type!r}",
            attribute="data",
        )
    return obj


def _attribute_json(name: str, value: Any) -> Any:
    """JSON form of an attribute value (JSON format 2.2): String, Boolean, Integer as is."""
    kind = type(value)
    if kind is str or kind is bool or kind is int:
        return value
    return attribute_string(name, value)


def to_json(event: CloudEvent) -> bytes:
    """The event as JSON event format bytes (the structured-mode body)."""
    return serialize(to_object(event))


def from_object(
    obj: Any,
    *,
    validate: bool = True,
    max_name_length: int | None = MAX_NAME_LENGTH,
    index: int | None = None,
    keep_json: bool = False,
) -> CloudEvent:
    """Build an event from a parsed JSON-format object (data returned as bytes).

    `null` members are unset. `data_base64` is decoded; `data` is re-encoded as JSON bytes
    when the content type is JSON or absent (then `datacontenttype` is set to
    `application/json`, as JSON format 3.1.2 recommends) and UTF-8 encoded otherwise.
    `keep_json` leaves JSON `data` as the parsed value instead (`json_data` returns it
    as is): for a caller that needs the value, like the gateway's schema check, it saves
    encoding it and parsing it again. `index` (the position in a batch) goes into errors.
    """
    if type(obj) is not dict:
        raise BindingError("an event must be a JSON object", index=index)
    attrs: dict[str, Any] = {}
    data: Any = None
    has_data = False
    data_b64: Any = None
    for name, value in obj.items():
        if value is None:
            continue
        if name == "data":
            data, has_data = value, True
        elif name == "data_base64":
            data_b64 = value
        else:
            attrs[name] = value
    try:
        if data_b64 is not None:
            if has_data:
                raise BindingError("'data' and 'data_base64' are mutually exclusive",
                                   attribute="data")
            if type(data_b64) is not str:
                raise BindingError("must be a Base64 string", attribute="data_base64")
            try:
                data = base64.b64decode(data_b64, validate=True)
            except (binascii.Error, ValueError):
                raise BindingError("not valid Base64", attribute="data_base64") from None
        elif has_data:
            content_type = attrs.get("datacontenttype")
            if type(content_type) is not str and content_type is not None:
                raise BindingError("must be a non-empty string", attribute="datacontenttype")
            if is_json_content_type(content_type):
                if not keep_json:
                    try:
                        data = orjson.dumps(data)
                    except TypeError:  # orjson writes at most 254 levels of nesting
                        raise BindingError("nested too deeply (JSON data may nest at most "
                                           "254 levels)", attribute="data") from None
                if content_type is None:
                    attrs["datacontenttype"] = "application/json"
            elif type(data) is str:
                data = data.encode()
            else:
                raise BindingError(
                    f"must be a string for datacontenttype {content_type!r}", attribute="data"
                )
        if validate:
            validate_attributes(attrs, max_name_length=max_name_length)
    except BindingError as exc:
        if index is None:
            raise
        raise BindingError(exc.reason, attribute=exc.attribute, index=index) from None
    return make_event(attrs, data)


def from_json(
    body: bytes | str, *, validate: bool = True, max_name_length: int | None = MAX_NAME_LENGTH
) -> CloudEvent:
    """Parse JSON event format bytes (a structured-mode body) into an event."""
    return from_object(parse(body), validate=validate, max_name_length=max_name_length)
