"""The CloudEvents HTTP protocol binding and its batch format: the one home of `ce-` headers.

Spec followed: CloudEvents v1.0.2 HTTP protocol binding, all three content modes: binary
(`ce-*` headers, percent-encoded as 3.1.3.2 requires; the body is the data), structured
(`application/cloudevents+json`, one JSON-format event) and batched
(`application/cloudevents-batch+json`, a JSON array of JSON-format events). Names follow
the CloudEvents Python SDK (`cloudevents.http`): `to_binary`, `to_structured`,
`from_http`; the batch has `from_batch`/`to_batch`.

The batch also has a lower level for callers that answer or report each event on its
own: `batch_items` (the array, members not yet read: each is read with
`eventing.cloudevent.json.from_object(item, index=i)`), `to_batch_item` (one member) and
`batch_message` (headers and body from members). The gateway reports every bad event
of a batch by index, the function host answers per event, the HTTP invoker sends what
it can: all three go through these.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from cloudevents.http import CloudEvent

from eventing.cloudevent.event import (
    MAX_NAME_LENGTH,
    BindingError,
    attribute_string,
    data_bytes,
    make_event,
    validate_attributes,
)
from eventing.cloudevent.json import (
    BATCH_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    STRUCTURED_JSON,
    from_json,
    from_object,
    parse,
    serialize,
    to_json,
    to_object,
)

# Printable US-ASCII except '"' and '%': everything else is percent-encoded (HTTP 3.1.3.2).
_HTTP_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_HTTP_NEEDS_QUOTING = re.compile(r'[^\x21\x23\x24\x26-\x7e]')
_QUOTED_PAIR = re.compile(r"\\(.)")


def mode(headers: Mapping[str, str]) -> str:
    """`"structured"`, `"batch"` or `"binary"` from the Content-Type (HTTP binding 3)."""
    content_type = _header(headers, "content-type")
    if content_type is not None:
        media = content_type.lstrip()[:29].lower()
        if media.startswith("application/cloudevents-batch"):
            return "batch"
        if media.startswith("application/cloudevents"):
            return "structured"
    return "binary"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for k, v in headers.items():
            if k.lower() == name:
                return v
    return value


# --------------------------------------------------------------------------- one event


def to_binary(event: CloudEvent, *, validate: bool = True) -> tuple[dict[str, str], bytes]:
    """HTTP binary content mode: `ce-<name>` headers (percent-encoded) and the body bytes.

    This is what a KafkaSource POSTs to a function. Raises `BindingError` for invalid
    attributes or unencodable data.
    """
    attrs = event._get_attributes()
    if validate:
        validate_attributes(attrs, max_name_length=None)
    headers = {
        "ce-" + name: (value if type(value) is str else attribute_string(name, value))
        for name, value in attrs.items()
        if value is not None and name != "datacontenttype"
    }
    # One regex pass over all values; almost always nothing needs percent-encoding.
    if _HTTP_NEEDS_QUOTING.search("".join(headers.values())) is not None:
        headers = {name: _percent_encode(value) for name, value in headers.items()}
    body, content_type = data_bytes(event.data, attrs.get("datacontenttype"))
    if content_type is not None:
        headers["content-type"] = content_type
    return headers, body or b""


def to_structured(event: CloudEvent, *, validate: bool = True) -> tuple[dict[str, str], bytes]:
    """HTTP structured content mode: `application/cloudevents+json` body."""
    if validate:
        validate_attributes(event._get_attributes(), max_name_length=None)
    return {"content-type": STRUCTURED_CONTENT_TYPE}, to_json(event)


def from_http(
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    max_name_length: int | None = MAX_NAME_LENGTH,
) -> CloudEvent:
    """Parse one binary- or structured-mode HTTP CloudEvent (data left as bytes).

    `headers` may be any mapping (e.g. Starlette's `Headers`); names are matched
    case-insensitively. Raises `BindingError` for batched content (use `from_batch`),
    unsupported event formats, a `ce-datacontenttype` header in binary mode, missing
    `ce-specversion`, bad JSON, or invalid attributes.
    """
    how = mode(headers)
    if how == "batch":
        raise BindingError("batched content mode: use from_batch")
    content_type = _header(headers, "content-type")
    if how == "structured":
        media = content_type.split(";", 1)[0].strip().lower()  # type: ignore[union-attr]
        if media != STRUCTURED_JSON:
            raise BindingError(f"unsupported event format {media!r} (only {STRUCTURED_JSON})")
        return from_json(body or b"", max_name_length=max_name_length)
    attrs: dict[str, Any] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith("ce-"):
            attr = lname[3:]
            if attr == "datacontenttype":
                raise BindingError(
                    "must not be sent as a ce-datacontenttype header: use Content-Type",
                    attribute="datacontenttype",
                )
            attrs[attr] = _percent_decode(attr, value)
    if "specversion" not in attrs:
        raise BindingError(
            "missing: no ce-specversion header and Content-Type is not "
            "application/cloudevents+json, so this is not a CloudEvent",
            attribute="specversion",
        )
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    validate_attributes(attrs, max_name_length=max_name_length)
    return make_event(attrs, body or None)


def _percent_encode(value: str) -> str:
    if _HTTP_NEEDS_QUOTING.search(value) is None:
        return value
    return quote(value, safe=_HTTP_SAFE)


def _percent_decode(name: str, value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
    if not value.isascii():
        # ASGI servers hand header values over as latin-1; undo that for raw UTF-8.
        try:
            value = value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise BindingError("header value is not valid UTF-8", attribute=name) from None
    if "%" not in value:
        return value
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise BindingError(
            "percent-encoded value is not valid UTF-8", attribute=name
        ) from None


# --------------------------------------------------------------------------- batch


def batch_items(body: bytes | str) -> list[Any]:
    """The JSON array of an `application/cloudevents-batch+json` body, members unread.

    Raises `BindingError` (no attribute, no index) when the body is not a JSON array.
    Read each member with `eventing.cloudevent.json.from_object(item, index=i)`, so a
    caller can report or answer each event by its position.
    """
    items = parse(body)
    if type(items) is not list:
        raise BindingError("a batch must be a JSON array of events")
    return items


def from_batch(
    body: bytes | str, *, max_name_length: int | None = MAX_NAME_LENGTH
) -> list[CloudEvent]:
    """Parse an `application/cloudevents-batch+json` body (a JSON array, may be empty).

    All or nothing: the first bad event raises, and `BindingError.index` is its position.
    """
    return [
        from_object(item, max_name_length=max_name_length, index=i)
        for i, item in enumerate(batch_items(body))
    ]


def to_batch_item(event: CloudEvent) -> dict[str, Any]:
    """One event as a batch member: the JSON format, losing nothing of bytes data.

    `to_object` embeds bytes as JSON when the content type is JSON or absent (JSON
    format 3.1); bytes that are not JSON (a KafkaSource-style record with arbitrary bytes
    and no content type) go as `data_base64` instead, so the receiver gets the body
    binary mode would have sent. Raises `BindingError` for data that has no JSON form.
    """
    try:
        return to_object(event)
    except BindingError:
        data = event.data
        if type(data) is not bytes:
            raise
        obj = to_object(make_event(event._get_attributes()))
        obj["data_base64"] = base64.b64encode(data).decode("ascii")
        return obj


def batch_message(items: list[dict[str, Any]]) -> tuple[dict[str, str], bytes]:
    """Headers and body of a batch POST from members made by `to_batch_item`."""
    return {"content-type": BATCH_CONTENT_TYPE}, serialize(items)


def to_batch(
    events: Iterable[CloudEvent], *, validate: bool = True
) -> tuple[dict[str, str], bytes]:
    """Encode events as one `application/cloudevents-batch+json` body (`to_batch_item`)."""
    items = []
    for event in events:
        if validate:
            validate_attributes(event._get_attributes(), max_name_length=None)
        items.append(to_batch_item(event))
    return batch_message(items)
