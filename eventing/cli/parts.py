"""Commands that run one part of the pipeline in the foreground until stopped.

`sluice up` starts each of these as its own supervised process (`eventing.stack`), with
explicit flags; run by hand they default to the local stack of `--state-dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from eventing.cli.edge import (
    LOG_FORMAT,
    LOG_LEVELS,
    CommandFailed,
    Edge,
    add_command,
    duration_arg,
    settings_flag,
    size_arg,
    tracing_flags,
)

GATEWAY = "eventing.ingest.gateway:GatewaySettings"
REALTIME = "eventing.tables.realtime:RealtimeSettings"
LAKE_SINK = "eventing.tables.lake:LakeSinkConfig"
MAINTENANCE = "eventing.tables.maintenance:MaintenancePolicy"
RETENTION = "eventing.telemetry.traces:RetentionPolicy"
BROKER_RETENTION = "eventing.stack.retention:RetentionSettings"
ROLLOVER = "eventing.stack.rollover:RolloverSettings"


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
                           registry_url=a.registry or s.registry_url,
                           broker_storage=s.broker_storage)
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
    token_file = a.token_file or s.gateway_token_file  # flag, then SLUICE_GATEWAY_TOKEN_FILE
    if token_file:
        try:
            token = Path(token_file).read_text().strip() or None
        except OSError as exc:
            raise CommandFailed(f"cannot read the token file: {exc}") from None
        if token is None:  # refuse to start rather than run without the token asked for
            raise CommandFailed(f"the token file {token_file} is empty: put the bearer "
                                "token in it, or leave --token-file out to run without one")
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
    """Receive OTLP traces into SQLite, keeping it within its bounds, until SIGINT/SIGTERM."""
    from eventing.telemetry import traces

    a, s = edge.args, edge.settings
    stop = edge.foreground("sluice-tracestore")
    try:
        policy = traces.RetentionPolicy(**edge.given(max_age_s="retention",
                                                     max_bytes="max_size", every_s="every"))
    except ValueError as exc:
        raise CommandFailed(str(exc)) from None
    receiver_settings = traces.ReceiverSettings(
        host=a.host or s.host, port=a.port if a.port is not None else s.ports.tracestore)
    store = traces.TraceStore(Path(a.db) if a.db else traces.db_path(s.state_dir),
                              policy=policy,
                              ref_attributes=traces.ref_attributes(edge.trace_ids().values()))
    try:
        receiver = traces.TraceReceiver(store, policy, receiver_settings)
    except OSError as exc:
        store.close()
        raise CommandFailed(f"cannot listen on {receiver_settings.host}:"
                            f"{receiver_settings.port}: {exc}") from None
    try:
        receiver.run(stop)
    finally:
        store.close()
    print(f"stored {receiver.spans} spans from {receiver.requests} requests; "
          f"{receiver.rejected} rejected; {store.deleted} traces deleted by retention")
    return 0


def retention(edge: Edge) -> int:
    """Bound the broker until SIGINT/SIGTERM (or once): on s3 storage trim its topics
    (eventing.stack.retention); on memory storage roll it over, drained, when its RSS is
    above the cap (eventing.stack.rollover). `--rollover-now` rolls over once and exits."""
    from eventing.stack import retention as ret
    from eventing.stack import rollover as roll

    a, s = edge.args, edge.settings
    topology = edge.topology()
    if a.rollover_now or s.broker_storage == "memory":
        settings_r = roll.RolloverSettings(**edge.given(
            max_rss="max_broker_rss", check_s="rss_check", drain_timeout_s="drain_timeout"),
            hold_at=edge.rollover_hold_at())
        token = _gateway_token(edge)
        if a.rollover_now:
            logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
            logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request
            # One that was interrupted (its saved records in the state folder) is
            # finished instead: the outcome then names it (`finished`).
            outcome = roll.build(s, topology, settings_r, token).run("asked for (--rollover-now)")
            print(json.dumps({k: v for k, v in vars(outcome).items()}, default=str))
            if not outcome.rolled:
                raise CommandFailed(f"no rollover: {outcome.reason}", 1)
            return 0
        stop = edge.foreground("sluice-retention")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        roll.build(s, topology, settings_r, token).loop(stop)
        return 0
    settings = ret.RetentionSettings(**edge.given(
        interval_s="interval", min_age_s="min_age", orphan_age_s="orphan_age"))
    if a.once:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        done = ret.build(s, topology, settings).run_once()
        print(f"trimmed {done.total} objects: " + ", ".join(
            f"{t} {n}" for t, n in sorted(done.objects.items())))
        return 0
    stop = edge.foreground("sluice-retention")
    loop = ret.build(s, topology, settings)
    loop.run(stop)
    print(f"{loop.passes} passes, {loop.trimmed.total} objects trimmed")
    return 0


def _gateway_token(edge: Edge) -> str | None:
    """The token the gateway requires (env, else the stack's token file): the pause call
    of a rollover must pass it like any client."""
    token = edge.gateway_token()
    token_file = edge.settings.gateway_token_file
    if token is None and token_file:
        try:
            token = Path(token_file).read_text().strip() or None
        except OSError as exc:
            raise CommandFailed(f"cannot read the token file: {exc}") from None
    return token


def sink_lake(edge: Edge) -> int:
    """Topics into Iceberg tables until SIGINT/SIGTERM: `--topic` alone, else every table
    the topology declares, one consumer thread each in this one process (a process per
    table would cost an interpreter and a pyiceberg import each, on 2 cores)."""
    import threading
    from dataclasses import replace

    from eventing.tables.arrow_memory import use_returning_pool

    use_returning_pool()  # before pyarrow loads: the default pool kept freed memory
    from eventing.kafka import client_tuning
    from eventing.serde import AvroSerde
    from eventing.tables.lake import LakeSink, LakeSinkConfig, serve_metrics
    from eventing.tables.lakehouse import table_name_for_topic
    from eventing.tables.maintenance import MaintenancePolicy

    a, s = edge.args, edge.settings
    if a.topic:
        tables = [{"topic": a.topic, "table": a.table or table_name_for_topic(a.topic)}]
    else:
        if a.table:
            raise CommandFailed("--table needs --topic (without them the topology's "
                                "tables are served)")
        declared = edge.topology().tables.values()
        if not declared:
            raise CommandFailed(f"{edge.topology_path} declares no tables: add a `tables:` "
                                "section, or give --topic")
        tables = [{"topic": t.topic, "table": t.name, "time_field": t.time_field,
                   "partition_by": t.partition_by, "dedupe_key": t.dedupe_key,
                   "dedupe_window_ms": int(t.dedupe_window_s * 1000)} for t in declared]
    stop = edge.foreground("sluice-lake-sink")
    lake = edge.lake_config(**edge.given("namespace"))
    if a.catalog_uri or a.s3_endpoint:
        lake = replace(lake, catalog_uri=a.catalog_uri or lake.catalog_uri,
                       s3_endpoint=a.s3_endpoint or lake.s3_endpoint)
    policy = None if a.no_maintenance else MaintenancePolicy(**edge.given(
        "keep_snapshots", "orphan_age_s", every_commits="maintenance_every_commits",
        every_s="maintenance_every_s", min_files="compact_min_files",
        max_snapshot_age_s="snapshot_max_age_s"))
    serde = AvroSerde(a.registry or s.registry_url)
    tuned = client_tuning(s.broker_storage).consumer
    sinks = [LakeSink(LakeSinkConfig(
        maintenance=policy, consumer_overrides=tuned, **(table | edge.given(
        "batch_size", "interval_ms", "time_field", "group_id"))), lake,
        a.bootstrap or s.bootstrap, serde) for table in tables]
    if a.metrics_port:
        serve_metrics(sinks, a.metrics_host or s.host, a.metrics_port)
    failed: list[str] = []

    def run_one(sink: LakeSink) -> None:
        try:
            sink.run(stop, max_rows=a.max_rows)
        except Exception as exc:
            failed.append(f"{sink.identifier}: {exc!r}")
            stop.set()  # one table down stops the part, so `sluice status` shows it
            raise

    threads = [threading.Thread(target=run_one, args=(sink,), name=f"lake-{sink.identifier}")
               for sink in sinks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sink in sinks:
        print(json.dumps({"table": sink.identifier, **sink.stats.as_dict()}))
    if failed:
        raise CommandFailed("lake sink failed: " + "; ".join(failed), 1)
    return 0


def realtime(edge: Edge) -> int:
    """The real-time table server (foreground): `--topic` alone, else every real-time
    table the topology declares, all in one process and one DuckDB database."""
    from dataclasses import replace

    from eventing.kafka import client_tuning
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
    base = RealtimeSettings(
        bootstrap=a.bootstrap or s.bootstrap, registry_url=a.registry or s.registry_url,
        host=a.host or s.host, port=a.port if a.port is not None else s.ports.realtime,
        lake=None if a.no_lake else LakeConfig.from_settings(s), token=edge.query_token(),
        consumer_overrides=client_tuning(s.broker_storage).consumer, **retention,
        **edge.given("topic", "time_field", "log_level"))
    if a.topic:
        serve(base)
        return 0
    declared = edge.topology().realtime_tables()
    serve([replace(base, topic=t.topic, table=t.name, time_field=t.time_field,
                   retention_s=retention.get("retention_s", t.retention_s or 0.0),
                   dedupe_key=t.dedupe_key, dedupe_window_s=t.dedupe_window_s)
           for t in declared] or [base])
    return 0


def _kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    p.add_argument("--registry", help="schema registry URL (default: the local stack's)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "registry", registry,
                    help="run the embedded schema registry (foreground)",
                    example="sluice registry --port 8081")
    p.add_argument("--host", help="listen host (default: the local stack's)")
    p.add_argument("--port", type=int, help="port (default: the local stack's registry port)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    p.add_argument("--topic", help="the registry's log topic (default: the local stack's, "
                   "_schemas)")

    p = add_command(sub, "run", run, help="run the topology's functions (foreground)",
                    example="sluice run --topology functions/topology.yaml --function enrich")
    p.add_argument("--topology", help="topology file (default functions/topology.yaml)")
    p.add_argument("--function", action="append", help="only this function (repeatable)")
    _kafka_flags(p)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", help="metrics listen host (default: the local stack's)")
    tracing_flags(p, "sluice-<function>")

    p = add_command(sub, "gateway", gateway,
                    help="run the CloudEvents ingest gateway (foreground)",
                    example="sluice gateway --port 8080 --token-file ~/.sluice-token")
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

    p = add_command(sub, "tracestore", tracestore, help="receive OTLP/HTTP traces into the "
                    "local trace store, bounded by age and size (foreground; `sluice up` "
                    "runs it)",
                    example="sluice tracestore --db /tmp/traces.db --max-size 200MB")
    p.add_argument("--host", help="listen host (default: the local stack's)")
    p.add_argument("--port", type=int, help="OTLP/HTTP port (default: the local stack's "
                   "trace store port)")
    p.add_argument("--db", help="trace store file (default: the state folder's)")
    settings_flag(p, "--retention", type=duration_arg, metavar="AGE",
                  default_of=f"{RETENTION}.max_age_s",
                  help="delete traces older than this (1h, 30m, 2d; seconds)")
    settings_flag(p, "--max-size", type=size_arg, metavar="SIZE",
                  default_of=f"{RETENTION}.max_bytes",
                  help="delete the oldest traces above this size (1GiB, 200MB; bytes)")
    settings_flag(p, "--every", type=duration_arg, metavar="AGE",
                  default_of=f"{RETENTION}.every_s", help="how often retention runs (seconds)")
    p.add_argument("--topology", help="topology whose `traceIds` are indexed "
                   "(default functions/topology.yaml)")

    p = add_command(sub, "retention", retention, help="bound the broker: on s3 storage trim "
                    "batches every reader is done with and superseded changelog batches; on "
                    "memory storage roll it over (drained) above an RSS cap (foreground; "
                    "`sluice up` runs it)",
                    example="sluice retention --once\nsluice retention --min-age 10m\n"
                    "sluice retention --rollover-now")
    p.add_argument("--topology", help="topology whose readers hold retention "
                   "(default functions/topology.yaml)")
    p.add_argument("--once", action="store_true", help="one pass, print what it trimmed")
    settings_flag(p, "--interval", type=duration_arg, metavar="AGE",
                  default_of=f"{BROKER_RETENTION}.interval_s", help="time between passes")
    settings_flag(p, "--min-age", type=duration_arg, metavar="AGE",
                  default_of=f"{BROKER_RETENTION}.min_age_s",
                  help="keep at least this much of every topic (replay, tail reach back)")
    settings_flag(p, "--orphan-age", type=duration_arg, metavar="AGE",
                  default_of=f"{BROKER_RETENTION}.orphan_age_s",
                  help="trim topics no declared group reads (dead letters) past this age "
                  "(default: keep them)")
    p.add_argument("--token-file", help="the gateway's bearer token, for the rollover's "
                   "pause call (default: env SLUICE_GATEWAY_TOKEN)")
    p.add_argument("--rollover-now", action="store_true",
                   help="memory broker: one drained rollover now (pause intake, drain, "
                   "save, restart, restore, resume), print its outcome")
    settings_flag(p, "--max-broker-rss", type=size_arg, metavar="SIZE",
                  default_of=f"{ROLLOVER}.max_rss",
                  help="memory broker: roll over when its RSS is above this (512MiB)")
    settings_flag(p, "--rss-check", type=duration_arg, metavar="AGE",
                  default_of=f"{ROLLOVER}.check_s", help="how often the RSS is checked")
    settings_flag(p, "--drain-timeout", type=duration_arg, metavar="AGE",
                  default_of=f"{ROLLOVER}.drain_timeout_s",
                  help="give up (resume, no rollover) when readers are not at the end by then")

    sink = add_command(sub, "sink", _no_sink, help="run a table sink (foreground)",
                    example="sluice sink lake --topic payments.scored")
    sinks = sink.add_subparsers(dest="sink", required=True)
    p = add_command(sinks, "lake", sink_lake,
                    help="append a topic to an Iceberg table, exactly once",
                    example="sluice sink lake --topic payments.scored --batch-size 5000")
    tracing_flags(p, "sluice-lake-sink")
    p.add_argument("--topic", help="one topic (default: every table the topology declares)")
    p.add_argument("--table", help="with --topic: table name (default: the topic, dots -> "
                   "underscores)")
    p.add_argument("--topology", help="topology file whose tables to serve "
                   "(default functions/topology.yaml)")
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
                "they exit, with backoff (foreground; `sluice up` runs it)",
                example="sluice supervise --state-dir .state")

    p = add_command(sub, "realtime", realtime,
                    help="run the real-time table server (foreground)",
                    example="sluice realtime --topic payments.scored --retention 1h")
    tracing_flags(p, "sluice-realtime")
    p.add_argument("--host", help="listen host (default: the local stack's)")
    p.add_argument("--port", type=int, help="port (default: the local stack's realtime port)")
    _kafka_flags(p)
    p.add_argument("--topic", help="one topic to serve (default: every real-time table "
                   "the topology declares)")
    p.add_argument("--topology", help="topology file whose tables to serve "
                   "(default functions/topology.yaml)")
    settings_flag(p, "--retention", default_of=f"{REALTIME}.retention_s",
                  help="keep rows this recent by the time field: 1h, 30m, or seconds")
    settings_flag(p, "--time-field", default_of=f"{REALTIME}.time_field",
                  help="epoch-ms or timestamp field")
    p.add_argument("--no-lake", action="store_true", help="do not ATTACH the Iceberg catalog")
    settings_flag(p, "--log-level", choices=LOG_LEVELS, default_of=f"{REALTIME}.log_level",
                  help="log level")


def supervise(edge: Edge) -> int:
    """The stack's supervisor (foreground): restart parts that exit (`sluice up` runs it)."""
    from eventing.stack import objectstore
    from eventing.stack.supervisor import Stack
    from eventing.stack.watchdog import serve_metrics

    stop = edge.foreground("sluice-supervisor")
    s = edge.settings
    sup = Stack(s).supervise()
    serve_metrics(sup, s.host, s.ports.supervisor)
    if (s.state_dir / "data" / objectstore.NAME).is_dir():
        # SeaweedFS never deletes its filer's metadata log, and `weed mini` switches its
        # master's automatic vacuum off: the stack's keeper purges and compacts.
        objectstore.ObjectStoreJanitor(s, stop).start()
    sup.run(stop)
    return 0


def _no_sink(edge: Edge) -> int:  # argparse requires a sink kind; never reached
    raise CommandFailed("name a sink: `sluice sink lake ...`")
