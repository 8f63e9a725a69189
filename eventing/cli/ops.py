"""Commands that operate the local stack: up, status, down, schemas, top, trace, dashboards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eventing.cli.edge import CommandFailed, Edge, add_command, settings_flag

STACK_SETTINGS = "eventing.stack.settings:StackSettings"


def up(edge: Edge) -> int:
    from eventing.registry.files import IncompatibleSchema
    from eventing.stack.binaries import MissingBinary
    from eventing.stack.supervisor import Stack, StackError

    s = edge.settings
    print(f"Starting the Sluice stack (state in {s.state_dir}, broker storage {s.broker_storage})")
    try:
        Stack(s).up()
    except (StackError, IncompatibleSchema, MissingBinary) as exc:
        raise CommandFailed(f"{exc}\nParts already started keep running; `sluice down` "
                            "stops them.", 1) from None
    print("\nReady:")
    print(f"  kafka bootstrap   {s.bootstrap}")
    print(f"  schema registry   {s.registry_url}")
    print(f"  s3                {s.s3_endpoint}  (keys in {s.state_dir / 'credentials.json'})")
    print(f"  iceberg catalog   {s.iceberg_url}")
    print(f"  otlp              grpc {s.host}:{s.ports.otlp_grpc}  "
          f"http http://{s.host}:{s.ports.otlp_http}")
    print(f"  prometheus        {s.prometheus_url}")
    return 0


def status(edge: Edge) -> int:
    from eventing.stack.supervisor import Stack

    parts = Stack(edge.settings).status()
    if edge.args.json:
        print(json.dumps([p.as_dict() for p in parts], indent=2))
    else:
        print(f"{'PART':<12} {'PID':>8}  {'HEALTH':<16} {'UPTIME':>8} {'RESTARTS':>8}  "
              "ENDPOINT")
        for p in parts:
            health = "healthy" if p.healthy else ("unhealthy" if p.running else "stopped")
            if p.state and p.state != "Running":
                health = p.state  # Waiting / CrashLoopBackOff, as the supervisor sees it
            uptime = f"{p.uptime_s:.0f}s" if p.uptime_s is not None else "-"
            print(f"{p.name:<12} {p.pid or '-':>8}  {health:<16} {uptime:>8} {p.restarts:>8}  "
                  f"{p.endpoint}")
            if p.last_exit_reason:
                print(f"{'':<12} {'':>8}  last exit: {p.last_exit_reason}")
    return 0 if all(p.healthy for p in parts) else 3


def down(edge: Edge) -> int:
    from eventing.stack.supervisor import Stack, StackError

    try:
        Stack(edge.settings).down(purge=edge.args.purge)
    except StackError as exc:
        raise CommandFailed(str(exc), 1) from None
    return 0


def schemas(edge: Edge) -> int:
    from eventing.registry.files import IncompatibleSchema, register_all

    s = edge.settings
    try:
        for r in register_all(edge.args.registry or s.registry_url, s.schemas_dir):
            print(f"{r.subject} -> id {r.schema_id}  ({r.path.name})")
    except IncompatibleSchema as exc:
        raise CommandFailed(str(exc), 1) from None
    return 0


def top(edge: Edge) -> int:
    from eventing.telemetry import top as live

    try:
        live.run(edge.args.prometheus or edge.settings.prometheus_url, sys.stdout,
                 once=edge.args.once, **edge.given("interval"))
    except live.PrometheusUnavailable as exc:
        raise CommandFailed(str(exc), 1) from None
    except KeyboardInterrupt:
        pass
    return 0


def dashboards(edge: Edge) -> int:
    from eventing.telemetry import dashboards as grafana

    for path in grafana.write(Path(edge.args.out)):
        print(path)
    return 0


def trace(edge: Edge) -> int:
    """The waterfall of every trace an event id, trace id or payment id names, from the
    local trace store."""
    from eventing.telemetry import traces

    args = edge.args
    path = Path(args.db) if args.db else traces.db_path(edge.settings.state_dir)
    if not path.exists() and not args.wait:
        raise CommandFailed(f"no trace store at {path}; is the stack up (`sluice up`)?")
    found = traces.wait_for(path, args.ref, args.wait or 0.0,
                            **(edge.given(settle_s="settle") if args.wait else {"settle_s": 0.0}))
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "up", up, help="start the local stack and wait until it is healthy")
    p.add_argument("--storage", choices=["s3", "memory"], default=None,
                   help="broker storage: memory (default) is fast and forgets on restart; "
                        "s3 keeps topics in the object store across restarts, but "
                        "Tansu's fetches slow down as small objects pile up")
    p.add_argument("--no-pipeline", action="store_true",
                   help="start only the infrastructure, not the gateway and functions")
    p.add_argument("--no-generator", action="store_true",
                   help="do not start the topology's traffic generator (its generate.py)")
    settings_flag(p, "--rate", dest="generator_rate", type=float,
                  default_of=f"{STACK_SETTINGS}.generator_rate",
                  help="generator payments per second")
    p.add_argument("--token-file", help="require this bearer token at the gateway "
                   "(env SLUICE_GATEWAY_TOKEN_FILE)")
    settings_flag(p, "--trace-sampling", type=float,
                  default_of=f"{STACK_SETTINGS}.trace_sampling",
                  help="share of new traces the pipeline records, 0..1")

    p = add_command(sub, "status", status,
                    help="report each part: pid, endpoint, health, uptime, restarts and "
                    "the reason of its last exit")
    p.add_argument("--json", action="store_true")

    p = add_command(sub, "down", down, help="stop what `sluice up` started")
    p.add_argument("--purge", action="store_true", help="also delete the state folder")

    p = add_command(sub, "schemas", schemas,
                    help="register every schemas/*.avsc with the registry")
    p.add_argument("--registry", help="registry URL (default: the local stack's)")

    p = add_command(sub, "top", top, help="live per-function rate, p99, lag, dead letters")
    settings_flag(p, "--interval", type=float,
                  default_of="eventing.telemetry.top:run.interval", help="seconds")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--prometheus", help="Prometheus URL (default: the local stack's)")

    p = add_command(sub, "dashboards", dashboards, help="write the Grafana dashboards (JSON)")
    p.add_argument("--out", default="infra/grafana")

    p = add_command(sub, "trace", trace, help="show what happened to an event: the waterfall "
                    "of its trace(s) by CloudEvent id, trace id or payment id")
    p.add_argument("ref", help="CloudEvent id, trace id (32 hex) or payment id")
    p.add_argument("--json", action="store_true", help="machine-readable spans")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the spans to arrive and settle")
    settings_flag(p, "--settle", type=float, metavar="S",
                  default_of="eventing.telemetry.traces:wait_for.settle_s",
                  help="with --wait: done once no new span arrived for S seconds")
    p.add_argument("--db", help="trace store file (default: the state folder's)")
