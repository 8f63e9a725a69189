"""Commands that run one part of the pipeline in the foreground until stopped.

`sluice up` starts each of these as its own supervised process (`eventing.stack`), with
explicit flags; run by hand they default to the local stack of `--state-dir`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eventing.cli.edge import (
    LOG_LEVELS,
    CommandFailed,
    Edge,
    add_command,
    settings_flag,
    tracing_flags,
)

GATEWAY = "eventing.ingest.gateway:GatewaySettings"
REALTIME = "eventing.tables.realtime:RealtimeSettings"
LAKE_SINK = "eventing.tables.lake:LakeSinkConfig"
MAINTENANCE = "eventing.tables.maintenance:MaintenancePolicy"


def registry(edge: Edge) -> int:
    from eventing.registry.server import run

    a, s = edge.args, edge.settings
    run(a.host or s.host, a.port if a.port is not None else s.ports.registry,
        a.bootstrap or s.bootstrap, a.topic or s.schemas_topic)
    return 0


def run(edge: Edge) -> int:
    from eventing.delivery.runner import RunSettings
    from eventing.delivery.runner import run as run_functions

    a, s = edge.args, edge.settings
    topology = edge.topology()
    stop = edge.foreground("sluice-" + "-".join(a.function) if a.function
                           else "sluice-functions")
    settings = RunSettings(bootstrap=a.bootstrap or s.bootstrap,
                           registry_url=a.registry or s.registry_url)
    metrics = (a.metrics_host or s.host, a.metrics_port) if a.metrics_port else None
    stats = run_functions(topology, a.function or [], settings, stop, metrics)
    for name, st in stats.items():
        print(f"{name}: {st}")
    return 0


def gateway(edge: Edge) -> int:
    from eventing.ingest.gateway import GatewaySettings, serve

    a, s = edge.args, edge.settings
    topology = edge.topology()
    token = edge.gateway_token()
    if a.token_file:
        try:
            token = Path(a.token_file).read_text().strip() or None
        except OSError as exc:
            raise CommandFailed(f"cannot read the token file: {exc}") from None
    settings = GatewaySettings.from_topology(
        topology,
        bootstrap=a.bootstrap or s.bootstrap,
        registry_url=a.registry or s.registry_url,
        host=a.host or s.host,
        port=a.port if a.port is not None else s.ports.gateway,
        token=token,
        **edge.given("message_timeout_ms", "log_level"),
    )
    edge.tracing("sluice-gateway")
    serve(settings)
    return 0


def tracestore(edge: Edge) -> int:
    """Index the traces topic into SQLite until SIGINT/SIGTERM."""
    from eventing.telemetry import traces

    a, s = edge.args, edge.settings
    stop = edge.foreground("sluice-tracestore")
    store = traces.TraceStore(Path(a.db) if a.db else traces.db_path(s.state_dir))
    ingestor = traces.TraceIngestor(store, a.bootstrap or s.bootstrap, a.topic or s.traces_topic)
    try:
        ingestor.run(stop)
    finally:
        store.close()
    print(f"indexed {ingestor.spans} spans from {ingestor.records} records")
    return 0


def sink_lake(edge: Edge) -> int:
    """A topic into an Iceberg table until SIGINT/SIGTERM."""
    from dataclasses import replace

    from eventing.serde import AvroSerde
    from eventing.tables.lake import LakeSink, LakeSinkConfig, serve_metrics
    from eventing.tables.lakehouse import LakeConfig, table_name_for_topic
    from eventing.tables.maintenance import MaintenancePolicy

    a, s = edge.args, edge.settings
    stop = edge.foreground("sluice-lake-sink")
    lake = LakeConfig.from_settings(s, **edge.given("namespace"))
    if a.catalog_uri or a.s3_endpoint:
        lake = replace(lake, catalog_uri=a.catalog_uri or lake.catalog_uri,
                       s3_endpoint=a.s3_endpoint or lake.s3_endpoint)
    policy = None if a.no_maintenance else MaintenancePolicy(**edge.given(
        "keep_snapshots", "orphan_age_s", every_commits="maintenance_every_commits",
        every_s="maintenance_every_s", min_files="compact_min_files",
        max_snapshot_age_s="snapshot_max_age_s"))
    config = LakeSinkConfig(topic=a.topic, table=a.table or table_name_for_topic(a.topic),
                            maintenance=policy,
                            **edge.given("batch_size", "interval_ms", "time_field", "group_id"))
    sink = LakeSink(config, lake, a.bootstrap or s.bootstrap,
                    AvroSerde(a.registry or s.registry_url))
    if a.metrics_port:
        serve_metrics(sink, a.metrics_host or s.host, a.metrics_port)
    stats = sink.run(stop, max_rows=a.max_rows)
    print(json.dumps(stats.as_dict()))
    return 0


def realtime(edge: Edge) -> int:
    """The real-time table server (foreground)."""
    from eventing.tables.lakehouse import LakeConfig
    from eventing.tables.realtime import RealtimeSettings, parse_duration, serve

    edge.tracing("sluice-realtime")
    a, s = edge.args, edge.settings
    retention = {}
    if a.retention is not None:
        try:
            retention["retention_s"] = parse_duration(a.retention)
        except ValueError as exc:
            raise CommandFailed(str(exc)) from None
    serve(RealtimeSettings(
        bootstrap=a.bootstrap or s.bootstrap, registry_url=a.registry or s.registry_url,
        host=a.host or s.host, port=a.port if a.port is not None else s.ports.realtime,
        lake=None if a.no_lake else LakeConfig.from_settings(s),
        **retention, **edge.given("topic", "time_field", "log_level")))
    return 0


def _kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    p.add_argument("--registry", help="schema registry URL (default: the local stack's)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "registry", registry,
                    help="run the embedded schema registry (foreground)")
    p.add_argument("--host", help="listen host (default: the local stack's)")
    p.add_argument("--port", type=int, help="port (default: the local stack's registry port)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    p.add_argument("--topic", help="the registry's log topic (default: the local stack's, "
                   "_schemas)")

    p = add_command(sub, "run", run, help="run the topology's functions (foreground)")
    p.add_argument("--topology", help="topology file (default functions/topology.yaml)")
    p.add_argument("--function", action="append", help="only this function (repeatable)")
    _kafka_flags(p)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", help="metrics listen host (default: the local stack's)")
    tracing_flags(p, "sluice-<function>")

    p = add_command(sub, "gateway", gateway,
                    help="run the CloudEvents ingest gateway (foreground)")
    p.add_argument("--host", help="listen host (default: the local stack's)")
    p.add_argument("--port", type=int, help="port (default: the local stack's gateway port)")
    _kafka_flags(p)
    p.add_argument("--topology", help="topology file (default functions/topology.yaml)")
    p.add_argument("--token-file", help="require this bearer token (default: env "
                   "SLUICE_GATEWAY_TOKEN; none means no authentication)")
    settings_flag(p, "--message-timeout-ms", type=int,
                  default_of=f"{GATEWAY}.message_timeout_ms",
                  help="answer 503 when the broker has not acknowledged within this time")
    settings_flag(p, "--log-level", choices=LOG_LEVELS, default_of=f"{GATEWAY}.log_level",
                  help="log level")
    tracing_flags(p, "sluice-gateway")

    p = add_command(sub, "tracestore", tracestore, help="index the traces topic into the "
                    "local trace store (foreground; `sluice up` runs it)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    p.add_argument("--topic", help="traces topic (default: the local stack's, sluice.traces)")
    p.add_argument("--db", help="trace store file (default: the state folder's)")

    sink = add_command(sub, "sink", _no_sink, help="run a table sink (foreground)")
    sinks = sink.add_subparsers(dest="sink", required=True)
    p = add_command(sinks, "lake", sink_lake,
                    help="append a topic to an Iceberg table, exactly once")
    tracing_flags(p, "sluice-lake-sink")
    p.add_argument("--topic", required=True)
    p.add_argument("--table", help="table name (default: the topic, dots -> underscores)")
    settings_flag(p, "--namespace", default_of="eventing.tables.lakehouse:LakeConfig.namespace",
                  help="Iceberg namespace of the table")
    settings_flag(p, "--batch-size", type=int, default_of=f"{LAKE_SINK}.batch_size",
                  help="rows per commit (max)")
    settings_flag(p, "--interval-ms", type=int, default_of=f"{LAKE_SINK}.interval_ms",
                  help="commit a non-empty batch at least this often")
    settings_flag(p, "--time-field", default_of=f"{LAKE_SINK}.time_field",
                  help="epoch-ms field: timestamptz column, partitioned by day")
    p.add_argument("--group-id", help="consumer group (default sluice-lake-<table>)")
    _kafka_flags(p)
    p.add_argument("--catalog-uri", help="Iceberg REST catalog (default: the local stack's)")
    p.add_argument("--s3-endpoint", help="S3 endpoint (default: the local stack's)")
    p.add_argument("--no-maintenance", action="store_true")
    settings_flag(p, "--maintenance-every-commits", type=int,
                  default_of=f"{MAINTENANCE}.every_commits",
                  help="run maintenance after this many commits ...")
    settings_flag(p, "--maintenance-every-s", type=float, default_of=f"{MAINTENANCE}.every_s",
                  help="... or this many seconds, whichever comes first")
    settings_flag(p, "--compact-min-files", type=int, default_of=f"{MAINTENANCE}.min_files",
                  help="compact a partition once it has this many small files")
    settings_flag(p, "--keep-snapshots", type=int, default_of=f"{MAINTENANCE}.keep_snapshots",
                  help="always keep the newest N snapshots")
    settings_flag(p, "--snapshot-max-age-s", type=float,
                  default_of=f"{MAINTENANCE}.max_snapshot_age_s",
                  help="and every snapshot younger than this")
    settings_flag(p, "--orphan-age-s", type=float, default_of=f"{MAINTENANCE}.orphan_age_s",
                  help="delete unreferenced files only when older than this")
    p.add_argument("--max-rows", type=int, help="stop after writing this many rows")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", help="metrics listen host (default: the local stack's)")

    add_command(sub, "supervise", supervise, help="restart the local stack's parts when "
                "they exit, with backoff (foreground; `sluice up` runs it)")

    p = add_command(sub, "realtime", realtime,
                    help="run the real-time table server (foreground)")
    tracing_flags(p, "sluice-realtime")
    p.add_argument("--host", help="listen host (default: the local stack's)")
    p.add_argument("--port", type=int, help="port (default: the local stack's realtime port)")
    _kafka_flags(p)
    settings_flag(p, "--topic", default_of=f"{REALTIME}.topic", help="topic to serve")
    settings_flag(p, "--retention", default_of=f"{REALTIME}.retention_s",
                  help="keep rows this recent by the time field: 1h, 30m, or seconds")
    settings_flag(p, "--time-field", default_of=f"{REALTIME}.time_field",
                  help="epoch-ms or timestamp field")
    p.add_argument("--no-lake", action="store_true", help="do not ATTACH the Iceberg catalog")
    settings_flag(p, "--log-level", choices=LOG_LEVELS, default_of=f"{REALTIME}.log_level",
                  help="log level")


def supervise(edge: Edge) -> int:
    """The stack's supervisor (foreground): restart parts that exit (`sluice up` runs it)."""
    from eventing.stack.supervisor import Stack
    from eventing.stack.watchdog import serve_metrics

    stop = edge.foreground("sluice-supervisor")
    s = edge.settings
    sup = Stack(s).supervise()
    serve_metrics(sup, s.host, s.ports.supervisor)
    sup.run(stop)
    return 0


def _no_sink(edge: Edge) -> int:  # argparse requires a sink kind; never reached
    raise CommandFailed("name a sink: `sluice sink lake ...`")
