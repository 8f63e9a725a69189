"""The lake sink: one topic of Avro records into one Iceberg table, exactly once.

Rows are appended in micro-batches (`batch_size` records or `interval_ms`, whichever
comes first). Exactly-once rests on one rule, in this order for every batch:

1. the batch's rows are written as Parquet files and committed to the table in one
   Iceberg snapshot whose summary carries `sluice.kafka-offsets`: the *cumulative*
   last-included offset per partition (the head's map merged with the batch's);
2. only after that commit succeeded are the Kafka offsets committed.

A crash between 1 and 2 replays the batch from Kafka; on start and on every partition
assignment the sink reads the offsets from the table (highest over the snapshot
history, so a crash at any point is covered) and seeks past them and skips every record
at or below them, so a replay never duplicates a row. The commit itself re-checks the
head's offsets and drops rows already there, which also covers a commit whose outcome was
unknown (timeout) and a zombie writer after a rebalance. Compaction copies the offsets
into its rewrite snapshot (`maintenance.CARRIED_PREFIX`) so they survive maintenance and
snapshot expiry.

Offsets stop a record from being written twice, not an event: a function that crashed
replays and produces new records for events it had already handled. The sink also drops
a record whose CloudEvent `source` + `id` it wrote recently (`eventing.tables.dedupe`:
within `dedupe_window_ms` of Kafka time, rebuilt from the topic on every assignment), so
the table holds each event once when replays come within that window (seconds, normally).

Table layout: the Avro fields (all optional columns, so the schema can evolve), the
time field as `timestamptz` (from epoch-ms long), partitioned by `day(time)`, plus
`kafka_partition` and `kafka_offset` (not `partition`/`offset`: both are SQL keywords
and would need quoting in every query), which make replays checkable.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from eventing.tables import dedupe
from eventing.tables.maintenance import (
    KEEP_REPORTS,
    TABLE_PROPERTIES,
    MaintenancePolicy,
    MaintenanceReport,
    MaintenanceThread,
    prepare_table,
)
from eventing.telemetry import tracing

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table

    from eventing.tables.lakehouse import LakeConfig

log = logging.getLogger("sluice.lake")

OFFSETS_PROPERTY = "sluice.kafka-offsets"
# The Kafka topic id (a new one each time the topic is created) the offsets belong to: a
# memory broker's restart recreates the topic empty, and offsets of the old log must not
# make the sink skip the new one's records as "already in the table".
TOPIC_IDS_PROPERTY = "sluice.kafka-topic-ids"
PARTITION_COLUMN = "kafka_partition"
OFFSET_COLUMN = "kafka_offset"


class UnsupportedSchema(ValueError):
    """An Avro schema the lake sink cannot map to an Iceberg table (yet)."""


class Unconvertible(ValueError):
    """One record whose values the table cannot hold (e.g. a time past year 9999).

    The schema let it through, so no retry can fix it: the sink dead-letters the record
    with this reason and goes on, rather than failing the whole batch for ever.
    """


# The instants Iceberg, Arrow (microseconds in int64) and Python's datetime all represent:
# 0001-01-01 to 9999-12-31. A time outside breaks the Parquet write or partition path.
TIME_MIN_MS = -62_135_596_800_000
TIME_MAX_MS = 253_402_300_799_999


# --------------------------------------------------------------------------- schema


def _avro_to_iceberg_type(avro: Any, path: str) -> Any:
    from pyiceberg import types as t

    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1:
            raise UnsupportedSchema(f"field {path!r}: unions other than [null, T] "
                                    "are not supported")
        return _avro_to_iceberg_type(branches[0], path)
    if isinstance(avro, dict):
        kind, logical = avro["type"], avro.get("logicalType")
        if logical == "date":
            return t.DateType()
        if logical in ("timestamp-millis", "timestamp-micros"):
            return t.TimestamptzType()
        if logical in ("local-timestamp-millis", "local-timestamp-micros"):
            return t.TimestampType()
        if logical in ("time-millis", "time-micros"):
            return t.TimeType()
        if logical == "decimal":
            return t.DecimalType(avro["precision"], avro.get("scale", 0))
        if kind == "enum" or logical == "uuid":
            return t.StringType()
        if kind == "fixed":
            return t.FixedType(avro["size"])
        if isinstance(kind, str) and kind in _PRIMITIVE_TYPES:
            return _avro_to_iceberg_type(kind, path)
        raise UnsupportedSchema(f"field {path!r}: Avro type {kind!r} is not supported")
    if avro in _PRIMITIVE_TYPES:
        return getattr(t, _PRIMITIVE_TYPES[avro])()
    raise UnsupportedSchema(f"field {path!r}: Avro type {avro!r} is not supported")


_PRIMITIVE_TYPES = {
    "boolean": "BooleanType", "int": "IntegerType", "long": "LongType",
    "float": "FloatType", "double": "DoubleType", "string": "StringType",
    "bytes": "BinaryType",
}


def iceberg_schema(avro: dict[str, Any], time_field: str) -> Schema:
    """The table schema for records of `avro` (a record schema, parsed or as JSON).

    `time_field` must be a long (epoch ms) or a timestamp-millis/micros field; it becomes
    a `timestamptz` column of the same name. Every column is optional: Iceberg cannot add
    required columns later, and Avro adds fields with defaults.
    """
    from pyiceberg.schema import Schema
    from pyiceberg.types import IntegerType, LongType, NestedField, TimestamptzType

    if avro.get("type") != "record":
        raise UnsupportedSchema("the topic's value schema must be an Avro record")
    fields = []
    for i, f in enumerate(avro["fields"], start=1):
        name = f["name"]
        if name in (PARTITION_COLUMN, OFFSET_COLUMN):
            raise UnsupportedSchema(f"field {name!r} clashes with the sink's own column")
        ftype = _avro_to_iceberg_type(f["type"], name)
        if name == time_field:
            if not isinstance(ftype, LongType | TimestamptzType):
                raise UnsupportedSchema(f"time field {name!r} must be epoch-ms long or a "
                                        f"timestamp, not {ftype}")
            ftype = TimestamptzType()
        fields.append(NestedField(i, name, ftype, required=False, doc=f.get("doc")))
    if time_field not in {f.name for f in fields}:
        raise UnsupportedSchema(f"time field {time_field!r} is not in the schema")
    n = len(fields)
    fields.append(NestedField(n + 1, PARTITION_COLUMN, IntegerType(), required=True,
                              doc="Kafka partition the row was read from"))
    fields.append(NestedField(n + 2, OFFSET_COLUMN, LongType(), required=True,
                              doc="Kafka offset the row was read from"))
    return Schema(*fields)


def open_table(cat: Catalog, identifier: str, avro: dict[str, Any], time_field: str,
               partition_by: str = "day") -> Table:
    """Load the table, creating it (partitioned by `partition_by` of time_field: hour,
    day, month or year) when missing. An existing table keeps its partitioning."""
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import DayTransform, HourTransform, MonthTransform, YearTransform

    transforms = {"hour": HourTransform, "day": DayTransform, "month": MonthTransform,
                  "year": YearTransform}
    if partition_by not in transforms:
        raise ValueError(f"partition_by must be one of {', '.join(transforms)}, "
                         f"not {partition_by!r}")
    schema = iceberg_schema(avro, time_field)
    source_id = schema.find_field(time_field).field_id
    spec = PartitionSpec(PartitionField(source_id, 1000, transforms[partition_by](),
                                        f"{time_field}_{partition_by}"))
    table = cat.create_table_if_not_exists(
        identifier, schema=schema, partition_spec=spec,
        properties={"write.parquet.compression-codec": "zstd", **TABLE_PROPERTIES},
    )
    prepare_table(table)
    return table


# --------------------------------------------------------------------------- offsets


def _offsets_of(summary: Any, topic: str, topic_id: str | None = None) -> dict[int, int]:
    """The offsets a snapshot recorded for `topic`; none when they belong to another
    incarnation of the topic than `topic_id` (a snapshot that recorded no id counts)."""
    props = None if summary is None else summary.additional_properties
    raw = props.get(OFFSETS_PROPERTY) if props else None
    if not raw:
        return {}
    if topic_id is not None:
        recorded = json.loads(props.get(TOPIC_IDS_PROPERTY) or "{}").get(topic)
        if recorded is not None and recorded != topic_id:
            return {}
    return {int(p): int(o) for p, o in json.loads(raw).get(topic, {}).items()}


def recorded_topic_id(table: Table, topic: str) -> str | None:
    """The topic id the head snapshot's offsets belong to (None: not recorded)."""
    snapshot = table.current_snapshot()
    raw = snapshot.summary.additional_properties.get(TOPIC_IDS_PROPERTY) if snapshot else None
    return json.loads(raw).get(topic) if raw else None


