"""Commands that operate the local stack: up, status, down, logs, top, trace, dashboards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eventing.cli import output
from eventing.cli.edge import (
    CommandFailed,
    Edge,
    add_command,
    duration_arg,
    settings_flag,
    size_arg,
)
from eventing.stack.settings import StackSettings

STACK_SETTINGS = "eventing.stack.settings:StackSettings"
TRACE_COLUMNS = ["trace_id", "span_id", "parent_id", "depth", "service", "name",
                 "start_offset_ms", "duration_ms", "status"]


def up(edge: Edge) -> int:
    from eventing.registry.files import IncompatibleSchema
    from eventing.stack.binaries import MissingBinary
    from eventing.stack.supervisor import Stack, StackError

    s = edge.settings
    _check_trace_bounds(s)
    print(f"Starting the Sluice stack (state in {s.state_dir}, broker storage {s.broker_storage})")
    try:
        stack = Stack(s)
    except ValueError as exc:  # the topology and `--replicas` disagree: nothing started
        raise CommandFailed(str(exc), 2) from None
    try:
        stack.up()
    except (StackError, IncompatibleSchema, MissingBinary) as exc:
        raise CommandFailed(f"{exc}\nParts already started keep running; `sluice down` "
                            "stops them.", 1) from None
    if s.pipeline and s.gateway_requires_token:
        from eventing.stack.pipeline import gateway_refuses_anonymous

        # A gateway left running from an `up` without the token would fail open.
        if not gateway_refuses_anonymous(s):
            raise CommandFailed(
                f"the gateway at {s.gateway_url} accepts events without a token, but a "
                "token is configured (SLUICE_GATEWAY_TOKEN or --token-file): it was started "
                "without one. Run `sluice down`, then `sluice up` again with the token.", 1)
    print("\nReady:")
    print(f"  kafka bootstrap   {s.bootstrap}")
    print(f"  schema registry   {s.registry_url}")
    print(f"  s3                {s.s3_endpoint}  (keys in {s.state_dir / 'credentials.json'})")
    print(f"  iceberg catalog   {s.iceberg_url}")
    print(f"  otlp              grpc {s.host}:{s.ports.otlp_grpc}  "
          f"http http://{s.host}:{s.ports.otlp_http}")
    print(f"  prometheus        {s.prometheus_url}")
    return 0


def _check_trace_bounds(s: StackSettings) -> None:
    """Refuse trace store bounds the store would refuse, before anything starts."""
    from eventing.telemetry.traces import RetentionPolicy

    given = {k: v for k, v in (("max_age_s", s.trace_retention_s),
                               ("max_bytes", s.trace_max_bytes)) if v is not None}
    try:
        RetentionPolicy(**given)
    except ValueError as exc:
        raise CommandFailed(f"{exc} (--trace-retention / --trace-max-size)") from None


def status(edge: Edge) -> int:
    """Each part's pid, health, uptime and endpoint. Reads the state folder only: a folder
    that does not exist is reported, never created (no credentials appear as a side effect)."""
    state_dir = edge.settings.state_dir
    if not state_dir.exists():
        output.note(f"no stack here: the state folder {state_dir} does not exist "
                    "(start one with `sluice up`, or pass --state-dir)")
        if _fmt(edge) == "json":
            print("[]")
        return 3
    from eventing.stack.supervisor import Stack

    parts = Stack(edge.settings).status()
    fmt = _fmt(edge)
    if fmt == "json":
        output.records([p.as_dict() for p in parts], [], "json")
    else:
        rows = []
        for p in parts:
            health = "healthy" if p.healthy else ("unhealthy" if p.running else "stopped")
            if p.state and p.state != "Running":
                health = p.state  # Waiting / CrashLoopBackOff, as the supervisor sees it
            uptime = f"{p.uptime_s:.0f}s" if p.uptime_s is not None else "-"
            rows.append([p.name, p.pid or "-", health, uptime, p.restarts, p.endpoint,
                         p.last_exit_reason or ""])
        output.emit(["PART", "PID", "HEALTH", "UPTIME", "RESTARTS", "ENDPOINT", "LAST EXIT"],
                    rows, fmt, numeric=[False, True, False, True, True, False, False])
        if fmt == "table" and (line := _last_rollover(state_dir)):
            output.note(line)
    return 0 if all(p.healthy for p in parts) else 3


def _last_rollover(state_dir: Path) -> str | None:
    """One line on the memory broker's last rollover (eventing.stack.rollover), if any."""
    import datetime

    from eventing.stack.rollover import load_outcomes

    data = load_outcomes(state_dir)
    last = data.get("last")
    if not last:
        return None
    when = datetime.datetime.fromtimestamp(last["started_at"]).strftime("%Y-%m-%d %H:%M:%S")
    mib = lambda b: "?" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    what = (f"intake paused {last['pause_s']:.1f}s, kept {sum(last['saved'].values())} records, "
            f"broker RSS {mib(last['rss_before'])} -> {mib(last['rss_after'])}"
            if last["rolled"] else last["reason"])
    if last.get("finished"):
        what += f"; finished the one interrupted of {last['finished']}"
    return (f"last broker rollover: {when}, {'done' if last['rolled'] else 'not done'}: "
            f"{what} ({data.get('rolled', 0)} done, {data.get('aborted', 0)} aborted)")


