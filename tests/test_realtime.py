"""The real-time table server: its HTTP surface (in-process), then on the real stack.

Stack tests give the server its own topic (`payments.scored.<hex>`, the same Avro schema),
so they share the session stack with any other test without seeing their records.
Timings (produce -> queryable, example query latency) are measured and printed
(`pytest -s`), not asserted.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from eventing.tables import query
from eventing.tables.realtime import RealtimeSettings, RealtimeTable, create_app, parse_duration
from functions.queries import EXAMPLES
from tests.helpers import ROOT, free_port, stop_process
from tests.pipeline import payment_record

AVRO = json.loads((ROOT / "schemas" / "payments.scored.avsc").read_text())


def scored(i: int, *, card: str = "card-42", merchant: str | None = None,
           decision: str = "approve", score: float = 10.0,
           at_ms: int | None = None, payment_id: str | None = None) -> dict:
    """A record of schemas/payments.scored.avsc."""
    return {
        "payment_id": payment_id or f"p-{i}", "card_id": card,
        "merchant_id": merchant or f"m-{i % 5}", "amount": 12.5, "currency": "EUR",
        "country": "DE" if i % 2 else "FR",
        "event_time": at_ms if at_ms is not None else int(time.time() * 1000),
        "amount_eur": 12.5, "merchant_category": "grocery", "card_home_country": "DE",
        "count_1m": 1 + i % 3, "amount_1m": 12.5, "count_10m": 2, "amount_10m": 25.0,
        "distinct_merchants_10m": 1, "country_mismatch": False, "late": False,
        "score": score, "decision": decision, "reasons": "",
    }


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- in-process


@pytest.fixture
def table() -> RealtimeTable:
    return RealtimeTable(RealtimeSettings(bootstrap="unused:1", registry_url="http://unused",
                                          topic="payments.scored",
                                          retention_s=3600), AVRO)


def test_parse_duration() -> None:
    assert parse_duration("1h") == 3600 and parse_duration("30m") == 1800
    assert parse_duration("90") == 90 and parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("an hour")


def test_table_has_the_lake_sinks_columns(table: RealtimeTable) -> None:
    columns = table.columns("payments_scored_rt")
    assert list(columns)[:2] == ["payment_id", "card_id"]
    assert columns["event_time"] == "TIMESTAMP WITH TIME ZONE"
    assert list(columns)[-2:] == ["kafka_partition", "kafka_offset"]
    assert columns["count_1m"] == "INTEGER"


def test_append_leaves_out_and_expires_rows_older_than_the_retention(
        table: RealtimeTable, monkeypatch: pytest.MonkeyPatch) -> None:
    from eventing.tables import realtime

    now = int(time.time() * 1000)
    old = now - 2 * 3600 * 1000
    assert table.append([(scored(1), 0, 0), (scored(2, at_ms=old), 0, 1)], [now, now]) == 1
    # A row that ages out while in the table is deleted by the sweep. The clock is moved,
    # not waited on, so a slow machine cannot age the row out before it is appended.
    assert table.append([(scored(3, at_ms=now - 3600 * 1000 + 60_000), 1, 0)], [now]) == 1
    later = time.time() + 120
    monkeypatch.setattr(realtime.time, "time", lambda: later)
    assert table.expire() == 1
    result = table.query("SELECT payment_id, kafka_partition, kafka_offset, "
                         "event_time FROM payments_scored_rt")
    assert [r[:3] for r in result["rows"]] == [["p-1", 0, 0]]
    assert result["rows"][0][3] == dt.datetime.fromtimestamp(now / 1000, dt.UTC)
    assert table.rows == 1


def test_a_row_no_timestamp_holds_is_skipped_and_counted_not_fatal(
        table: RealtimeTable) -> None:
    rows = [(scored(1), 0, 0), (scored(2, at_ms=10**16), 0, 1), (scored(3), 0, 2)]
    assert table.append(rows) == 2
    assert table.metrics.unconvertible._value.get() == 1
    result = table.query("SELECT payment_id FROM payments_scored_rt ORDER BY 1")
    assert result["rows"] == [["p-1"], ["p-3"]]


def test_a_dead_ingest_thread_ends_the_process(table: RealtimeTable, monkeypatch) -> None:
    """The HTTP server used to live on with a table that no longer filled."""
    from eventing.tables import realtime

    exits: list[int] = []
    monkeypatch.setattr(realtime.os, "_exit", exits.append)

    class Broken:
        def __init__(self, *_a, **_k) -> None:
            pass

        def close(self) -> None:
            pass

    def boom(self, consumer) -> None:
        raise RuntimeError("ingest broke")

    monkeypatch.setattr("confluent_kafka.Consumer", Broken)
    monkeypatch.setattr(realtime.Ingest, "_loop", boom)
    ingest = realtime.Ingest(table, serde=None)
    ingest._run()
    assert exits == [realtime.EXIT_INGEST_DIED]
    assert "ingest broke" in ingest.error


class QueueConsumer:
    """`consume(n, timeout)` as librdkafka answers it: whatever is queued, up to n, at once
    when n are there, else after waiting `timeout` (nothing arrives meanwhile here).
    Every call's (n, timeout) is recorded: the waits are what the test checks."""

    def __init__(self, queued: int) -> None:
        self.queued = list(range(queued))
        self.calls: list[tuple[int, float]] = []

    def consume(self, n: int, timeout: float) -> list[int]:
        self.calls.append((n, timeout))
        out, self.queued = self.queued[:n], self.queued[n:]
        return out


