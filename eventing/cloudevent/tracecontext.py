"""W3C Trace Context (Level 2) and where CloudEvents carry it: the one home of its names.

A trace context travels in three places, all named here and nowhere else:

- the W3C HTTP headers `traceparent` / `tracestate` (what an OpenTelemetry-instrumented
  HTTP client sends);
- the CloudEvents distributed-tracing extension attributes `traceparent` / `tracestate`
  (in HTTP binary mode the `ce-traceparent` / `ce-tracestate` headers, in structured and
  batch mode members of the JSON object);
- on Kafka, the same attributes as the `ce_traceparent` / `ce_tracestate` record headers
  (`eventing.cloudevent.kafka` writes every attribute that way).

The parsing rules follow W3C Trace Context Level 2 to the letter, because a context that a
later hop cannot parse silently breaks the trace:

traceparent
    - leading and trailing optional whitespace (space, tab) is ignored;
    - `version-traceid-parentid-flags`, lower-case hex only, exact field lengths;
    - version `ff` is invalid; version `00` is exactly 55 characters; a higher version may
      append `-<anything>` after the flags (parsed as version 00, the rest ignored), but
      any other character after the flags is invalid;
    - an all-zero trace id or parent id is invalid;
    - flags: bit 0 `sampled`, bit 1 `random` (Level 2: the trace id's right-most 7 bytes
      are random); the other bits are not defined and are set to zero when propagating;
    - the header repeated (several header fields, or a value folded with `,`) is invalid:
      the trace restarts.

tracestate (read only with a valid traceparent)
    - several header fields combine, in order, into one comma-separated list;
    - list members are `key=value` with optional whitespace around them; empty members
      are skipped;
    - key: `simple-key` (lower-case letter, then up to 255 of `a-z0-9_-*/`) or
      `tenant@system` (tenant: letter or digit then up to 240 of those, system: letter
      then up to 13);
    - value: 1 to 256 printable ASCII characters (0x20-0x7E) other than `,` and `=`, not
      ending in a space;
    - at most 32 members, each key once. A tracestate that breaks any rule is dropped
      whole (the traceparent still continues the trace).

The gateway's precedence when a request carries both: the event's own `traceparent`
attribute (`ce-traceparent`, or the attribute of a structured/batch event) when valid,
since it is per event and is what the publisher stamped on that event; otherwise the W3C
`traceparent` header of the request (shared by every event of a batch); otherwise a new
trace. The tracestate always comes from the same place as the traceparent it belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

# The attribute names (CloudEvents distributed-tracing extension) and the W3C HTTP headers.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
HTTP_TRACEPARENT = "traceparent"
HTTP_TRACESTATE = "tracestate"
KAFKA_TRACEPARENT = "ce_traceparent"
KAFKA_TRACESTATE = "ce_tracestate"

SAMPLED = 0x01
RANDOM = 0x02
KNOWN_FLAGS = SAMPLED | RANDOM
MAX_TRACESTATE_MEMBERS = 32

_OWS = " \t"
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_KEY_CHARS = r"[a-z0-9_\-*/]"
_KEY = re.compile(
    rf"(?:[a-z]{_KEY_CHARS}{{0,255}}|[a-z0-9]{_KEY_CHARS}{{0,240}}@[a-z]{_KEY_CHARS}{{0,13}})\Z")
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z")


class TraceParent(NamedTuple):
    """A valid `traceparent`: ids as lower-case hex, flags with unknown bits cleared."""

    trace_id: str
    span_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    @property
    def random(self) -> bool:
        return bool(self.flags & RANDOM)

    def format(self) -> str:
        return format_traceparent(self.trace_id, self.span_id, self.flags)


def format_traceparent(trace_id: str, span_id: str, flags: int | bool = SAMPLED) -> str:
    """A version-00 `traceparent`; `flags` True/False means sampled or not (random unset)."""
    return f"00-{trace_id}-{span_id}-{int(flags) & KNOWN_FLAGS:02x}"


def parse_traceparent(value: Any) -> TraceParent | None:
    """The context of one `traceparent` value, or None when it breaks a rule above."""
    if type(value) is not str:
        if type(value) is not bytes:
            return None
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip(_OWS)
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, span_id, flags = m.group("version", "trace_id", "span_id", "flags")
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return TraceParent(trace_id, span_id, int(flags, 16) & KNOWN_FLAGS)


def traceparent_from_headers(values: Sequence[str]) -> TraceParent | None:
    """The context of a request's `traceparent` header fields (all of them, in order).

    More than one field, or one value folded from several (`a, b`), is invalid.
    """
    if len(values) != 1 or "," in values[0]:
        return None
    return parse_traceparent(values[0])


def parse_tracestate(values: str | Iterable[str] | None) -> str | None:
    """The normalised `tracestate` (members joined by `,`) of one or several header values,
    or None when it is absent, empty, or breaks a rule (then it is dropped whole)."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        values = [values]
    members: list[str] = []
    keys: set[str] = set()
    for value in values:
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return None
        for member in value.split(","):
            member = member.strip(_OWS)
            if not member:
                continue
            key, sep, val = member.partition("=")
            if not sep or _KEY.match(key) is None or _VALUE.match(val) is None or key in keys:
                return None
            keys.add(key)
            members.append(f"{key}={val}")
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    return ",".join(members)


def sanitize_attributes(attrs: dict[str, Any]) -> TraceParent | None:
    """Validate an event's tracing attributes in place: an invalid `traceparent` is removed
    with its `tracestate`; an invalid `tracestate` alone is removed; a valid pair is
    rewritten in normal form (whitespace trimmed, undefined flag bits cleared).

    Returns the valid parent, or None.
    """
    tp = attrs.get(TRACEPARENT)
    if tp is None:
        attrs.pop(TRACESTATE, None)
        return None
    parent = parse_traceparent(tp)
    if parent is None:
        del attrs[TRACEPARENT]
        attrs.pop(TRACESTATE, None)
        return None
    attrs[TRACEPARENT] = parent.format()
    state = parse_tracestate(attrs.get(TRACESTATE))
    if state is None:
        attrs.pop(TRACESTATE, None)
    else:
        attrs[TRACESTATE] = state
    return parent


_UNSAMPLED_FLAGS = frozenset("02468ace")


def is_unsampled(tp: Any) -> bool:
    """Cheap pre-check (a few hundred ns): a version-00-shaped value whose sampled bit is
    clear. A hop passes such a context on untouched (the gateway validated it) and records
    nothing, without a full parse or any OpenTelemetry call."""
    return type(tp) is str and len(tp) == 55 and tp[54] in _UNSAMPLED_FLAGS and tp[:3] == "00-"
