"""`sluice`: argument parsing and printing only; every command calls into the modules.

This is the edge where configuration is read (flags, then `SLUICE_*` environment
variables, then defaults) and turned into typed settings passed down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from eventing.settings import StackSettings, load_settings


def _settings(args: argparse.Namespace) -> StackSettings:
    settings = load_settings(
        state_dir=args.state_dir or os.environ.get("SLUICE_STATE_DIR"),
        port_offset=int(args.port_offset if args.port_offset is not None
                        else os.environ.get("SLUICE_PORT_OFFSET", "0")),
        broker_storage=getattr(args, "storage", None) or os.environ.get("SLUICE_BROKER_STORAGE"),
    )
    return settings


def _stack(args: argparse.Namespace):
    from eventing.stack.supervisor import Stack

    settings = _settings(args)
    stack = Stack(settings)
    if stack.running() or args.command in ("status", "down"):
        # A running (or stopped) stack keeps the ports and storage it was started with.
        settings = settings.with_saved()
        stack = Stack(settings)
    return stack


def cmd_up(args: argparse.Namespace) -> int:
    from eventing.schemas import IncompatibleSchema
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
    from eventing.schemas import IncompatibleSchema, register_all

    s = _stack(args).settings
    try:
        for r in register_all(args.registry or s.registry_url, s.schemas_dir):
            print(f"{r.subject} -> id {r.schema_id}  ({r.path.name})")
    except IncompatibleSchema as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", help="state folder (default ./.state, env SLUICE_STATE_DIR)")
    parser.add_argument("--port-offset", type=int, default=None,
                        help="shift every default port by N (env SLUICE_PORT_OFFSET)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the local stack and wait until it is healthy")
    up.add_argument("--storage", choices=["s3", "memory"], default=None,
                    help="broker storage: s3 keeps data across restarts (default), "
                         "memory is faster and forgets")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
