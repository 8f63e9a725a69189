"""Pinot schema and REALTIME table for the real-time topic, derived from its Avro schema.

Pinot reads the topic directly from Kafka with the Confluent-registry Avro decoder, so
the table's columns are the Avro record's fields: strings and booleans become
dimensions, floating-point numbers metrics, integers dimensions (counts are attributes
to filter on here, not sums), and the time column a DATETIME in epoch milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from eventing.deploy.common import DeployError, DeploySettings

DECODER = ("org.apache.pinot.plugin.inputformat.avro.confluent."
           "KafkaConfluentSchemaRegistryAvroMessageDecoder")
CONSUMER_FACTORY = "org.apache.pinot.plugin.stream.kafka30.KafkaConsumerFactory"
_TYPES = {"string": "STRING", "boolean": "BOOLEAN", "int": "INT", "long": "LONG",
          "float": "FLOAT", "double": "DOUBLE", "bytes": "BYTES"}


def table_name(topic: str) -> str:
    """Pinot reads `a.b` as database `a`, table `b`: use underscores."""
    return topic.replace(".", "_").replace("-", "_")


def _avro_type(field: dict) -> tuple[str, bool]:
    """(Avro primitive type, nullable) of a field, unwrapping ["null", T] unions."""
    t = field["type"]
    nullable = False
    if isinstance(t, list):
        rest = [x for x in t if x != "null"]
        nullable = len(rest) < len(t)
        if len(rest) != 1:
            raise DeployError(f"field {field['name']!r}: unions of several types do not map "
                              "to one Pinot column")
        t = rest[0]
    if isinstance(t, dict):
        if t.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
            return t["logicalType"], nullable
        t = t.get("type")
    if t not in _TYPES:
        raise DeployError(f"field {field['name']!r}: Avro type {t!r} has no flat Pinot column; "
                          "flatten the record before the real-time table")
    return t, nullable


def schema(avro: dict, topic: str, time_column: str) -> dict:
    """The Pinot schema (dimensionFieldSpecs, metricFieldSpecs, dateTimeFieldSpecs)."""
    dims, metrics, times = [], [], []
    for field in avro["fields"]:
        name = field["name"]
        atype, _ = _avro_type(field)
        if name == time_column or atype.startswith("timestamp"):
            unit = "MICROSECONDS" if atype == "timestamp-micros" else "MILLISECONDS"
            times.append({"name": name, "dataType": "LONG", "format": f"1:{unit}:EPOCH",
                          "granularity": f"1:{unit}"})
        elif atype in ("float", "double"):
            metrics.append({"name": name, "dataType": _TYPES[atype]})
        else:
            dims.append({"name": name, "dataType": _TYPES[atype]})
    if not any(t["name"] == time_column for t in times):
        raise DeployError(f"{topic}: time column {time_column!r} is not a field of the schema")
    return {"schemaName": table_name(topic), "enableColumnBasedNullHandling": True,
            "dimensionFieldSpecs": dims, "metricFieldSpecs": metrics,
            "dateTimeFieldSpecs": times}


def table(topic: str, settings: DeploySettings, pinot_schema: dict) -> dict:
    """A REALTIME table consuming `topic` from Kafka, decoding Avro via the registry."""
    name = table_name(topic)
    dims = {d["name"]: d["dataType"] for d in pinot_schema["dimensionFieldSpecs"]}
    inverted = sorted(n for n, t in dims.items() if t == "STRING")
    stream = {
        "streamType": "kafka",
        "stream.kafka.topic.name": topic,
        "stream.kafka.broker.list": settings.bootstrap,
        "stream.kafka.consumer.type": "lowlevel",
        "stream.kafka.consumer.factory.class.name": CONSUMER_FACTORY,
        "stream.kafka.consumer.prop.auto.offset.reset": "smallest",
        "stream.kafka.decoder.class.name": DECODER,
        "stream.kafka.decoder.prop.schema.registry.rest.url": settings.registry_url,
        "realtime.segment.flush.threshold.rows": "0",
        "realtime.segment.flush.threshold.time": "6h",
        "realtime.segment.flush.threshold.segment.size": "200M",
    }
    return {
        "tableName": name,
        "tableType": "REALTIME",
        "segmentsConfig": {
            "schemaName": name,
            "timeColumnName": settings.realtime_time_column,
            "timeType": "MILLISECONDS",
            "replicasPerPartition": "1",
            "retentionTimeUnit": "DAYS",
            "retentionTimeValue": "30",
        },
        "tenants": {"broker": "DefaultTenant", "server": "DefaultTenant"},
        "tableIndexConfig": {"loadMode": "MMAP", "invertedIndexColumns": inverted},
        "ingestionConfig": {"streamIngestionConfig": {"streamConfigMaps": [stream]}},
        "metadata": {"customConfigs": {"generatedBy": "sluice deploy"}},
    }


def configs(schemas_dir: Path, settings: DeploySettings) -> tuple[dict, dict]:
    """(schema, table config) for `settings.realtime_topic` from `<topic>.avsc`."""
    topic = settings.realtime_topic
    path = schemas_dir / f"{topic}.avsc"
    if not path.exists():
        raise DeployError(f"the real-time table needs {path} (the Avro schema of {topic})")
    pinot_schema = schema(json.loads(path.read_text()), topic, settings.realtime_time_column)
    return pinot_schema, table(topic, settings, pinot_schema)


def setup_job(settings: DeploySettings, files: list[str], configmap: str) -> dict:
    """A Job that posts the schema, then the table, to the Pinot controller's REST API
    (Pinot has no Kubernetes resource for them). It is deleted 10 minutes after it ends,
    so re-applying the bundle re-runs it; `override=true` makes the schema upsert."""
    schema_file, table_file = files
    c = settings.pinot_controller.rstrip("/")
    script = (
        "set -e\n"
        f"curl -fsS -X POST -H 'Content-Type: application/json' "
        f"--data-binary @/config/{schema_file} '{c}/schemas?override=true'\n"
        f"curl -fsS -X POST -H 'Content-Type: application/json' "
        f"--data-binary @/config/{table_file} '{c}/tables' || "
        f"curl -fsS -X PUT -H 'Content-Type: application/json' "
        f"--data-binary @/config/{table_file} '{c}/tables/{table_name(settings.realtime_topic)}'\n"
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "pinot-setup", "namespace": settings.namespace,
                     "labels": {"app.kubernetes.io/part-of": "sluice",
                                "app.kubernetes.io/component": "pinot-setup"}},
        "spec": {
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 10,
            "template": {"spec": {
                "restartPolicy": "OnFailure",
                "containers": [{
                    "name": "setup", "image": "curlimages/curl:8.10.1",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "config", "mountPath": "/config"}],
                    "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
                }],
                "volumes": [{"name": "config", "configMap": {"name": configmap}}],
            }},
        },
    }
