"""Sinks: consumers that write topics into tables, idempotent by Kafka offsets.

- `lake` — a topic into an Iceberg table (micro-batches, offsets in snapshot summaries).
- `maintenance` — compaction, snapshot expiry and orphan deletion for those tables.
"""