def head_offsets(table: Table, topic: str, topic_id: str | None = None) -> dict[int, int]:
    """Last offset included per partition, as the head snapshot records it."""
    snapshot = table.current_snapshot()
    return _offsets_of(snapshot.summary if snapshot else None, topic, topic_id)


def committed_offsets(table: Table, topic: str, topic_id: str | None = None) -> dict[int, int]:
    """Highest last-included offset per partition over every snapshot still in history."""
    found: dict[int, int] = {}
    for snapshot in table.metadata.snapshots:
        for p, o in _offsets_of(snapshot.summary, topic, topic_id).items():
            if o > found.get(p, -1):
                found[p] = o
    return found


def _offsets_json(table_offsets: dict[int, int], batch: dict[int, int], topic: str,
                  previous: str | None) -> str:
    """Merge the batch into the head's map; keep other topics' entries untouched."""
    doc = json.loads(previous) if previous else {}
    merged = dict(table_offsets)
    for p, o in batch.items():
        merged[p] = max(o, merged.get(p, -1))
    doc[topic] = {str(p): merged[p] for p in sorted(merged)}
    return json.dumps(doc, separators=(",", ":"))


def rows_after(rows: pa.Table, offsets: dict[int, int]) -> pa.Table:
    """The rows whose offset is above the committed one of their partition."""
    import pyarrow.compute as pc

    if not offsets or rows.num_rows == 0:
        return rows
    parts, offs = rows[PARTITION_COLUMN], rows[OFFSET_COLUMN]
    keep = None
    for p in pc.unique(parts).to_pylist():
        mask = pc.and_(pc.equal(parts, p), pc.greater(offs, offsets.get(p, -1)))
        keep = mask if keep is None else pc.or_(keep, mask)
    return rows.filter(keep)


