"""Kafka client settings shared by every Sluice component.

The defaults here exist because of measured broker behaviour (see
`../shared/notes/local-parts.md`), not taste:

- `fetch.wait.max.ms=10`: Tansu answers a waiting fetch only when the wait expires, so
  the default 500 ms wait becomes end-to-end latency.
- `fetch.queue.backoff.ms=10`: Tansu ignores `max.partition.fetch.bytes` and returns
  ~5 MB per partition, overfilling librdkafka's queue; the default 1 s backoff starves
  fast consumers.
- `session.timeout.ms=6000`: a group join is held for half the session timeout.

They are harmless on Apache Kafka, so one configuration serves both. Every broker
address comes from the caller: nothing here knows where the broker is.
"""

from __future__ import annotations

from typing import Any

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 10,
    "fetch.queue.backoff.ms": 10,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "enable.partition.eof": False,
}

PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    "enable.idempotence": False,
}


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Return a confluent-kafka consumer config for `bootstrap` with Sluice's defaults."""
    return {"bootstrap.servers": bootstrap, "group.id": group_id, **CONSUMER_DEFAULTS, **overrides}


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Return a confluent-kafka producer config for `bootstrap` with Sluice's defaults."""
    return {"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS, **overrides}


def admin_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Return a confluent-kafka AdminClient config."""
    return {"bootstrap.servers": bootstrap, **overrides}


def ensure_topics(
    bootstrap: str,
    topics: dict[str, int],
    *,
    config: dict[str, dict[str, str]] | None = None,
    timeout: float = 10.0,
) -> None:
    """Create each topic (name -> partitions) that does not exist yet.

    Idempotent: an existing topic is left as it is (Tansu cannot add partitions).
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(admin_config(bootstrap))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(name, num_partitions=parts, replication_factor=1,
                 config=(config or {}).get(name, {}))
        for name, parts in topics.items()
        if name not in existing
    ]
    if not wanted:
        return
    for name, fut in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {name!r}: {exc}") from exc
