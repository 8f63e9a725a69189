"""The registry on a real broker: durability across restarts and the Confluent Avro serde
round trip through a topic.

The broker is the test stack's; each test keeps its schemas in a `_schemas_<random>` topic
of its own, and a registry process it starts listens on a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from eventing.kafka import consumer_config, ensure_topics, producer_config
from eventing.registry.server import open_store
from tests.helpers import ROOT, free_port, stop_process

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def bootstrap(stack) -> str:
    return stack.bootstrap


class RegistryProcess:
    """`eventing.registry.server.run` in a child process, as the supervisor runs it."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        code = (
            "from eventing.registry.server import run; "
            f"run('127.0.0.1', {port}, {bootstrap!r}, {topic!r})"
        )
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "registry process exited"
            try:
                if httpx.get(self.url + "/", timeout=1).json() == {}:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "registry did not come up"
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc, 15)


def _record(*fields: dict) -> str:
    return json.dumps({"type": "record", "name": "Payment", "namespace": "sluice.test",
                       "fields": list(fields)})


V1 = _record({"name": "id", "type": "string"}, {"name": "amount", "type": "int"})
V2 = _record({"name": "id", "type": "string"}, {"name": "amount", "type": "long"},
             {"name": "currency", "type": "string", "default": "EUR"})


def test_store_state_survives_reopen(bootstrap: str) -> None:
    topic = f"_schemas_{uuid.uuid4().hex[:8]}"
    store = open_store(bootstrap, topic)
    v1 = store.register("pay-value", V1)
    v2 = store.register("pay-value", V2)
    other = store.register("other-value", V1)
    store.set_config("pay-value", "FULL")
    store.delete_version("other-value", 1)
    store.delete_version("other-value", 1, permanent=True)
    store.delete_subject("pay-value")  # soft
    store.close()

    again = open_store(bootstrap, topic)
    try:
        assert again.subjects() == []
        assert again.subjects(deleted=True) == ["pay-value"]
        assert again.versions("pay-value", deleted=True) == [1, 2]
        assert again.get_version("pay-value", 2, deleted=True) == \
            store.get_version("pay-value", 2, deleted=True)
        assert again.get_config("pay-value") == "FULL"
        assert again.schema_by_id(v1.id).schema == v1.schema == other.schema
        assert again.schema_by_id(v2.id).schema == v2.schema
        # new ids continue after the highest one in the log
        assert again.register("new-value", _record({"name": "x", "type": "int"})).id == 3
    finally:
        again.close()


def test_registry_process_restart_keeps_registrations(bootstrap: str) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    topic = f"_schemas_{uuid.uuid4().hex[:8]}"
    registry = RegistryProcess(bootstrap, topic)
    try:
        sr = SchemaRegistryClient({"url": registry.url})
        sid1 = sr.register_schema("pay-value", Schema(V1, "AVRO"))
        sid2 = sr.register_schema("pay-value", Schema(V2, "AVRO"))
        sr.set_compatibility("pay-value", "FORWARD")
        sr.delete_version("pay-value", 1)
    finally:
        registry.stop()

    registry = RegistryProcess(bootstrap, topic)
    try:
        sr = SchemaRegistryClient({"url": registry.url})
        assert sr.get_versions("pay-value") == [2]
        assert sr.get_versions("pay-value", deleted=True) == [1, 2]
        assert sr.get_latest_version("pay-value").schema_id == sid2
        assert sr.get_compatibility("pay-value") == "FORWARD"
        assert json.loads(sr.get_schema(sid1).schema_str) == json.loads(V1)
        assert sr.register_schema("pay-value", Schema(V2, "AVRO")) == sid2  # not a new id
    finally:
        registry.stop()


def test_avro_serde_round_trip_through_tansu(bootstrap: str) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    schemas_topic = f"_schemas_{uuid.uuid4().hex[:8]}"
    data_topic = f"payments-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {data_topic: 1})
    registry = RegistryProcess(bootstrap, schemas_topic)
    try:
        sr = SchemaRegistryClient({"url": registry.url})
        serializer = AvroSerializer(sr, V2)
        ctx = SerializationContext(data_topic, MessageField.VALUE)
        event = {"id": "p-1", "amount": 12_345_678_901, "currency": "SEK"}
        payload = serializer(event, ctx)
        schema_id = sr.get_latest_version(f"{data_topic}-value").schema_id
        assert payload[0] == 0 and int.from_bytes(payload[1:5], "big") == schema_id

        producer = Producer(producer_config(bootstrap))
        producer.produce(data_topic, key=b"p-1", value=payload)
        assert producer.flush(10) == 0

        consumer = Consumer(consumer_config(bootstrap, f"reg-test-{uuid.uuid4()}"))
        consumer.assign([TopicPartition(data_topic, 0, 0)])
        try:
            deadline = time.monotonic() + 15
            msg = None
            while msg is None and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error():
                    pytest.fail(str(msg.error()))
            assert msg is not None, "record not consumed"
        finally:
            consumer.close()

        # a fresh client, so the writer schema really comes from the registry by id
        deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry.url}))
        assert deserializer(msg.value(), ctx) == event
        # reading old data with a newer reader schema (schema resolution) also works
        old = AvroSerializer(sr, V1, conf={"auto.register.schemas": True})(
            {"id": "p-0", "amount": 5}, SerializationContext(f"{data_topic}-old",
                                                             MessageField.VALUE))
        reader = AvroDeserializer(SchemaRegistryClient({"url": registry.url}), V2)
        assert reader(old, ctx) == {"id": "p-0", "amount": 5, "currency": "EUR"}
    finally:
        registry.stop()
