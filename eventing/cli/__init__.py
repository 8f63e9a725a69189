"""`sluice`: argument parsing and printing only; every command calls into the modules.

This is the edge where configuration is read (flags, then `SLUICE_*` environment
variables, then defaults) and turned into typed settings passed down.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from eventing.stack.settings import StackSettings, load_settings


def _settings(args: argparse.Namespace) -> StackSettings:
    settings = load_settings(
        state_dir=args.state_dir or os.environ.get("SLUICE_STATE_DIR"),
        port_offset=int(args.port_offset if args.port_offset is not None
                        else os.environ.get("SLUICE_PORT_OFFSET", "0")),
        broker_storage=getattr(args, "storage", None) or os.environ.get("SLUICE_BROKER_STORAGE"),
        pipeline=not getattr(args, "no_pipeline", False),
        generator=not getattr(args, "no_generator", False),
        generator_rate=getattr(args, "rate", None) or 20.0,
        gateway_token_file=getattr(args, "token_file", None)
        or os.environ.get("SLUICE_GATEWAY_TOKEN_FILE"),
        trace_sampling=_sampling(getattr(args, "trace_sampling", None)),
    )
    return settings


def _sampling(value: float | None) -> float:
    return 1.0 if value is None else value


def _add_tracing_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--otlp-endpoint", help="export spans over OTLP/HTTP to this collector "
                   "(e.g. http://127.0.0.1:4318; default: no spans, `sluice up` sets it)")
    p.add_argument("--service-name", help=f"service.name of the spans (default {what})")
    p.add_argument("--trace-sampling", type=float, default=None,
                   help="share of new traces recorded, 0..1 (default 1; a sampled or "
                        "unsampled incoming traceparent is obeyed)")


def _configure_tracing(args: argparse.Namespace, service_name: str) -> None:
    """Tracing settings from the flags, made this process's (eventing.telemetry.tracing)."""
    from eventing.telemetry import tracing

    if args.otlp_endpoint:
        tracing.configure(tracing.TracingSettings(
            endpoint=args.otlp_endpoint, service_name=args.service_name or service_name,
            sampling=_sampling(args.trace_sampling)))


def _stack(args: argparse.Namespace):
    from eventing.stack.supervisor import Stack

    settings = _settings(args)
    if settings.settings_file.exists():
        # A state folder keeps the ports and broker storage it was first started with, so
        # `up` after `down` brings back the same stack (an s3 broker's topics included);
        # an explicit `up --storage` still wins.
        saved = settings.with_saved(keep_pipeline=args.command == "up")
        if getattr(args, "storage", None):
            saved = dataclasses.replace(saved, broker_storage=args.storage)
        settings = saved
    return Stack(settings)