def test_a_quiet_table_inserts_what_arrived_without_waiting(table: RealtimeTable) -> None:
    """It used to wait out the whole poll_s (20 ms) before inserting a record that
    arrived after a quiet spell: latency for nothing."""
    from eventing.tables.realtime import Ingest

    ingest = Ingest(table, serde=None)
    consumer = QueueConsumer(queued=3)
    assert ingest._next_batch(consumer) == [0, 1, 2]
    assert all(timeout == 0 for _, timeout in consumer.calls), consumer.calls

    empty = QueueConsumer(queued=0)
    assert ingest._next_batch(empty) == []
    assert empty.calls == [(table.settings.batch_max, 0), (1, table.settings.poll_s)]


def test_a_busy_table_inserts_at_most_once_per_poll_interval(table: RealtimeTable) -> None:
    """An INSERT costs milliseconds of CPU whatever its size: right after one, the next
    batch gathers records until poll_s after it."""
    from eventing.tables.realtime import Ingest

    ingest = Ingest(table, serde=None)
    ingest.last_insert = time.monotonic()
    consumer = QueueConsumer(queued=2)
    assert ingest._next_batch(consumer) == [0, 1]
    waits = [timeout for _, timeout in consumer.calls if timeout > 0]
    assert len(waits) == 1 and 0 < waits[0] <= table.settings.poll_s
    full = QueueConsumer(queued=table.settings.batch_max + 5)
    ingest.last_insert = time.monotonic()
    assert len(ingest._next_batch(full)) == table.settings.batch_max  # a full batch goes now
    assert all(timeout == 0 for _, timeout in full.calls)


def test_queries_cannot_change_the_database(table: RealtimeTable) -> None:
    with pytest.raises(query.TranslationError, match="only queries"):
        table.query("DELETE FROM payments_scored_rt", engine="duckdb")
    with pytest.raises(query.Refused, match="read_csv"):
        table.query("SELECT * FROM read_csv('/etc/hostname')", engine="duckdb")
    # The second wall, under the SQL check: DuckDB itself has no local files or http.
    for escape in ("SELECT * FROM read_csv('/etc/hostname')",
                   "SELECT * FROM read_text('http://127.0.0.1:9/')"):
        with pytest.raises(query.QueryFailed, match="disabled|httpfs"):  # no lake: no httpfs
            table._execute(escape, 1)
    with pytest.raises(query.TranslationError, match="only queries"):
        table.query("SET lock_configuration = false", engine="duckdb")


