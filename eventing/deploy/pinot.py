"""Pinot schemas and REALTIME tables, one per real-time table the topology declares.

The columns are the local real-time table's (`eventing.tables.realtime`), derived the same
way, from the lake sink's mapping of the topic's Avro schema
(`eventing.tables.lake.iceberg_schema`): the Avro fields with the time field as a
TIMESTAMP, then `kafka_partition` and `kafka_offset` (from the Kafka record's metadata,
which Pinot exposes as `__metadata$partition` / `__metadata$offset` when
`stream.kafka.metadata.populate` is on). So the same Trino SQL reads `<name>_rt` locally
and `pinot.default.<name>` on a cluster. Strings and booleans become dimensions,
floating-point numbers metrics, integers dimensions (counts are attributes to filter on
here, not sums).

Pinot reads the topic directly from Kafka with the Confluent-registry Avro decoder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from eventing.deploy.common import DeployError, DeploySettings
from eventing.topology import Table, Topology

DECODER = ("org.apache.pinot.plugin.inputformat.avro.confluent."
           "KafkaConfluentSchemaRegistryAvroMessageDecoder")
CONSUMER_FACTORY = "org.apache.pinot.plugin.stream.kafka30.KafkaConsumerFactory"
PARTITION_COLUMN, OFFSET_COLUMN = "kafka_partition", "kafka_offset"
_METADATA = {PARTITION_COLUMN: "__metadata$partition", OFFSET_COLUMN: "__metadata$offset"}
# Iceberg type (as the lake sink maps Avro) -> (Pinot data type, field kind)
_TYPES = {"string": ("STRING", "dimension"), "boolean": ("BOOLEAN", "dimension"),
          "int": ("INT", "dimension"), "long": ("LONG", "dimension"),
          "float": ("FLOAT", "metric"), "double": ("DOUBLE", "metric"),
          "binary": ("BYTES", "dimension")}


def table_name(table: Table) -> str:
    """The Pinot table: the lake table's name (`sluice query` maps `<name>_rt` to it)."""
    return table.name


def columns(avro: dict, table: Table) -> dict[str, str]:
    """{column: Pinot data type}, in the local real-time table's order."""
    from eventing.tables.lake import UnsupportedSchema, iceberg_schema

    try:
        schema = iceberg_schema(avro, table.time_field)
    except (UnsupportedSchema, ValueError, StopIteration) as exc:
        raise DeployError(f"table {table.name}: {exc}") from None
    out = {}
    for f in schema.fields:
        kind = str(f.field_type)
        if f.name == table.time_field or kind.startswith("timestamp"):
            out[f.name] = "TIMESTAMP"
        elif kind.startswith("decimal"):
            out[f.name] = "BIG_DECIMAL"
        elif kind in _TYPES:
            out[f.name] = _TYPES[kind][0]
        else:
            raise DeployError(f"table {table.name}: column {f.name!r} of type {kind} has no "
                              "flat Pinot column; flatten it before the real-time table")
    return out


def schema(avro: dict, table: Table) -> dict:
    """The Pinot schema (dimensionFieldSpecs, metricFieldSpecs, dateTimeFieldSpecs)."""
    time_type = next((f["type"] for f in avro["fields"] if f["name"] == table.time_field), None)
    if time_type is None:
        raise DeployError(f"table {table.name}: time field {table.time_field!r} is not a "
                          f"field of {table.topic}'s schema")
    if "timestamp-micros" in json.dumps(time_type):
        raise DeployError(f"table {table.name}: {table.time_field} is timestamp-micros; "
                          "Pinot's TIMESTAMP is milliseconds: publish timestamp-millis")
    dims, metrics, times = [], [], []
    for name, kind in columns(avro, table).items():
        if kind == "TIMESTAMP":
            times.append({"name": name, "dataType": "TIMESTAMP",
                          "format": "1:MILLISECONDS:TIMESTAMP", "granularity": "1:MILLISECONDS"})
        elif kind in ("FLOAT", "DOUBLE", "BIG_DECIMAL"):
            metrics.append({"name": name, "dataType": kind})
        else:
            dims.append({"name": name, "dataType": kind})
    return {"schemaName": table_name(table), "enableColumnBasedNullHandling": True,
            "dimensionFieldSpecs": dims, "metricFieldSpecs": metrics,
            "dateTimeFieldSpecs": times}