def cmd_up(args: argparse.Namespace) -> int:
    from eventing.registry.files import IncompatibleSchema
    from eventing.stack.binaries import MissingBinary
    from eventing.stack.supervisor import StackError

    stack = _stack(args)
    s = stack.settings
    print(f"Starting the Sluice stack (state in {s.state_dir}, broker storage {s.broker_storage})")
    try:
        stack.up()
    except (StackError, IncompatibleSchema, MissingBinary) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("Parts already started keep running; `sluice down` stops them.", file=sys.stderr)
        return 1
    print("\nReady:")
    print(f"  kafka bootstrap   {s.bootstrap}")
    print(f"  schema registry   {s.registry_url}")
    print(f"  s3                {s.s3_endpoint}  (keys in {s.state_dir / 'credentials.json'})")
    print(f"  iceberg catalog   {s.iceberg_url}")
    print(f"  otlp              grpc {s.host}:{s.ports.otlp_grpc}  "
          f"http http://{s.host}:{s.ports.otlp_http}")
    print(f"  prometheus        {s.prometheus_url}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stack = _stack(args)
    parts = stack.status()
    if args.json:
        print(json.dumps([p.as_dict() for p in parts], indent=2))
    else:
        print(f"{'PART':<12} {'PID':>8}  {'HEALTH':<9} {'UPTIME':>8}  ENDPOINT")
        for p in parts:
            health = "healthy" if p.healthy else ("unhealthy" if p.running else "stopped")
            uptime = f"{p.uptime_s:.0f}s" if p.uptime_s is not None else "-"
            print(f"{p.name:<12} {p.pid or '-':>8}  {health:<9} {uptime:>8}  {p.endpoint}")
    return 0 if all(p.healthy for p in parts) else 3


def cmd_down(args: argparse.Namespace) -> int:
    from eventing.stack.supervisor import StackError

    stack = _stack(args)
    try:
        stack.down(purge=args.purge)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from eventing.registry.server import run

    run(args.host, args.port, args.bootstrap, args.topic)
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from eventing.registry.files import IncompatibleSchema, register_all

    s = _stack(args).settings
    try:
        for r in register_all(args.registry or s.registry_url, s.schemas_dir):
            print(f"{r.subject} -> id {r.schema_id}  ({r.path.name})")
    except IncompatibleSchema as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from eventing import topology as topo
    from eventing.delivery.runner import RunSettings, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpx2"):  # one line per registry lookup is noise, not news
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = _stack(args).settings
    try:
        topology = topo.load(args.topology or s.topology_path)
    except topo.TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _configure_tracing(args, "sluice-" + "-".join(args.function) if args.function
                       else "sluice-functions")
    settings = RunSettings(bootstrap=args.bootstrap or s.bootstrap,
                           registry_url=args.registry or s.registry_url)
    metrics = (args.metrics_host, args.metrics_port) if args.metrics_port else None
    stats = run(topology, args.function or [], settings, stop, metrics)
    for name, st in stats.items():
        print(f"{name}: {st}")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from eventing import topology as topo
    from eventing.ingest.gateway import GatewaySettings, serve

    s = _settings(args).with_saved()
    try:
        topology = topo.load(args.topology or s.topology_path)
    except topo.TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    token = os.environ.get("SLUICE_GATEWAY_TOKEN") or None
    if args.token_file:
        try:
            with open(args.token_file) as fh:
                token = fh.read().strip() or None
        except OSError as exc:
            print(f"error: cannot read the token file: {exc}", file=sys.stderr)
            return 2
    settings = GatewaySettings.from_topology(
        topology,
        bootstrap=args.bootstrap or s.bootstrap,
        registry_url=args.registry or s.registry_url,
        host=args.host,
        port=args.port if args.port is not None else s.ports.gateway,
        token=token,
        message_timeout_ms=args.message_timeout_ms,
        log_level=args.log_level,
    )
    _configure_tracing(args, "sluice-gateway")
    serve(settings)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """`sluice trace REF`: the waterfall of every trace an event id, trace id or payment id
    names, from the local trace store."""
    from pathlib import Path

    from eventing.telemetry import traces

    path = Path(args.db) if args.db else traces.db_path(_settings(args).with_saved().state_dir)
    if not path.exists() and not args.wait:
        print(f"error: no trace store at {path}; is the stack up (`sluice up`)?",
              file=sys.stderr)
        return 2
    found = traces.wait_for(path, args.ref, args.wait or 0.0,
                            settle_s=args.settle if args.wait else 0.0)
    if not found:
        print(f"no trace found for {args.ref!r} (event id, trace id or payment id)"
              + ("" if args.wait else "; spans take ~1 s to be indexed: try --wait 10"),
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(traces.as_json(found), indent=2))
    else:
        print(traces.render(found), end="")
    return 0


def cmd_tracestore(args: argparse.Namespace) -> int:
    """`sluice tracestore`: index the traces topic into SQLite until SIGINT/SIGTERM."""
    import logging
    import signal
    import threading
    from pathlib import Path

    from eventing.telemetry import traces

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = _settings(args).with_saved()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    store = traces.TraceStore(Path(args.db) if args.db else traces.db_path(s.state_dir))
    ingestor = traces.TraceIngestor(store, args.bootstrap or s.bootstrap,
                                    args.topic or s.traces_topic)
    try:
        ingestor.run(stop)
    finally:
        store.close()
    print(f"indexed {ingestor.spans} spans from {ingestor.records} records")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from eventing.ingest.publish import GatewayError, Progress, Publisher, one_event, read_jsonl

    url = args.gateway or _settings(args).with_saved().gateway_url
    token = os.environ.get("SLUICE_GATEWAY_TOKEN") or None
    try:
        with Publisher(url, token) as publisher:
            if args.file:
                total, events = read_jsonl(args.file)
                progress = Progress(total, sys.stderr)
                sent = publisher.send_many(events, batch_size=args.batch_size,
                                           progress=progress)
                progress(sent, final=True)
                print(f"published {sent} events to {url}")
            else:
                if not args.type or args.data is None:
                    print("error: give --file, or --type and --data (and --source)",
                          file=sys.stderr)
                    return 2
                event = one_event(args.type, args.source, args.data, args.id, args.key)
                print(publisher.send(event))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"\nerror: gateway answered {exc.status or 'nothing'} ({exc.error}): "
              f"{exc.reason}", file=sys.stderr)
        for bad in exc.events[:20]:
            print(f"  event {bad['index']} (0-based, blank lines skipped): {bad.get('reason')}",
                  file=sys.stderr)
        return 1
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_generate(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from eventing import generate
    from eventing.ingest.publish import GatewayError, Progress, Publisher

    s = _stack(args).settings
    token = os.environ.get("SLUICE_GATEWAY_TOKEN")
    if not token and s.gateway_token_file and s.gateway_token_file.exists():
        token = s.gateway_token_file.read_text().strip()
    signal.signal(signal.SIGTERM, _interrupt)  # `sluice down` stops the generator cleanly
    total = int(args.rate * args.duration) if args.duration else 0
    progress = Progress(total, sys.stderr) if total and not args.quiet else None
    try:
        with Publisher(args.gateway or s.gateway_url, token) as pub:
            sent, fraud = generate.run(pub, rate=args.rate, duration=args.duration,
                                       seed=args.seed, fraud_share=args.fraud_share,
                                       truth=Path(args.truth) if args.truth else None,
                                       progress=progress)
    except KeyboardInterrupt:
        return 0
    except GatewayError as exc:
        print(f"error: the gateway refused a batch: {exc}", file=sys.stderr)
        return 1
    if progress:
        progress(sent, final=True)
    print(f"published {sent} payments ({fraud} injected fraud)")
    return 0


def cmd_sink_lake(args: argparse.Namespace) -> int:
    """`sluice sink lake`: a topic into an Iceberg table until SIGINT/SIGTERM."""
    _configure_tracing(args, "sluice-lake-sink")
    import logging
    import signal
    import threading

    from eventing.serde import AvroSerde
    from eventing.tables.lake import LakeSink, LakeSinkConfig, serve_metrics
    from eventing.tables.lakehouse import LakeConfig, table_name_for_topic
    from eventing.tables.maintenance import MaintenancePolicy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpx2"):  # the registry client logs every request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = _settings(args).with_saved()
    lake = LakeConfig.from_settings(s, namespace=args.namespace)
    if args.catalog_uri or args.s3_endpoint:
        from dataclasses import replace

        lake = replace(lake, catalog_uri=args.catalog_uri or lake.catalog_uri,
                       s3_endpoint=args.s3_endpoint or lake.s3_endpoint)
    policy = None if args.no_maintenance else MaintenancePolicy(
        every_commits=args.maintenance_every_commits, every_s=args.maintenance_every_s,
        min_files=args.compact_min_files, keep_snapshots=args.keep_snapshots,
        max_snapshot_age_s=args.snapshot_max_age_s, orphan_age_s=args.orphan_age_s)
    config = LakeSinkConfig(
        topic=args.topic, table=args.table or table_name_for_topic(args.topic),
        batch_size=args.batch_size, interval_ms=args.interval_ms,
        time_field=args.time_field, group_id=args.group_id, maintenance=policy)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sink = LakeSink(config, lake, args.bootstrap or s.bootstrap,
                    AvroSerde(args.registry or s.registry_url))
    if args.metrics_port:
        serve_metrics(sink, args.metrics_host, args.metrics_port)
    stats = sink.run(stop, max_rows=args.max_rows)
    print(json.dumps(stats.as_dict()))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from eventing import topology as topo
    from eventing.deploy import DeployError, DeploySettings, write_bundle
    from eventing.deploy.apply import ToolMissing, apply

    s = _settings(args)
    try:
        topology = topo.load(args.topology or s.topology_path)
    except topo.TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    given = {k: v for k, v in {
        "namespace": args.namespace, "image_registry": args.image_registry,
        "image_tag": args.image_tag, "bootstrap": args.bootstrap,
        "registry_url": args.registry_url, "kafka_cluster": args.kafka_cluster,
        "otlp_endpoint": args.otlp_endpoint}.items() if v is not None}
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sluice-deploy-"))
    try:
        bundle = write_bundle(topology, out, DeploySettings(**given),
                              include_code=not args.no_code)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(bundle.files)} files to {out}:")
    for name in topology.functions:
        print(f"  function {name:<12} functions/{name}/Dockerfile, "
              f"base/functions/{name}.service.yaml, base/functions/{name}.kafkasource.yaml")
    print("  kustomize          base/, overlays/dev, overlays/prod;  kn script: kn.sh")
    if args.dry_run:
        return 0
    try:
        return apply(out, args.overlay)
    except ToolMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_query(args: argparse.Namespace) -> int:
    """`sluice query`: Trino SQL to the real-time server (DuckDB) or to a Trino cluster."""
    from eventing.tables.query import QueryFailed, TranslationError, run

    server = args.server or _settings(args).with_saved().realtime_url
    try:
        print(run(args.sql, server_url=server, trino_url=args.trino, fmt=args.format,
                  explain=args.explain, timeout_s=args.timeout))
    except TranslationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except QueryFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_realtime(args: argparse.Namespace) -> int:
    """`sluice realtime`: the real-time table server (foreground)."""
    _configure_tracing(args, "sluice-realtime")
    from eventing.tables.lakehouse import LakeConfig
    from eventing.tables.realtime import RealtimeSettings, parse_duration, serve

    s = _settings(args).with_saved()
    try:
        retention = parse_duration(args.retention)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lake = None if args.no_lake else LakeConfig.from_settings(s)
    serve(RealtimeSettings(
        bootstrap=args.bootstrap or s.bootstrap, registry_url=args.registry or s.registry_url,
        topic=args.topic, host=args.host,
        port=args.port if args.port is not None else s.ports.realtime,
        retention_s=retention, time_field=args.time_field, lake=lake,
        log_level=args.log_level))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from eventing.telemetry import top

    s = _stack(args).settings
    try:
        top.run(args.prometheus or s.prometheus_url, sys.stdout, interval=args.interval,
                once=args.once)
    except top.PrometheusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_dashboards(args: argparse.Namespace) -> int:
    from pathlib import Path

    from eventing.telemetry import dashboards

    for path in dashboards.write(Path(args.out)):
        print(path)
    return 0


