"""Register the Avro schemas in `schemas/` with the registry.

File name = topic (TopicNameStrategy): `payments.raw.avsc` registers subject
`payments.raw-value`. Registration goes through `SchemaRegistryClient`, so the same code
works against the embedded registry and against Confluent, Karapace or Apicurio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from eventing.serde import subject_for


class IncompatibleSchema(RuntimeError):
    """A schema file cannot be registered; the message carries the registry's reason."""


@dataclass(frozen=True)
class Registered:
    subject: str
    schema_id: int
    path: Path


def register_all(registry_url: str, schemas_dir: Path) -> list[Registered]:
    """Register every `*.avsc` under `schemas_dir`; stop at the first refusal."""
    if not schemas_dir.is_dir():
        raise IncompatibleSchema(f"no schemas folder at {schemas_dir}: put the pipeline's "
                                 "<topic>.avsc files there, or point the topology's "
                                 "`schemas:` key at them")
    client = SchemaRegistryClient({"url": registry_url})
    done: list[Registered] = []
    for path in sorted(schemas_dir.glob("*.avsc")):
        subject = subject_for(path.name.removesuffix(".avsc"))  # the file name is the topic
        schema = Schema(path.read_text(), schema_type="AVRO")
        try:
            schema_id = client.register_schema(subject, schema)
        except SchemaRegistryError as exc:
            raise IncompatibleSchema(
                f"{path}: subject {subject!r} refused by the registry "
                f"(error {exc.error_code}): {exc.error_message}"
            ) from exc
        done.append(Registered(subject, schema_id, path))
    return done
