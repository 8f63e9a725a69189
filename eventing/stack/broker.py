"""Tansu, the Kafka-protocol broker, on `memory://` (tests) or `s3://` (durable)."""

from __future__ import annotations

from eventing.stack import binaries
from eventing.stack.health import kafka_probe
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "broker"


def storage_url(settings: StackSettings) -> str:
    if settings.broker_storage == "memory":
        return "memory://tansu/"
    return f"s3://{settings.broker_bucket}/"


def spec(settings: StackSettings) -> PartSpec:
    listener = f"tcp://{settings.host}:{settings.ports.broker}"
    env = binaries.base_env()
    if settings.broker_storage == "s3":
        creds = settings.credentials
        env |= {
            "AWS_ENDPOINT": settings.s3_endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": creds.access_key,
            "AWS_SECRET_ACCESS_KEY": creds.secret_key,
            "AWS_DEFAULT_REGION": settings.region,
        }
    data_dir = settings.state_dir / "data" / NAME
    data_dir.mkdir(parents=True, exist_ok=True)

    def healthy() -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": settings.bootstrap, "log_level": 0})
        admin.list_topics(timeout=1.0)  # raises until the broker answers metadata
        return True

    return PartSpec(
        name=NAME,
        argv=[
            binaries.tansu(), "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", storage_url(settings),
        ],
        env=env,
        cwd=data_dir,
        endpoint=f"kafka {settings.bootstrap} ({settings.broker_storage})",
        health=healthy,
        ports=[settings.ports.broker],
        liveness=kafka_probe(settings.host, settings.ports.broker),
    )