# --------------------------------------------------------------------------- rows


class BatchBuilder:
    """Collects decoded records column by column and builds one Arrow table per batch.

    Column-wise lists (one append per field) cost about 1 µs per 20-field record here;
    `pa.Table.from_pylist` costs several times that.
    """

    def __init__(self, schema: pa.Schema, time_field: str, time_is_ms: bool) -> None:
        self.schema = schema
        self.time_field = time_field
        self.time_is_ms = time_is_ms
        self.names = [f.name for f in schema if f.name not in (PARTITION_COLUMN, OFFSET_COLUMN)]
        self.clear()

    def clear(self) -> None:
        self.columns: dict[str, list[Any]] = {n: [] for n in self.names}
        self.partitions: list[int] = []
        self.offsets: list[int] = []

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, record: dict[str, Any], partition: int, offset: int) -> None:
        """Add one row; raises `Unconvertible` (nothing added) for a row no table holds."""
        get = record.get
        if self.time_is_ms:
            t = get(self.time_field)
            if t is not None and not TIME_MIN_MS <= t <= TIME_MAX_MS:
                raise Unconvertible(f"{self.time_field} {t} (epoch ms) is outside the years "
                                    "1-9999 a timestamp column holds")
        for name, column in self.columns.items():
            column.append(get(name))
        self.partitions.append(partition)
        self.offsets.append(offset)

    def build(self) -> pa.Table:
        arrays = []
        for f in self.schema:
            if f.name == PARTITION_COLUMN:
                arrays.append(pa.array(self.partitions, f.type))
            elif f.name == OFFSET_COLUMN:
                arrays.append(pa.array(self.offsets, f.type))
            elif f.name == self.time_field and self.time_is_ms:
                ms = pa.array(self.columns[f.name], pa.int64())
                arrays.append(ms.cast(pa.timestamp("ms", tz="UTC")).cast(f.type))
            else:
                values = self.columns[f.name]
                if pa.types.is_string(f.type) and values and not isinstance(values[0], str):
                    values = [None if v is None else str(v) for v in values]  # enum/uuid
                arrays.append(pa.array(values, f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def drop_unconvertible(self) -> list[tuple[int, str]]:
        """Remove the rows that fail `build` on their own; return (index, reason) of each.

        The slow path after a batch failed to build: one Arrow table per row finds the
        offenders (a value of the wrong type for its column, say) so the rest still lands.
        """
        bad: list[tuple[int, str]] = []
        columns, partitions, offsets = self.columns, self.partitions, self.offsets
        for i in range(len(offsets)):
            self.columns = {n: [c[i]] for n, c in columns.items()}
            self.partitions, self.offsets = [partitions[i]], [offsets[i]]
            try:
                self.build()
            except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
                bad.append((i, f"{type(exc).__name__}: {exc}"))
        drop = {i for i, _ in bad}
        self.columns = {n: [v for i, v in enumerate(c) if i not in drop]
                        for n, c in columns.items()}
        self.partitions = [v for i, v in enumerate(partitions) if i not in drop]
        self.offsets = [v for i, v in enumerate(offsets) if i not in drop]
        return bad


# --------------------------------------------------------------------------- writer


@dataclass
class CommitResult:
    rows: int
    write_s: float
    commit_s: float
    conflicts: int


class LakeWriter:
    """Appends Arrow batches to the table with the offsets in the same snapshot."""

    def __init__(self, table: Table, topic: str, *, attempts: int | None = None,
                 max_backoff_s: float = 10.0, commit_lock: threading.Lock | None = None,
                 stop: threading.Event | None = None) -> None:
        self.table = table
        # None: retry until `stop` is set. An object-store or catalog outage is waited out
        # (the sink's metrics show it), never turned into an exit that loses the batch's
        # place; `sluice_lake_commit_failures` and the SluiceLakeStoreUnavailable alert say so.
        self.stop = stop or threading.Event()
        self.topic_id: str | None = None  # the topic incarnation being read (see above)
        self.failures = 0             # failed attempts whose outcome was unknown, in total
        self.failing_since: float | None = None  # monotonic start of the current outage
        # Held around each catalog commit; shared with this sink's maintenance thread.
        self.commit_lock = commit_lock or threading.Lock()
        self.topic = topic
        self.attempts = attempts
        self.max_backoff_s = max_backoff_s

    def committed(self) -> dict[int, int]:
        """Reload the table and return the offsets over its snapshot history.

        Waits out a catalog outage like `commit` (until `stop`), since a sink that does not
        know where the table ends must not read on.
        """
        attempt = 0
        while True:
            try:
                self.table.refresh()
                self.failing_since = None
                return committed_offsets(self.table, self.topic, self.topic_id)
            except Exception:
                if self.stop.is_set() or (self.attempts is not None
                                          and attempt + 1 >= self.attempts):
                    raise
                self.failures += 1
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                log.warning("cannot read %s's offsets (attempt %d), retrying",
                            self.table.name(), attempt + 1, exc_info=attempt < 3)
            self.stop.wait(min(self.max_backoff_s, 0.05 * 2 ** min(attempt, 20)))
            attempt += 1

    def commit(self, rows: pa.Table, offsets: dict[int, int]) -> CommitResult:
        """Commit `rows` (consumed up to `offsets`, per partition) exactly once.

        Retries on conflicts (reloading the head each time) and on errors whose outcome
        is unknown; rows the head already holds are dropped before each attempt.
        """
        from pyiceberg.exceptions import CommitFailedException
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        files: list[Any] = []   # written for `files_rows` pending rows, not committed
        files_rows = -1
        write_s = commit_s = 0.0
        conflicts = 0
        attempt = 0
        while self.attempts is None or attempt < self.attempts:
            if attempt and self.stop.is_set():
                break
            try:
                if attempt:
                    self.table.refresh()
                done = head_offsets(self.table, self.topic, self.topic_id)
                pending = rows_after(rows, done)
                if pending.num_rows == 0:
                    self._delete(files)  # the head already holds these rows
                    return CommitResult(0, write_s, commit_s, conflicts)
                if pending.num_rows != files_rows:
                    self._delete(files)
                    files, files_rows = [], -1
                    t0 = time.monotonic()
                    files = list(_dataframe_to_data_files(
                        self.table.metadata, pending, self.table.io, uuid.uuid4()))
                    files_rows = pending.num_rows
                    write_s += time.monotonic() - t0
                snapshot = self.table.current_snapshot()
                previous = (snapshot.summary.additional_properties.get(OFFSETS_PROPERTY)
                            if snapshot else None)
                props = {OFFSETS_PROPERTY: _offsets_json(done, offsets, self.topic, previous)}
                if self.topic_id is not None:
                    ids = (json.loads(snapshot.summary.additional_properties.get(
                        TOPIC_IDS_PROPERTY) or "{}") if snapshot else {})
                    props[TOPIC_IDS_PROPERTY] = json.dumps(ids | {self.topic: self.topic_id})
                tx = self.table.transaction()
                with tx.update_snapshot(snapshot_properties=props).fast_append() as append:
                    for f in files:
                        append.append_data_file(f)
                t0 = time.monotonic()
                try:
                    with self.commit_lock:
                        tx.commit_transaction()
                finally:
                    commit_s += time.monotonic() - t0
                self.failing_since = None
                return CommitResult(pending.num_rows, write_s, commit_s, conflicts)
            except CommitFailedException:
                # The head moved (maintenance, another writer); nothing was applied, so the
                # files can be reused if the next head still lacks all of these rows.
                conflicts += 1
                log.info("commit conflict on %s, retrying", self.table.name())
            except Exception:
                # Outcome unknown (timeout, 5xx, network). The next attempt reads the head:
                # a commit that did land shows in its offsets and is never repeated. The
                # files may be live now, so they are not deleted (orphan cleanup decides).
                files, files_rows = [], -1
                self.failures += 1
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                log.warning("commit to %s failed (attempt %d, failing for %.0fs), retrying",
                            self.table.name(), attempt + 1,
                            time.monotonic() - self.failing_since, exc_info=attempt < 3)
            self.stop.wait(min(self.max_backoff_s, 0.05 * 2 ** min(attempt, 20)))
            attempt += 1
        raise RuntimeError(f"could not commit to {self.table.name()} after "
                           f"{attempt} attempts" + (" (stopping)" if self.stop.is_set() else ""))

    def _delete(self, files: list[Any]) -> None:
        for f in files:
            try:
                self.table.io.delete(f.file_path)
            except Exception:
                log.warning("could not delete %s (an orphan now)", f.file_path)


# --------------------------------------------------------------------------- sink


@dataclass(frozen=True)
class LakeSinkConfig:
    topic: str
    table: str                      # short (`payments_scored`) or qualified name
    batch_size: int = 10_000
    interval_ms: int = 1_000
    time_field: str = "event_time"
    partition_by: str = "day"       # hour | day | month | year of time_field
    group_id: str | None = None     # default `sluice-lake-<table>`
    maintenance: MaintenancePolicy | None = field(default_factory=MaintenancePolicy)
    consumer_overrides: dict[str, Any] = field(default_factory=dict)
    # Drop a CloudEvent whose source+id was written this recently (Kafka time); 0 = off.
    dedupe_window_ms: int = dedupe.DEFAULT_WINDOW_MS
    dedupe_max_ids: int = dedupe.DEFAULT_MAX_IDS
    dedupe_key: tuple[str, ...] = dedupe.DEFAULT_KEY  # CloudEvent attributes
    # Where records the table cannot hold go, with the reason (Knative's extensions).
    dead_letter_topic: str = "sluice.deadletter"

    @property
    def group(self) -> str:
        return self.group_id or f"sluice-lake-{self.table.rsplit('.', 1)[-1]}"


@dataclass
class SinkStats:
    consumed: int = 0
    rows_written: int = 0
    skipped_replayed: int = 0
    skipped_duplicate_ids: int = 0
    undecodable: int = 0
    dead_lettered: int = 0
    topic_resets: int = 0
    commits: int = 0
    commit_conflicts: int = 0
    kafka_commit_errors: int = 0
    # (seconds of the whole flush, of the catalog commit alone), newest last
    latencies: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=10_000))
    # the newest maintenance reports; `maintenance_runs` counts them all
    maintenance: deque[MaintenanceReport] = field(
        default_factory=lambda: deque(maxlen=KEEP_REPORTS))
    maintenance_runs: int = 0

    def add_report(self, report: MaintenanceReport) -> None:
        self.maintenance.append(report)
        self.maintenance_runs += 1

    def as_dict(self) -> dict[str, Any]:
        flush = sorted(x[0] for x in self.latencies)
        commit = sorted(x[1] for x in self.latencies)
        return {
            "consumed": self.consumed, "rows_written": self.rows_written,
            "skipped_replayed": self.skipped_replayed,
            "skipped_duplicate_ids": self.skipped_duplicate_ids, "undecodable": self.undecodable,
            "dead_lettered": self.dead_lettered, "topic_resets": self.topic_resets,
            "commits": self.commits,
            "commit_conflicts": self.commit_conflicts,
            "flush_p50_ms": _pct(flush, 50), "flush_p99_ms": _pct(flush, 99),
            "commit_p50_ms": _pct(commit, 50), "commit_p99_ms": _pct(commit, 99),
            "maintenance_runs": self.maintenance_runs,
        }