def test_http_surface(table: RealtimeTable) -> None:
    now = int(time.time() * 1000)
    table.append([(scored(i, decision="decline" if i < 3 else "approve", score=90.0 - i),
                   i % 2, i) for i in range(6)], [now] * 6)
    with TestClient(create_app(table)) as client:
        ok = client.post("/query", json={"sql": EXAMPLES["top_risky_merchants_5m"]})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["columns"][:3] == ["merchant_id", "payments", "flagged"]
        assert sum(r[2] for r in body["rows"]) == 3
        assert {"translate", "execute", "total"} <= set(body["timing_ms"])
        assert "memory.main.payments_scored_rt" in body["duckdb_sql"]

        refused = client.post("/query", json={"sql": "SELECT count_1m / 2 "
                                              "FROM payments_scored_rt"})
        assert refused.status_code == 422
        assert refused.json()["error"] == "refused"
        assert "integer division" in refused.json()["construct"]

        raw = client.post("/query", json={"sql": "SELECT 7 / 2 AS x", "engine": "duckdb"})
        assert raw.json()["rows"] == [[3.5]]  # DuckDB SQL runs as DuckDB SQL

        explain = client.post("/query", json={"sql": "SELECT * FROM payments_scored_rt",
                                              "explain": True})
        assert explain.json()["duckdb_sql"] == ("SELECT * FROM memory.main.payments_scored_rt "
                                                "AS payments_scored_rt")
        assert "rows" not in explain.json()

        failed = client.post("/query", json={"sql": "SELECT nope FROM payments_scored_rt"})
        assert failed.status_code == 400 and "nope" in failed.json()["message"]
        lake = client.post("/query", json={"sql": "SELECT * FROM payments_scored"})
        assert lake.status_code == 400 and "no lake configured" in lake.json()["message"]
        assert client.post("/query", content=b"not json",
                           headers={"content-type": "application/json"}).status_code == 400

        limited = client.post("/query", json={"sql": "SELECT * FROM payments_scored_rt",
                                              "max_rows": 2})
        assert len(limited.json()["rows"]) == 2 and limited.json()["truncated"] is True

        assert client.get("/healthz").json()["rows"] == 6
        metrics = client.get("/metrics").text
        assert "sluice_realtime_rows 6.0" in metrics
        assert 'sluice_realtime_query_duration_seconds_count{outcome="refused"} 1.0' in metrics
        assert "sluice_realtime_ingest_lag_seconds_bucket" in metrics


# --------------------------------------------------------------------------- real stack


