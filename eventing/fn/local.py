"""Run a function on one event exactly as the dispatcher would, and show what it returns.

`sluice invoke` goes through the real path minus the broker: the event is encoded as
the gateway writes it (Avro in the Confluent wire format when the input topic has a
schema, else JSON), turned into a Kafka record (`cloudevent.kafka.to_binary`), read back
as a KafkaSource delivers it (`from_record`), decoded (`serde.decode_data`) and run by
the `FunctionHost` that runs it in the pipeline, which routes and encodes the outputs.
The output records are then decoded again for display, so what is shown is what the
output topics would receive.

Schemas come from a registry when one answers, else from the project's `schemas/`
folder (`FileSchemas`, the same files `sluice up` registers), so a function can be tried
before any stack runs.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cloudevents.http import CloudEvent

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.serde import (
    AVRO_CONTENT_TYPE,
    AvroSerde,
    SchemaNotFound,
    decode_data,
    subject_for,
)
from eventing.topology import Function, Topology


class FileSchemas:
    """A read-only registry client over `schemas/*.avsc` (file name = topic): ids are
    the files' positions in name order, stable for one folder."""

    def __init__(self, schemas_dir: Path) -> None:
        self._by_subject: dict[str, tuple[int, str]] = {}
        self._by_id: dict[int, str] = {}
        for i, path in enumerate(sorted(schemas_dir.glob("*.avsc")), 1):
            text = path.read_text()
            self._by_subject[subject_for(path.name.removesuffix(".avsc"))] = (i, text)
            self._by_id[i] = text

    def get_latest_version(self, subject: str) -> Any:
        if subject not in self._by_subject:
            raise SchemaNotFound(f"no schema file for subject {subject!r}")
        schema_id, text = self._by_subject[subject]
        return SimpleNamespace(schema_id=schema_id, schema=SimpleNamespace(schema_str=text))

    def get_schema(self, schema_id: int) -> Any:
        if schema_id not in self._by_id:
            raise SchemaNotFound(f"schema id {schema_id} is not in the schemas folder")
        return SimpleNamespace(schema_str=self._by_id[schema_id])


@dataclass
class Output:
    topic: str
    type: str
    key: str | None
    id: str
    data: Any

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "type": self.type, "key": self.key, "id": self.id,
                "data": self.data}


@dataclass
class Outcome:
    """What one invocation did: outputs, or the failure and what delivery would do."""

    outputs: list[Output] = field(default_factory=list)
    code: int = 200
    error: str | None = None
    then: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "error": self.error, "then": self.then,
                "outputs": [o.as_dict() for o in self.outputs]}


def input_event(topology: Topology, function: Function, data: Any, *,
                event_type: str | None, source: str = "/sluice/invoke",
                key: str | None = None, event_id: str | None = None,
                serde: AvroSerde | None) -> tuple[str, CloudEvent]:
    """(input topic, the event as a record of it) for `data`: encoded as the gateway would."""
    topic = function.topics[0]
    if event_type is None:
        routed = [t for t, tp in topology.routes.items() if tp == topic]
        producers = [t for f in topology.functions.values() for tp, types in f.outputs.items()
                     if tp == topic for t in types if t != "*"]
        candidates = routed + producers
        if not candidates:
            raise ValueError(f"give --type: nothing in the topology says which event type "
                             f"reaches {topic!r}")
        event_type = candidates[0]
    attrs: dict[str, Any] = {"specversion": "1.0", "id": event_id or str(uuid.uuid4()),
                             "source": source, "type": event_type}
    if key is not None:
        attrs["partitionkey"] = key
    value: bytes
    if serde is not None and _has_schema(serde, topic):
        value = serde.encode(topic, data)  # SchemaViolation names the field
        attrs["datacontenttype"] = AVRO_CONTENT_TYPE
    else:
        value = json.dumps(data).encode()
        attrs["datacontenttype"] = "application/json"
    return topic, ce_event.make_event(attrs, value)


def _has_schema(serde: AvroSerde, topic: str) -> bool:
    try:
        serde.writer_for(topic)
    except SchemaNotFound:
        return False
    return True


def invoke(function: Function, topic: str, event: CloudEvent, serde: AvroSerde | None,
           host: Any = None) -> Outcome:
    """Run `function` on `event` through the host the dispatcher uses; decode its outputs."""
    from eventing.fn.output import failure
    from eventing.fn.runtime import FunctionHost

    key, value, headers = ce_kafka.to_binary(event)
    delivered = ce_kafka.from_record(key, value, headers, topic=topic, partition=0, offset=0,
                                     timestamp_ms=None, validate=False, wrap_invalid=True)
    host = host or FunctionHost(function, serde)
    try:
        records = host.call(delivered)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, as delivery would
        code, message = failure(exc)
        retry = function.delivery.retry
        then = ("dead-lettered now (Reject: no retries)" if code == 422 else
                f"retried {retry} time(s) with {function.delivery.backoff_policy} backoff, "
                f"then dead-lettered to {function.delivery.dead_letter_sink}")
        return Outcome(code=code, error=message, then=then)
    outputs = []
    for out_topic, out_key, out_value, out_headers in records:
        out = ce_kafka.from_record(out_key, out_value, out_headers, topic=out_topic,
                                   partition=0, offset=0, timestamp_ms=None, validate=False,
                                   wrap_invalid=True)
        attrs = out._get_attributes()
        try:
            data = decode_data(attrs.get("datacontenttype"), out.data, serde)
        except Exception as exc:  # noqa: BLE001 - show the bytes and why
            data = f"<{len(out.data or b'')} bytes: {exc}>"
        outputs.append(Output(out_topic, str(attrs.get("type")),
                              out_key.decode("utf-8", "replace") if out_key else None,
                              str(attrs.get("id")), data))
    return Outcome(outputs=outputs)


def post(url: str, event: CloudEvent, timeout_s: float = 30.0) -> tuple[int, str]:
    """POST `event` in HTTP binary mode, one event per request, as a KafkaSource does."""
    import httpx

    from eventing.cloudevent import http as ce_http

    headers, body = ce_http.to_binary(event)
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot reach the function at {url}: {exc}") from None
    return response.status_code, response.text