def _add_trace_parsers(sub) -> None:
    tr = sub.add_parser("trace", help="show what happened to an event: the waterfall of its "
                        "trace(s) by CloudEvent id, trace id or payment id")
    tr.add_argument("ref", help="CloudEvent id, trace id (32 hex) or payment id")
    tr.add_argument("--json", action="store_true", help="machine-readable spans")
    tr.add_argument("--wait", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for the spans to arrive and settle")
    tr.add_argument("--settle", type=float, default=1.5, metavar="S",
                    help="with --wait: done once no new span arrived for S seconds")
    tr.add_argument("--db", help="trace store file (default: the state folder's)")
    tr.set_defaults(func=cmd_trace)

    ts = sub.add_parser("tracestore", help="index the traces topic into the local trace "
                        "store (foreground; `sluice up` runs it)")
    ts.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    ts.add_argument("--topic", help="traces topic (default sluice.traces)")
    ts.add_argument("--db", help="trace store file (default: the state folder's)")
    ts.set_defaults(func=cmd_tracestore)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", help="state folder (default ./.state, env SLUICE_STATE_DIR)")
    parser.add_argument("--port-offset", type=int, default=None,
                        help="shift every default port by N (env SLUICE_PORT_OFFSET)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the local stack and wait until it is healthy")
    up.add_argument("--storage", choices=["s3", "memory"], default=None,
                    help="broker storage: memory (default) is fast and forgets on restart; "
                         "s3 keeps topics in the object store across restarts, but "
                         "Tansu's fetches slow down as small objects pile up")
    up.add_argument("--no-pipeline", action="store_true",
                    help="start only the infrastructure, not the gateway and functions")
    up.add_argument("--no-generator", action="store_true",
                    help="do not start the example traffic generator")
    up.add_argument("--rate", type=float, default=None,
                    help="generator payments per second (default 20)")
    up.add_argument("--token-file", help="require this bearer token at the gateway "
                    "(env SLUICE_GATEWAY_TOKEN_FILE)")
    up.add_argument("--trace-sampling", type=float, default=None,
                    help="share of new traces the pipeline records, 0..1 (default 1)")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="report each part: pid, endpoint, health, uptime")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop what `sluice up` started")
    down.add_argument("--purge", action="store_true", help="also delete the state folder")
    down.set_defaults(func=cmd_down)

    reg = sub.add_parser("registry", help="run the embedded schema registry (foreground)")
    reg.add_argument("--host", default="127.0.0.1")
    reg.add_argument("--port", type=int, default=8081)
    reg.add_argument("--bootstrap", default="127.0.0.1:9092")
    reg.add_argument("--topic", default="_schemas")
    reg.set_defaults(func=cmd_registry)

    schemas = sub.add_parser("schemas", help="register every schemas/*.avsc with the registry")
    schemas.add_argument("--registry", help="registry URL (default: the local stack's)")
    schemas.set_defaults(func=cmd_schemas)

    run_p = sub.add_parser("run", help="run the topology's functions (foreground)")
    run_p.add_argument("--topology", help="topology file (default functions/topology.yaml)")
    run_p.add_argument("--function", action="append", help="only this function (repeatable)")
    run_p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    run_p.add_argument("--registry", help="schema registry URL (default: the local stack's)")
    run_p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    run_p.add_argument("--metrics-host", default="127.0.0.1")
    _add_tracing_args(run_p, "sluice-<function>")
    run_p.set_defaults(func=cmd_run)

    top_p = sub.add_parser("top", help="live per-function rate, p99, lag, dead letters")
    top_p.add_argument("--interval", type=float, default=2.0)
    top_p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top_p.add_argument("--prometheus", help="Prometheus URL (default: the local stack's)")
    top_p.set_defaults(func=cmd_top)

    dash = sub.add_parser("dashboards", help="write the Grafana dashboards (JSON)")
    dash.add_argument("--out", default="infra/grafana")
    dash.set_defaults(func=cmd_dashboards)

    gen = sub.add_parser("generate", help="publish realistic payments with injected fraud")
    gen.add_argument("--rate", type=float, default=50.0, help="payments per second")
    gen.add_argument("--duration", type=float, default=60.0, help="seconds (0 = forever)")
    gen.add_argument("--seed", type=int, default=11)
    gen.add_argument("--fraud-share", type=float, default=0.01,
                     help="share of payments that start a fraud pattern")
    gen.add_argument("--truth", help="append injected fraud payment ids to this file")
    gen.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    gen.add_argument("--quiet", action="store_true", help="no progress line")
    gen.add_argument("--token-file", help="file holding the gateway's bearer token")
    gen.set_defaults(func=cmd_generate)

    gw = sub.add_parser("gateway", help="run the CloudEvents ingest gateway (foreground)")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, help="port (default: the local stack's gateway port)")
    gw.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    gw.add_argument("--registry", help="schema registry URL (default: the local stack's)")
    gw.add_argument("--topology", help="topology file (default functions/topology.yaml)")
    gw.add_argument("--token-file", help="require this bearer token (default: env "
                    "SLUICE_GATEWAY_TOKEN; none means no authentication)")
    gw.add_argument("--message-timeout-ms", type=int, default=5000,
                    help="answer 503 when the broker has not acknowledged within this time")
    gw.add_argument("--log-level", default="info",
                    choices=["critical", "error", "warning", "info", "debug"])
    _add_tracing_args(gw, "sluice-gateway")
    gw.set_defaults(func=cmd_gateway)

    _add_trace_parsers(sub)

    pub = sub.add_parser("publish", help="publish CloudEvents to the gateway "
                         "(bearer token from env SLUICE_GATEWAY_TOKEN)")
    pub.add_argument("--type", help="event type (routes it to a topic)")
    pub.add_argument("--source", help="event source (default /sluice/publish)")
    pub.add_argument("--data", help="event data as JSON text")
    pub.add_argument("--id", help="event id (default: a new UUID)")
    pub.add_argument("--key", help="partition key (the partitionkey extension)")
    pub.add_argument("--file", help="JSON Lines file, one structured CloudEvent per line "
                     "(id, source, specversion filled in when missing)")
    pub.add_argument("--batch-size", type=int, default=500, help="events per request (--file)")
    pub.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    pub.set_defaults(func=cmd_publish)

    sink = sub.add_parser("sink", help="run a table sink (foreground)")
    sinks = sink.add_subparsers(dest="sink", required=True)
    lake = sinks.add_parser("lake", help="append a topic to an Iceberg table, exactly once")
    _add_tracing_args(lake, "sluice-lake-sink")
    lake.add_argument("--topic", required=True)
    lake.add_argument("--table", help="table name (default: the topic, dots -> underscores)")
    lake.add_argument("--namespace", default="sluice")
    lake.add_argument("--batch-size", type=int, default=10_000, help="rows per commit (max)")
    lake.add_argument("--interval-ms", type=int, default=1_000,
                      help="commit a non-empty batch at least this often")
    lake.add_argument("--time-field", default="event_time",
                      help="epoch-ms field: timestamptz column, partitioned by day")
    lake.add_argument("--group-id", help="consumer group (default sluice-lake-<table>)")
    lake.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    lake.add_argument("--registry", help="schema registry URL (default: the local stack's)")
    lake.add_argument("--catalog-uri", help="Iceberg REST catalog (default: the local stack's)")
    lake.add_argument("--s3-endpoint", help="S3 endpoint (default: the local stack's)")
    lake.add_argument("--no-maintenance", action="store_true")
    lake.add_argument("--maintenance-every-commits", type=int, default=50)
    lake.add_argument("--maintenance-every-s", type=float, default=300.0)
    lake.add_argument("--compact-min-files", type=int, default=8,
                      help="compact a partition once it has this many small files")
    lake.add_argument("--keep-snapshots", type=int, default=20)
    lake.add_argument("--snapshot-max-age-s", type=float, default=900.0)
    lake.add_argument("--orphan-age-s", type=float, default=1800.0,
                      help="delete unreferenced files only when older than this")
    lake.add_argument("--max-rows", type=int, help="stop after writing this many rows")
    lake.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    lake.add_argument("--metrics-host", default="127.0.0.1")
    lake.set_defaults(func=cmd_sink_lake)

    dep = sub.add_parser("deploy", help="write Knative/Kubernetes manifests for the topology "
                         "and apply them with kubectl (--dry-run: only write them)")
    dep.add_argument("--dry-run", action="store_true", help="write the files, apply nothing")
    dep.add_argument("--out", help="folder to write into (default: a new temporary folder)")
    dep.add_argument("--topology", help="topology file (default functions/topology.yaml)")
    dep.add_argument("--overlay", choices=["dev", "prod"], default="dev",
                     help="which overlay to apply (without --dry-run)")
    dep.add_argument("--namespace", help="Kubernetes namespace (default sluice)")
    dep.add_argument("--image-registry", help="registry prefix of function images")
    dep.add_argument("--image-tag", help="tag of function images (default latest)")
    dep.add_argument("--bootstrap", help="Kafka bootstrap servers on the cluster "
                     "(default sluice-kafka-bootstrap:9092)")
    dep.add_argument("--registry-url", help="schema registry URL on the cluster")
    dep.add_argument("--kafka-cluster", help="Strimzi Kafka cluster name (KafkaTopic label)")
    dep.add_argument("--otlp-endpoint", help="OTLP endpoint functions export traces to")
    dep.add_argument("--no-code", action="store_true", help="do not copy code into the build "
                     "contexts (how the checked-in infra/cluster is written)")
    dep.set_defaults(func=cmd_deploy)

    qry = sub.add_parser("query", help="run Trino SQL: locally on the real-time server "
                         "(translated to DuckDB), or on Trino with --trino")
    qry.add_argument("sql", help="one Trino SQL query; tables: payments_scored (lake), "
                     "payments_scored_rt (real-time)")
    qry.add_argument("--format", choices=["table", "csv", "json"], default="table")
    qry.add_argument("--trino", metavar="URL", help="run on Trino at "
                     "http(s)://[user@]host:port[/catalog/schema] instead")
    qry.add_argument("--explain", action="store_true",
                     help="print the SQL that would run (DuckDB, or Trino with --trino)")
    qry.add_argument("--server", help="real-time server URL (default: the local stack's)")
    qry.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for answers")
    qry.set_defaults(func=cmd_query)

    rt = sub.add_parser("realtime", help="run the real-time table server (foreground)")
    _add_tracing_args(rt, "sluice-realtime")
    rt.add_argument("--host", default="127.0.0.1")
    rt.add_argument("--port", type=int, help="port (default: the local stack's realtime port)")
    rt.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack)")
    rt.add_argument("--registry", help="schema registry URL (default: the local stack's)")
    rt.add_argument("--topic", default="payments.scored")
    rt.add_argument("--retention", default="1h", help="keep rows this recent by the time "
                    "field (e.g. 1h, 30m)")
    rt.add_argument("--time-field", default="event_time", help="epoch-ms or timestamp field")
    rt.add_argument("--no-lake", action="store_true", help="do not ATTACH the Iceberg catalog")
    rt.add_argument("--log-level", default="info",
                    choices=["critical", "error", "warning", "info", "debug"])
    rt.set_defaults(func=cmd_realtime)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