def _fmt(edge: Edge) -> str:
    """`-o`, with the older `--json` meaning `-o json`."""
    return "json" if getattr(edge.args, "json", False) else edge.args.output


def down(edge: Edge) -> int:
    from eventing.stack.supervisor import Stack, StackError

    try:
        Stack(edge.settings).down(purge=edge.args.purge)
    except StackError as exc:
        raise CommandFailed(str(exc), 1) from None
    return 0


def logs(edge: Edge) -> int:
    """A part's log from the state folder; `-f` keeps printing what it appends."""
    import time

    from eventing.stack import logs as part_logs
    from eventing.stack.process import ProcessDir

    procs = ProcessDir(edge.settings.state_dir)
    path = procs.log_path(edge.args.part)
    if not path.exists():
        known = sorted(p.stem for p in procs.log_dir.glob("*.log")) if procs.log_dir.exists() \
            else []
        raise CommandFailed(f"no log for part {edge.args.part!r} at {path}; "
                            + (f"parts with logs: {', '.join(known)}" if known
                               else "is the stack up? (`sluice up`)"))
    # Across rotations (`eventing.stack.logs`): older lines are in <part>.log.1, .2 ...
    follower = part_logs.Follower(path)  # from the end as of now, before the tail is read
    sys.stdout.write(b"".join(part_logs.last_lines(path, edge.args.lines))
                     .decode("utf-8", "replace"))
    sys.stdout.flush()
    if not edge.args.follow:
        return 0
    edge.interrupt_on_sigterm()
    while True:
        chunk = follower.read()
        if chunk:
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
        else:
            time.sleep(0.2)