class Server:
    def __init__(self, url: str, topic: str, table: str, proc: subprocess.Popen) -> None:
        self.url = url
        self.topic = topic
        self.table = table  # lake table name; the real-time one is table + "_rt"
        self.proc = proc

    def query(self, sql: str, **extra) -> dict:
        r = httpx.post(self.url + "/query", json={"sql": sql, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def sql(self, example: str) -> str:
        """An example query pointed at this test's tables."""
        return example.replace("payments_scored", self.table)


@pytest.fixture(scope="module")
def server(stack, tmp_path_factory) -> Iterator[Server]:
    """`sluice realtime` as the stack would run it, on its own topic and a free port."""
    from tests.pipeline import register, setup_topics

    suffix = uuid.uuid4().hex[:8]
    topic = f"payments.scored.{suffix}"
    register(stack.registry_url, topic, "payments.scored.avsc")
    setup_topics(stack.bootstrap, {topic: 4})
    port = free_port()
    log = tmp_path_factory.mktemp("realtime") / "server.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eventing.cli", "--state-dir", str(stack.state_dir),
             "realtime", "--port", str(port), "--topic", topic, "--retention", "1h"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/healthz", timeout=1).json()
                if "[0, 1, 2, 3]" in health.get("ingest", ""):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"realtime server did not come up:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(url, topic, f"payments_scored_{suffix}", proc)
    finally:
        stop_process(proc, timeout=15)


def producer_for(stack):
    from confluent_kafka import Producer

    from eventing.kafka import producer_config
    from eventing.serde import AvroSerde

    return Producer(producer_config(stack.bootstrap, **{"linger.ms": 0})), \
        AvroSerde(stack.registry_url)


def produce(producer, serde, topic: str, record: dict) -> None:
    key, value, headers = payment_record(serde, topic, record, source="/sluice/functions/score",
                                         type="com.sluice.payment.scored")
    producer.produce(topic, value, key, headers=headers)
    producer.poll(0)


@pytest.mark.stack
def test_records_are_queryable_within_a_second(stack, server: Server) -> None:
    producer, serde = producer_for(stack)
    delays = []
    rt = server.table + "_rt"
    for i in range(60):
        pid = f"lat-{i}-{uuid.uuid4().hex[:6]}"
        record = scored(i, payment_id=pid, card=f"card-{i % 7}")
        sql = f"SELECT count(*) FROM {rt} WHERE payment_id = '{pid}'"
        started = time.perf_counter()
        produce(producer, serde, server.topic, record)
        producer.flush(10)
        while server.query(sql)["rows"] != [[1]]:
            assert time.perf_counter() - started < 10, f"{pid} not queryable after 10 s"
            time.sleep(0.002)
        delays.append((time.perf_counter() - started) * 1000)
    print(f"\nproduce -> queryable over HTTP (n={len(delays)}): "
          f"p50 {statistics.median(delays):.1f} ms, p99 {pct(delays, 99):.1f} ms, "
          f"max {max(delays):.1f} ms")
    metrics = dict(line.rsplit(" ", 1) for line in httpx.get(server.url + "/metrics").text
                   .splitlines() if line and not line.startswith("#"))
    lag_n = float(metrics["sluice_realtime_ingest_lag_seconds_count"])
    assert lag_n >= 60
    print(f"server-side Kafka timestamp -> inserted: mean "
          f"{float(metrics['sluice_realtime_ingest_lag_seconds_sum']) / lag_n * 1000:.1f} ms")
    count = server.query(f"SELECT count(*) FROM {rt} WHERE payment_id LIKE 'lat-%'")
    assert count["rows"] == [[60]]  # every record once


@pytest.mark.stack
def test_cli_query_formats_and_explain(stack, server: Server) -> None:
    producer, serde = producer_for(stack)
    for i in range(3):
        produce(producer, serde, server.topic,
                scored(i, payment_id=f"cli-{i}", card="card-cli", decision="decline",
                       score=95.0))
    producer.flush(10)
    rt = server.table + "_rt"
    deadline = time.monotonic() + 10
    while server.query(f"SELECT count(*) FROM {rt} WHERE card_id = 'card-cli'")["rows"] != [[3]]:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def sluice(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "eventing.cli", "query", *args,
                               "--server", server.url], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    sql = (f"SELECT payment_id, score, count_1m FROM {rt} WHERE card_id = 'card-cli' "
           "ORDER BY payment_id")
    table = sluice(sql)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "payment_id | score | count_1m"
    assert lines[2] == "cli-0      |  95.0 |        1"
    assert lines[-1] == "(3 rows)"
    as_json = json.loads(sluice(sql, "--format", "json").stdout)
    assert [r["payment_id"] for r in as_json] == ["cli-0", "cli-1", "cli-2"]
    assert sluice(sql, "--format", "csv").stdout.splitlines()[1] == "cli-0,95.0,1"
    explained = sluice(sql, "--explain")
    assert explained.stdout.strip().startswith("SELECT payment_id, score, count_1m FROM "
                                               f"memory.main.{rt}")
    refused = sluice(f"SELECT count_1m / 2 FROM {rt}")
    assert refused.returncode == 2 and "integer division" in refused.stderr


@pytest.mark.stack
def test_one_query_reads_the_lake_and_the_realtime_table(stack, server: Server) -> None:
    try:
        from eventing.serde import AvroSerde
        from eventing.tables.lake import LakeSink, LakeSinkConfig
        from eventing.tables.lakehouse import LakeConfig
    except ImportError as exc:  # pragma: no cover - the lake sink is written in parallel
        pytest.skip(f"the lake sink is not there yet: {exc}")
    producer, serde = producer_for(stack)
    now = int(time.time() * 1000)
    # Five payments the lake sink writes first; then three only the real-time table has.
    for i in range(5):
        produce(producer, serde, server.topic,
                scored(i, payment_id=f"lake-{i}", card="card-mix", at_ms=now - 1000 * i,
                       decision="decline" if i == 0 else "approve"))
    producer.flush(10)
    lake = LakeConfig.from_settings(stack)
    sink = LakeSink(LakeSinkConfig(topic=server.topic, table=server.table, interval_ms=200,
                                   group_id=f"lake-{uuid.uuid4().hex[:8]}", maintenance=None),
                    lake, stack.bootstrap, AvroSerde(stack.registry_url))
    stop = threading.Event()
    stats = sink.run(stop, max_rows=_count_rows(server))
    assert stats.rows_written >= 5
    for i in range(5, 8):
        produce(producer, serde, server.topic,
                scored(i, payment_id=f"fresh-{i}", card="card-mix", decision="decline"))
    producer.flush(10)
    rt = server.table + "_rt"
    deadline = time.monotonic() + 10
    while server.query(f"SELECT count(*) FROM {rt} WHERE card_id = 'card-mix'")["rows"] != [[8]]:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    union = server.query(
        f"SELECT source, count(*) FROM (SELECT 'lake' AS source, payment_id FROM {server.table} "
        f"WHERE card_id = 'card-mix' UNION ALL SELECT 'rt', payment_id FROM {rt} "
        "WHERE card_id = 'card-mix') t GROUP BY source ORDER BY source")
    assert union["rows"] == [["lake", 5], ["rt", 8]]
    assert f"lake.sluice.{server.table}" in union["duckdb_sql"]
    same_shape = server.query(f"SELECT count(*) FROM (SELECT * FROM {server.table} "
                              f"UNION ALL SELECT * FROM {rt}) t WHERE card_id = 'card-mix'")
    assert same_shape["rows"] == [[13]]

    # The example counts each payment once although the lake has most of them too.
    totals = server.query(f"SELECT count(*), count_if(decision = 'decline') FROM {rt}")
    rates = server.query(server.sql(EXAMPLES["fraud_rate_by_country_hourly"]))
    assert [sum(r[2] for r in rates["rows"]), sum(r[3] for r in rates["rows"])] == \
        totals["rows"][0]

    timings: dict[str, list[float]] = {}
    for name, sql in EXAMPLES.items():
        for _ in range(15):
            started = time.perf_counter()
            result = server.query(server.sql(sql))
            wall = (time.perf_counter() - started) * 1000
            timings.setdefault(name, []).append(wall)
            assert result["columns"]
    print()
    for name, walls in timings.items():
        print(f"example {name}: p50 {statistics.median(walls):.1f} ms, "
              f"p99 {pct(walls, 99):.1f} ms over HTTP (n={len(walls)})")


def _count_rows(server: Server) -> int:
    """Rows in the topic so far (the lake sink writes them all, then stops)."""
    rt = server.table + "_rt"
    deadline = time.monotonic() + 10
    while True:
        n = server.query(f"SELECT count(*) FROM {rt}")["rows"][0][0]
        wanted = server.query(f"SELECT count(*) FROM {rt} WHERE payment_id LIKE 'lake-%'")
        if wanted["rows"] == [[5]] or time.monotonic() > deadline:
            return n
        time.sleep(0.05)
