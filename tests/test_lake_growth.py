"""What keeps the lake and its object store bounded while a sink writes for days.

Unit tests (fakes) for the rules; `stack` tests against the session's real SeaweedFS:
its Iceberg catalog honouring the metadata-file properties, maintenance deleting what no
snapshot references while the table stays readable, and the filer's metadata log purge.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from eventing.stack import objectstore
from eventing.stack.settings import load_settings
from eventing.tables import arrow_memory
from eventing.tables import maintenance as mnt
from eventing.tables.lake import BatchBuilder, LakeWriter, SinkStats, open_table
from eventing.tables.lakehouse import LakeConfig, catalog, duckdb_connect, s3_filesystem
from tests.helpers import ROOT, unique, wait_until

SCORED = json.loads((ROOT / "schemas" / "payments.scored.avsc").read_text())
LOG = objectstore.FILER_LOG_DIR


# --------------------------------------------------------------------------- unit


def _at(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def test_stale_log_files_are_whole_minutes_older_than_the_keep_time():
    paths = [f"{LOG}/2026-11-29/23-59.0fb0e212", f"{LOG}/2026-11-30/12-00.0fb0e212",
             f"{LOG}/2026-11-30/12-08.0fb0e212", f"{LOG}/2026-11-30/12-09.0fb0e212",
             f"{LOG}/2026-11-30/12-10.0fb0e212", f"{LOG}/2026-11-30/not-a-minute"]
    # now 12:10:30, keep 60 s: a file is stale once its minute ended before 12:09:30
    stale = objectstore.stale_log_files(paths, 60, _at("2026-11-30 12:10:30"))
    assert stale == paths[:3]
    assert objectstore.stale_log_files(paths, 3600, _at("2026-11-30 12:10:30")) == paths[:1]
    assert objectstore.log_file_minute(paths[1]) == datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert objectstore.log_file_minute(paths[-1]) is None


def test_object_store_part_gets_its_bounds_from_the_settings(tmp_path):
    settings = load_settings(state_dir=tmp_path / "state", port_offset=22800)
    spec = objectstore.spec(settings)
    assert spec.env["GOMEMLIMIT"] == str(settings.objectstore_memory_limit)
    assert f"-master.vacuumIntervalSeconds={objectstore.VACUUM_INTERVAL_S}" in spec.argv


def test_volume_totals_are_read_from_the_end_of_volume_list():
    out = ("Topology volumeSizeLimit:1024 MB hdd(volume:2/71 active:2 free:69 remote:0)\n"
           "  volume Id:2, Size:17429680, Collection:, FileCount:4, DeleteCount:0\n"
           "total size:29308632 file_count:540 deleted_file:4 deleted_bytes:20328 \n")
    assert objectstore.parse_volume_totals(out) == objectstore.VolumeTotals(29308632, 20328)
    assert objectstore.parse_volume_totals("total size:155456 file_count:24 \n") == (
        objectstore.VolumeTotals(155456, 0))  # nothing deleted yet: no deleted_bytes
    assert objectstore.parse_volume_totals("error: no master") is None


def test_janitor_purges_then_vacuums_each_round_and_survives_a_failing_store(
        tmp_path, monkeypatch):
    import threading

    calls: list[tuple[str, float]] = []

    def purge(settings: object, keep_s: float) -> int:
        calls.append(("purge", keep_s))
        if len(calls) == 1:
            raise OSError("object store restarting")  # logged; the vacuum still runs
        return 2

    def vacuum(settings: object, garbage_threshold: float) -> str:
        calls.append(("vacuum", garbage_threshold))
        if len(calls) == 4:
            raise OSError("vacuum timed out")  # logged, retried next round
        return ""

    monkeypatch.setattr(objectstore, "purge_filer_log", purge)
    monkeypatch.setattr(objectstore, "vacuum_volumes", vacuum)
    monkeypatch.setattr(objectstore, "volume_totals", lambda settings: None)
    settings = load_settings(state_dir=tmp_path / "state", port_offset=22800)
    stop = threading.Event()
    janitor = objectstore.ObjectStoreJanitor(settings, stop, every_s=0.01).start()
    wait_until(lambda: janitor.purged >= 4 and janitor.vacuums >= 3, 10,
               "rounds after a failed purge and a failed vacuum")
    stop.set()
    janitor._thread.join(5)
    assert not janitor._thread.is_alive()
    kinds = [kind for kind, _ in calls]
    assert kinds[:6] == ["purge", "vacuum"] * 3  # the round's purged minutes, compacted
    assert set(calls) == {("purge", settings.filer_log_keep_s),
                          ("vacuum", settings.objectstore_garbage_threshold)}


def test_prometheus_is_started_with_a_retention_bound(tmp_path):
    from dataclasses import replace

    from eventing.stack import prometheus

    settings = replace(load_settings(state_dir=tmp_path / "state", port_offset=22800),
                       metrics_retention="6h", metrics_max_size="64MB")
    argv = prometheus.spec(settings).argv
    assert "--storage.tsdb.retention.time=6h" in argv
    assert "--storage.tsdb.retention.size=64MB" in argv


class _FakeTable:
    """Just what `prepare_table` touches: properties and a transaction."""

    def __init__(self, properties: dict[str, str]) -> None:
        self.properties = dict(properties)
        self.transactions = 0

    @contextmanager
    def transaction(self) -> Any:
        table = self

        class _Tx:
            def set_properties(self, props: dict[str, str]) -> None:
                table.properties.update(props)

        self.transactions += 1
        yield _Tx()


def test_prepare_table_adds_missing_properties_once():
    old = _FakeTable({"commit.retry.num-retries": "0", "owner": "x"})  # made before this
    mnt.prepare_table(old)
    assert old.properties == {"owner": "x", **mnt.TABLE_PROPERTIES}
    assert old.transactions == 1
    mnt.prepare_table(old)
    assert old.transactions == 1  # nothing missing: no commit


def test_sink_keeps_a_bounded_number_of_maintenance_reports():
    stats = SinkStats()
    for _ in range(mnt.KEEP_REPORTS + 7):
        stats.add_report(mnt.MaintenanceReport())
    assert len(stats.maintenance) == mnt.KEEP_REPORTS
    assert stats.as_dict()["maintenance_runs"] == mnt.KEEP_REPORTS + 7


# --------------------------------------------------------------------------- stack


def _arrow_backend_after(code: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter (Arrow's pool is chosen once per process), then
    print the default pool's backend; return it."""
    import os
    import subprocess
    import sys

    script = (code + "\nimport pyarrow as pa\n"
              "print('BACKEND', pa.default_memory_pool().backend_name)")
    clean = {k: v for k, v in os.environ.items() if k != arrow_memory.POOL_ENV} | env
    out = subprocess.run([sys.executable, "-c", script], env=clean, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BACKEND ")]
    assert lines, out.stderr[-2000:]
    return lines[-1].split()[1]


def test_lake_sink_pool_is_one_that_returns_freed_memory():
    # mimalloc (pyarrow's default here) kept +5 MiB/min in the sink (arrow_memory's doc).
    code = "from eventing.tables.arrow_memory import use_returning_pool\nuse_returning_pool()"
    assert _arrow_backend_after(code, {}) == "system"
    # An operator's explicit choice is kept.
    assert _arrow_backend_after(code, {arrow_memory.POOL_ENV: "jemalloc"}) == "jemalloc"


def test_sink_lake_command_chooses_the_pool_before_arrow_loads(tmp_path):
    # The command fails at the (absent) catalog; by then the pool must be chosen.
    code = (
        "from eventing.cli import main\n"
        "try:\n"
        f"    main(['--state-dir', {str(tmp_path)!r}, '--port-offset', '22850', 'sink', 'lake',"
        " '--topic', 'x', '--no-maintenance'])\n"
        "except BaseException:\n"
        "    pass")
    assert _arrow_backend_after(code, {}) == "system"


@pytest.fixture
def lake(stack) -> LakeConfig:
    return LakeConfig.from_settings(stack)


def _scored(i: int) -> dict:
    return {"payment_id": f"p-{i}", "card_id": f"card-{i % 7}", "merchant_id": "m-1",
            "amount": 10.0, "currency": "EUR", "country": "DE",
            "event_time": 1_764_000_000_000 + (i % 2) * 86_400_000, "amount_eur": 10.0,
            "merchant_category": "grocery", "card_home_country": "DE", "count_1m": 1,
            "amount_1m": 10.0, "count_10m": 1, "amount_10m": 10.0,
            "distinct_merchants_10m": 1, "country_mismatch": False, "late": False,
            "score": 1.0, "decision": "approve", "reasons": ""}


def _files(lake: LakeConfig, table: Any) -> dict[str, list[str]]:
    """The table's objects in S3 by folder: data, metadata.json, other metadata."""
    from pyarrow.fs import FileSelector, FileType

    root = table.location().split("://", 1)[1]
    found: dict[str, list[str]] = {"data": [], "metadata.json": [], "manifests": []}
    for info in s3_filesystem(lake).get_file_info(FileSelector(root, recursive=True)):
        if info.type != FileType.File:
            continue
        kind = ("data" if "/data/" in info.path else "metadata.json"
                if info.path.endswith(".metadata.json") else "manifests")
        found[kind].append(f"s3://{info.path}")
    return found


@pytest.mark.stack
def test_catalog_keeps_few_metadata_files_and_maintenance_deletes_the_rest(stack, lake):
    """40 commits, then maintenance: the catalog itself leaves at most
    previous-versions-max + 1 metadata.json files; maintenance leaves exactly the files
    the head references (no orphan, nothing the head needs), and both DuckDB and
    pyiceberg read every row."""
    table = open_table(catalog(lake), lake.qualified(unique("lake_growth_")), SCORED,
                       "event_time")
    keep = int(mnt.TABLE_PROPERTIES["write.metadata.previous-versions-max"])
    writer = LakeWriter(table, "t")
    builder = BatchBuilder(table.schema().as_arrow(), "event_time", time_is_ms=True)
    commits, per = 40, 5
    for c in range(commits):
        builder.clear()
        for i in range(c * per, (c + 1) * per):
            builder.add(_scored(i), 0, i)
        writer.commit(builder.build(), {0: (c + 1) * per - 1})
    table.refresh()
    before = _files(lake, table)
    assert len(table.metadata.metadata_log) <= keep
    assert len(before["metadata.json"]) <= keep + 1 < commits  # deleted at commit
    assert len(before["data"]) == 2 * commits  # a file per event-time day per commit

    report = mnt.run_maintenance(table, s3_filesystem(lake), mnt.MaintenancePolicy(
        min_files=2, keep_snapshots=1, max_snapshot_age_s=0, orphan_age_s=0))
    assert not report.errors, report.errors
    assert report.snapshots_expired > 0 and report.orphans_deleted > 0
    after = _files(lake, table)
    referenced = mnt.referenced_files(table)
    assert set(after["data"]) | set(after["manifests"]) <= referenced  # no orphan left
    assert set(after["data"]) == {t.file.file_path for t in table.scan().plan_files()}
    assert len(after["data"]) == 2 < len(before["data"])  # one file per day partition
    n = commits * per
    ids = Counter(table.scan(selected_fields=("payment_id",)).to_arrow()["payment_id"]
                  .to_pylist())
    assert ids == Counter(f"p-{i}" for i in range(n))
    con = duckdb_connect(lake)
    assert con.sql(f"SELECT count(*) FROM {table.name()[-1]}").fetchone()[0] == n


@pytest.mark.stack
def test_purge_filer_log_deletes_old_minutes_and_the_store_keeps_working(stack, lake):
    """The real filer writes its log once a minute: wait for a file, purge everything
    older than an hour from now (so every file is stale), and check that S3 and the
    catalog still answer and the filer logs again afterwards."""
    from pyarrow.fs import FileSelector

    fs = s3_filesystem(lake)
    bucket = stack.broker_bucket  # a plain bucket (the table bucket takes tables only)

    def log_files() -> list[str]:
        days = objectstore._listed(objectstore.shell(stack, [f"fs.ls -l {LOG}"]))
        return objectstore._listed(objectstore.shell(stack, [f"fs.ls -l {d}" for d in days]))

    def write_one() -> str:
        key = f"{bucket}/growth-test/{uuid.uuid4().hex}"
        with fs.open_output_stream(key) as out:
            out.write(b"x" * 100)
        return key

    write_one()
    files = wait_until(log_files, 150, "a filer metadata log file", interval=5)
    purged = objectstore.purge_filer_log(stack, keep_s=0, now=time.time() + 3600)
    # The stack's own janitor (the supervisor) purges too and may take one first (a CI
    # run: 4 purged of 5 listed): what must hold is that none of them is left.
    assert purged >= 1
    assert not set(files) & set(log_files())
    key = write_one()  # the store works on
    assert fs.get_file_info(key).size == 100
    assert catalog(lake).list_namespaces() is not None
    wait_until(log_files, 150, "the filer to log again after the purge", interval=5)
    fs.delete_dir_contents(f"{bucket}/growth-test")
    assert not [i for i in fs.get_file_info(FileSelector(f"{bucket}/growth-test",
                                                         allow_not_found=True))]


def _volume_files_bytes(settings) -> int:
    """Bytes of every volume data file (`*.dat`) in the object store's data folder."""
    folder = settings.state_dir / "data" / objectstore.NAME
    return sum(f.stat().st_size for f in folder.glob("*.dat"))


@pytest.mark.stack
def test_vacuum_gives_deleted_objects_disk_back(stack, lake):
    """Write 8 MiB of objects, delete them: the volumes keep the bytes (the master counts
    them deleted) until `vacuum_volumes` compacts, after which the data folder's volume
    files are smaller by most of it. This is what `weed mini` stops doing by itself."""
    from pyarrow.fs import FileSelector

    fs = s3_filesystem(lake)
    prefix = f"{stack.broker_bucket}/vacuum-test-{uuid.uuid4().hex[:8]}"
    blob, count = uuid.uuid4().bytes * (16384 // 16 * 16), 32  # 256 KiB each, 8 MiB
    for i in range(count):
        with fs.open_output_stream(f"{prefix}/{i}") as out:
            out.write(blob)
    written = len(blob) * count
    on_disk = _volume_files_bytes(stack)
    baseline = objectstore.volume_totals(stack)
    assert baseline is not None
    fs.delete_dir_contents(prefix)
    # The volume server tells the master its deleted bytes by heartbeat (seconds).
    wait_until(lambda: (t := objectstore.volume_totals(stack)) is not None
               and t.deleted_bytes >= baseline.deleted_bytes + written // 2
               or _volume_files_bytes(stack) < on_disk - written // 2,  # janitor was first
               60, "the master to count the deleted objects", interval=1)
    objectstore.vacuum_volumes(stack, garbage_threshold=0.01)
    after = _volume_files_bytes(stack)
    assert after < on_disk - written // 2, (on_disk, after, written)
    assert not list(fs.get_file_info(FileSelector(prefix, allow_not_found=True)))
    assert catalog(lake).list_namespaces() is not None  # the store works on