def _pct(sorted_s: list[float], p: float) -> float | None:
    if not sorted_s:
        return None
    return round(sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * p / 100))] * 1000, 1)


class LakeSink:
    """Consume `config.topic`, decode with `serde`, append to the table in micro-batches."""

    def __init__(self, config: LakeSinkConfig, lake: LakeConfig, bootstrap: str, serde: Any,
                 *, on_flush: Callable[[CommitResult], None] | None = None) -> None:
        from eventing.tables import lakehouse

        self.config = config
        self.lake = lake
        self.bootstrap = bootstrap
        self.serde = serde
        self.on_flush = on_flush
        self.stats = SinkStats()
        self.identifier = lake.qualified(config.table)
        self.catalog = lakehouse.catalog(lake)
        avro = serde.writer_for(config.topic).parsed
        time_avro = next((f["type"] for f in avro["fields"]
                          if f["name"] == config.time_field), None)
        self.table = open_table(self.catalog, self.identifier, avro, config.time_field,
                                config.partition_by)
        self.writer = LakeWriter(self.table, config.topic)
        self.builder = BatchBuilder(self.table.schema().as_arrow(), config.time_field,
                                    time_is_ms=is_plain_long(time_avro))
        self._done: dict[int, int] = {}       # last offset in the table, per partition
        self._batch: dict[int, int] = {}      # last offset consumed in this batch
        self._tracer = tracing.get_tracer()
        self._traced: list[Any] = []          # records of the batch, when tracing is on
        self._batch_started = 0.0
        self._consumer: Any = None
        self.last_loop = time.monotonic()     # read by /healthz
        self._rows: list[Any] = []            # the message of each row in `builder`
        self._producer: Any = None            # dead letters; made on first use
        self._dead_acks: Any = None           # their delivery reports, awaited in flush
        self._admin: Any = None               # reads the topic's id (a recreated topic)
        self._topic_checked = 0.0
        self.recent = dedupe.RecentIds(config.dedupe_window_ms, config.dedupe_max_ids)
        self._maintenance: MaintenanceThread | None = None
        if config.maintenance is not None:
            self._maintenance = MaintenanceThread(
                lambda: lakehouse.catalog(lake).load_table(self.identifier),
                lakehouse.s3_filesystem(lake), config.maintenance,
                on_report=self.stats.add_report, commit_lock=self.writer.commit_lock)

    # -- Kafka callbacks

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self._check_topic_id()
        self._done = self.writer.committed()
        for tp in partitions:
            if tp.partition in self._done:
                tp.offset = self._done[tp.partition] + 1  # the table is the source of truth
        log.info("assigned %s; table holds offsets %s",
                 [tp.partition for tp in partitions], self._done)
        if self.config.dedupe_window_ms > 0:
            assigned = [tp.partition for tp in partitions]
            self.recent.forget(assigned)  # rebuilt from what the table holds now
            dedupe.restore(self.recent, self.bootstrap, self.config.topic,
                           {p: o for p, o in self._done.items() if p in assigned},
                           key_of=lambda m: dedupe.event_key(m, self.config.dedupe_key),
                           consumer_overrides=self.config.consumer_overrides)
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self.flush()
        self.recent.forget(tp.partition for tp in partitions)
        consumer.unassign()

    # -- loop

    def run(self, stop: threading.Event, *, max_rows: int | None = None) -> SinkStats:
        """Run until `stop` is set (or `max_rows` rows were written); flush on the way out."""
        from confluent_kafka import Consumer

        from eventing.kafka import consumer_config

        cfg = self.config
        # A maintenance-free flush can take seconds (poll interval), and the topic may be
        # created after the sink starts (see it within seconds, not librdkafka's 5 min).
        conf = consumer_config(self.bootstrap, cfg.group, **{
            "max.poll.interval.ms": 600_000, "topic.metadata.refresh.interval.ms": 5_000,
            **cfg.consumer_overrides})
        self.writer.stop = stop
        self._consumer = consumer = Consumer(conf)
        consumer.subscribe([cfg.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        if self._maintenance:
            self._maintenance.start()
        interval = cfg.interval_ms / 1000
        try:
            while not stop.is_set():
                self.last_loop = time.monotonic()
                if max_rows is not None and self.stats.rows_written >= max_rows:
                    break
                wait = 0.1
                if self._batch:
                    wait = max(0.0, min(wait, self._batch_started + interval - time.monotonic()))
                room = max(1, min(cfg.batch_size - len(self.builder), 10_000))
                for msg in consumer.consume(num_messages=room, timeout=wait):
                    if msg.error():
                        log.warning("consumer error: %s", msg.error())
                        continue
                    self._add(msg)
                if self._batch and (len(self.builder) >= cfg.batch_size
                                    or time.monotonic() - self._batch_started >= interval):
                    self.flush()
            self.flush()
        finally:
            if self._maintenance:
                self._maintenance.stop()
            consumer.close()
            if self._producer is not None:
                self._producer.flush(10)
        return self.stats

    def _add(self, msg: Any) -> None:
        from eventing.cloudevent import kafka as ce_kafka
        from eventing.serde import SerdeError, decode_row

        p, o = msg.partition(), msg.offset()
        self.stats.consumed += 1
        if o <= self._done.get(p, -1):
            # After the seek past the table's offsets this means a replay, or a topic that
            # was recreated under us (broker restart): the records are new then.
            if not self._check_topic_id(min_interval_s=5.0):
                self.stats.skipped_replayed += 1
                return
        if not self._batch:
            self._batch_started = time.monotonic()
        self._batch[p] = o
        value = msg.value()
        if value is None:
            return  # a tombstone: nothing to store, but its offset counts
        # Decoded once for both the dedupe key and the data's content type; a record that
        # is not a valid CloudEvent is wrapped (no key; content type from its header).
        event = ce_kafka.from_record(
            msg.key(), value, msg.headers(), topic=msg.topic(), partition=p, offset=o,
            timestamp_ms=None, wrap_invalid=True, validate=False)
        if self.config.dedupe_window_ms > 0:
            key = dedupe.key_of(event, self.config.dedupe_key)
            if key is not None and self.recent.seen(p, key, dedupe.record_time_ms(msg)):
                self.stats.skipped_duplicate_ids += 1  # a replayed event: its offset counts
                return
        try:
            record = decode_row(event.get("datacontenttype"), event.data, self.serde,
                                self.config.topic)
        except SerdeError as exc:
            self.stats.undecodable += 1
            log.warning("skipping %s[%d]@%d: %s", msg.topic(), p, o, exc)
            return
        try:
            self.builder.add(record, p, o)
        except Unconvertible as exc:
            self._dead_letter(msg, event, str(exc))
            return
        self._rows.append(msg)
        if self._tracer.enabled:
            self._traced.append(msg)  # spans for sampled records, made at commit

    def flush(self, *, commit_kafka: bool = True) -> CommitResult | None:
        """Commit the pending batch to the table, then its offsets to Kafka."""
        if not self._batch:
            return None
        from confluent_kafka import KafkaException, TopicPartition

        t0 = time.monotonic()
        result = None
        rows = self._build()
        self._await_dead_letters()  # before the commit records these offsets as done
        if rows is not None:
            with self._tracer.sink_span("lake", self._traced, table=self.config.table):
                result = self.writer.commit(rows, self._batch)
            self._traced = []
            self.stats.rows_written += result.rows
            self.stats.commits += 1
            self.stats.commit_conflicts += result.conflicts
            self.stats.latencies.append((time.monotonic() - t0, result.commit_s))
        for p, o in self._batch.items():
            self._done[p] = max(o, self._done.get(p, -1))
        try:
            if commit_kafka:
                self._consumer.commit(offsets=[TopicPartition(self.config.topic, p, o + 1)
                                               for p, o in self._batch.items()],
                                      asynchronous=False)
        except KafkaException as exc:  # harmless: the table's offsets skip the replay
            self.stats.kafka_commit_errors += 1
            log.warning("Kafka offset commit failed: %s", exc)
        self.builder.clear()
        self._rows = []
        self._batch = {}
        if self._maintenance and result:
            self._maintenance.notify_commit()
        if self.on_flush and result:
            self.on_flush(result)
        return result


    # -- a recreated topic

    def _current_topic_id(self) -> str | None:
        from confluent_kafka.admin import AdminClient

        from eventing.kafka import admin_config, topic_id

        if self._admin is None:
            self._admin = AdminClient(admin_config(self.bootstrap))
        return topic_id(self._admin, self.config.topic)  # None: keep the offsets we have

    def _check_topic_id(self, min_interval_s: float = 0.0) -> bool:
        """Read the topic's id; when it is not the one the table's offsets belong to, the
        log was reset: forget those offsets (counted, logged). True when it was reset."""
        now = time.monotonic()
        if now - self._topic_checked < min_interval_s:
            return False
        self._topic_checked = now
        current = self._current_topic_id()
        if current is None:
            return False
        known = self.writer.topic_id or recorded_topic_id(self.writer.table, self.config.topic)
        self.writer.topic_id = current
        if known is None or known == current:
            return False
        self.stats.topic_resets += 1
        log.warning("topic %s was recreated (id %s, the table's offsets are of %s): reading "
                    "the new log from its start; records of the old log not yet in the "
                    "table were lost with it", self.config.topic, current, known)
        # What was consumed from the old log and not yet committed belongs to that log:
        # commit it to the table under the old id, but not to Kafka (its offsets would
        # point into the new log).
        self.writer.topic_id = known
        self.flush(commit_kafka=False)
        self.writer.topic_id = current
        self._done = {}
        return True

    # -- records the table cannot hold

    def _build(self) -> pa.Table | None:
        """The batch as Arrow; rows that cannot convert are dead-lettered, the rest kept."""
        if not len(self.builder):
            return None
        try:
            return self.builder.build()
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            log.warning("batch of %d rows does not convert (%s); finding the rows",
                        len(self.builder), exc)
        bad = self.builder.drop_unconvertible()
        drop = {i for i, _ in bad}
        for i, reason in bad:
            msg = self._rows[i]
            self._dead_letter(msg, _event_of(msg), reason)
        self._rows = [m for i, m in enumerate(self._rows) if i not in drop]
        return self.builder.build() if len(self.builder) else None

    def _dead_letter(self, msg: Any, event: Any, reason: str) -> None:
        """Send `msg` to the dead-letter topic with `reason`; `flush` awaits the ack."""
        from confluent_kafka import Producer

        from eventing.cloudevent import kafka as ce_kafka
        from eventing.kafka import Acks, produce, producer_config

        if self._producer is None:
            self._producer = Producer(producer_config(self.bootstrap))
        if self._dead_acks is None:
            self._dead_acks = Acks()
        key, value, headers = ce_kafka.to_dead_letter(
            event, msg.headers(), destination=f"lake:{self.identifier}", code=422,
            message=reason)
        produce(self._producer, self.config.dead_letter_topic, value, msg.key() or key,
                headers=headers, on_delivery=self._dead_acks)
        self._dead_acks.sent()
        self.stats.dead_lettered += 1
        log.warning("dead-lettered %s[%d]@%d to %s: %s", msg.topic(), msg.partition(),
                    msg.offset(), self.config.dead_letter_topic, reason[:200])

    def _await_dead_letters(self) -> None:
        """Block until the batch's dead letters are acknowledged; raise if they were not.

        Their offsets are committed with the batch, so an unacknowledged dead letter would
        be a lost record: the sink exits instead and replays it after the restart.
        """
        acks, self._dead_acks = self._dead_acks, None
        if acks is None:
            return
        acks.seal()
        self._producer.flush(30)  # serves the delivery reports
        problem = acks.wait(time.monotonic())
        if problem:
            raise RuntimeError(f"dead letters of {self.identifier}: {problem}")


def _event_of(msg: Any) -> Any:
    from eventing.cloudevent import kafka as ce_kafka

    return ce_kafka.from_record(
        msg.key(), msg.value(), msg.headers(), topic=msg.topic(), partition=msg.partition(),
        offset=msg.offset(), timestamp_ms=None, wrap_invalid=True, validate=False)


def is_plain_long(avro_type: Any) -> bool:
    """An epoch-number `long` (possibly nullable), as opposed to a logical timestamp."""
    if isinstance(avro_type, list):
        avro_type = next((b for b in avro_type if b != "null"), None)
    if isinstance(avro_type, dict):
        return avro_type.get("type") == "long" and "logicalType" not in avro_type
    return avro_type == "long"


def serve_metrics(sinks: LakeSink | Sequence[LakeSink], host: str, port: int) -> None:
    """Expose the sinks' counters for Prometheus (one sample per table), read at scrape
    time: one lake-sink process serves every declared table; and a cheap `/healthz`."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import REGISTRY, Collector

    all_sinks = [sinks] if isinstance(sinks, LakeSink) else list(sinks)
    counters = (
        ("sluice_lake_records_consumed", "consumed", "Records consumed"),
        ("sluice_lake_rows_written", "rows_written", "Rows appended to the table"),
        ("sluice_lake_records_skipped_replayed", "skipped_replayed",
         "Replayed records already in the table"),
        ("sluice_lake_records_skipped_duplicate_id", "skipped_duplicate_ids",
         "Records of an event (its dedupe key) written recently"),
        ("sluice_lake_records_undecodable", "undecodable", "Records that did not decode"),
        ("sluice_lake_records_dead_lettered", "dead_lettered",
         "Records the table cannot hold, sent to the dead-letter topic with the reason"),
        ("sluice_lake_topic_resets", "topic_resets",
         "Times the topic was found recreated (a new log): read from its start"),
        ("sluice_lake_commits", "commits", "Iceberg commits"),
        ("sluice_lake_commit_conflicts", "commit_conflicts", "Commits retried"),
        ("sluice_lake_maintenance_runs", "maintenance_runs", "Maintenance runs"),
    )

    class _Collector(Collector):
        def collect(self):  # type: ignore[override]
            stats = [(sink.identifier, sink.stats) for sink in all_sinks]
            for name, attr, help_ in counters:
                fam = CounterMetricFamily(name, help_, labels=["table"])
                for table, s in stats:
                    value = getattr(s, attr)
                    fam.add_metric([table], value)
                yield fam
            fam = CounterMetricFamily(
                "sluice_lake_commit_failures",
                "Catalog/object-store attempts that failed and were retried", labels=["table"])
            for sink in all_sinks:
                fam.add_metric([sink.identifier], sink.writer.failures)
            yield fam
            dicts = [(table, s.as_dict()) for table, s in stats]
            for key in ("commit_p50_ms", "commit_p99_ms", "flush_p50_ms", "flush_p99_ms"):
                gauge = GaugeMetricFamily(f"sluice_lake_{key}", f"{key} over recent commits",
                                          labels=["table"])
                for table, d in dicts:
                    gauge.add_metric([table], d[key] or 0.0)
                yield gauge
            gauge = GaugeMetricFamily(
                "sluice_lake_store_unavailable_seconds",
                "How long the catalog/object store has been failing (0 when it answers)",
                labels=["table"])
            now = time.monotonic()
            for sink in all_sinks:
                since = sink.writer.failing_since
                gauge.add_metric([sink.identifier], 0.0 if since is None else now - since)
            yield gauge

    REGISTRY.register(_Collector())

    def health() -> tuple[bool, dict[str, Any]]:
        # Alive and looping; a store outage is reported, not "unhealthy": the sinks wait
        # it out, and a restart would not help.
        now = time.monotonic()
        ages = {sink.identifier: round(now - sink.last_loop, 1) for sink in all_sinks}
        failing = {sink.identifier: round(now - sink.writer.failing_since, 1)
                   for sink in all_sinks if sink.writer.failing_since is not None}
        return all(age < 120 for age in ages.values()), {"seconds_since_loop": ages,
                                                         "store_failing_s": failing}

    from eventing.telemetry import metrics

    metrics.serve_metrics(host, port, health)