def table_config(table: Table, settings: DeploySettings, pinot_schema: dict) -> dict:
    """A REALTIME table consuming the table's topic, decoding Avro via the registry,
    keeping what the local real-time table keeps (the declared retention)."""
    name = table_name(table)
    dims = {d["name"]: d["dataType"] for d in pinot_schema["dimensionFieldSpecs"]}
    inverted = sorted(n for n, t in dims.items() if t == "STRING")
    stream = {
        "streamType": "kafka",
        "stream.kafka.topic.name": table.topic,
        "stream.kafka.broker.list": settings.bootstrap,
        "stream.kafka.consumer.type": "lowlevel",
        "stream.kafka.consumer.factory.class.name": CONSUMER_FACTORY,
        "stream.kafka.consumer.prop.auto.offset.reset": "smallest",
        "stream.kafka.decoder.class.name": DECODER,
        "stream.kafka.decoder.prop.schema.registry.rest.url": settings.registry_url,
        "stream.kafka.metadata.populate": "true",
        "realtime.segment.flush.threshold.rows": "0",
        "realtime.segment.flush.threshold.time": "6h",
        "realtime.segment.flush.threshold.segment.size": "200M",
    }
    hours = max(1, math.ceil((table.retention_s or 3600) / 3600))
    return {
        "tableName": name,
        "tableType": "REALTIME",
        "segmentsConfig": {
            "schemaName": name,
            "timeColumnName": table.time_field,
            "replicasPerPartition": "1",
            "retentionTimeUnit": "HOURS",
            "retentionTimeValue": str(hours),
        },
        "tenants": {"broker": "DefaultTenant", "server": "DefaultTenant"},
        "tableIndexConfig": {"loadMode": "MMAP", "invertedIndexColumns": inverted},
        "ingestionConfig": {
            "streamIngestionConfig": {"streamConfigMaps": [stream]},
            "transformConfigs": [{"columnName": column, "transformFunction": f'"{source}"'}
                                 for column, source in _METADATA.items()],
        },
        "metadata": {"customConfigs": {"generatedBy": "sluice deploy"}},
    }


def configs(topology: Topology, settings: DeploySettings) -> dict[str, tuple[dict, dict]]:
    """{table name: (schema, table config)} for every real-time table, from the Avro
    schema `<topic>.avsc` in the topology's schemas folder."""
    out = {}
    for table in topology.realtime_tables():
        path = Path(topology.schemas) / f"{table.topic}.avsc"
        if not path.exists():
            raise DeployError(f"the real-time table {table.name} needs {path} (the Avro "
                              f"schema of {table.topic})")
        pinot_schema = schema(json.loads(path.read_text()), table)
        out[table_name(table)] = (pinot_schema, table_config(table, settings, pinot_schema))
    return out


def setup_job(settings: DeploySettings, tables: list[str], configmap: str) -> dict:
    """A Job that posts each schema, then its table, to the Pinot controller's REST API
    (Pinot has no Kubernetes resource for them). It is deleted 10 minutes after it ends,
    so re-applying the bundle re-runs it; `override=true` makes the schema upsert."""
    c = settings.pinot_controller.rstrip("/")
    lines = ["set -e"]
    for name in tables:
        lines += [
            f"curl -fsS -X POST -H 'Content-Type: application/json' "
            f"--data-binary @/config/{name}.schema.json '{c}/schemas?override=true'",
            f"curl -fsS -X POST -H 'Content-Type: application/json' "
            f"--data-binary @/config/{name}.table.json '{c}/tables' || "
            f"curl -fsS -X PUT -H 'Content-Type: application/json' "
            f"--data-binary @/config/{name}.table.json '{c}/tables/{name}'",
        ]
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
                    "command": ["sh", "-c", "\n".join(lines) + "\n"],
                    "volumeMounts": [{"name": "config", "mountPath": "/config"}],
                    "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
                }],
                "volumes": [{"name": "config", "configMap": {"name": configmap}}],
            }},
        },
    }
