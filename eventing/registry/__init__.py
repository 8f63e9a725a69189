"""Embedded Confluent-compatible schema registry (Avro only).

Works unchanged with `confluent_kafka.schema_registry.SchemaRegistryClient` and its Avro
serde, so no external registry server is needed. `compat` holds the Avro resolution rules,
`schemas` parsing and canonical forms, `store` the durable log and index, `app` the HTTP
API, `server` the process entry point.
"""

from .app import create_app
from .errors import RegistryError
from .server import open_store, run
from .store import KafkaLog, MemoryLog, SchemaStore

__all__ = ["KafkaLog", "MemoryLog", "RegistryError", "SchemaStore", "create_app", "open_store",
           "run"]
