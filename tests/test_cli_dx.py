"""The CLI a function developer meets, without a stack: help, output, errors, new, invoke.

Every command runs as a user runs it (`python -m eventing.cli`), against a state folder
and ports where nothing runs, so these start nothing and touch no one's stack.
"""

from __future__ import annotations

import argparse
import http.server
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eventing.cli import build_parser, output
from eventing.cli.develop import Filter, parse_time
from eventing.cli.edge import CommandFailed
from eventing.tables.query import TranslationError, translate
from tests.helpers import ROOT, free_port_offset, http_server

pytestmark = pytest.mark.timeout(120)
ANSI = "\x1b["


@pytest.fixture(scope="module")
def nowhere(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A state folder that does not exist and a port offset where nothing listens."""
    return tmp_path_factory.mktemp("nowhere") / "state", free_port_offset(start=27300)


def run(*args: str, where: tuple[Path, int], cwd: Path = ROOT, stdin: str | None = None,
        shell_pipe: str | None = None) -> subprocess.CompletedProcess[str]:
    state, offset = where
    cmd = [sys.executable, "-m", "eventing.cli", "--state-dir", str(state),
           "--port-offset", str(offset), *args]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if shell_pipe:
        line = " ".join(f"'{c}'" for c in cmd) + " | " + shell_pipe
        return subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True,
                              text=True, timeout=60, cwd=cwd, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
                          input=stdin)


# --------------------------------------------------------------------------- help


def _commands(parser: argparse.ArgumentParser, prefix: str = ""
              ) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found |= _commands(sub, prefix + name + " ")
    return found


def test_every_command_has_a_description_and_an_example() -> None:
    commands = _commands(build_parser())
    assert {"new", "invoke", "tail", "deadletters", "replay", "schemas", "logs", "query",
            "publish", "status", "sink lake"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        assert parser.description, f"`sluice {name}` has no description"
        assert "\nexample:\n  sluice " in text, f"`sluice {name} --help` shows no example"


def test_top_level_help_groups_commands_and_documents_exit_codes(nowhere) -> None:
    proc = run("--help", where=nowhere)
    assert proc.returncode == 0
    text = proc.stdout
    develop = text.index("Develop functions:")
    internal = text.index("Internal parts")
    assert develop < text.index("  invoke ") < internal
    # Daemons are listed apart, after every user command, on one line.
    assert ("registry, run, gateway, tracestore, retention, sink, supervise, realtime"
            in text[internal:])
    assert "  gateway " not in text[:internal]
    for code in ("0 ", "1 ", "2 ", "3 ", "130", "141"):
        assert f"\n  {code}" in text[text.index("exit codes:"):]
    assert "argument parsing" not in text  # the old description was a code comment


def test_version(nowhere) -> None:
    proc = run("--version", where=nowhere)
    assert proc.returncode == 0 and proc.stdout.startswith("sluice 0.")


def test_a_closed_pipe_ends_quietly(nowhere, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "gateway.log").write_text("a log line of some length\n" * 200_000)
    proc = run("logs", "gateway", "-n", "0", where=(state, nowhere[1]), shell_pipe="head -1")
    assert proc.stdout == "a log line of some length\n"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


# --------------------------------------------------------------------------- output


def test_plain_table_when_not_a_terminal_and_trino_rendering() -> None:
    import io

    rows = [["a", True, None, 1.5], ["b", False, {"k": 1}, 2.0]]
    text = output.render(["name", "ok", "extra", "n"], rows, "table", stream=io.StringIO())
    assert ANSI not in text
    lines = text.splitlines()
    assert lines[0].split() == ["name", "ok", "extra", "n"]
    assert lines[2].split() == ["a", "true", "NULL", "1.5"]
    assert "True" not in text and "None" not in text
    csv_text = output.render(["name", "ok", "extra", "n"], rows, "csv")
    assert csv_text.splitlines() == ["name,ok,extra,n", "a,true,,1.5",
                                     'b,false,"{""k"": 1}",2.0']
    assert json.loads(output.render(["name", "ok"], [["a", True]], "json")) == [
        {"name": "a", "ok": True}]


def test_rich_table_on_a_terminal() -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    text = output.render(["name", "ok"], [["a", True]], "table", stream=Tty())  # type: ignore
    assert "name" in text and "true" in text


def test_status_without_a_state_folder_creates_nothing(nowhere) -> None:
    state, _ = nowhere
    proc = run("status", where=nowhere)
    assert proc.returncode == 3
    assert f"the state folder {state} does not exist" in proc.stderr
    assert not state.exists()
    proc = run("status", "-o", "json", where=nowhere)
    assert proc.returncode == 3 and json.loads(proc.stdout) == [] and not state.exists()


def test_logs_names_the_parts_that_have_logs(tmp_path: Path, nowhere) -> None:
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "broker.log").write_text("one\ntwo\nthree\n")
    proc = run("logs", "gatewy", where=(state, nowhere[1]))
    assert proc.returncode == 2
    assert "no log for part 'gatewy'" in proc.stderr and "parts with logs: broker" in proc.stderr
    proc = run("logs", "broker", "-n", "2", where=(state, nowhere[1]))
    assert proc.returncode == 0 and proc.stdout == "two\nthree\n"


# --------------------------------------------------------------------------- query


def test_query_names_columns_as_trino_does() -> None:
    sql = translate("SELECT count(*), merchant_id, round(avg(score), 1), max(score) AS top "
                    "FROM payments_scored_rt GROUP BY merchant_id")
    assert "COUNT(*) AS _col0" in sql and "AS _col2" in sql and "AS top" in sql
    assert "merchant_id AS" not in sql


@pytest.mark.parametrize("sql, message", [
    ("SELEC merchant_id FROM payments_scored_rt",
     "line 1, column 1: 'SELEC' does not start a SQL statement; did you mean SELECT?"),
    ("\n  SELCT 1", "line 2, column 3: 'SELCT' does not start a SQL statement"),
    ("SELECT a,\n  b FROM t WHERE (", "does not parse as trino SQL at line 2, column 18"),
])
def test_query_parse_errors_give_the_position_without_escape_codes(sql: str, message: str
                                                                    ) -> None:
    with pytest.raises(TranslationError) as info:
        translate(sql)
    assert message in str(info.value)
    assert ANSI not in str(info.value)


def test_query_reads_sql_from_stdin_and_files(nowhere, tmp_path: Path) -> None:
    # --trino with --explain translates locally and contacts nothing.
    proc = run("query", "--trino", "http://127.0.0.1:9", "--explain", where=nowhere,
               stdin="SELECT merchant_id FROM payments_scored;\n")
    assert proc.returncode == 0, proc.stderr
    assert "iceberg.sluice.payments_scored" in proc.stdout
    f = tmp_path / "q.sql"
    f.write_text("SELEC 1")
    proc = run("query", "-f", str(f), "--trino", "http://127.0.0.1:9", "--explain",
               where=nowhere)
    assert proc.returncode == 2
    assert "error: line 1, column 1: 'SELEC' does not start a SQL statement; did you mean " \
           "SELECT?" in proc.stderr
    assert ANSI not in proc.stderr
    proc = run("query", "-f", str(tmp_path / "missing.sql"), where=nowhere)
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "missing.sql" in proc.stderr
    proc = run("query", "-", where=nowhere, stdin="  ;\n")
    assert proc.returncode == 2 and "the SQL is empty" in proc.stderr


def test_query_against_no_server_says_where_it_looked(nowhere) -> None:
    proc = run("query", "SELECT 1", where=nowhere)
    assert proc.returncode == 1
    assert "did not answer" in proc.stderr and "sluice status" in proc.stderr


# --------------------------------------------------------------------------- publish


def _gateway(answers: list[tuple[int, dict]], seen: list[dict]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length", 0))
            seen.append({"auth": self.headers.get("authorization"),
                         "body": self.rfile.read(length)})
            status, body = answers.pop(0) if answers else (202, {"accepted": 1})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    return http_server(Handler)


def test_publish_reports_the_files_line_numbers(nowhere, tmp_path: Path) -> None:
    f = tmp_path / "events.jsonl"
    f.write_text('{"type": "t", "data": {}}\n\n{"type": "t", "data": {}}\n'
                 '{"type": "t", "data": {}}\n')
    rejected = {"error": "schema_violation", "reason": "1 of 3 events rejected",
                "events": [{"index": 1, "reason": "field 'amount' missing"}]}
    with _gateway([(422, rejected)], []) as url:
        proc = run("publish", "--file", str(f), "--gateway", url, where=nowhere)
    assert proc.returncode == 1
    assert f"{f}:3: field 'amount' missing" in proc.stderr  # line 3: the blank line counts
    assert "0-based" not in proc.stderr


def test_publish_token_file(nowhere, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t\n")
    seen: list[dict] = []
    with _gateway([], seen) as url:
        proc = run("publish", "--type", "t", "--data", "{}", "--gateway", url,
                   "--token-file", str(token), where=nowhere)
    assert proc.returncode == 0, proc.stderr
    assert seen[0]["auth"] == "Bearer s3cr3t"
    assert "s3cr3t" not in proc.stdout + proc.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    proc = run("publish", "--type", "t", "--data", "{}", "--token-file", str(empty),
               where=nowhere)
    assert proc.returncode == 2 and f"the token file {empty} is empty" in proc.stderr
    proc = run("publish", "--type", "t", "--data", "{}", "--token-file",
               str(tmp_path / "nope"), where=nowhere)
    assert proc.returncode == 2 and "cannot read the token file" in proc.stderr


def test_publish_input_errors(nowhere, tmp_path: Path) -> None:
    proc = run("publish", "--file", str(tmp_path / "missing.jsonl"), where=nowhere)
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr and "missing.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("publish", "--type", "t", where=nowhere)
    assert proc.returncode == 2 and "give --file FILE, or --type TYPE and --data" in proc.stderr
    proc = run("publish", "--type", "t", "--data", "{nope", where=nowhere)
    assert proc.returncode == 2 and "--data is not valid JSON" in proc.stderr


def test_publish_to_an_unreachable_gateway_fails_at_once_naming_it(nowhere) -> None:
    from eventing.stack.settings import Ports

    url = f"http://127.0.0.1:{Ports().shifted(nowhere[1]).gateway}/"
    proc = run("publish", "--type", "t", "--data", "{}", where=nowhere)
    assert proc.returncode == 1
    # The no-retry path: a refused connection before any answer is reported, not retried.
    assert f"cannot connect to the gateway at {url}" in proc.stderr
    assert "sluice status" in proc.stderr


# --------------------------------------------------------------------------- new + invoke


@pytest.fixture()
def project(tmp_path: Path, nowhere) -> Path:
    proj = tmp_path / "shop"
    assert run("new", "project", str(proj), where=nowhere).returncode == 0
    proc = run("new", "function", "resize", where=nowhere, cwd=proj)
    assert proc.returncode == 0, proc.stderr
    return proj


def test_new_project_and_function_write_a_runnable_project(project: Path, nowhere) -> None:
    from eventing import topology

    for name in ("functions/topology.yaml", "functions/resize/main.py",
                 "tests/test_resize.py", "schemas/resize.in.avsc", "README.md", "Makefile"):
        assert (project / name).exists(), name
    topo = topology.load(project / "functions" / "topology.yaml")
    fn = topo.function("resize")
    assert fn.topics == ("resize.in",) and list(fn.outputs) == ["resize.out"]
    assert topo.routes == {"dev.shop.resize.in": "resize.in"}
    assert "up:" in (project / "Makefile").read_text()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests"], cwd=project, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert "2 passed" in tests.stdout, tests.stdout + tests.stderr


def test_new_refuses_with_the_reason(project: Path, nowhere, tmp_path: Path) -> None:
    proc = run("new", "project", str(project), where=nowhere)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    proc = run("new", "function", "resize", where=nowhere, cwd=project)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run("new", "function", "Bad_Name", where=nowhere, cwd=project)
    assert proc.returncode == 2 and "lower-case DNS label" in proc.stderr
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    proc = run("new", "function", "x", where=nowhere, cwd=elsewhere)
    assert proc.returncode == 2 and "sluice new project DIR" in proc.stderr


def test_invoke_shows_outputs_through_the_real_serde(project: Path, nowhere) -> None:
    proc = run("invoke", "resize", "--data", '{"id": "1", "amount": 2.5}', "--key", "k-1",
               "-o", "json", where=nowhere, cwd=project)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["code"] == 200 and out["error"] is None
    [o] = out["outputs"]
    assert o["topic"] == "resize.out" and o["type"] == "dev.shop.resize.in"
    assert o["key"] == "k-1" and o["data"] == {"id": "1", "amount": 5.0}
    assert "using the schemas in" in proc.stderr  # no registry: the project's files
    table = run("invoke", "resize", "--data", '{"id": "1", "amount": 2.5}', where=nowhere,
                cwd=project)
    assert table.stdout.splitlines()[0].split() == ["TOPIC", "TYPE", "KEY", "ID", "DATA"]


def test_invoke_reports_rejection_and_bad_input(project: Path, nowhere, tmp_path: Path
                                               ) -> None:
    proc = run("invoke", "resize", "--data", '{"id": "1", "amount": -1}', where=nowhere,
               cwd=project)
    assert proc.returncode == 1
    assert "rejected (422): Reject: amount must not be negative" in proc.stdout
    assert "dead-lettered now" in proc.stdout
    proc = run("invoke", "resize", "--data", '{"id": "1", "amount": "x"}', where=nowhere,
               cwd=project)
    assert proc.returncode == 2
    assert "does not fit 'resize.in''s schema: field 'amount': expected double" in proc.stderr
    proc = run("invoke", "nope", "--data", "{}", where=nowhere, cwd=project)
    assert proc.returncode == 2 and "no function 'nope'" in proc.stderr
    proc = run("invoke", "resize", "--data", "{", where=nowhere, cwd=project)
    assert proc.returncode == 2 and "--data is not valid JSON" in proc.stderr
    proc = run("invoke", "resize", where=nowhere, cwd=project)
    assert proc.returncode == 2 and "--data JSON or --file FILE" in proc.stderr
    proc = run("invoke", "resize", "--file", str(tmp_path / "no.json"), where=nowhere,
               cwd=project)
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_invoke_url_posts_as_a_kafkasource_does(project: Path, nowhere) -> None:
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            seen.append({k.lower(): v for k, v in self.headers.items()} | {"body": body})
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    with http_server(Handler) as url:
        proc = run("invoke", "resize", "--data", '{"id": "1", "amount": 2.5}', "--url", url,
                   where=nowhere, cwd=project)
    assert proc.returncode == 0, proc.stderr
    [req] = seen
    assert req["ce-type"] == "dev.shop.resize.in" and req["ce-specversion"] == "1.0"
    assert req["content-type"] == "application/avro" and req["body"][:1] == b"\x00"
    proc = run("invoke", "resize", "--data", '{"id": "1", "amount": 2.5}', "--url",
               "http://127.0.0.1:9", where=nowhere, cwd=project)
    assert proc.returncode == 1
    assert "cannot reach the function at http://127.0.0.1:9" in proc.stderr


# --------------------------------------------------------------------------- parsing


def test_filter_and_time_parsing() -> None:
    keep = Filter(["type=t.a", "data.amount!=0", "data.card~^card-0"])
    assert keep({"type": "t.a"}, {"amount": 5, "card": "card-01"})
    assert not keep({"type": "t.b"}, {"amount": 5, "card": "card-01"})
    assert not keep({"type": "t.a"}, {"amount": 0, "card": "card-01"})
    assert not keep({"type": "t.a"}, {"amount": 5, "card": "x"})
    assert Filter(["data.ok=true"])({}, {"ok": True})  # rendered as Trino renders it
    with pytest.raises(CommandFailed, match="NAME=VALUE"):
        Filter(["amount > 5"])
    with pytest.raises(CommandFailed, match="bad regular expression"):
        Filter(["type~("])
    from datetime import UTC, datetime

    now = datetime(2026, 11, 30, 17, 0, tzinfo=UTC)
    assert parse_time("15m", now=now) == int(now.timestamp() * 1000) - 15 * 60_000
    assert parse_time("2026-11-30T16:00:00Z") == int(now.timestamp() * 1000) - 3_600_000
    assert parse_time("1764522000000") == 1764522000000
    with pytest.raises(CommandFailed, match="ISO 8601"):
        parse_time("yesterday")


def test_progress_is_a_rich_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from eventing.ingest.publish import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    plain = output.progress(10)
    assert isinstance(plain, Progress)
    plain(10, final=True)
    assert ANSI not in sys.stderr.getvalue() and "10/10 events" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = output.progress(10)
    bar(5)
    bar(10, final=True)
    assert isinstance(bar, output.RichProgress) and "10/10" in sys.stderr.getvalue()


def test_top_as_data_names_an_unreachable_prometheus(nowhere) -> None:
    from eventing.stack.settings import Ports

    proc = run("top", "-o", "json", where=nowhere)
    assert proc.returncode == 1
    assert f"127.0.0.1:{Ports().shifted(nowhere[1]).prometheus}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trace_waterfall_time_bars() -> None:
    from eventing.telemetry import traces

    assert traces.time_bar(0, 100, 100, width=10) == "█" * 10
    assert traces.time_bar(50, 10, 100, width=10) == "     █    "
    assert traces.time_bar(99, 0.01, 100, width=10) == "         █"  # never invisible
    spans = [traces.StoredSpan("t" * 32, "a", None, "gw", "receive", "server", 0, 10_000_000,
                               "ok", ""),
             traces.StoredSpan("t" * 32, "b", "a", "fn", "process", "consumer", 5_000_000,
                               10_000_000, "unset", "")]
    plain = traces.render({"t" * 32: spans})
    barred = traces.render({"t" * 32: spans}, bars=True)
    assert "█" not in plain and "TIME" not in plain
    assert "TIME" in barred and "█" * 24 in barred and " " * 12 + "█" * 12 in barred
