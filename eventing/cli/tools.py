"""Commands a user runs against the pipeline: publish, generate, query, deploy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eventing.cli.edge import CommandFailed, Edge, add_command, settings_flag

DEPLOY = "eventing.deploy:DeploySettings"


def publish(edge: Edge) -> int:
    from eventing.cli import output
    from eventing.ingest.publish import (
        CLI_CONCURRENCY,
        GatewayError,
        Publisher,
        one_event,
        read_jsonl,
    )

    a = edge.args
    url = a.gateway or edge.settings.gateway_url
    token = _token(a.token_file) or edge.gateway_token()
    lines: list[int] = []
    try:
        if a.file:
            total, events, lines = read_jsonl(a.file)
        elif not a.type or a.data is None:
            raise CommandFailed("give --file FILE, or --type TYPE and --data JSON "
                                "(and --source)")
        else:
            event = one_event(a.type, a.source, a.data, a.id, a.key)
        with Publisher(url, token, concurrency=a.concurrency or CLI_CONCURRENCY) as publisher:
            if a.file:
                progress = output.progress(total)
                sent = publisher.send_many(events, progress=progress, **edge.given("batch_size"))
                progress(sent, final=True)
                print(f"published {sent} events to {url}")
            else:
                print(publisher.send(event))
    except ValueError as exc:
        raise CommandFailed(str(exc)) from None
    except GatewayError as exc:
        if exc.status is None:
            raise CommandFailed(exc.reason, 1) from None
        print(f"\nerror: gateway answered {exc.status} ({exc.error}): {exc.reason}",
              file=sys.stderr)
        for bad in exc.events[:20]:
            index = bad["index"]
            where = (f"{a.file}:{lines[index]}" if 0 <= index < len(lines)
                     else f"event {index}")
            print(f"  {where}: {bad.get('reason')}", file=sys.stderr)
        return 1
    return 0


def _token(path: str | None) -> str | None:
    """The bearer token in `path` (a file, so the token never shows in `ps` or history)."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise CommandFailed(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise CommandFailed(f"the token file {path} is empty")
    return token


def generate(edge: Edge) -> int:
    """Publish the topology's example traffic (its `generate.py`) through the gateway."""
    from eventing.cli import output
    from eventing.ingest.publish import GatewayError, Publisher

    a, s = edge.args, edge.settings
    traffic = edge.generator()
    token = edge.gateway_token()
    if not token and s.gateway_token_file and s.gateway_token_file.exists():
        token = s.gateway_token_file.read_text().strip()
    edge.interrupt_on_sigterm()  # `sluice down` stops the generator cleanly
    total = int(a.rate * a.duration) if a.duration else 0
    progress = output.progress(total, "events") if total and not a.quiet else None
    try:
        with Publisher(a.gateway or s.gateway_url, token,
                       concurrency=a.concurrency or 1) as pub:
            sent, injected = traffic.run(pub, rate=a.rate, duration=a.duration,
                                      truth=Path(a.truth) if a.truth else None,
                                      progress=progress, **edge.given("seed", "inject_share"))
    except KeyboardInterrupt:
        return 0
    except GatewayError as exc:
        raise CommandFailed(f"the gateway refused a batch: {exc}", 1) from None
    if progress:
        progress(sent, final=True)
    print(f"published {sent} events ({injected} injected" +
          (f", their ids in {a.truth})" if a.truth else ")"))
    return 0


def query(edge: Edge) -> int:
    """Trino SQL to the real-time server (DuckDB) or to a Trino cluster."""
    import time

    from eventing.cli import output
    from eventing.tables.query import QueryFailed, TranslationError, run

    a = edge.args
    sql = _sql(a)
    server = a.server or edge.settings.realtime_url
    fmt = a.format or a.output
    started = time.perf_counter()
    cut: list[int] = []
    try:
        text = run(sql, server_url=server, trino_url=a.trino, explain=a.explain, fmt=fmt,
                   token=edge.query_token(), on_truncated=cut.append,
                   **edge.given(timeout_s="timeout", max_rows="max_rows"))
    except TranslationError as exc:
        raise CommandFailed(str(exc)) from None
    except QueryFailed as exc:
        raise CommandFailed(str(exc), 1) from None
    print(text)
    if not a.explain:
        output.note(f"elapsed {time.perf_counter() - started:.3f} s")
    if cut:
        # Never a silent cut: the rows above are only the first ones (exit 3).
        output.note(f"warning: the answer was cut at {cut[0]} rows; add a LIMIT or a "
                    "narrower WHERE, or ask for more with --max-rows (up to the server's "
                    "limit, 100000 by default)")
        return 3
    return 0


