"""The real-time table: a topic's last hour in DuckDB, queryable within milliseconds.

Locally this plays Pinot's part. DuckDB allows one writing process, so the table lives
in one long-running server process that owns the connection, consumes the topic into an
in-memory table and answers SQL over HTTP:

- **Ingest.** A consumer with direct partition assignment (no group: nothing is
  committed, the table is a cache rebuilt from the topic on start, and a Tansu group join
  costs seconds) starts each partition at the first record newer than the retention and
  appends what it polls as one Arrow batch: at once when the table was quiet, else at
  most one INSERT per `poll_s` (20 ms: an INSERT costs milliseconds of CPU whatever its
  size). A record is queryable as soon as its batch's INSERT returns.
  Rows whose time field is older than the retention are deleted every `sweep_s`.
  A record of an event (CloudEvent source + id) seen within `dedupe_window_s` of Kafka
  time is skipped: a function that crashed replays events it had already handled
  (`eventing.tables.dedupe`; the window's ids are rebuilt by reading the topic on start).
- **Same shape as the lake.** Columns come from the lake sink's own mapping
  (`eventing.tables.lake.iceberg_schema`: Avro fields, the time field as TIMESTAMPTZ, then
  `kafka_partition`, `kafka_offset`), so `SELECT * FROM payments_scored UNION ALL SELECT *
  FROM payments_scored_rt` lines up, and (partition, offset) tells which real-time rows
  the lake already has.
- **One connection, many cursors.** The Iceberg catalog is ATTACHed (`lakehouse`) to the
  same DuckDB database, so one SQL reads both. Ingest and every query use their own
  cursor (DuckDB connections to one database; MVCC keeps them apart). Settings are set
  globally and then locked, and the local file system is disabled, so a query can only
  read the tables.
- **HTTP.** `POST /query` `{"sql": ..., "engine": "trino"|"duckdb", "explain": bool,
  "max_rows": n}` (Trino SQL is translated by `eventing.tables.query` with the live
  columns), `/healthz`, `/metrics`. Binds 127.0.0.1 by default, under the limits of
  `eventing.serving`.
- **Who may ask what.** `POST /query` needs `Content-Type: application/json` (415
  otherwise: an HTML form or a `no-cors` fetch from a web page cannot send that without
  a CORS preflight, which this server never grants) and, when a token is set (env
  `SLUICE_QUERY_TOKEN`), `Authorization: Bearer <token>` (401). The SQL may read the
  lake's tables and this server's real-time table only (`query.guard`: no table
  functions, files, URLs or system tables), and at most `max_rows_limit` rows come back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.serde import decode_row, subject_for
from eventing.serving import ServerLimits
from eventing.tables import query
from eventing.tables.dedupe import key_of
from eventing.telemetry import tracing
from eventing.units import parse_duration  # noqa: F401 - callers import it from here

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from eventing.tables.lakehouse import LakeConfig

log = logging.getLogger("sluice.realtime")

LAKE_ALIAS = query.DEFAULT_NAMES.lake_alias
# Exit status of a server whose ingest thread died (the supervisor shows it as the reason).
EXIT_INGEST_DIED = 70


def table_for_topic(topic: str, suffix: str = query.DEFAULT_NAMES.realtime_suffix) -> str:
    """`payments.scored` -> `payments_scored_rt` (the lake's name plus the suffix)."""
    from eventing.tables.lakehouse import table_name_for_topic

    return table_name_for_topic(topic) + suffix


@dataclass(frozen=True)
class RealtimeSettings:
    """What the real-time server needs; the CLI builds it from flags and stack settings."""

    bootstrap: str
    registry_url: str
    topic: str = ""
    table: str = ""  # the lake table's name (default: the topic's); this one adds `_rt`
    host: str = "127.0.0.1"
    port: int = 8090
    retention_s: float = 3600.0
    time_field: str = "event_time"
    lake: LakeConfig | None = None
    poll_s: float = 0.02  # at most one INSERT per poll_s (each costs ms of CPU); a quiet
    # table inserts a record the moment it arrives (`Ingest._next_batch`)
    # Over `eventing.kafka`'s consumer defaults: the broker storage's tuning.
    consumer_overrides: dict[str, Any] = field(default_factory=dict)
    batch_max: int = 5000
    sweep_s: float = 10.0
    dedupe_window_s: float = 300.0  # 0 = keep replayed events (see eventing.tables.dedupe)
    dedupe_key: tuple[str, ...] = ("source", "id")  # CloudEvent attributes
    query_timeout_s: float = 60.0
    max_rows: int = 10_000  # rows an answer holds unless the request asks for more
    max_rows_limit: int = 100_000  # the most a request may ask for (answers are in memory)
    log_level: str = "info"
    token: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    limits: ServerLimits = field(default_factory=ServerLimits)


class Metrics:
    """The server's instruments, on their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rows_ingested = Counter("sluice_realtime_rows_ingested", "Rows appended",
                                     registry=r)
        self.rows_expired = Counter("sluice_realtime_rows_expired",
                                    "Rows deleted for being older than the retention",
                                    registry=r)
        self.undecodable = Counter("sluice_realtime_undecodable_records",
                                   "Records skipped: not a decodable CloudEvent/Avro value",
                                   registry=r)
        self.unconvertible = Counter("sluice_realtime_unconvertible_records",
                                     "Records skipped: values the table cannot hold "
                                     "(the lake sink dead-letters them)", registry=r)
        self.topic_resets = Counter("sluice_realtime_topic_resets",
                                    "Partitions whose offsets went back: the topic was "
                                    "recreated (a broker restart); read from the new log",
                                    registry=r)
        self.duplicates = Counter("sluice_realtime_duplicate_records",
                                  "Records skipped: an event (source+id) seen recently",
                                  registry=r)
        self.rows = Gauge("sluice_realtime_rows", "Rows in the real-time table", registry=r)
        self.lag_ms = Gauge("sluice_realtime_ingest_lag_ms",
                            "Last batch: longest time from a record's Kafka timestamp to "
                            "queryable", registry=r)
        self.lag = Histogram("sluice_realtime_ingest_lag_seconds",
                             "Per record: Kafka timestamp to queryable", registry=r,
                             buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.query_latency = Histogram(
            "sluice_realtime_query_duration_seconds", "POST /query, translation to last row",
            ["outcome"], registry=r,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


class TableTarget:
    """One real-time table inside the server's database: its topic's rows, its retention."""

    def __init__(self, db: RealtimeTable, settings: RealtimeSettings,
                 avro_schema: dict[str, Any]) -> None:
        from eventing.tables.lake import BatchBuilder, iceberg_schema, is_plain_long

        self.db = db
        self.settings = settings
        self.metrics = db.metrics
        self.name = table_for_topic(settings.topic) if not settings.table else (
            settings.table + query.DEFAULT_NAMES.realtime_suffix)
        self.arrow_schema: pa.Schema = iceberg_schema(avro_schema, settings.time_field).as_arrow()
        time_type = next(f["type"] for f in avro_schema["fields"]
                         if f["name"] == settings.time_field)
        self.builder = BatchBuilder(self.arrow_schema, settings.time_field,
                                    time_is_ms=is_plain_long(time_type))
        self.rows = 0
        with db._write_lock:
            db._write.register("_rt_empty", self.arrow_schema.empty_table())
            try:
                db._write.execute(f'CREATE TABLE "{self.name}" AS SELECT * FROM _rt_empty')
            finally:
                db._write.unregister("_rt_empty")

    def append(self, records: Iterable[tuple[dict[str, Any], int, int]],
               timestamps_ms: Iterable[int] = ()) -> int:
        """Append decoded records `(record, partition, offset)` as one Arrow batch.

        Records older than the retention are left out. `timestamps_ms` (the Kafka
        timestamps) feed the ingest-lag metrics. Returns the rows appended.
        """
        import pyarrow as pa

        from eventing.tables.lake import Unconvertible

        builder = self.builder
        builder.clear()
        for record, partition, offset in records:
            try:
                builder.add(record, partition, offset)
            except Unconvertible as exc:  # the lake sink dead-letters it; here: skip, count
                self._skip(partition, offset, str(exc))
        if not len(builder):
            return 0
        try:
            batch = builder.build()
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            for i, reason in builder.drop_unconvertible():
                self._skip(-1, i, reason)
            if not len(builder):
                return 0
            batch = builder.build()
        builder.clear()
        cutoff = self._cutoff()
        db = self.db
        with db._write_lock:
            db._write.register("_rt_batch", batch)
            try:
                n = db._write.execute(
                    f'INSERT INTO "{self.name}" SELECT * FROM _rt_batch '
                    f'WHERE "{self.settings.time_field}" >= $1 '
                    f'OR "{self.settings.time_field}" IS NULL', [cutoff]).fetchone()[0]
            finally:
                db._write.unregister("_rt_batch")
        now_ms = time.time() * 1000
        lags = [(now_ms - ts) / 1000 for ts in timestamps_ms if ts and ts > 0]
        if lags:
            for lag in lags:
                self.metrics.lag.observe(lag)
            self.metrics.lag_ms.set(round(max(lags) * 1000, 1))
        self.rows += n
        self.metrics.rows_ingested.inc(n)
        self.metrics.rows.set(db.rows)
        return n

    def _skip(self, partition: int, offset: int, reason: str) -> None:
        self.metrics.unconvertible.inc()
        log.warning("%s: skipping the row of partition %d offset %d: %s", self.name,
                    partition, offset, reason[:200])

    def _cutoff(self) -> Any:
        import datetime as dt

        return dt.datetime.fromtimestamp(time.time() - self.settings.retention_s, dt.UTC)

    def expire(self) -> int:
        """Delete rows older than the retention (by the time field); returns how many."""
        db = self.db
        with db._write_lock:
            n = db._write.execute(
                f'DELETE FROM "{self.name}" WHERE "{self.settings.time_field}" < $1',
                [self._cutoff()]).fetchone()[0]
            self.rows = db._write.execute(f'SELECT count(*) FROM "{self.name}"').fetchone()[0]
        self.metrics.rows_expired.inc(n)
        self.metrics.rows.set(db.rows)
        return n


class RealtimeTable:
    """The DuckDB database: the real-time tables, the attached lake, ingest and queries.

    Built with its first table (`settings`, `avro_schema`); `add_table` adds one per
    further declared topic. `append`/`expire`/`name` are the first table's."""

    def __init__(self, settings: RealtimeSettings, avro_schema: dict[str, Any] | None, *,
                 con: duckdb.DuckDBPyConnection | None = None,
                 metrics: Metrics | None = None, lake_attempts: int = 10) -> None:
        """`avro_schema` None: no real-time table yet (a pipeline with lake tables only
        still answers queries over the lake)."""
        import duckdb

        self.settings = settings
        self.metrics = metrics or Metrics()
        self.con = con or duckdb.connect(config={"autoinstall_known_extensions": "false",
                                                 "autoload_known_extensions": "false"})
        self.con.execute("SET GLOBAL TimeZone = 'UTC'")  # the local engine runs in UTC
        self.lake_error: str | None = "no lake configured" if settings.lake is None else None
        if settings.lake is not None:
            self.attach_lake(attempts=lake_attempts)
        # Queries may read tables, nothing else (`query.guard` checks the SQL first); as a
        # second wall: no external access but the lake's bucket (other buckets, the
        # broker's among them, are refused), no local files, no http(s) URLs, and no
        # changed settings. Order matters: allowed_directories must be set first.
        warehouse = settings.lake.warehouse.rstrip("/") + "/" if settings.lake else None
        if warehouse:
            self.con.execute("SET allowed_directories = [?]", [warehouse])
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET disabled_filesystems = 'LocalFileSystem,HTTPFileSystem'")
        self.con.execute("SET lock_configuration = true")
        self._write = self.con.cursor()  # ingest's own connection
        self._write_lock = threading.Lock()
        self.tables: dict[str, TableTarget] = {}
        self.primary = None if avro_schema is None else self.add_table(settings, avro_schema)
        self.name = self.primary.name if self.primary else ""
        self._columns: dict[str, tuple[float, dict[str, str] | None]] = {}
        self.columns_ttl_s = 30.0
        self._last_reattach = 0.0
        self._translations: dict[str, tuple[float, str]] = {}

    def add_table(self, settings: RealtimeSettings, avro_schema: dict[str, Any]) -> TableTarget:
        """One more real-time table in this database (a further declared topic)."""
        target = TableTarget(self, settings, avro_schema)
        self.tables[target.name] = target
        return target

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def append(self, records: Iterable[tuple[dict[str, Any], int, int]],
               timestamps_ms: Iterable[int] = ()) -> int:
        assert self.primary is not None, "no real-time table"
        return self.primary.append(records, timestamps_ms)

    def expire(self) -> int:
        assert self.primary is not None, "no real-time table"
        return self.primary.expire()

    # ----------------------------------------------------------------- lake

    def attach_lake(self, attempts: int = 1, wait_s: float = 1.0) -> bool:
        """ATTACH the Iceberg catalog as `lake` (extensions, secrets; before the lock);
        False, with `lake_error` set, when it fails `attempts` times."""
        from eventing.tables import lakehouse

        assert self.settings.lake is not None
        for attempt in range(attempts):
            try:
                lakehouse.duckdb_connect(self.settings.lake, alias=LAKE_ALIAS,
                                         use_namespace=False, con=self.con)
            except Exception as exc:  # noqa: BLE001 - the real-time table works without it
                self.lake_error = f"the lake catalog is not attached: {exc}"
                if attempt + 1 < attempts:
                    time.sleep(wait_s)
                continue
            self.lake_error = None
            return True
        log.warning("%s", self.lake_error)
        return False

    def reattach_lake(self) -> bool:
        """DETACH and ATTACH again, which signs in to the catalog anew (an expired OAuth2
        token). Only the ATTACH is repeated: loading extensions needs the local file
        system, which is disabled once the server is up. Same statement as
        `lakehouse.duckdb_connect`, with the secret it created."""
        lake = self.settings.lake
        if lake is None:
            return False
        uri = lake.catalog_uri.rstrip("/").replace("'", "''")
        warehouse = lake.warehouse_name.replace("'", "''")
        try:
            with self._write_lock:
                attached = {r[0] for r in self.con.execute(
                    "SELECT database_name FROM duckdb_databases()").fetchall()}
                if LAKE_ALIAS in attached:
                    self.con.execute(f"DETACH {LAKE_ALIAS}")
                self.con.execute(f"ATTACH '{warehouse}' AS {LAKE_ALIAS} (TYPE iceberg, "
                                 f"ENDPOINT '{uri}', SECRET {LAKE_ALIAS}_iceberg)")
        except Exception as exc:  # noqa: BLE001
            self.lake_error = f"the lake catalog is not attached: {exc}"
            return False
        self.lake_error = None
        self._columns.clear()
        return True

    # ----------------------------------------------------------------- queries

    def columns(self, short: str) -> dict[str, str] | None:
        """{column: type} of a table by its short name (`payments_scored_rt`,
        `payments_scored`, `ns.table`), for the translator; None when unknown."""
        kind, namespace, name = query.DEFAULT_NAMES.resolve(short.split("."))
        parts = query.DEFAULT_NAMES.target(kind, namespace, name, "duckdb")
        key = ".".join(parts)
        cached = self._columns.get(key)
        if cached and time.monotonic() - cached[0] < self.columns_ttl_s:
            return cached[1]
        cur = self.con.cursor()
        try:
            quoted = ".".join(f'"{p}"' for p in parts)
            columns = {r[0]: r[1] for r in cur.execute(f"DESCRIBE {quoted}").fetchall()}
        except Exception:  # noqa: BLE001 - no such table (yet), or the lake is away
            columns = None
        finally:
            cur.close()
        self._columns[key] = (time.monotonic(), columns)
        return columns

    def query(self, sql: str, *, engine: str = "trino", explain: bool = False,
              max_rows: int | None = None) -> dict[str, Any]:
        """Translate (engine `trino`) or check (engine `duckdb`) and run one query.

        Raises `query.TranslationError`/`query.Refused` for SQL that cannot run and
        `query.QueryFailed` when DuckDB fails or the query times out.
        """
        started = time.perf_counter()
        meta = query.metadata_statement(sql) if engine == "trino" else None
        if meta is not None:
            return self._metadata(meta, started)
        if engine == "trino":
            duck_sql = self._translate(sql)
        elif engine == "duckdb":
            query.guard(sql, self.reachable)  # one read-only query of declared tables
            duck_sql = sql
        else:
            raise query.TranslationError(f"engine must be trino or duckdb, not {engine!r}")
        translated = time.perf_counter()
        timing = {"translate": _ms(translated - started)}
        if explain:
            return {"duckdb_sql": duck_sql, "timing_ms": timing}
        limit = self.settings.max_rows if max_rows is None else max_rows
        if (self.lake_error and self.settings.lake is not None and f"{LAKE_ALIAS}." in duck_sql
                and time.monotonic() - self._last_reattach > 5.0):
            self._last_reattach = time.monotonic()
            self.reattach_lake()  # the catalog was away at start: try again
        try:
            columns, types, rows = self._execute(duck_sql, limit + 1)
        except query.QueryFailed as exc:
            if self.settings.lake is None or not _looks_like_auth(str(exc)):
                raise
            self.reattach_lake()  # an expired catalog token: sign in again, retry once
            columns, types, rows = self._execute(duck_sql, limit + 1)
        done = time.perf_counter()
        timing |= {"execute": _ms(done - translated), "total": _ms(done - started)}
        return {"columns": columns, "types": types, "rows": rows[:limit],
                "truncated": len(rows) > limit, "duckdb_sql": duck_sql, "timing_ms": timing}

    def _metadata(self, meta: query.Metadata, started: float) -> dict[str, Any]:
        """SHOW TABLES / DESCRIBE / SHOW COLUMNS, answered as Trino shapes them."""
        names = query.DEFAULT_NAMES
        if meta.kind == "tables":
            schema = list(meta.schema)
            realtime_only = bool(schema) and (schema[-1] == names.realtime_schema
                                              or schema[0] == names.trino_realtime_catalog)
            tables = [] if schema and not realtime_only else sorted(self.tables)
            if not realtime_only:
                tables += self.lake_tables(schema[-1] if schema else names.namespace)
            rows = [[t] for t in sorted(tables) if query.like_matches(meta.like, t)]
            columns, types = query.TABLES_COLUMNS, ["VARCHAR"]
        else:
            kind, namespace, name = names.resolve(list(meta.table))
            short = names.short(kind, namespace, name)
            found = self.columns(short)
            if found is None:
                raise query.QueryFailed(f"Table '{short}' does not exist"
                                        + (f" ({self.lake_error})" if kind == "lake"
                                           and self.lake_error else ""))
            rows, columns = query.describe_rows(found), query.DESCRIBE_COLUMNS
            types = ["VARCHAR"] * len(columns)
        total = _ms(time.perf_counter() - started)
        return {"columns": columns, "types": types, "rows": rows, "truncated": False,
                "duckdb_sql": "", "timing_ms": {"translate": 0.0, "execute": total,
                                                "total": total}}

    def lake_tables(self, namespace: str) -> list[str]:
        """Short names of the lake's tables in `namespace` (none while the lake is away)."""
        if self.settings.lake is None:
            return []
        if self.lake_error and time.monotonic() - self._last_reattach > 5.0:
            self._last_reattach = time.monotonic()
            self.reattach_lake()
        cur = self.con.cursor()
        try:
            found = cur.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = $1 "
                "AND schema_name = $2", [LAKE_ALIAS, namespace]).fetchall()
        except Exception:  # noqa: BLE001 - the lake is away: list what is here
            return []
        finally:
            cur.close()
        short = query.DEFAULT_NAMES.short
        return [short("lake", namespace, r[0]) for r in found]

    def _translate(self, sql: str) -> str:
        """Translate with the live columns; repeated SQL (dashboards) from a small cache
        that expires with the column cache (parsing costs ~5-10 ms a query)."""
        hit = self._translations.get(sql)
        if hit and time.monotonic() - hit[0] < self.columns_ttl_s:
            return hit[1]
        duck_sql = query.translate(sql, schema=self.columns)
        query.guard(duck_sql, self.reachable)  # cached only once it passed
        if len(self._translations) >= 512:
            self._translations.clear()
        self._translations[sql] = (time.monotonic(), duck_sql)
        return duck_sql

    def reachable(self, catalog: str, db: str, name: str) -> bool:
        """Whether user SQL may read this table: the lake catalog's tables and this
        server's real-time tables (one per declared table), nothing else (`query.guard`)."""
        if catalog == LAKE_ALIAS:
            return bool(db) and db.lower() not in ("information_schema", "pg_catalog")
        realtime_catalog, realtime_db = query.DEFAULT_NAMES.realtime_db.split(".")
        return name in self.tables and (catalog, db) in {
            (realtime_catalog, realtime_db), ("", realtime_db), ("", "")}

    def _execute(self, sql: str, limit: int) -> tuple[list[str], list[str], list[Any]]:
        cur = self.con.cursor()
        timer = threading.Timer(self.settings.query_timeout_s, cur.interrupt)
        timer.start()
        try:
            cur.execute(sql)
            rows = cur.fetchmany(limit)
            description = cur.description or []
        except Exception as exc:  # duckdb.Error and its subclasses
            if not timer.is_alive():
                raise query.QueryFailed(
                    f"the query ran longer than {self.settings.query_timeout_s:g} s and was "
                    "stopped") from None
            message = str(exc)
            if self.lake_error and f"{LAKE_ALIAS}." in sql.lower():
                message += f" ({self.lake_error})"
            raise query.QueryFailed(message) from None
        finally:
            timer.cancel()
            cur.close()
        return ([d[0] for d in description], [str(d[1]) for d in description],
                [list(r) for r in rows])


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _looks_like_auth(message: str) -> bool:
    lowered = message.lower()
    return any(s in lowered for s in ("401", "unauthorized", "token expired", "403"))