def top(edge: Edge) -> int:
    from eventing.telemetry import top as live

    url = edge.args.prometheus or edge.settings.prometheus_url
    if edge.args.output != "table":  # data for a script: one snapshot
        try:
            snap = live.snapshot(url)
        except live.PrometheusUnavailable as exc:
            raise CommandFailed(str(exc), 1) from None
        except Exception as exc:  # noqa: BLE001 - httpx errors: name the URL
            raise CommandFailed(f"Prometheus at {url} did not answer: {exc}", 1) from None
        if edge.args.output == "json":
            print(json.dumps(snap, indent=2))
        else:
            keys = ["rate", "p99", "lag", "dead", "retries", "total"]
            output.emit(["function", *keys], [[fn, *[r.get(k) for k in keys]]
                                              for fn, r in sorted(snap["functions"].items())],
                        "csv")
        return 0
    try:
        live.run(edge.args.prometheus or edge.settings.prometheus_url, sys.stdout,
                 once=edge.args.once, terminal=output.is_terminal(),
                 **edge.given("interval"))
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
    """The waterfall of every trace an event id, trace id or business id (the topology's
    `traceIds`) names; or, with search flags and no id, the list of matching traces,
    newest first."""
    from eventing.telemetry import traces

    args = edge.args
    path = Path(args.db) if args.db else traces.db_path(edge.settings.state_dir)
    searching = (args.errors or args.since is not None or args.function is not None
                 or args.min_duration is not None)
    if args.ref is None and not searching:
        raise CommandFailed("name a trace (CloudEvent id, trace id or business id) or search "
                            "with --since, --errors, --function or --min-duration")
    if not path.exists() and not args.wait:
        raise CommandFailed(f"no trace store at {path}; is the stack up (`sluice up`)?")
    if args.ref is None:
        store = traces.TraceStore(path, readonly=True)
        try:
            found = store.search(**_search_filters(args), **edge.given("limit"))
        finally:
            store.close()
        if args.json:
            print(json.dumps(traces.summaries_as_json(found), indent=2))
        elif found:
            print(traces.render_list(found), end="")
        if not found:
            print("no trace matches", file=sys.stderr)
            return 1
        return 0
    found = traces.wait_for(path, args.ref, args.wait or 0.0,
                            **(edge.given(settle_s="settle") if args.wait else {"settle_s": 0.0}))
    if found and searching:  # the named traces that also match the search
        store = traces.TraceStore(path, readonly=True)
        try:
            keep = {t.trace_id for t in store.search(
                **_search_filters(args), trace_ids=list(found), limit=len(found))}
        finally:
            store.close()
        found = {t: spans for t, spans in found.items() if t in keep}
    if not found:
        ids = ", ".join(edge.trace_ids()) or "none declared"
        print(f"no trace found for {args.ref!r} (event id, trace id or business id: {ids})"
              + ("" if args.wait else "; spans take ~1 s to be indexed: try --wait 10"),
              file=sys.stderr)
        return 1
    if _fmt(edge) == "json":
        print(json.dumps(traces.as_json(found), indent=2))
    elif args.output == "csv":
        spans = [{"trace_id": t["trace_id"], **sp} for t in traces.as_json(found)
                 for sp in t["spans"]]
        output.emit(TRACE_COLUMNS, [[sp.get(c) for c in TRACE_COLUMNS] for sp in spans], "csv")
    else:
        print(traces.render(found, list(edge.trace_ids().values()),
                            bars=output.is_terminal()), end="")
    return 0