def _sql(a: argparse.Namespace) -> str:
    """The SQL: the argument, `-f FILE`, or stdin (`-` or nothing, when piped)."""
    if a.file:
        if a.sql not in (None, "-"):
            raise CommandFailed("give the SQL as an argument or with -f FILE, not both")
        try:
            sql = Path(a.file).read_text()
        except OSError as exc:
            raise CommandFailed(f"cannot read {a.file}: {exc.strerror or exc}") from None
    elif a.sql in (None, "-"):
        if a.sql is None and sys.stdin.isatty():
            raise CommandFailed('give SQL: sluice query "SELECT ...", -f FILE, or pipe it in')
        sql = sys.stdin.read()
    else:
        sql = a.sql
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise CommandFailed("the SQL is empty")
    return sql


def deploy(edge: Edge) -> int:
    """Knative/Kubernetes manifests for the topology, applied with kubectl."""
    import tempfile

    from eventing.deploy import DeployError, DeploySettings, write_bundle
    from eventing.deploy.apply import ToolMissing, apply

    a = edge.args
    topology = edge.topology()
    settings = DeploySettings(**edge.given(
        "namespace", "image_registry", "image_tag", "bootstrap", "registry_url",
        "kafka_cluster", "otlp_endpoint"))
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="sluice-deploy-"))
    try:
        bundle = write_bundle(topology, out, settings, include_code=not a.no_code)
    except DeployError as exc:
        raise CommandFailed(str(exc)) from None
    print(f"wrote {len(bundle.files)} files to {out}:")
    for name in topology.functions:
        print(f"  function {name:<12} functions/{name}/Dockerfile, "
              f"base/functions/{name}.service.yaml, base/functions/{name}.kafkasource.yaml")
    print("  gateway            platform/Dockerfile, base/platform/gateway.service.yaml "
          "(token: Secret "
          f"{settings.gateway_token_secret})")
    if topology.tables:
        print(f"  lake sink          base/platform/lakesink.deployment.yaml "
              f"({', '.join(sorted(topology.tables))}; keys: Secret {settings.lake_secret})")
    realtime = [t.name for t in topology.realtime_tables()]
    if realtime:
        print(f"  pinot              base/config/pinot-tables/ ({', '.join(realtime)}), "
              "base/pinot/setup-job.yaml")
    print("  trino              base/config/trino-catalogs/ (iceberg, pinot)")
    print(f"  registry           {settings.registry_url} "
          "(or Sluice's own: kubectl apply -k optional/registry)")
    print("  kustomize          base/, overlays/dev, overlays/prod;  kn script: kn.sh")
    if a.dry_run:
        return 0
    try:
        return apply(out, a.overlay)
    except ToolMissing as exc:
        raise CommandFailed(str(exc), 1) from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    from eventing.cli.output import output_flag

    p = add_command(sub, "publish", publish, help="publish CloudEvents to the gateway",
                    example="sluice publish --type com.sluice.payment.created --key card-1 "
                            "--data '{\"payment_id\": \"p-1\", ...}'\n"
                            "sluice publish --file events.jsonl --token-file ~/.sluice-token")
    p.add_argument("--type", help="event type (routes it to a topic)")
    p.add_argument("--source", help="event source (default /sluice/publish)")
    p.add_argument("--data", help="event data as JSON text")
    p.add_argument("--id", help="event id (default: a new UUID)")
    p.add_argument("--key", help="partition key (the partitionkey extension)")
    p.add_argument("--file", help="JSON Lines file, one structured CloudEvent per line "
                   "(id, source, specversion filled in when missing)")
    settings_flag(p, "--batch-size", type=int,
                  default_of="eventing.ingest.publish:Publisher.send_many.batch_size",
                  help="events per request (--file)")
    p.add_argument("--concurrency", type=int, help="batch requests in flight at once "
                   "(default: eventing.ingest.publish.CLI_CONCURRENCY, 4); 1 keeps the "
                   "events' order across batches")
    p.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    p.add_argument("--token-file", help="file holding the gateway's bearer token (default: "
                   "env SLUICE_GATEWAY_TOKEN)")

    p = add_command(sub, "generate", generate, help="publish the topology's example traffic "
                    "(its generate.py, e.g. payments with injected fraud)",
                    example="sluice generate --rate 200 --duration 30")
    p.add_argument("--rate", type=float, default=50.0, help="events per second")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (0 = forever)")
    p.add_argument("--seed", type=int, help="random seed (default: the generator's)")
    p.add_argument("--inject-share", "--fraud-share", dest="inject_share", type=float,
                   help="share of events that start an injected pattern (fraud, anomalies; "
                        "default: the generator's)")
    p.add_argument("--truth", help="append the ids of injected events to this file")
    p.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--concurrency", type=int, help="batch requests in flight at once "
                   "(default 1: a card's payments arrive in order, which per-key rules "
                   "such as impossible travel rely on; more for load tests)")
    p.add_argument("--token-file", help="file holding the gateway's bearer token")
    p.add_argument("--topology", help="topology file whose generate.py runs "
                   "(default functions/topology.yaml)")

    p = add_command(sub, "query", query, help="run Trino SQL: locally on the real-time server "
                    "(translated to DuckDB), or on Trino with --trino",
                    example='sluice query "SELECT decision, count(*) FROM payments_scored_rt '
                            'GROUP BY 1"\nsluice query -f report.sql -o csv > report.csv\n'
                            'echo "SELECT 1" | sluice query')
    p.add_argument("sql", nargs="?", help="one Trino SQL query, or SHOW TABLES / DESCRIBE "
                   "<table> / SHOW COLUMNS FROM <table> (`-` or left out: read stdin); "
                   "<name> is a lake table, <name>_rt real-time")
    p.add_argument("-f", "--file", help="read the SQL from this file")
    output_flag(p)
    p.add_argument("--format", choices=["table", "csv", "json"], default=None,
                   help=argparse.SUPPRESS)  # the older name of -o
    p.add_argument("--trino", metavar="URL", help="run on Trino at "
                   "http(s)://[user@]host:port[/catalog/schema] instead")
    p.add_argument("--explain", action="store_true",
                   help="print the SQL that would run (DuckDB, or Trino with --trino)")
    p.add_argument("--server", help="real-time server URL (default: the local stack's; "
                   "bearer token from env SLUICE_QUERY_TOKEN)")
    settings_flag(p, "--max-rows", type=int,
                  default_of="eventing.tables.realtime:RealtimeSettings.max_rows",
                  help="most rows to fetch; a cut answer is reported on stderr, exit 3")
    settings_flag(p, "--timeout", type=float, default_of="eventing.tables.query:run.timeout_s",
                  help="seconds to wait for answers")

    p = add_command(sub, "deploy", deploy, help="write Knative/Kubernetes manifests for the "
                    "topology and apply them with kubectl (--dry-run: only write them)",
                    example="sluice deploy --dry-run --out deploy/ --image-registry "
                            "ghcr.io/acme")
    p.add_argument("--dry-run", action="store_true", help="write the files, apply nothing")
    p.add_argument("--out", help="folder to write into (default: a new temporary folder)")
    p.add_argument("--topology", help="topology file (default functions/topology.yaml)")
    p.add_argument("--overlay", choices=["dev", "prod"], default="dev",
                   help="which overlay to apply (without --dry-run)")
    settings_flag(p, "--namespace", default_of=f"{DEPLOY}.namespace",
                  help="Kubernetes namespace")
    settings_flag(p, "--image-registry", default_of=f"{DEPLOY}.image_registry",
                  help="registry prefix of function images")
    settings_flag(p, "--image-tag", default_of=f"{DEPLOY}.image_tag",
                  help="tag of function images")
    settings_flag(p, "--bootstrap", default_of=f"{DEPLOY}.bootstrap",
                  help="Kafka bootstrap servers on the cluster")
    settings_flag(p, "--registry-url", default_of=f"{DEPLOY}.registry_url",
                  help="schema registry URL on the cluster")
    settings_flag(p, "--kafka-cluster", default_of=f"{DEPLOY}.kafka_cluster",
                  help="Strimzi Kafka cluster name (KafkaTopic label)")
    settings_flag(p, "--otlp-endpoint", default_of=f"{DEPLOY}.otlp_endpoint",
                  help="OTLP endpoint functions export traces to")
    p.add_argument("--no-code", action="store_true", help="do not copy code into the build "
                   "contexts (how the checked-in infra/cluster is written)")