# --------------------------------------------------------------------------- consumer


class Ingest:
    """The consumer thread: topic -> `RealtimeTable.append`, plus the retention sweep."""

    def __init__(self, table: RealtimeTable | TableTarget, serde: Any) -> None:
        from eventing.tables.dedupe import RecentIds

        self.table = table
        self.serde = serde
        self.settings = table.settings
        self.recent = RecentIds(int(self.settings.dedupe_window_s * 1000))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"realtime-{table.name}",
                                       daemon=True)
        self.assigned: set[int] = set()
        self.last_offsets: dict[int, int] = {}  # per partition: a step back = a new log
        self.topic_id: str | None = None        # the incarnation of the topic being read
        self._admin: Any = None
        self.last_poll = 0.0
        self.last_insert = 0.0  # monotonic time of the last INSERT (see `_next_batch`)
        self.error: str | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)

    def healthy(self) -> tuple[bool, str]:
        if not self.thread.is_alive():
            return False, f"the ingest thread stopped: {self.error or 'unknown reason'}"
        if time.monotonic() - self.last_poll > 10:
            return False, "the ingest thread has not polled for 10 s"
        return True, f"assigned partitions {sorted(self.assigned)}"

    def _run(self) -> None:
        from confluent_kafka import Consumer

        from eventing.kafka import consumer_config

        s = self.settings
        consumer = Consumer(consumer_config(
            s.bootstrap, f"sluice-realtime-{uuid.uuid4().hex[:8]}",
            **{**s.consumer_overrides, "enable.auto.offset.store": False}))
        try:
            self._loop(consumer)
        except Exception as exc:
            self.error = repr(exc)
            log.exception("real-time ingest failed")
            # The HTTP server would live on with a table that no longer fills: exit, so the
            # stack's supervisor restarts the process (which reloads the last hour). The
            # log handler flushed the traceback already (a StreamHandler flushes each record).
            os._exit(EXIT_INGEST_DIED)
        finally:
            consumer.close()

    def _loop(self, consumer: Any) -> None:
        s = self.settings
        next_meta = next_sweep = 0.0
        decode = self._decode
        while not self.stop_event.is_set():
            now = time.monotonic()
            self.last_poll = now
            if now >= next_meta:
                self._assign_new(consumer)
                next_meta = now + (5.0 if self.assigned else 0.5)
            if now >= next_sweep:
                expired = self.table.expire()
                if expired:
                    log.info("expired %d rows older than %gs", expired, s.retention_s)
                next_sweep = now + s.sweep_s
            if not self.assigned:
                self.stop_event.wait(0.2)
                continue
            msgs = self._next_batch(consumer)
            if not msgs:
                continue
            records, stamps = [], []
            last = self.last_offsets
            for msg in msgs:
                if msg.error():
                    continue
                p, o = msg.partition(), msg.offset()
                if o < last.get(p, -1):
                    # Only a recreated log goes back (this consumer never seeks back);
                    # the consumer already reads it from its start (auto.offset.reset).
                    self.table.metrics.topic_resets.inc()
                    log.warning("%s[%d] went back from offset %d to %d: the topic was "
                                "recreated; reading the new log", msg.topic(), p, last[p], o)
                last[p] = o
                record = decode(msg)
                if record is None:
                    continue
                records.append((record, msg.partition(), msg.offset()))
                stamps.append(msg.timestamp()[1])
            with tracing.sink_span("realtime", msgs, table=self.table.name):
                self.table.append(records, stamps)
            self.last_insert = time.monotonic()

    def _next_batch(self, consumer: Any) -> list[Any]:
        """The records of the next INSERT: those already fetched at once, else the first
        to arrive within `poll_s` and whatever came with it; then, if the previous INSERT
        was less than `poll_s` ago, more until `poll_s` after it (or `batch_max`).

        An INSERT costs ~4-15 ms of CPU whatever its size (Arrow registration and
        planning; measured 14.6 ms for 1 row and 19.5 ms for 1,000 on the shared 2
        cores), so at most one per `poll_s` keeps the server's CPU bounded under load.
        `consume(batch_max, poll_s)` alone also waited out the whole `poll_s` when a
        record arrived after a quiet spell, adding up to `poll_s` to its latency for
        nothing; now a quiet table inserts the moment a record arrives.
        """
        s = self.settings
        msgs = consumer.consume(s.batch_max, 0)
        if not msgs:
            msgs = consumer.consume(1, s.poll_s)  # returns when the first record arrives
            if not msgs:
                return []
            msgs += consumer.consume(s.batch_max - 1, 0)
        left = self.last_insert + s.poll_s - time.monotonic()
        if left > 0 and len(msgs) < s.batch_max:
            msgs += consumer.consume(s.batch_max - len(msgs), left)
        return msgs

    def _decode(self, msg: Any) -> dict[str, Any] | None:
        try:
            event = ce_kafka.from_record(
                msg.key(), msg.value(), msg.headers(), topic=msg.topic(),
                partition=msg.partition(), offset=msg.offset(),
                timestamp_ms=msg.timestamp()[1], validate=False)
            if self.recent.window_ms > 0 and event["type"] != ce_event.NON_CLOUDEVENT_TYPE:
                ts = msg.timestamp()[1]
                if self.recent.seen(msg.partition(), key_of(event, self.settings.dedupe_key),
                                    ts if ts > 0 else int(time.time() * 1000)):
                    self.table.metrics.duplicates.inc()
                    return None
            return decode_row(event.get("datacontenttype"), event.data, self.serde, msg.topic())
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the table
            self.table.metrics.undecodable.inc()
            log.debug("skipping %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            return None

    def _check_topic_id(self, consumer: Any) -> None:
        """A recreated topic (memory broker restart): read every partition of the new log
        from its start. A fetch past the new log's end would wait, not fail, on Tansu."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition
        from confluent_kafka.admin import AdminClient

        from eventing.kafka import admin_config, topic_id

        if self._admin is None:
            self._admin = AdminClient(admin_config(self.settings.bootstrap))
        current = topic_id(self._admin, self.settings.topic, timeout_s=5.0)
        if current is None:
            return
        known, self.topic_id = self.topic_id, current
        if known is None or known == current or not self.assigned:
            return
        self.table.metrics.topic_resets.inc()
        log.warning("topic %s was recreated (id %s, was %s): reading the new log from its "
                    "start", self.settings.topic, current, known)
        consumer.incremental_unassign([TopicPartition(self.settings.topic, p)
                                       for p in sorted(self.assigned)])
        consumer.incremental_assign([TopicPartition(self.settings.topic, p, OFFSET_BEGINNING)
                                     for p in sorted(self.assigned)])
        self.last_offsets.clear()

    def _assign_new(self, consumer: Any) -> None:
        """Assign partitions not yet assigned, each from the retention's start."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        topic = self.settings.topic
        try:
            meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
        except KafkaException as exc:
            log.warning("cannot read metadata of %s: %s", topic, exc)
            return
        if meta is None or meta.error is not None:
            return
        self._check_topic_id(consumer)
        new = sorted(set(meta.partitions) - self.assigned)
        if not new:
            return
        since_ms = int((time.time() - self.settings.retention_s) * 1000)
        wanted = [TopicPartition(topic, p, since_ms) for p in new]
        try:
            starts = consumer.offsets_for_times(wanted, timeout=10)
        except KafkaException as exc:
            log.warning("offsets_for_times failed (%s); reading %s from the start", exc, topic)
            starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in new]
        fixed = []
        for tp in starts:
            if tp.error is not None or tp.offset < 0:
                # -1: nothing that new yet; read from the start, the filter drops old rows
                tp = TopicPartition(topic, tp.partition, OFFSET_BEGINNING)
            fixed.append(tp)
        consumer.incremental_assign(fixed)
        self.assigned.update(new)
        log.info("reading %s partitions %s from offsets %s", topic, new,
                 [tp.offset for tp in fixed])


