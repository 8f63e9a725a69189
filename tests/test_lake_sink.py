"""The lake sink on the real stack (SeaweedFS S3 + Iceberg REST catalog, Tansu, registry).

Every test uses its own topic and table, so they share the session's stack. Figures the
sink reports (rows/s, commit latency, file counts, query time) are printed: run with `-s`.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from eventing.serde import AvroSerde
from eventing.tables import maintenance as mnt
from eventing.tables.lake import (
    OFFSETS_PROPERTY,
    BatchBuilder,
    LakeSink,
    LakeSinkConfig,
    LakeWriter,
    Unconvertible,
    UnsupportedSchema,
    committed_offsets,
    head_offsets,
    iceberg_schema,
    open_table,
    rows_after,
)
from eventing.tables.lakehouse import LakeConfig, catalog, duckdb_connect, s3_filesystem
from tests.helpers import ROOT, stop_process, unique, wait_until
from tests.pipeline import produce_payments, register, setup_topics

SCORED = json.loads((ROOT / "schemas" / "payments.scored.avsc").read_text())
DAY_MS = 86_400_000
T0 = 1_764_000_000_000  # 2025-11-24T16:00Z: rows spread over three days


def scored(i: int) -> dict:
    return {
        "payment_id": f"p-{i}", "card_id": f"card-{i % 97}", "merchant_id": f"m-{i % 50}",
        "amount": 10.0 + i % 7, "currency": "EUR", "country": "DE",
        "event_time": T0 + (i % 3) * DAY_MS + i, "amount_eur": 10.0 + i % 7,
        "merchant_category": "grocery", "card_home_country": "DE", "count_1m": 1,
        "amount_1m": 10.0, "count_10m": 1, "amount_10m": 10.0, "distinct_merchants_10m": 1,
        "country_mismatch": False, "late": False, "score": float(i % 100),
        "decision": ("approve", "review", "decline")[i % 3], "reasons": "",
    }


# --------------------------------------------------------------------------- unit


def test_schema_from_avro_has_timestamptz_and_kafka_columns():
    from pyiceberg.types import IntegerType, LongType, TimestamptzType

    schema = iceberg_schema(SCORED, "event_time")
    assert isinstance(schema.find_field("event_time").field_type, TimestamptzType)
    assert isinstance(schema.find_field("kafka_partition").field_type, IntegerType)
    assert isinstance(schema.find_field("kafka_offset").field_type, LongType)
    assert len(schema.fields) == len(SCORED["fields"]) + 2
    with pytest.raises(UnsupportedSchema, match="time field 'when'"):
        iceberg_schema(SCORED, "when")
    bad = {"type": "record", "name": "X", "fields": [
        {"name": "event_time", "type": "long"},
        {"name": "u", "type": ["null", "int", "string"]}]}
    with pytest.raises(UnsupportedSchema, match="'u'"):
        iceberg_schema(bad, "event_time")


def test_batch_builder_converts_epoch_ms_and_filters_replayed_rows():
    schema = iceberg_schema(SCORED, "event_time").as_arrow()
    builder = BatchBuilder(schema, "event_time", time_is_ms=True)
    for i in range(6):
        builder.add(scored(i), partition=i % 2, offset=i // 2)
    rows = builder.build()
    assert rows.column("event_time").type == pa.timestamp("us", tz="UTC")
    assert rows.column("event_time")[0].as_py().timestamp() * 1000 == T0
    kept = rows_after(rows, {0: 1})  # partition 0 offsets 0,1 are in the table already
    pairs = zip(kept["kafka_partition"].to_pylist(), kept["kafka_offset"].to_pylist(),
                strict=True)
    assert sorted(pairs) == [(0, 2), (1, 0), (1, 1), (1, 2)]


def test_batch_builder_refuses_times_no_timestamp_column_holds():
    schema = iceberg_schema(SCORED, "event_time").as_arrow()
    builder = BatchBuilder(schema, "event_time", time_is_ms=True)
    builder.add(scored(0), partition=0, offset=0)
    for poison in (10**16, 253_402_300_800_000, -62_135_596_800_001):
        with pytest.raises(Unconvertible, match="event_time"):
            builder.add(scored(1) | {"event_time": poison}, partition=0, offset=1)
    builder.add(scored(2), partition=0, offset=2)
    assert builder.build()["kafka_offset"].to_pylist() == [0, 2]  # nothing of the poison


def test_batch_builder_drops_only_the_rows_that_do_not_convert():
    schema = iceberg_schema(SCORED, "event_time").as_arrow()
    builder = BatchBuilder(schema, "event_time", time_is_ms=True)
    for i in range(5):
        builder.add(scored(i) | ({"amount": "not a number"} if i in (1, 3) else {}),
                    partition=0, offset=i)
    with pytest.raises(pa.ArrowException):
        builder.build()
    bad = builder.drop_unconvertible()
    assert [i for i, _ in bad] == [1, 3]
    assert "not a number" in bad[0][1] or "double" in bad[0][1]
    assert builder.build()["kafka_offset"].to_pylist() == [0, 2, 4]


# --------------------------------------------------------------------------- stack helpers


@pytest.fixture(scope="module")
def lake(stack) -> LakeConfig:
    return LakeConfig.from_settings(stack)


def _topic(stack, partitions: int = 4) -> str:
    topic = unique("lake-test-") + ".scored"
    setup_topics(stack.bootstrap, {topic: partitions})
    register(stack.registry_url, topic, "payments.scored.avsc")
    return topic


def _produce(stack, topic: str, ids: range) -> None:
    produce_payments(stack.bootstrap, AvroSerde(stack.registry_url), topic,
                     [scored(i) for i in ids])


def _ids(table) -> Counter:
    return Counter(table.scan(selected_fields=("payment_id",)).to_arrow()["payment_id"]
                   .to_pylist())


def _run_sink(config: LakeSinkConfig, lake: LakeConfig, stack, rows: int,
              timeout: float = 120) -> LakeSink:
    sink = LakeSink(config, lake, stack.bootstrap, AvroSerde(stack.registry_url))
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), kwargs={"max_rows": rows})
    thread.start()
    thread.join(timeout)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    return sink


# --------------------------------------------------------------------------- stack tests


@pytest.mark.stack
def test_sink_appends_every_record_once_and_duckdb_agrees(stack, lake):
    topic, n = _topic(stack), 20_000
    _produce(stack, topic, range(n))
    table_name = unique("lake_all_")
    config = LakeSinkConfig(topic=topic, table=table_name, batch_size=2_000, interval_ms=500,
                            maintenance=None)
    t0 = time.monotonic()
    sink = _run_sink(config, lake, stack, n)
    elapsed = time.monotonic() - t0
    table = catalog(lake).load_table(lake.qualified(table_name))
    assert _ids(table) == Counter(f"p-{i}" for i in range(n))
    assert sink.stats.rows_written == n and sink.stats.skipped_replayed == 0
    # offsets in the head snapshot: the last offset of each partition, per-partition counts
    rows = table.scan(selected_fields=("kafka_partition", "kafka_offset")).to_arrow()
    last: dict[int, int] = {}
    for p, o in zip(rows["kafka_partition"].to_pylist(), rows["kafka_offset"].to_pylist(),
                    strict=True):
        last[p] = max(o, last.get(p, -1))
    assert head_offsets(table, topic) == last
    assert str(table.spec().fields[0].transform) == "day"
    # three event-time days -> three partitions
    assert len({tuple(t.file.partition) for t in table.scan().plan_files()}) == 3

    con = duckdb_connect(lake)
    t1 = time.monotonic()
    by_day = con.sql(f"SELECT date_trunc('day', event_time) d, count(*), sum(amount) "
                     f"FROM {table_name} GROUP BY 1 ORDER BY 1").fetchall()
    query_s = time.monotonic() - t1
    assert sum(r[1] for r in by_day) == n and len(by_day) == 3
    d = sink.stats.as_dict()
    print(f"\nlake sink: {n} rows in {elapsed:.2f}s wall (incl. ~3s group join), "
          f"{d['commits']} commits, flush p50 {d['flush_p50_ms']} ms p99 {d['flush_p99_ms']} "
          f"ms, catalog commit p50 {d['commit_p50_ms']} ms p99 {d['commit_p99_ms']} ms; "
          f"DuckDB GROUP BY {query_s * 1000:.0f} ms")


@pytest.mark.stack
def test_a_poison_time_among_good_rows_is_dead_lettered_and_the_rest_lands(stack, lake):
    """Year 10000 (and 1e16 ms) passed the schema but broke the Parquet write: the sink
    crash-looped on that batch and nothing after it reached the table."""
    import base64

    from tests.pipeline import consume_all, headers_of

    topic, n = _topic(stack), 1_000
    dead = unique("lake-dead-")
    setup_topics(stack.bootstrap, {dead: 1})
    poison = {500: 10**16, 700: 253_402_300_800_000}
    rows = [scored(i) | ({"event_time": poison[i]} if i in poison else {})
            for i in range(n + len(poison))]
    produce_payments(stack.bootstrap, AvroSerde(stack.registry_url), topic, rows)
    table_name = unique("lake_poison_")
    config = LakeSinkConfig(topic=topic, table=table_name, batch_size=300, interval_ms=300,
                            maintenance=None, dead_letter_topic=dead)
    sink = _run_sink(config, lake, stack, n)
    table = catalog(lake).load_table(lake.qualified(table_name))
    assert _ids(table) == Counter(f"p-{i}" for i in range(n + 2) if i not in poison)
    assert sink.stats.dead_lettered == 2 and sink.stats.rows_written == n
    letters = consume_all(stack.bootstrap, dead, 2, timeout=30)
    assert sorted(headers_of(m)["ce_id"] for m in letters) == ["p-500", "p-700"]
    for m in letters:
        h = headers_of(m)
        assert h["ce_knativeerrorcode"] == "422"
        assert h["ce_knativeerrordest"] == f"lake:{lake.qualified(table_name)}"
        assert "outside the years 1-9999" in base64.b64decode(h["ce_knativeerrordata"]).decode()
        assert m.value()  # the original Avro data, for a replay after a fix


@pytest.mark.stack
def test_writer_commit_is_idempotent_by_offsets(stack, lake):
    table = open_table(catalog(lake), lake.qualified(unique("lake_idem_")), SCORED,
                       "event_time")
    writer = LakeWriter(table, "t")
    builder = BatchBuilder(table.schema().as_arrow(), "event_time", time_is_ms=True)
    for i in range(10):
        builder.add(scored(i), 0, i)
    rows = builder.build()
    assert writer.commit(rows, {0: 9}).rows == 10
    # the same batch again (a replay after a crash before the Kafka commit): nothing added
    assert writer.commit(rows, {0: 9}).rows == 0
    # a stale Table object (another writer committed meanwhile) conflicts, reloads, skips
    stale = catalog(lake).load_table(table.name())
    builder.clear()
    for i in range(10, 15):
        builder.add(scored(i), 0, i)
    more = builder.build()
    assert writer.commit(more, {0: 14}).rows == 5
    result = LakeWriter(stale, "t").commit(pa.concat_tables([rows, more]), {0: 14})
    assert result.rows == 0 and result.conflicts == 1
    table.refresh()
    assert _ids(table) == Counter(f"p-{i}" for i in range(15))
    assert committed_offsets(table, "t") == {0: 14}


@pytest.mark.stack
def test_replayed_batch_after_lost_kafka_commit_is_not_duplicated(stack, lake):
    """A crash after the Iceberg commit but before the Kafka commit, made deterministic:
    the first sink never commits Kafka offsets, so the second replays everything."""
    topic = _topic(stack, partitions=2)
    _produce(stack, topic, range(3_000))
    table_name, group = unique("lake_replay_"), unique("sluice-lake-test-")
    config = LakeSinkConfig(topic=topic, table=table_name, batch_size=500, interval_ms=300,
                            group_id=group, maintenance=None)
    first = LakeSink(config, lake, stack.bootstrap, AvroSerde(stack.registry_url))
    real_flush = first.flush

    def flush_without_kafka_commit():
        consumer = first._consumer
        first._consumer = type("NoCommit", (), {"commit": lambda *a, **k: None})()
        try:
            return real_flush()
        finally:
            first._consumer = consumer

    first.flush = flush_without_kafka_commit  # type: ignore[method-assign]
    stop = threading.Event()
    th = threading.Thread(target=first.run, args=(stop,), kwargs={"max_rows": 3_000})
    th.start()
    th.join(90)
    stop.set()
    th.join(30)
    assert first.stats.rows_written == 3_000
    _produce(stack, topic, range(3_000, 4_000))
    second = _run_sink(config, lake, stack, 1_000)
    assert second.stats.rows_written == 1_000
    table = catalog(lake).load_table(lake.qualified(table_name))
    assert _ids(table) == Counter(f"p-{i}" for i in range(4_000))


def _sink_process(stack, topic: str, table: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "eventing.cli", "--state-dir", str(stack.state_dir),
           "sink", "lake", "--topic", topic, "--table", table, "--batch-size", "500",
           "--interval-ms", "200", "--maintenance-every-commits", "5",
           "--compact-min-files", "4", "--keep-snapshots", "5", "--snapshot-max-age-s", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.stack
def test_sigkill_mid_stream_then_restart_yields_each_row_once(stack, lake, tmp_path):
    topic, n = _topic(stack), 40_000
    table_name = unique("lake_crash_")
    _produce(stack, topic, range(n // 2))
    cat = catalog(lake)
    ident = lake.qualified(table_name)
    log = tmp_path / "sink.log"

    def total() -> int:
        try:
            t = cat.load_table(ident)
        except Exception:
            return 0
        snap = t.current_snapshot()
        return int(snap.summary["total-records"]) if snap else 0

    proc = _sink_process(stack, topic, table_name, log)
    try:
        wait_until(lambda: total() >= 3_000, 90, "some commits")
        producer = threading.Thread(target=_produce, args=(stack, topic, range(n // 2, n)))
        producer.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = total()
        producer.join(60)
        assert 0 < killed_at < n
        proc = _sink_process(stack, topic, table_name, log)
        wait_until(lambda: total() >= n, 120, f"{n} rows (log: {log})")
        time.sleep(1.5)  # anything beyond n would be a duplicate: give it time to show
    finally:
        stop_process(proc, 30)
    table = cat.load_table(ident)
    assert _ids(table) == Counter(f"p-{i}" for i in range(n))
    assert "maintenance:" in log.read_text()  # it ran while writing and across the kill
    print(f"\ncrash test: killed with {killed_at} of {n} rows committed; "
          f"{len(table.metadata.snapshots)} snapshots left")


def _append_batch(writer: LakeWriter, builder: BatchBuilder, b: int, per_batch: int) -> None:
    """Commit batch `b`: rows `b * per_batch ...` over 4 Kafka partitions and 3 days."""
    builder.clear()
    for i in range(b * per_batch, (b + 1) * per_batch):
        builder.add(scored(i), i % 4, i)
    writer.commit(builder.build(), {p: (b + 1) * per_batch - 4 + p for p in range(4)})


@pytest.mark.stack
def test_maintenance_racing_appends_keeps_every_row_and_shrinks_files(stack, lake):
    """Compaction beside back-to-back appends, sharing the writer's commit lock as the sink
    does. Deterministic: the appender waits halfway until a compaction has committed, and
    with the lock no compaction loses its commit to an append (no conflict at all)."""
    table = open_table(catalog(lake), lake.qualified(unique("lake_maint_")), SCORED,
                       "event_time")
    writer = LakeWriter(table, "t")
    builder = BatchBuilder(table.schema().as_arrow(), "event_time", time_is_ms=True)
    batches, per_batch = 60, 200
    latencies: list[float] = []
    failures: list[BaseException] = []
    compacted = threading.Event()

    def append_all() -> None:
        try:
            for b in range(batches):
                if b == batches // 2 and not compacted.wait(120):
                    raise AssertionError("no compaction committed beside the appends")
                t0 = time.monotonic()
                _append_batch(writer, builder, b, per_batch)
                latencies.append(time.monotonic() - t0)
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    other = catalog(lake).load_table(table.name())  # the maintenance side's own Table
    policy = mnt.MaintenancePolicy(min_files=3)
    appender = threading.Thread(target=append_all)
    appender.start()
    conflicts = compactions = 0
    while appender.is_alive():
        report = mnt.compact(other, policy, lock=writer.commit_lock)
        conflicts += report.commit_conflicts
        compactions += report.partitions_compacted
        if report.partitions_compacted:
            compacted.set()
        time.sleep(0.05)
    appender.join()
    assert not failures, failures
    assert compactions > 0 and conflicts == 0

    other.refresh()
    files_before = mnt.data_file_count(other)
    report = mnt.run_maintenance(other, s3_filesystem(lake), mnt.MaintenancePolicy(
        min_files=2, keep_snapshots=1, max_snapshot_age_s=0, orphan_age_s=0))
    assert not report.errors, report.errors
    files_after = mnt.data_file_count(other)
    assert files_after == 3 < files_before  # one file per event-time day
    assert report.snapshots_expired > 0 and report.orphans_deleted > 0
    assert len(other.metadata.snapshots) == 1
    n = batches * per_batch
    # no row lost or doubled, every remaining file readable, offsets survived the rewrites
    assert _ids(other) == Counter(f"p-{i}" for i in range(n))
    assert head_offsets(other, "t") == {p: n - 4 + p for p in range(4)}
    assert OFFSETS_PROPERTY in other.current_snapshot().summary.additional_properties
    con = duckdb_connect(lake)
    assert con.sql(f"SELECT count(*) FROM {other.name()[-1]}").fetchone()[0] == n
    print(f"\nmaintenance race: {compactions} partition compactions, {conflicts} conflicts; "
          f"append p50 {statistics.median(latencies) * 1000:.0f} ms; files {files_before} -> "
          f"{files_after}; {report.snapshots_expired} snapshots expired, "
          f"{report.orphans_deleted} orphans deleted")


@pytest.mark.stack
def test_compaction_commits_although_an_append_lands_after_every_reload(stack, lake):
    """Starvation under continuous appends, made deterministic: whenever the compaction
    reloads its table while the sink's commit lock is free, an append lands right after
    (a sink behind on its topic appends back to back). The compaction must still commit
    at its first attempt, and keep the rows appended while it planned and rewrote."""
    table = open_table(catalog(lake), lake.qualified(unique("lake_starve_")), SCORED,
                       "event_time")
    writer = LakeWriter(table, "t")
    builder = BatchBuilder(table.schema().as_arrow(), "event_time", time_is_ms=True)
    per_batch, batches = 40, 4
    for b in range(batches):
        _append_batch(writer, builder, b, per_batch)  # 4 small files per day partition
    other = catalog(lake).load_table(table.name())
    reload = other.refresh

    def reload_then_append():
        reload()
        if not writer.commit_lock.locked():
            nonlocal batches
            _append_batch(writer, builder, batches, per_batch)
            batches += 1
        return other

    other.refresh = reload_then_append  # type: ignore[method-assign]
    report = mnt.compact(other, mnt.MaintenancePolicy(min_files=4), lock=writer.commit_lock)
    assert report.commit_conflicts == 0 and report.partitions_compacted == 3
    assert batches > 4  # appends landed after the compaction planned
    other.refresh = reload  # type: ignore[method-assign]
    other.refresh()
    n = batches * per_batch
    assert _ids(other) == Counter(f"p-{i}" for i in range(n))
    assert head_offsets(other, "t") == {p: n - 4 + p for p in range(4)}
    # the 12 planned files became 3; each later append added one file per day
    assert mnt.data_file_count(other) == 3 + 3 * (batches - 4)

