"""Commands for developing functions: new, invoke, tail, deadletters, replay, schemas."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from eventing.cli import output
from eventing.cli.edge import CommandFailed, Edge, add_command

# ---------------------------------------------------------------------- shared helpers


def parse_time(text: str, *, now: datetime | None = None) -> int:
    """`--since`/`--until` to epoch ms: ISO 8601 (`2026-11-30T17:00:00Z`, a date), epoch
    ms, or an age: `90s`, `15m`, `2h`, `1d` ago."""
    now = now or datetime.now(UTC)
    value = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return int((now - timedelta(seconds=float(value[:-1]) * units[value[-1]]))
                   .timestamp() * 1000)
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CommandFailed(f"time {text!r}: use ISO 8601 (2026-11-30T17:00:00Z), epoch "
                            "milliseconds, or an age such as 15m, 2h, 1d") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _serde(edge: Edge, *, quiet: bool = False) -> Any:
    """The registry's serde when a registry answers, else the project's schema files."""
    from eventing.serde import AvroSerde
    from eventing.stack.health import http_status

    url = getattr(edge.args, "registry", None) or edge.settings.registry_url
    try:
        up = http_status(url.rstrip("/") + "/subjects") == 200
    except Exception:  # noqa: BLE001 - any failure means "no registry here"
        up = False
    if up:
        return AvroSerde(url)
    if getattr(edge.args, "registry", None):
        raise CommandFailed(f"the schema registry at {url} does not answer")
    from eventing.fn.local import FileSchemas

    if not quiet:
        output.note(f"(no registry at {url}: using the schemas in {edge.settings.schemas_dir})")
    return AvroSerde(client=FileSchemas(edge.settings.schemas_dir), subject_ttl_s=None)


def _bootstrap(edge: Edge) -> str:
    return getattr(edge.args, "bootstrap", None) or edge.settings.bootstrap


def _broker_up(edge: Edge) -> None:
    """Fail fast, naming the address, when no broker listens (librdkafka would retry)."""
    from eventing.stack.process import port_open

    bootstrap = _bootstrap(edge)
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not port.isdigit() or not port_open(host or "127.0.0.1", int(port), timeout=1.0):
        raise CommandFailed(f"no Kafka broker answers at {bootstrap}; is the stack up "
                            "(`sluice status`), or is --bootstrap wrong?", 1)


def _read_data(a: argparse.Namespace) -> Any:
    if (a.data is None) == (a.file is None):
        raise CommandFailed("give the event data with --data JSON or --file FILE (one of them)")
    if a.file:
        try:
            text = Path(a.file).read_text()
        except OSError as exc:
            raise CommandFailed(f"cannot read {a.file}: {exc.strerror or exc}") from None
        where = a.file
    else:
        text, where = a.data, "--data"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandFailed(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno}") from None


# ---------------------------------------------------------------------- new


def new(edge: Edge) -> int:
    from eventing import scaffold

    a = edge.args
    try:
        if a.kind == "project":
            files = scaffold.new_project(Path(a.name))
            print(f"created project {a.name}:")
            for f in files:
                print(f"  {f}")
            output.note(f"next: cd {a.name} && sluice new function NAME")
        else:
            project = edge.project_dir or Path.cwd()
            files = scaffold.new_function(project, a.name, event_type=a.type,
                                          input_topic=a.input, output_topic=a.output)
            print(f"created function {a.name}:")
            for f in files:
                print(f"  {f}")
            output.note(f"next: sluice invoke {a.name} --data '{{\"id\": \"1\", "
                        "\"amount\": 2.5}'")
    except scaffold.ScaffoldError as exc:
        raise CommandFailed(str(exc)) from None
    return 0


# ---------------------------------------------------------------------- invoke


def invoke(edge: Edge) -> int:
    from eventing.fn import local
    from eventing.serde import SerdeError

    a = edge.args
    topology = edge.topology()
    function = _function(topology, a.function)
    data = _read_data(a)
    serde = _serde(edge)
    try:
        topic, event = local.input_event(topology, function, data, event_type=a.type,
                                         key=a.key, event_id=a.id, serde=serde)
    except SerdeError as exc:
        raise CommandFailed(f"the event does not fit {function.topics[0]!r}'s schema: "
                            f"{exc}") from None
    except ValueError as exc:
        raise CommandFailed(str(exc)) from None
    if a.url:
        try:
            status, body = local.post(a.url, event)
        except ConnectionError as exc:
            raise CommandFailed(str(exc), 1) from None
        print(f"{a.url} answered {status}" + (f": {body}" if body else ""))
        return 0 if 200 <= status < 300 else 1
    try:
        outcome = local.invoke(function, topic, event, serde)
    except ImportError as exc:
        raise CommandFailed(f"cannot load function {function.name!r}: {exc}") from None
    if a.output == "json":
        print(json.dumps(outcome.as_dict(), indent=2, default=str))
    elif outcome.error is None:
        if not outcome.outputs:
            output.note("(the function returned nothing: no outputs)")
        else:
            output.emit(["TOPIC", "TYPE", "KEY", "ID", "DATA"],
                        [[o.topic, o.type, o.key, o.id, o.data] for o in outcome.outputs],
                        a.output)
    else:
        print(f"{'rejected' if outcome.code == 422 else 'failed'} ({outcome.code}): "
              f"{outcome.error}")
        print(f"in the pipeline it would be {outcome.then}")
    return 0 if outcome.error is None else 1


def _function(topology: Any, name: str) -> Any:
    from eventing.topology import TopologyError

    try:
        return topology.function(name)
    except TopologyError as exc:
        raise CommandFailed(str(exc)) from None


# ---------------------------------------------------------------------- tail


class Filter:
    """`--filter` expressions, all of which must hold: `NAME=VALUE`, `NAME!=VALUE`,
    `NAME~REGEX`. NAME is a CloudEvent attribute (`type`, `source`, `partitionkey` ...)
    or `data.FIELD[.FIELD...]`."""

    def __init__(self, exprs: list[str]) -> None:
        import re

        self.tests = []
        for expr in exprs:
            m = re.match(r"^\s*([A-Za-z_][\w.]*)\s*(!=|=|~)\s*(.*)$", expr)
            if not m:
                raise CommandFailed(f"--filter {expr!r}: write NAME=VALUE, NAME!=VALUE or "
                                    "NAME~REGEX (NAME: an attribute, or data.FIELD)")
            name, op, value = m.groups()
            if op == "~":
                try:
                    pattern = re.compile(value)
                except re.error as exc:
                    raise CommandFailed(f"--filter {expr!r}: bad regular expression: "
                                        f"{exc}") from None
                self.tests.append((name, op, pattern))
            else:
                self.tests.append((name, op, value))

    def __call__(self, attrs: dict[str, Any], data: Any) -> bool:
        for name, op, value in self.tests:
            got = _lookup(attrs, data, name)
            text = None if got is None else output.cell(got)
            if op == "=" and text != value:
                return False
            if op == "!=" and text == value:
                return False
            if op == "~" and (text is None or not value.search(text)):
                return False
        return True


def _lookup(attrs: dict[str, Any], data: Any, name: str) -> Any:
    if not name.startswith("data.") and name != "data":
        return attrs.get(name)
    value = data
    for part in name.split(".")[1:]:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


TAIL_COLUMNS = ["time", "topic", "partition", "offset", "key", "type", "id", "data"]


def tail(edge: Edge) -> int:
    from eventing import scan

    a = edge.args
    keep = Filter(a.filter or [])
    _broker_up(edge)
    serde = _serde(edge, quiet=True)
    edge.interrupt_on_sigterm()
    shown = 0
    fmt = a.output
    writer = None
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(TAIL_COLUMNS)
    try:
        for seen in scan.read(_bootstrap(edge), a.topic, from_beginning=a.from_beginning,
                              follow=a.limit is None or a.limit > 0, serde=serde,
                              timeout_s=a.timeout, on_ready=lambda: output.note(
                                  f"(reading {', '.join(a.topic)}"
                                  + ("" if a.from_beginning else ": new events only")
                                  + "; Ctrl-C stops)")):
            attrs = seen.attributes()
            if not keep(attrs, seen.data):
                continue
            row = _tail_row(seen, attrs)
            if fmt == "json":  # one object per line: a stream, readable with jq
                print(json.dumps({**row, "attributes": attrs}, default=str), flush=True)
            elif writer is not None:
                writer.writerow([output.cell(row[c]) if row[c] is not None else ""
                                 for c in TAIL_COLUMNS])
                sys.stdout.flush()
            else:
                print(f"{row['time'] or '-'} {row['topic']}[{row['partition']}]@{row['offset']}"
                      f" key={row['key']} type={row['type']} id={row['id']}\n  "
                      f"{output.cell(row['data'])}", flush=True)
            shown += 1
            if a.limit and shown >= a.limit:
                break
    except LookupError as exc:
        raise CommandFailed(str(exc).strip("'\""), 2) from None
    except KeyboardInterrupt:
        pass
    return 0


def _tail_row(seen: Any, attrs: dict[str, Any]) -> dict[str, Any]:
    from eventing.delivery.deadletters import _iso

    data = seen.data
    if seen.decode_error:
        data = f"<undecodable: {seen.decode_error}>"
    elif isinstance(data, bytes | bytearray):
        data = bytes(data).decode("utf-8", "replace")
    return {"time": _iso(seen.timestamp_ms), "topic": seen.topic, "partition": seen.partition,
            "offset": seen.offset, "key": seen.key.decode("utf-8", "replace") if seen.key
            else None, "type": attrs.get("type"), "id": attrs.get("id"), "data": data}


# ---------------------------------------------------------------------- dead letters


def _dead_letter_topics(edge: Edge) -> list[str]:
    a = edge.args
    if a.topic:
        return [a.topic]
    topology = edge.topology()
    functions = ([_function(topology, a.function)] if a.function
                 else list(topology.functions.values()))
    topics = sorted({f.delivery.dead_letter_sink for f in functions})
    if not topics:
        from eventing.topology import DEFAULT_DEAD_LETTER_TOPIC

        topics = [DEFAULT_DEAD_LETTER_TOPIC]
    return topics


def deadletters(edge: Edge) -> int:
    from eventing.delivery import deadletters as dl

    a = edge.args
    if a.action in ("show", "redrive") and not a.id and not (a.action == "redrive" and a.all):
        raise CommandFailed(f"`deadletters {a.action}` needs --id REF (a reference from "
                            "`deadletters list`, or an event id)"
                            + ("; or --all for every one not yet redriven"
                               if a.action == "redrive" else ""))
    _broker_up(edge)
    serde = _serde(edge, quiet=True)
    since = parse_time(a.since) if a.since else None
    try:
        letters = dl.list_dead_letters(_bootstrap(edge), _dead_letter_topics(edge), serde,
                                       function=a.function, since_ms=since, refs=a.id or [])
    except LookupError as exc:
        raise CommandFailed(f"{str(exc).strip(chr(39))}: no dead letters yet "
                            "(the topic is made by `sluice up`)", 1) from None
    if a.id:
        missing = [i for i in a.id if not any(i in (x.ref, x.event_id) for x in letters)]
        if missing:
            raise CommandFailed(f"no dead letter {', '.join(missing)} (see `sluice "
                                "deadletters list`)")
    if a.action == "list":
        output.records([x.summary() for x in letters],
                       ["ref", "time", "function", "code", "attempts", "id", "error",
                        "redriven"], a.output)
        output.note(f"({len(letters)} dead letter{'s' if len(letters) != 1 else ''})")
        return 0
    if a.action == "show":
        details = [x.detail() for x in letters]
        if a.output == "json":
            print(json.dumps(details, indent=2, default=str))
        else:
            for d in details:
                for k, v in d.items():
                    if k not in ("attributes", "data"):
                        print(f"{k:<10} {output.cell(v)}")
                print("attributes " + json.dumps(d["attributes"], default=str))
                print("data       " + json.dumps(d["data"], default=str, indent=2))
                print()
        return 0
    todo = [x for x in letters if not x.redriven] if a.all else letters
    results = dl.redrive(_bootstrap(edge), todo)
    output.emit(["REF", "OUTCOME", "DETAIL"], [[r.ref, r.outcome, r.detail] for r in results],
                a.output)
    return 0 if all(r.outcome != "failed" for r in results) else 1


# ---------------------------------------------------------------------- replay


def replay(edge: Edge) -> int:
    from eventing.delivery import replay as rp
    from eventing.delivery.runner import RunSettings, build

    a = edge.args
    topology = edge.topology()
    since = parse_time(a.since)
    until = parse_time(a.until) if a.until else None
    if until is not None and until <= since:
        raise CommandFailed("--until must be after --since")
    consumers = [f for f in topology.functions.values() if a.topic in f.topics]
    if a.function:
        consumers = [_function(topology, a.function)]
    if not consumers:
        raise CommandFailed(f"no function of {edge.topology_path} consumes {a.topic!r}")
    _broker_up(edge)
    settings = RunSettings(bootstrap=_bootstrap(edge), registry_url=edge.settings.registry_url,
                           broker_storage=edge.settings.broker_storage)
    stop = edge.foreground("sluice-replay")
    rows = []
    for function in consumers:
        try:
            group, stats, handed = rp.replay(
                function, a.topic, lambda f, **kw: build(f, settings, **kw),
                bootstrap=settings.bootstrap, since_ms=since, until_ms=until, stop=stop)
        except ValueError as exc:
            raise CommandFailed(str(exc)) from None
        rows.append([function.name, group, handed, stats.succeeded, stats.dead_lettered])
    output.emit(["FUNCTION", "REPLAY GROUP", "RECORDS", "SUCCEEDED", "DEAD-LETTERED"], rows,
                a.output, numeric=[False, False, True, True, True])
    return 0


# ---------------------------------------------------------------------- schemas


def schemas(edge: Edge) -> int:
    from eventing.registry import files

    a = edge.args
    action = a.action or "register"
    url = a.registry or edge.settings.registry_url
    schemas_dir = edge.settings.schemas_dir
    try:
        if action == "register":
            rows = [[r.subject, r.schema_id, r.path.name]
                    for r in files.register_all(url, schemas_dir)]
            output.emit(["SUBJECT", "ID", "FILE"], rows, a.output)
            return 0
        if action == "list":
            output.records(files.list_subjects(url, schemas_dir),
                           ["subject", "version", "id", "level", "file", "local"], a.output)
            return 0
        if action == "show":
            print(files.show(url, _subject(a), version=a.version))
            return 0
        paths = [Path(a.name)] if a.name else sorted(schemas_dir.glob("*.avsc"))
        for path in paths:
            if not path.is_file():
                raise CommandFailed(f"no schema file {path}")
        if not paths:
            raise CommandFailed(f"no *.avsc files in {schemas_dir}")
        if action == "diff":
            for path in paths:
                print(files.diff(url, path), end="")
            return 0
        results = [files.check(url, path) for path in paths]
        output.records([r.as_dict() for r in results],
                       ["file", "subject", "level", "verdict", "reasons"], a.output)
        return 0 if all(r.compatible for r in results) else 1
    except files.RegistryUnavailable as exc:
        raise CommandFailed(str(exc), 1) from None
    except files.IncompatibleSchema as exc:
        raise CommandFailed(str(exc), 1) from None
    except LookupError as exc:
        raise CommandFailed(str(exc).strip("'\"")) from None


def _subject(a: argparse.Namespace) -> str:
    from eventing.serde import subject_for

    if not a.name:
        raise CommandFailed("name a topic or subject: `sluice schemas show payments.raw`")
    return a.name if a.name.endswith("-value") or a.name.endswith("-key") else subject_for(
        a.name)


# ---------------------------------------------------------------------- parser


def _kafka(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack's)")
    p.add_argument("--registry", help="schema registry URL (default: the local stack's)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "new", new, help="start a project, or add a function to one (code, "
                    "unit test, schema stub, topology entry)",
                    example="sluice new project shop && cd shop\nsluice new function resize")
    p.add_argument("kind", choices=["project", "function"], help="what to create")
    p.add_argument("name", help="project folder, or function name (a-z, 0-9, -)")
    p.add_argument("--type", help="function: the input event type the gateway routes to it "
                   "(default dev.<project>.<name>.in)")
    p.add_argument("--input", help="function: its input topic (default <name>.in)")
    p.add_argument("--output", help="function: its output topic (default <name>.out)")

    p = add_command(sub, "invoke", invoke, help="run a function locally on one event through "
                    "the real serde and routing; print its outputs or the rejection",
                    example="sluice invoke validate --data '{\"payment_id\": \"p-1\", ...}'\n"
                            "sluice invoke score --file event.json -o json\n"
                            "sluice invoke enrich --file event.json --url http://127.0.0.1:8080")
    p.add_argument("function", help="function name in the topology")
    p.add_argument("--data", help="event data as JSON text")
    p.add_argument("--file", help="file holding the event data as JSON")
    p.add_argument("--type", help="event type (default: the type routed to its input topic)")
    p.add_argument("--key", help="partition key (the partitionkey extension)")
    p.add_argument("--id", help="event id (default: a new UUID)")
    p.add_argument("--url", help="POST the event to a running function instead, as a "
                   "KafkaSource does (HTTP binary mode, one event)")
    p.add_argument("--topology", help="topology file (default: the project's)")
    p.add_argument("--registry", help="schema registry URL (default: the local stack's, else "
                   "the project's schemas/ files)")
    output.output_flag(p)

    p = add_command(sub, "tail", tail, help="print a topic's events, decoded, as they arrive",
                    example="sluice tail payments.scored\n"
                            "sluice tail payments.raw --from-beginning --filter "
                            "data.currency=EUR -o json | jq .data")
    p.add_argument("topic", nargs="+", help="topic(s) to read")
    p.add_argument("--from-beginning", action="store_true",
                   help="start at the oldest record (default: only new ones)")
    p.add_argument("--filter", action="append", metavar="EXPR",
                   help="NAME=VALUE, NAME!=VALUE or NAME~REGEX; NAME is an attribute "
                        "(type, source, id, partitionkey ...) or data.FIELD; repeat to AND")
    p.add_argument("-n", "--limit", type=int, help="stop after N events (0: print what is "
                   "there now and stop)")
    p.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    _kafka(p)
    output.output_flag(p)

    p = add_command(sub, "deadletters", deadletters, help="list, show and redrive dead "
                    "letters: the error, attempts and the original event",
                    example="sluice deadletters list --function validate --since 1h\n"
                            "sluice deadletters show --id sluice.deadletter/0/12\n"
                            "sluice deadletters redrive --id sluice.deadletter/0/12")
    p.add_argument("action", choices=["list", "show", "redrive"])
    p.add_argument("--function", help="only this function's dead letters")
    p.add_argument("--since", help="only those since TIME (ISO 8601, epoch ms, or 15m/2h/1d)")
    p.add_argument("--id", action="append", metavar="REF",
                   help="a dead letter's reference (topic/partition/offset) or event id; "
                        "repeatable")
    p.add_argument("--all", action="store_true",
                   help="redrive: every listed dead letter not yet redriven")
    p.add_argument("--topic", help="dead-letter topic (default: the topology's)")
    p.add_argument("--topology", help="topology file (default: the project's)")
    _kafka(p)
    output.output_flag(p)

    p = add_command(sub, "replay", replay, help="deliver a topic's records of a time range "
                    "to its functions again (a replay group; live groups untouched)",
                    example="sluice replay --topic payments.valid --since 2026-11-30T17:00:00Z "
                            "--until 2026-11-30T17:05:00Z\n"
                            "sluice replay --topic payments.raw --since 10m --function validate")
    p.add_argument("--topic", required=True, help="the topic whose records are replayed")
    p.add_argument("--since", required=True, help="TIME: ISO 8601, epoch ms, or 15m/2h/1d ago")
    p.add_argument("--until", help="TIME (default: now)")
    p.add_argument("--function", help="only this function (default: every consumer of the "
                   "topic)")
    p.add_argument("--topology", help="topology file (default: the project's)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack's)")
    output.output_flag(p)

    p = add_command(sub, "schemas", schemas, help="register, list, show, check and diff the "
                    "Avro schemas in schemas/ against the registry",
                    example="sluice schemas check schemas/payments.raw.avsc\n"
                            "sluice schemas diff\nsluice schemas list -o json\n"
                            "sluice schemas show payments.raw\nsluice schemas   # register all")
    p.add_argument("action", nargs="?", choices=["register", "list", "show", "check", "diff"],
                   help="register (default): every schemas/*.avsc; list: subjects and "
                        "versions; show NAME: a registered schema; check [FILE]: would the "
                        "registry accept it (its compatibility level, with the reason); "
                        "diff [FILE]: local file vs registered")
    p.add_argument("name", nargs="?", help="show: topic or subject; check/diff: an .avsc file")
    p.add_argument("--version", default="latest", help="show: version (default latest)")
    p.add_argument("--registry", help="registry URL (default: the local stack's)")
    output.output_flag(p)
