"""What the topology declares beyond functions (tables, trace ids, schemas), and the
metadata statements that make declared tables discoverable: unit tests, no stack."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from eventing import topology as topo
from eventing.stack.settings import load_settings
from eventing.tables import dedupe, query
from eventing.tables.realtime import RealtimeSettings, RealtimeTable, create_app
from tests.helpers import ROOT

SCHEMAS = ROOT / "schemas"
FN = "functions:\n  f:\n    source: f.py\n    topics: [a]\n    outputs: [b]\n"


def _topology(tmp_path: Path, extra: str) -> topo.Topology:
    (tmp_path / "f.py").write_text("def f(e):\n    return None\n")
    path = tmp_path / "topology.yaml"
    path.write_text(FN + extra)
    return topo.load(path)


def test_tables_section_defaults_and_overrides(tmp_path: Path) -> None:
    t = _topology(tmp_path, "tables:\n  b_rows:\n    topic: b\n"
                            "  c_rows:\n    topic: c\n    timeField: ts\n    partitionBy: hour\n"
                            "    retention: none\n"
                            "    dedupe: {key: [subject, id], window: PT30S}\n"
                            "traceIds:\n  order_id: order.id\nschemas: sch\n")
    b, c = t.table("b_rows"), t.table("c_rows")
    assert (b.topic, b.time_field, b.partition_by, b.retention_s) == ("b", "event_time", "day",
                                                                     3600.0)
    assert (b.dedupe_key, b.dedupe_window_s) == (("source", "id"), 300.0)
    assert (c.time_field, c.partition_by, c.retention_s) == ("ts", "hour", None)
    assert (c.dedupe_key, c.dedupe_window_s) == (("subject", "id"), 30.0)
    assert [x.name for x in t.realtime_tables()] == ["b_rows"]
    assert t.trace_ids == {"order_id": "order.id"}
    assert t.schemas == (tmp_path / "sch").resolve()
    assert t.all_topics()["c"] == 4  # a table's topic is created like any other
    assert _topology(tmp_path, "").schemas == tmp_path.resolve() / "schemas"


@pytest.mark.parametrize("extra, message", [
    ("tables:\n  x:\n    timeField: t\n", "tables.x.topic: name the topic"),
    ("tables:\n  x:\n    topic: b\n    partitionBy: week\n", "use hour, day, month or year"),
    ("tables:\n  x:\n    topic: b\n  y:\n    topic: b\n", "already feeds table x"),
    ("tables:\n  x_rt:\n    topic: b\n", "not ending in _rt"),
    ("tables:\n  Bad:\n    topic: b\n", "lower-case SQL identifiers"),
    ("tables:\n  x:\n    topic: b\n    dedupe: {key: [Source]}\n", "CloudEvent attribute"),
    ("tables:\n  x:\n    topic: b\n    retention: 1h\n", "not an ISO-8601 duration"),
    ("tables:\n  x:\n    topic: b\n    retension: PT1H\n", "unknown key(s) retension"),
    ("traceIds:\n  id: cloudevents.event_id\n", "reserved namespace"),
    ("traceIds:\n  id: 'has space'\n", "not a span attribute"),
])
def test_bad_declarations_name_the_entry_and_the_fix(tmp_path: Path, extra: str,
                                                     message: str) -> None:
    with pytest.raises(topo.TopologyError, match=message.replace("(", r"\(").replace(
            ")", r"\)")):
        _topology(tmp_path, extra)


def test_the_payments_example_declares_both_of_its_outputs() -> None:
    t = topo.load(ROOT / "functions" / "topology.yaml")
    assert {(x.name, x.topic) for x in t.tables.values()} == {
        ("payments_scored", "payments.scored"), ("alerts_fraud", "alerts.fraud")}
    assert t.trace_ids == {"payment_id": "payment.id"}
    assert t.schemas == SCHEMAS
    for table in t.tables.values():
        assert (t.schemas / f"{table.topic}.avsc").exists()


def test_stack_settings_take_the_topology_and_remember_it(tmp_path: Path) -> None:
    iot = ROOT / "examples" / "iot" / "topology.yaml"
    s = load_settings(state_dir=tmp_path / "state", topology=iot)
    assert s.topology_path == iot and s.schemas_dir == iot.parent / "schemas"
    s.save()
    later = load_settings(state_dir=tmp_path / "state").with_saved()
    assert later.topology_path == iot  # `status`/`down` see the same parts
    default = load_settings(state_dir=tmp_path / "other")
    assert default.topology_path == ROOT / "functions" / "topology.yaml"
    assert default.schemas_dir == SCHEMAS


def test_dedupe_key_is_the_declared_attributes() -> None:
    event = {"type": "t", "source": "/s", "id": "1", "subject": "dev-1"}
    assert dedupe.key_of(event) == "/s 1"
    assert dedupe.key_of(event, ("subject", "id")) == "dev-1 1"
    assert dedupe.key_of(event, ("subject", "missing")) == "dev-1 "


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("sql, expected", [
    ("SHOW TABLES", query.Metadata("tables")),
    ("show tables from realtime;", query.Metadata("tables", schema=("realtime",))),
    ("SHOW TABLES IN iceberg.sluice LIKE 'pay%'",
     query.Metadata("tables", schema=("iceberg", "sluice"), like="pay%")),
    ("DESCRIBE payments_scored_rt", query.Metadata("columns", table=("payments_scored_rt",))),
    ("desc sluice.x", query.Metadata("columns", table=("sluice", "x"))),
    ("SHOW COLUMNS FROM pinot.default.x", query.Metadata("columns",
                                                         table=("pinot", "default", "x"))),
    ("SELECT * FROM x", None),
    ("SHOW TABLES; DROP TABLE x", None),
])
def test_metadata_statements_are_recognised(sql: str, expected) -> None:
    assert query.metadata_statement(sql) == expected


def test_trino_type_names_and_like() -> None:
    assert query.trino_type("TIMESTAMP WITH TIME ZONE") == "timestamp(6) with time zone"
    assert query.trino_type("DECIMAL(10,2)") == "decimal(10,2)"
    assert query.trino_type("FLOAT") == "real" and query.trino_type("VARCHAR") == "varchar"
    assert query.like_matches("%_rt", "a_rt") and not query.like_matches("%_rt", "rt")
    assert query.like_matches("pay%", "payments") and not query.like_matches("pay%", "Pay")
    assert query.like_matches(None, "anything")


@pytest.fixture
def server() -> RealtimeTable:
    def avro(topic: str) -> dict:
        return json.loads((SCHEMAS / f"{topic}.avsc").read_text())

    db = RealtimeTable(RealtimeSettings(bootstrap="unused:1", registry_url="http://unused",
                                        topic="payments.scored", table="payments_scored"),
                       avro("payments.scored"))
    db.add_table(RealtimeSettings(bootstrap="unused:1", registry_url="http://unused",
                                  topic="alerts.fraud", table="alerts_fraud"),
                 avro("alerts.fraud"))
    return db


def test_one_server_holds_every_declared_table(server: RealtimeTable) -> None:
    assert sorted(server.tables) == ["alerts_fraud_rt", "payments_scored_rt"]
    alerts = server.tables["alerts_fraud_rt"]
    now = int(time.time() * 1000)
    row = {"payment_id": "p1", "card_id": "c", "merchant_id": "m", "amount_eur": 1.0,
           "country": "DE", "event_time": now, "score": 90.0, "decision": "decline",
           "reasons": "x"}
    assert alerts.append([(row, 0, 7)], [now]) == 1
    assert server.rows == 1
    got = server.query("SELECT payment_id, kafka_offset FROM alerts_fraud_rt")
    assert got["rows"] == [["p1", 7]]


def test_show_tables_and_describe_answer_in_trinos_shape(server: RealtimeTable) -> None:
    tables = server.query("SHOW TABLES")
    assert tables["columns"] == ["Table"]
    assert tables["rows"] == [["alerts_fraud_rt"], ["payments_scored_rt"]]
    assert server.query("SHOW TABLES LIKE 'alerts%'")["rows"] == [["alerts_fraud_rt"]]
    assert server.query("SHOW TABLES FROM realtime")["rows"] == tables["rows"]
    described = server.query("DESCRIBE alerts_fraud_rt")
    assert described["columns"] == ["Column", "Type", "Extra", "Comment"]
    rows = {r[0]: r[1] for r in described["rows"]}
    assert rows["event_time"] == "timestamp(6) with time zone"
    assert rows["amount_eur"] == "double" and rows["kafka_offset"] == "bigint"
    assert server.query("SHOW COLUMNS FROM alerts_fraud_rt")["rows"] == described["rows"]
    with pytest.raises(query.QueryFailed, match="Table 'nope_rt' does not exist"):
        server.query("DESCRIBE nope_rt")
    with TestClient(create_app(server)) as client:
        r = client.post("/query", json={"sql": "DESCRIBE nope_rt"})
        assert r.status_code == 400 and "does not exist" in r.json()["message"]
        assert client.post("/query", json={"sql": "SHOW TABLES"}).json()["rows"] == \
            tables["rows"]
        assert client.get("/healthz").json()["tables"] == {"alerts_fraud_rt": 0,
                                                          "payments_scored_rt": 0}


class _Cursor:
    def __init__(self, log: list) -> None:
        self.log, self.description, self.rows = log, None, []

    def execute(self, sql: str) -> None:
        self.log.append(sql)
        if sql.startswith("SHOW TABLES FROM \"iceberg\""):
            self.rows = [("payments_scored",), ("alerts_fraud",)]
        elif sql.startswith("SHOW TABLES FROM \"pinot\""):
            self.rows = [("payments_scored",)]
        else:
            self.rows = [("payment_id", "varchar", "", "")]
        self.description = [("Table", "varchar")] if "TABLES" in sql else [
            ("Column", "varchar"), ("Type", "varchar"), ("Extra", "varchar"),
            ("Comment", "varchar")]

    def fetchall(self) -> list:
        return self.rows


def _connect(log: list):
    def connect(**_kwargs):
        return SimpleNamespace(cursor=lambda: _Cursor(log), close=lambda: None)
    return connect


def test_trino_show_tables_reads_both_catalogs_and_describe_resolves_names() -> None:
    log: list = []
    out = query.run("SHOW TABLES", trino_url="http://trino:8080", fmt="csv",
                    connect=_connect(log))
    assert out.splitlines() == ["Table", "alerts_fraud", "payments_scored",
                                "payments_scored_rt"]
    assert log == ['SHOW TABLES FROM "iceberg"."sluice"', 'SHOW TABLES FROM "pinot"."default"']
    log.clear()
    query.run("DESCRIBE payments_scored_rt", trino_url="http://trino:8080",
              connect=_connect(log))
    assert log == ['DESCRIBE "pinot"."default"."payments_scored"']
    log.clear()
    query.run("SHOW COLUMNS FROM payments_scored", trino_url="http://trino:8080",
              connect=_connect(log))
    assert log == ['DESCRIBE "iceberg"."sluice"."payments_scored"']
    assert query.run("SHOW TABLES FROM realtime", trino_url="http://t:1", explain=True) == \
        'SHOW TABLES FROM "pinot"."default"'


def test_lake_keys_come_from_the_environment_on_a_cluster(tmp_path, monkeypatch) -> None:
    """The lake sink's Deployment passes S3 keys from a Secret as env, never as flags."""
    import argparse

    from eventing.cli.edge import ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY, CommandFailed, Edge

    args = argparse.Namespace(state_dir=str(tmp_path / "state"), port_offset=0,
                              command="sink")
    monkeypatch.setenv(ENV_S3_ACCESS_KEY, "AKIA-test")
    monkeypatch.setenv(ENV_S3_SECRET_KEY, "s3cr3t")
    lake = Edge(args).lake_config(namespace="ns")
    assert (lake.access_key, lake.secret_key, lake.namespace) == ("AKIA-test", "s3cr3t", "ns")
    assert "s3cr3t" not in repr(lake)
    assert not (tmp_path / "state" / "credentials.json").exists()  # the state folder unused
    monkeypatch.delenv(ENV_S3_SECRET_KEY)
    with pytest.raises(CommandFailed, match="set both"):
        Edge(args).lake_config()
