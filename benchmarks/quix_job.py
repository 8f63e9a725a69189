"""The peer: the same job written as a Quix Streams 3.28.1 application.

Runs in `benchmarks/.venv-quix` (see setup_quix.sh; Quix needs confluent-kafka < 2.13).
Written the way its docs show: Avro (de)serializers bound to the schema registry, so
values are in the Confluent wire format like everyone else's, a StreamingDataFrame that
filters and updates, `to_topic`, and Quix's default checkpointing (commit every 5 s,
producer flushed before each commit). The Tansu-quirk client settings come from
`eventing.kafka`, as for every other contender.

The clock starts at the first record the dataframe sees and stops when `app.run()`
returns: the app is stopped after the last input, and its final checkpoint flushes the
producer (every output acknowledged) before it returns.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "contenders"))

from common import (  # noqa: E402
    CONVERTED_SCHEMA,
    EUR_PER_UNIT,
    SCHEMAS,
    Clock,
    emit,
    job_args,
    schema,
)
from quixstreams import Application  # noqa: E402
from quixstreams.models.serializers.avro import AvroDeserializer, AvroSerializer  # noqa: E402
from quixstreams.models.serializers.schema_registry import (  # noqa: E402
    SchemaRegistryClientConfig,
    SchemaRegistrySerializationConfig,
)

from eventing.kafka import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS  # noqa: E402

# Quix sets these itself (it owns commits and the offset reset); the rest are the quirks.
_QUIX_OWNS = {"enable.auto.commit", "auto.offset.reset", "enable.partition.eof"}


def main() -> None:
    args = job_args(__doc__.splitlines()[0]).parse_args()
    registry = SchemaRegistryClientConfig(url=args.registry)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        consumer_extra_config={k: v for k, v in CONSUMER_DEFAULTS.items() if k not in _QUIX_OWNS},
        producer_extra_config=dict(PRODUCER_DEFAULTS),
        state_dir=tempfile.mkdtemp(prefix="quix-state-"),
        use_changelog_topics=False,
        auto_create_topics=False,
        loglevel="WARNING",
    )
    src = app.topic(args.input, key_deserializer="bytes", value_deserializer=AvroDeserializer(
        schema(SCHEMAS / "payments.raw.avsc"), schema_registry_client_config=registry))
    dst = app.topic(args.output, key_serializer="bytes", value_serializer=AvroSerializer(
        schema(CONVERTED_SCHEMA), schema_registry_client_config=registry,
        schema_registry_serialization_config=SchemaRegistrySerializationConfig(
            auto_register_schemas=False, use_latest_version=True)))

    clock = Clock()
    counts = {"seen": 0, "out": 0}

    def count(_payment: dict) -> None:
        if not counts["seen"]:
            clock.start()
        counts["seen"] += 1
        if counts["seen"] >= args.events:
            app.stop()  # finishes this record, then the final checkpoint flushes

    def convert(p: dict) -> None:
        p["amount_eur"] = round(p["amount"] * EUR_PER_UNIT[p["currency"]], 2)
        counts["out"] += 1

    sdf = app.dataframe(src)
    sdf = sdf.update(count)
    sdf = sdf.filter(lambda p: p["amount"] > 0)
    sdf = sdf.update(convert)
    sdf.to_topic(dst)
    # Not run(timeout=...): with a stop condition Quix also collects every output.
    guard = threading.Timer(args.timeout, app.stop)
    guard.daemon = True
    guard.start()
    app.run()
    clock.stop()
    guard.cancel()
    emit(clock.result(counts["seen"], outputs=counts["out"]))


if __name__ == "__main__":
    main()