def _search_filters(args: argparse.Namespace) -> dict:
    """`sluice trace`'s search flags as `TraceStore.search` keywords."""
    import time

    return {"since_ns": None if args.since is None else time.time_ns() - int(args.since * 1e9),
            "errors": args.errors, "function": args.function,
            "min_duration_ms": None if args.min_duration is None else args.min_duration * 1e3}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "up", up, help="start the local stack and wait until it is healthy",
                    example="sluice up\nsluice up --no-generator --rate 100")
    p.add_argument("--storage", choices=["s3", "memory"], default=None,
                   help="broker storage: memory (default) keeps up, grows ~4 MiB/min at "
                        "the example's rate and forgets on restart; s3 keeps topics in "
                        "the object store across restarts, bounded by the `retention` "
                        "part; consumers wait up to 1 s per fetch on it, so a "
                        "trickle pays ~0.5 s per hop (README: Why memory is the "
                        "default broker storage)")
    p.add_argument("--no-pipeline", action="store_true",
                   help="start only the infrastructure, not the gateway and functions")
    p.add_argument("--no-generator", action="store_true",
                   help="do not start the topology's traffic generator (its generate.py)")
    settings_flag(p, "--rate", dest="generator_rate", type=float,
                  default_of=f"{STACK_SETTINGS}.generator_rate",
                  help="generator events per second")
    p.add_argument("--topology", help="the pipeline to run: its functions, tables, "
                   "schemas and generate.py (default functions/topology.yaml; env "
                   "SLUICE_TOPOLOGY); remembered by the state folder")
    p.add_argument("--token-file", help="require this bearer token at the gateway "
                   "(env SLUICE_GATEWAY_TOKEN_FILE)")
    settings_flag(p, "--trace-sampling", type=float,
                  default_of=f"{STACK_SETTINGS}.trace_sampling",
                  help="share of new traces the pipeline records, 0..1")
    settings_flag(p, "--trace-retention", type=duration_arg, metavar="AGE",
                  default_of="eventing.telemetry.traces:RetentionPolicy.max_age_s",
                  help="the trace store deletes traces older than this (1h, 2d; seconds)")
    settings_flag(p, "--trace-max-size", type=size_arg, metavar="SIZE",
                  default_of="eventing.telemetry.traces:RetentionPolicy.max_bytes",
                  help="the trace store deletes its oldest traces above this size "
                       "(1GiB, 200MB; bytes)")
    settings_flag(p, "--broker-max-rss", type=size_arg, metavar="SIZE",
                  default_of="eventing.stack.rollover:RolloverSettings.max_rss",
                  help="memory broker: the `retention` part rolls it over (drained, "
                       "nothing accepted lost) when its RSS is above this (512MiB)")
    p.add_argument("--replicas", action="append", metavar="NAME=N",
                   help="run function NAME as N processes in one consumer group (repeatable; "
                        "default: the topology's scale.min, at least 1)")

    p = add_command(sub, "status", status,
                    help="report each part: pid, endpoint, health, uptime, restarts and the "
                         "reason of its last exit (exit 3 if one is not healthy)",
                    example="sluice status\nsluice status -o json | jq '.[].name'")
    output.output_flag(p)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # = -o json

    p = add_command(sub, "down", down, help="stop what `sluice up` started",
                    example="sluice down\nsluice down --purge")
    p.add_argument("--purge", action="store_true", help="also delete the state folder")

    p = add_command(sub, "logs", logs, help="print a part's log (-f: keep following it)",
                    example="sluice logs gateway\nsluice logs fn-score -f")
    p.add_argument("part", help="part name as `sluice status` lists it (gateway, fn-<name>, "
                   "broker ...)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=50,
                   help="print the last N lines first (0 = all; default 50)")

    p = add_command(sub, "top", top, help="live per-function rate, p99, lag, dead letters",
                    example="sluice top\nsluice top --once -o json")
    settings_flag(p, "--interval", type=float,
                  default_of="eventing.telemetry.top:run.interval", help="seconds")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    output.output_flag(p)  # json/csv: one snapshot, as data
    p.add_argument("--prometheus", help="Prometheus URL (default: the local stack's)")

    p = add_command(sub, "dashboards", dashboards, help="write the Grafana dashboards (JSON)",
                    example="sluice dashboards --out infra/grafana")
    p.add_argument("--out", default="infra/grafana", help="folder (default infra/grafana)")

    p = add_command(sub, "trace", trace, help="show what happened to an event: the waterfall "
                    "of its trace(s) by CloudEvent id, trace id or business id; or list the "
                    "traces a search matches",
                    example="sluice trace pay-11-000000042\nsluice trace pay-11-000000042 "
                            "-o json --wait 10\nsluice trace --errors --since 10m")
    p.add_argument("ref", nargs="?", help="CloudEvent id, trace id (32 hex) or a business id the "
                   "topology declares (traceIds) "
                   "(leave out to list the traces the search flags match)")
    output.output_flag(p)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # = -o json
    p.add_argument("--topology", help="topology whose traceIds label the spans "
                   "(default: the stack's)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the spans to arrive and settle")
    settings_flag(p, "--settle", type=float, metavar="S",
                  default_of="eventing.telemetry.traces:wait_for.settle_s",
                  help="with --wait: done once no new span arrived for S seconds")
    p.add_argument("--errors", action="store_true", help="only traces with a failed span")
    p.add_argument("--since", type=duration_arg, metavar="AGE",
                   help="only traces that started within AGE (10m, 1h, 90s)")
    p.add_argument("--function", metavar="NAME", help="only traces that ran this function")
    p.add_argument("--min-duration", type=duration_arg, metavar="DUR",
                   help="only traces at least this long, first span start to last span end "
                        "(250ms, 1.5s)")
    settings_flag(p, "--limit", type=int, default_of="eventing.telemetry.traces:"
                  "TraceStore.search.limit", help="list at most N traces (newest first)")
    p.add_argument("--db", help="trace store file (default: the state folder's)")
