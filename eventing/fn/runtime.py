"""Run one user function on one event and turn what it returns into output records.

The same host code serves every invocation mode: the local dispatcher calls it in
process, and the HTTP wrapper (`eventing.fn.host`, the entry point of a function's
container) calls it for each POST a KafkaSource sends. That is what makes "the events a
function returns reach its output topics before its input counts as processed" hold both
locally and on Knative, where a KafkaSource drops HTTP replies.

A function is a plain `functions-framework` CloudEvent target:

    @functions_framework.cloud_event
    def enrich(event: CloudEvent) -> CloudEvent | list[CloudEvent] | dict | None: ...

It receives the event with `data` decoded (Avro → dict through the registry, JSON →
Python objects, anything else stays bytes) and returns nothing, one event, several
events, or bare dicts (each becomes an event of the input's type). Returned events keep
the input's `partitionkey` (so per-key order holds along a chain) and its trace context
unless they set their own.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import orjson
from cloudevents.http import CloudEvent

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.fn.state import KeyedState
from eventing.serde import AVRO_CONTENT_TYPE, decode_data
from eventing.telemetry import tracing
from eventing.topology import Function

OutputRecord = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]
_INHERITED = ("partitionkey", "traceparent", "tracestate")
_AVRO = AVRO_CONTENT_TYPE.encode()
_JSON = b"application/json"
# A tuple, not `list | tuple`: the union is a new object on every call (~400 instructions).
_SEQUENCES = (list, tuple)


class Serde(Protocol):
    """What the host needs from `eventing.serde.AvroSerde`."""

    def decode(self, value: bytes) -> Any: ...

    def encode_lazy(self, topic: str, record: Any) -> bytes: ...

    def writer_for(self, topic: str) -> Any: ...


class OutputError(RuntimeError):
    """The function returned something that cannot go to any of its outputs."""


def _has_schema(serde: Serde | None, topic: str) -> bool:
    """Whether `topic` has a registered value schema (outputs are then Avro, else JSON)."""
    if serde is None:
        return False
    from eventing.serde import SchemaNotFound

    try:
        serde.writer_for(topic)
    except SchemaNotFound:
        return False
    return True


def load_target(source: Path, target: str) -> Callable[[CloudEvent], Any]:
    """Import `target` from the file `source` (a functions-framework source file)."""
    module_name = f"sluice_fn_{source.parent.name}_{abs(hash(str(source)))}"
    if module_name in sys.modules:
        module = sys.modules[module_name]
    else:
        spec = importlib.util.spec_from_file_location(module_name, source)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {source}")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(source.parent))  # the function's own helper modules
        try:
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(source.parent))
    fn = getattr(module, target, None)
    if not callable(fn):
        raise ImportError(f"{source} has no function {target!r} (set `target` in the topology)")
    return fn


def _pass_through_target(fn: Callable[[CloudEvent], Any]) -> Callable[[CloudEvent], Any]:
    """The function to call per event: `fn`, or the function it wraps when `fn` is
    functions-framework's `@cloud_event` wrapper.

    That wrapper is `def wrapper(*args, **kwargs): return func(*args, **kwargs)` (it only
    registers the signature type at decoration), so calling `func` directly is the same
    call minus one Python frame with argument packing per event. Recognised by its code
    object, never by name, so any other decorator (one that does something) stays in the
    call; `fn` itself is kept as the user's target everywhere else.
    """
    ff = sys.modules.get("functions_framework")
    closure = getattr(fn, "__closure__", None)
    if ff is None or not closure or len(closure) != 1:
        return fn
    probe = ff.cloud_event.__code__.co_consts  # the wrapper's code is a constant of it
    if not any(c is getattr(fn, "__code__", None) for c in probe):
        return fn
    inner = closure[0].cell_contents
    return inner if callable(inner) else fn


class FunctionHost:
    """Decode → call → route and encode outputs, for one function."""

    def __init__(self, function: Function, serde: Serde | None,
                 user: Callable[[CloudEvent], Any] | None = None,
                 tracer: tracing.Tracer | None = None, *, defer_state: bool = False) -> None:
        self.function = function
        # Deferred (the in-process dispatcher): a call's state changes are not returned
        # with its outputs but held in `pending_state` (latest value per changelog key)
        # until `take_state`, which the dispatcher calls only once the outputs of every
        # call so far are acknowledged (`eventing.delivery.checkpoint`, step 3). So the
        # changelog never holds the state of an event whose outputs the broker may lack.
        self.defer_state = defer_state
        self.pending_state: dict[tuple[str, bytes | None], OutputRecord] = {}
        self.tracer = tracer or tracing.get_tracer()
        self.serde = serde
        self.user = user or load_target(function.source, function.target)
        self._invoke = _pass_through_target(self.user)
        self.source_uri = f"/sluice/functions/{function.name}"
        module = sys.modules.get(getattr(self.user, "__module__", ""), None)
        self.stores: list[KeyedState] = [
            v for v in vars(module).values() if isinstance(v, KeyedState)
        ] if module else []
        # Stateful functions run one event at a time: state is read-modify-write.
        self._state_lock = threading.Lock() if self.stores else None
        self._schema_topics = {t: _has_schema(serde, t) for t in function.outputs}
        self._routes: dict[str, str] = {}
        self._source = self.source_uri.encode()

    def decode_data(self, event: CloudEvent) -> None:
        """Replace the event's bytes with the value the function reads (`serde.decode_data`)."""
        data = event.data
        if type(data) is bytes:
            content_type = event._get_attributes().get("datacontenttype")
            if content_type == AVRO_CONTENT_TYPE and self.serde is not None:
                # What the gateway writes: straight to the serde (the rule's first case).
                event.data = self.serde.decode(data)
            else:
                event.data = decode_data(content_type, data, self.serde)  # type: ignore[arg-type]
        elif isinstance(data, bytearray):
            event.data = decode_data(event._get_attributes().get("datacontenttype"), data,
                                     self.serde)  # type: ignore[arg-type]

    def call(self, event: CloudEvent) -> list[OutputRecord]:
        """Run the function on a decoded-or-raw event and return its output records.

        Raises whatever the function raises (the dispatcher retries and dead-letters),
        and `OutputError` for a returned event no output takes. When the event's trace is
        sampled, the run is a span and each output a `send` span whose context the output
        carries (`eventing.telemetry.tracing`).
        """
        span = self.tracer.function(event, self.function.name) if self.tracer.enabled else None
        if span is None:  # unsampled: API spans of user code still join the event's context
            return self._call(event, None)
        token = self.tracer.enter(span)  # the user function's own spans are its children
        try:
            records = self._call(event, span)
        except BaseException as exc:
            span.fail(f"{type(exc).__name__}: {exc}"[:1024], type(exc).__name__)
            span.finish()
            raise
        finally:
            self.tracer.leave(token)
        span.finish()
        return records

    def _call(self, event: CloudEvent, span: Any) -> list[OutputRecord]:
        self.decode_data(event)
        if self._state_lock is None:
            result = self._invoke(event)
            return self._outputs(event, result, span) if result is not None else []
        with self._state_lock:
            try:
                result = self._invoke(event)
                records = self._outputs(event, result, span) if result is not None else []
            except BaseException:
                for st in self.stores:
                    st.discard_pending()
                raise
            if self.defer_state:
                pending = self.pending_state
                for st in self.stores:
                    for record in st.drain():
                        pending[record[0], record[1]] = record
            else:
                for st in self.stores:
                    records.extend(st.drain())
            return records

    def take_state(self) -> list[OutputRecord]:
        """The held state changes (deferred mode), latest per key, and forget them."""
        if not self.pending_state:
            return []
        records = list(self.pending_state.values())
        self.pending_state.clear()
        return records

    def restore_state(self, bootstrap: str,
                      consumer_overrides: dict[str, Any] | None = None) -> None:
        """Load every store of the function from its changelog (before events flow);
        `consumer_overrides`: the broker storage's tuning (`KeyedState.restore`)."""
        for st in self.stores:
            st.restore(bootstrap, consumer_overrides=consumer_overrides)

    def _outputs(self, event: CloudEvent, result: Any, span: Any = None) -> list[OutputRecord]:
        if not isinstance(result, _SEQUENCES):
            result = (result,)
        in_attrs = event._get_attributes()
        records: list[OutputRecord] = []
        for i, item in enumerate(result):
            if span is None and type(item) is dict:
                records.append(self._dict_record(item, in_attrs, i))
                continue
            out = self._as_event(item, in_attrs, i)
            attrs = out._get_attributes()
            for name in _INHERITED:
                if name not in attrs and name in in_attrs:
                    attrs[name] = in_attrs[name]
            topic = self.function.route(attrs["type"])
            if topic is None:
                raise OutputError(
                    f"function {self.function.name!r} returned an event of type "
                    f"{attrs['type']!r} that none of its outputs "
                    f"({', '.join(self.function.outputs) or 'none'}) takes"
                )
            send = None
            if span is not None and attrs.get("traceparent") in (None, in_attrs.get("traceparent")):
                # Not a context of the function's own choosing: the output carries its send span.
                send = self.tracer.send(span, attrs, out.data, topic)
            if self._schema_topics.get(topic) and not isinstance(out.data, bytes | None):
                out.data = self.serde.encode_lazy(topic, out.data)  # type: ignore[union-attr]
                attrs["datacontenttype"] = AVRO_CONTENT_TYPE
            key, value, headers = ce_kafka.to_binary(out, validate=False)
            records.append((topic, key, value, headers))
            if send is not None:
                send.finish()
        return records

    def _dict_record(self, data: dict, in_attrs: dict[str, Any], index: int) -> OutputRecord:
        """A returned dict straight to a binary-mode record, without building an event.

        The same record `_as_event` + `ce_kafka.to_binary` would make (the tests compare
        them), at a fraction of the cost: this runs once per output on the hot path.
        """
        etype = in_attrs["type"]
        topic = self._routes.get(etype)
        if topic is None:
            topic = self._route(etype)
        if self._schema_topics.get(topic):
            value = self.serde.encode_lazy(topic, data)  # type: ignore[union-attr]
            content_type = _AVRO
        else:
            value = orjson.dumps(data)
            content_type = _JSON
        key, value, headers = ce_kafka.to_binary_derived(
            in_attrs, f"{in_attrs['id']}/{self.function.name}/{index}", self._source, value,
            content_type)
        return topic, key, value, headers

    def _route(self, etype: str) -> str:
        topic = self.function.route(etype)
        if topic is None:
            raise OutputError(
                f"function {self.function.name!r} returned an event of type {etype!r} that "
                f"none of its outputs ({', '.join(self.function.outputs) or 'none'}) takes"
            )
        self._routes[etype] = topic
        return topic

    def _as_event(self, item: Any, in_attrs: dict[str, Any], index: int) -> CloudEvent:
        if isinstance(item, CloudEvent):
            return item
        if isinstance(item, dict):
            return ce_event.make_event({
                "specversion": "1.0",
                "id": f"{in_attrs['id']}/{self.function.name}/{index}",
                "source": self.source_uri,
                "type": in_attrs["type"],
                **({"time": in_attrs["time"]} if "time" in in_attrs else {}),
            }, item)
        raise OutputError(
            f"function {self.function.name!r} returned {type(item).__name__}; return a "
            "CloudEvent, a dict, a list of them, or None"
        )