# --------------------------------------------------------------------------- HTTP


def _json(body: Any, status: int = 200) -> Any:
    from starlette.responses import Response

    try:
        payload = orjson.dumps(body, default=str,
                               option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # e.g. a HUGEINT beyond 64 bits
        payload = json.dumps(body, default=str).encode()
    return Response(payload, status, media_type="application/json")


def _refusal(request: Any, token: bytes | None) -> Any:
    """The answer to a `POST /query` that may not run (content type, token), or None."""
    import hmac

    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        return _json({"error": "unsupported content type", "message": "send the query as "
                      "JSON with Content-Type: application/json"}, 415)
    if token is None:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), token):
        response = _json({"error": "unauthorized", "message": "this server needs "
                          "'Authorization: Bearer <token>' (env SLUICE_QUERY_TOKEN)"}, 401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="sluice"'
        return response
    return None


def _max_rows(value: Any, limit: int) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= limit:
        raise ValueError(f"max_rows must be an integer from 1 to {limit}")
    return value


def create_app(table: RealtimeTable, ingest: Ingest | Sequence[Ingest] | None = None,
               token: str | None = None) -> Any:
    """The server's ASGI app; starts and stops the `ingest` threads (one per table) with
    the app's lifespan. With `token`, `POST /query` needs it as a bearer token."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route

    metrics = table.metrics
    secret = token.encode() if token else None
    ingests = [] if ingest is None else [ingest] if isinstance(ingest, Ingest) else list(ingest)

    async def run_query(request: Request) -> Response:
        started = time.perf_counter()
        refusal = _refusal(request, secret)
        if refusal is not None:
            return refusal
        try:
            raw = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)  # the client left: nothing to answer or log
        try:
            body = orjson.loads(raw)
            sql = body["sql"]
            if not isinstance(sql, str):
                raise TypeError("sql must be a string")
            max_rows = _max_rows(body.get("max_rows"), table.settings.max_rows_limit)
        except (ValueError, KeyError, TypeError) as exc:
            return _json({"error": "bad request", "message": "send JSON {\"sql\": \"...\", "
                          f"\"engine\": \"trino\"|\"duckdb\"}}: {exc}"}, 400)
        outcome = "ok"
        try:
            result = await run_in_threadpool(
                table.query, sql, engine=body.get("engine", "trino"),
                explain=bool(body.get("explain")), max_rows=max_rows)
            return _json(result)
        except query.Refused as exc:
            outcome = "refused"
            return _json({"error": "refused", "construct": exc.construct, "reason": exc.reason,
                          "hint": exc.hint, "message": str(exc)}, 422)
        except query.TranslationError as exc:
            outcome = "refused"
            return _json({"error": "invalid query", "message": str(exc)}, 400)
        except query.QueryFailed as exc:
            outcome = "failed"
            return _json({"error": "query failed", "message": str(exc)}, 400)
        finally:
            metrics.query_latency.labels(outcome).observe(time.perf_counter() - started)

    async def healthz(_: Request) -> Response:
        states = {i.table.name: i.healthy() for i in ingests}
        ok = all(state[0] for state in states.values())
        detail = ("; ".join(f"{name}: {state[1]}" for name, state in states.items())
                  or "no ingest")
        # Next offset per partition of each topic read (no consumer group commits it): how
        # a broker rollover knows this table has read to the end (eventing.stack.rollover).
        positions: dict[str, dict[str, int]] = {}
        for i in ingests:  # two tables of one topic: the one behind counts
            read = positions.setdefault(i.settings.topic, {})
            for p, o in list(i.last_offsets.items()):
                read[str(p)] = min(read.get(str(p), o + 1), o + 1)
        body = {"status": "ok" if ok else "unhealthy", "ingest": detail, "rows": table.rows,
                "tables": {n: t.rows for n, t in table.tables.items()},
                "positions": positions,
                "table": table.name, "lake": table.lake_error or "attached"}
        return _json(body, 200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        for i in ingests:
            i.start()
        try:
            yield
        finally:
            for i in ingests:
                await run_in_threadpool(i.stop)

    return Starlette(routes=[
        Route("/query", run_query, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ], lifespan=lifespan)


def fetch_avro_schema(registry_url: str, topic: str, *, wait_s: float = 30.0,
                      sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """The latest value schema of `topic` (waits for it while the stack registers it)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    client = SchemaRegistryClient({"url": registry_url})
    subject = subject_for(topic)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return json.loads(client.get_latest_version(subject).schema.schema_str)
        except Exception as exc:  # noqa: BLE001 - registry down or subject missing
            if time.monotonic() > deadline:
                raise RuntimeError(f"no schema for {subject} at {registry_url}: "
                                   f"{exc}") from exc
            sleep(0.5)


def build(settings: RealtimeSettings | Sequence[RealtimeSettings],
          ) -> tuple[RealtimeTable, list[Ingest]]:
    """The database with one table per settings (lake attached when the first one
    configures it) and their not-yet-started consumers."""
    from eventing.serde import AvroSerde

    every = [settings] if isinstance(settings, RealtimeSettings) else list(settings)
    if not every:
        raise ValueError("no real-time table to serve")
    first = every[0]
    serde = AvroSerde(first.registry_url)
    if not first.topic:  # lake tables only: the server still answers queries over them
        return RealtimeTable(first, None), []
    db = RealtimeTable(first, fetch_avro_schema(first.registry_url, first.topic))
    assert db.primary is not None
    targets = [db.primary] + [db.add_table(s, fetch_avro_schema(s.registry_url, s.topic))
                              for s in every[1:]]
    return db, [Ingest(t, serde) for t in targets]


def serve(settings: RealtimeSettings | Sequence[RealtimeSettings]) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    from eventing import serving

    first = settings if isinstance(settings, RealtimeSettings) else settings[0]
    logging.basicConfig(level=first.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    table, ingests = build(settings)
    serving.serve(create_app(table, ingests, first.token), host=first.host,
                  port=first.port, limits=first.limits, log_level=first.log_level)
