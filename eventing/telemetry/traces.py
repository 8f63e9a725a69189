"""Where spans land locally, how long they stay, and how `sluice trace` finds them.

The `tracestore` part is an OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf or JSON,
gzip or not): rotel, the local collector, exports every batch of spans to it. Spans never
pass through the broker: Tansu trims no topic (it has no retention, and DeleteRecords is
not implemented), so a traces topic would grow the broker's memory for as long as the stack
runs. The receiver writes into `TraceStore`, an SQLite file in the state folder:

- `spans`: one row per span, keyed by (trace id, span id), attributes and events as JSON,
  plus the function the span ran in (for `sluice trace --function`);
- `traces`: one row per trace (first start, last end, root operation, error flag), the
  index that search (`--since`, `--errors`, `--min-duration`) and retention scan;
- `refs`: (reference, trace id) for the CloudEvent id and every business id the topology
  declares (`traceIds`, e.g. `order.id`), so "what happened to order X?" is an index lookup.

Everything that grows has a bound (`RetentionPolicy`): traces older than `max_age_s` are
deleted, and when the live pages (plus the write-ahead log) pass `max_bytes` the oldest
traces go until they are back under it. SQLite reuses freed pages, so the file stops
growing at the bound instead of shrinking and growing again.

Why SQLite in WAL mode: one writer (the `tracestore` part) and any number of readers
(`sluice trace` in other processes) at once, with no server to run; the stdlib has it.

On a cluster the collector sends spans to Tempo instead (see `eventing.deploy`).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("sluice.traces")

REF_ATTRIBUTES = ("cloudevents.event_id",)
# Which function a span ran in: Sluice's own attribute, or OpenTelemetry's FaaS one.
FUNCTION_ATTRIBUTES = ("sluice.function", "faas.name")


def ref_attributes(business_ids: Iterable[str] = ()) -> tuple[str, ...]:
    """What the store indexes: the CloudEvent id plus the topology's business-id span
    attributes (`traceIds` values)."""
    return REF_ATTRIBUTES + tuple(a for a in business_ids if a not in REF_ATTRIBUTES)
KIND_NAMES = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer",
              5: "consumer"}
STATUS_NAMES = {0: "unset", 1: "ok", 2: "error"}
_TRACE_ID = re.compile(r"[0-9a-f]{32}\Z")
SCHEMA_VERSION = 2  # PRAGMA user_version; a store of another version is emptied at start

# Rows live in insertion order (rowid tables), not by random trace id: retention deletes
# the oldest traces, and in insertion order those fill whole pages that SQLite then reuses;
# keyed by trace id they would be spread thinly over every page, freeing none.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    id INTEGER PRIMARY KEY,
    trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_id TEXT, service TEXT,
    name TEXT, kind INTEGER, start_ns INTEGER, end_ns INTEGER, status_code INTEGER,
    status_message TEXT, attributes TEXT, events TEXT, function TEXT,
    UNIQUE (trace_id, span_id));
CREATE INDEX IF NOT EXISTS spans_by_function ON spans (function, trace_id)
    WHERE function IS NOT NULL;
CREATE TABLE IF NOT EXISTS traces (
    id INTEGER PRIMARY KEY, trace_id TEXT NOT NULL UNIQUE, start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL, root TEXT, error INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS traces_by_start ON traces (start_ns);
CREATE TABLE IF NOT EXISTS refs (
    id INTEGER PRIMARY KEY, ref TEXT NOT NULL, trace_id TEXT NOT NULL,
    UNIQUE (ref, trace_id));
CREATE INDEX IF NOT EXISTS refs_by_trace ON refs (trace_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
_OLD_TABLES = ("spans", "traces", "refs", "meta", "offsets")


def db_path(state_dir: Path) -> Path:
    """The store's file in a state folder."""
    return state_dir / "data" / "tracestore" / "traces.db"


# --------------------------------------------------------------------------- spans


@dataclass
class StoredSpan:
    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status: str
    status_message: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def function(self) -> str | None:
        for name in FUNCTION_ATTRIBUTES:
            v = self.attributes.get(name)
            if v is not None:
                return str(v)
        return None

    def errors(self) -> list[str]:
        """The error texts of this span: its status message and exception events."""
        out = [self.status_message] if self.status == "error" and self.status_message else []
        for ev in self.events:
            msg = ev.get("attributes", {}).get("exception.message")
            if ev.get("name") == "exception" and msg and msg not in out:
                out.append(msg)
        return out


def _any_value(v: Mapping[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "arrayValue" in v:
        return [_any_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return _attributes(v["kvlistValue"].get("values", []))
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def _attributes(kvs: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {kv["key"]: _any_value(kv.get("value") or {}) for kv in kvs or ()}


def parse_resource_spans(resource_spans: Iterable[Mapping[str, Any]]) -> list[StoredSpan]:
    """Spans from OTLP/JSON ResourceSpans (the `resourceSpans` of an OTLP/HTTP JSON request;
    ids are hex, as the OTLP/JSON mapping says)."""
    out: list[StoredSpan] = []
    for rs in resource_spans:
        resource = _attributes((rs.get("resource") or {}).get("attributes"))
        service = str(resource.get("service.name", "unknown"))
        for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or ():
            for sp in ss.get("spans") or ():
                status = sp.get("status") or {}
                out.append(StoredSpan(
                    trace_id=str(sp["traceId"]).lower(),
                    span_id=str(sp["spanId"]).lower(),
                    parent_id=(str(sp.get("parentSpanId") or "").lower() or None),
                    service=service,
                    name=sp.get("name", ""),
                    kind=KIND_NAMES.get(int(sp.get("kind") or 0), "unspecified"),
                    start_ns=int(sp.get("startTimeUnixNano") or 0),
                    end_ns=int(sp.get("endTimeUnixNano") or 0),
                    status=STATUS_NAMES.get(int(status.get("code") or 0), "unset"),
                    status_message=status.get("message") or "",
                    attributes=_attributes(sp.get("attributes")),
                    events=[{"name": e.get("name", ""),
                             "time_ns": int(e.get("timeUnixNano") or 0),
                             "attributes": _attributes(e.get("attributes"))}
                            for e in sp.get("events") or ()],
                ))
    return out


def _pb_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_pb_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _pb_attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()  # as the OTLP/JSON mapping has it
    return getattr(v, kind)


def _pb_attributes(kvs: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in kvs}


def parse_otlp_protobuf(body: bytes) -> list[StoredSpan]:
    """Spans from an OTLP `ExportTraceServiceRequest` in protobuf (what rotel and the
    OpenTelemetry SDK's OTLP/HTTP exporter send). Raises ValueError when it is not one."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise ValueError(f"not an OTLP ExportTraceServiceRequest: {exc}") from None
    out: list[StoredSpan] = []
    for rs in request.resource_spans:
        resource = _pb_attributes(rs.resource.attributes)
        service = str(resource.get("service.name", "unknown"))
        for ss in rs.scope_spans:
            for sp in ss.spans:
                if len(sp.trace_id) != 16 or len(sp.span_id) != 8:
                    raise ValueError(f"span {sp.name!r}: trace id must be 16 bytes and span id "
                                     f"8, got {len(sp.trace_id)} and {len(sp.span_id)}")
                out.append(StoredSpan(
                    trace_id=sp.trace_id.hex(),
                    span_id=sp.span_id.hex(),
                    parent_id=sp.parent_span_id.hex() or None,
                    service=service,
                    name=sp.name,
                    kind=KIND_NAMES.get(sp.kind, "unspecified"),
                    start_ns=sp.start_time_unix_nano,
                    end_ns=sp.end_time_unix_nano,
                    status=STATUS_NAMES.get(sp.status.code, "unset"),
                    status_message=sp.status.message,
                    attributes=_pb_attributes(sp.attributes),
                    events=[{"name": e.name, "time_ns": e.time_unix_nano,
                             "attributes": _pb_attributes(e.attributes)} for e in sp.events],
                ))
    return out


def parse_otlp_json(body: bytes) -> list[StoredSpan]:
    """Spans from an OTLP/HTTP JSON request body. Raises ValueError when it is not one."""
    try:
        value = json.loads(body or b"{}")
        if not isinstance(value, dict):
            raise ValueError("the body must be a JSON object with `resourceSpans`")
        return parse_resource_spans(value.get("resourceSpans") or [])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an OTLP/JSON trace request: {exc!r}") from None


# --------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class RetentionPolicy:
    """How much the trace store keeps. The defaults keep `make up` bounded for days: an
    hour of the example's traffic at full sampling is ~700 MiB (12 MiB/min measured)."""

    max_age_s: float = 3600.0
    max_bytes: int = 1 << 30
    every_s: float = 5.0  # how often the store checks (between checks it may grow by
    #                        what arrives in `every_s`: ~1 MiB at the example's rate)

    @property
    def max_wal_bytes(self) -> int:
        """The write-ahead log's share of the bound (it counts toward the size)."""
        return min(4 << 20, self.max_bytes // 16)

    def __post_init__(self) -> None:
        if self.max_age_s <= 0:
            raise ValueError(f"trace retention must be positive, got {self.max_age_s} s")
        if self.max_bytes < MIN_STORE_BYTES:
            raise ValueError(f"trace store size must be at least {MIN_STORE_BYTES >> 20} MiB, "
                             f"got {self.max_bytes} bytes")
        if self.every_s <= 0:
            raise ValueError(f"retention check interval must be positive, got {self.every_s}")


MIN_STORE_BYTES = 4 << 20
ROW_OVERHEAD = 300  # bytes a span row costs beyond its JSON: ids, times, index entries
HIGH_WATER = 0.9  # prune once the store is above this share of max_bytes ...
LOW_WATER = 0.75  # ... down to this share, so a prune is not needed again seconds later


@dataclass
class PruneResult:
    by_age: int = 0
    by_size: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def traces(self) -> int:
        return self.by_age + self.by_size


@dataclass(frozen=True)
class TraceSummary:
    """One line of `sluice trace --since/--errors/...`: a trace without its spans."""

    trace_id: str
    start_ns: int
    end_ns: int
    root: str | None
    error: bool
    spans: int
    services: list[str]
    functions: list[str]

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


# --------------------------------------------------------------------------- the store


class TraceStore:
    """The SQLite span index. One writer process, many readers (WAL)."""

    def __init__(self, path: Path, *, ref_attributes: Sequence[str] = REF_ATTRIBUTES,
                 readonly: bool = False, policy: RetentionPolicy | None = None) -> None:
        """`policy`: the size bound `add` makes room for before each write (retention by
        age, and compaction, run from `prune`, which the owner calls on a timer)."""
        self.path = Path(path)
        self.ref_attributes = tuple(ref_attributes)
        self.policy = policy
        self.deleted = 0  # traces retention deleted since open (by age or size)
        max_wal_bytes = policy.max_wal_bytes if policy else 4 << 20
        # The receiver's threads share one connection: every use of it holds this lock
        # (re-entrant: a write that makes room runs a retention pass inside it).
        self._lock = threading.RLock()
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # The write-ahead log counts toward the size bound: checkpoint it often and cut
        # it back after each checkpoint.
        page = self.db.execute("PRAGMA page_size").fetchone()[0]
        self.db.execute(f"PRAGMA wal_autocheckpoint={max(16, max_wal_bytes // page)}")
        self.db.execute(f"PRAGMA journal_size_limit={max_wal_bytes}")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self.db.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if has_tables and version != SCHEMA_VERSION:
            # An older layout (spans read from a broker topic): the store is a cache of
            # recent traces, so start it afresh rather than migrate.
            log.warning("trace store %s has schema %d, not %d: starting it empty",
                        self.path, version, SCHEMA_VERSION)
            for table in _OLD_TABLES:
                self.db.execute(f"DROP TABLE IF EXISTS {table}")
            self.db.commit()
            self.db.execute("VACUUM")
        self.db.executescript(_SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- writing

    def add(self, spans: Iterable[StoredSpan]) -> int:
        """Insert (or replace) spans, their traces and references in one transaction,
        first deleting the oldest traces if the write would carry the store past its
        bound. Returns the number of spans."""
        rows = []
        refs = set()
        traces: dict[str, list[Any]] = {}  # trace id -> [start, end, root, error]
        for s in spans:
            rows.append((s.trace_id, s.span_id, s.parent_id, s.service, s.name,
                         _kind_number(s.kind), s.start_ns, s.end_ns, _status_number(s.status),
                         s.status_message, json.dumps(s.attributes), json.dumps(s.events),
                         s.function))
            for name in self.ref_attributes:
                v = s.attributes.get(name)
                if v is not None:
                    refs.add((str(v), s.trace_id))
            t = traces.setdefault(s.trace_id, [s.start_ns, s.end_ns, None, 0])
            t[0], t[1] = min(t[0], s.start_ns), max(t[1], s.end_ns)
            if s.parent_id is None:
                t[2] = s.name
            if s.status == "error":
                t[3] = 1
        with self._lock:
            if self.policy is not None and rows:
                # Room for the rows twice: once in the write-ahead log, once in the pages.
                incoming = 2 * sum(ROW_OVERHEAD + len(r[10]) + len(r[11]) + len(r[4] or "")
                                   for r in rows)
                if self.size_bytes() + incoming > self.policy.max_bytes * HIGH_WATER:
                    self.prune(self.policy, reserve=incoming)
            self._insert(rows, traces, refs)
        return len(rows)

    def _insert(self, rows: list[tuple], traces: dict[str, list[Any]],
                refs: set[tuple[str, str]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO spans (trace_id, span_id, parent_id, service, name, "
                "kind, start_ns, end_ns, status_code, status_message, attributes, events, "
                "function) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            self.db.executemany(
                "INSERT INTO traces (trace_id, start_ns, end_ns, root, error) VALUES "
                "(?,?,?,?,?) ON CONFLICT (trace_id) DO UPDATE SET "
                "start_ns=min(start_ns, excluded.start_ns), end_ns=max(end_ns, excluded.end_ns),"
                " root=coalesce(excluded.root, root), error=max(error, excluded.error)",
                [(tid, *t) for tid, t in traces.items()])
            self.db.executemany("INSERT OR IGNORE INTO refs (ref, trace_id) VALUES (?,?)",
                                sorted(refs))

    def set_meta(self, key: str, value: str) -> None:
        with self._lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)",
                            (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------------- retention

    def size_bytes(self) -> int:
        """What the bound counts: pages in use (not free pages, which SQLite reuses) plus
        the write-ahead log."""
        with self._lock:
            page_count, free, page = (self.db.execute(f"PRAGMA {p}").fetchone()[0]
                                      for p in ("page_count", "freelist_count", "page_size"))
        wal = self.path.with_name(self.path.name + "-wal")
        return (page_count - free) * page + (wal.stat().st_size if wal.exists() else 0)

    def disk_bytes(self) -> int:
        """The store's files on disk (database, write-ahead log, shared memory)."""
        return sum(p.stat().st_size for p in (
            self.path, self.path.with_name(self.path.name + "-wal"),
            self.path.with_name(self.path.name + "-shm")) if p.exists())

    def prune(self, policy: RetentionPolicy, *, now_ns: int | None = None,
              reserve: int = 0) -> PruneResult:
        """Delete traces that started before `max_age_s` ago, then the oldest traces while
        the store (plus `reserve` bytes about to be written) is above its size, down to
        `LOW_WATER` of it. Whole traces go, with their spans and references, in small
        transactions so readers and the receiver are never held up for long."""
        with self._lock:
            return self._prune(policy, time.time_ns() if now_ns is None else now_ns, reserve)

    def _prune(self, policy: RetentionPolicy, now_ns: int, reserve: int) -> PruneResult:
        result = PruneResult(bytes_before=self.size_bytes())
        cutoff = now_ns - int(policy.max_age_s * 1e9)
        while (n := self._delete_oldest(1000, before_ns=cutoff)):
            result.by_age += n
        self._checkpoint()
        for _ in range(20):  # each round deletes the share of traces that should free enough
            used = self.size_bytes() + reserve
            if used <= policy.max_bytes * HIGH_WATER and not result.by_size:
                break
            if used <= policy.max_bytes * LOW_WATER:
                break
            count = self.trace_count()
            if count == 0:
                break
            share = (used - policy.max_bytes * LOW_WATER) / used
            result.by_size += self._delete_oldest(max(1, int(count * share) + 1))
            self._checkpoint()
        result.bytes_after = self.size_bytes()
        self.deleted += result.traces
        if result.traces:
            log.info("retention: deleted %d traces by age, %d by size (%d bytes were due); "
                     "store %d -> %d bytes", result.by_age, result.by_size, reserve,
                     result.bytes_before, result.bytes_after)
        return result

    def compact_if_oversized(self, policy: RetentionPolicy) -> bool:
        """Give disk back once (VACUUM) when the file is larger than the bound, e.g. after
        the bound was lowered: pruning frees pages but never shrinks the file."""
        if self.path.stat().st_size <= policy.max_bytes:
            return False
        self.prune(policy)
        with self._lock:
            self.db.execute("VACUUM")
        self._checkpoint()
        return True

    def _delete_oldest(self, limit: int, *, before_ns: int | None = None) -> int:
        # By size: the first written go first (their pages come free together).
        where, order = ("", "id") if before_ns is None else ("WHERE start_ns < ?", "start_ns")
        params: tuple[int, ...] = (limit,) if before_ns is None else (before_ns, limit)
        with self._lock, self.db:
            ids = [r[0] for r in self.db.execute(
                f"SELECT trace_id FROM traces {where} ORDER BY {order} LIMIT ?", params)]
            if not ids:
                return 0
            doomed = [(t,) for t in ids]
            self.db.executemany("DELETE FROM spans WHERE trace_id=?", doomed)
            self.db.executemany("DELETE FROM refs WHERE trace_id=?", doomed)
            self.db.executemany("DELETE FROM traces WHERE trace_id=?", doomed)
        return len(ids)

    def _checkpoint(self) -> None:
        with self._lock:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ---------------------------------------------------------------- reading

    def trace_ids(self, ref: str) -> list[str]:
        """Trace ids for a trace id, CloudEvent id or business id (oldest trace first)."""
        ids: list[str] = []
        if _TRACE_ID.match(ref.lower()):
            if self.db.execute("SELECT 1 FROM traces WHERE trace_id=?",
                               (ref.lower(),)).fetchone():
                ids.append(ref.lower())
        rows = self.db.execute(
            "SELECT r.trace_id FROM refs r JOIN traces t ON t.trace_id = r.trace_id "
            "WHERE r.ref=? ORDER BY t.start_ns", (ref,)).fetchall()
        ids += [t for (t,) in rows if t not in ids]
        return ids

    def spans(self, trace_id: str) -> list[StoredSpan]:
        rows = self.db.execute(
            "SELECT trace_id, span_id, parent_id, service, name, kind, start_ns, end_ns, "
            "status_code, status_message, attributes, events FROM spans WHERE trace_id=? "
            "ORDER BY start_ns", (trace_id,)).fetchall()
        return [StoredSpan(r[0], r[1], r[2], r[3], r[4], KIND_NAMES.get(r[5], "unspecified"),
                           r[6], r[7], STATUS_NAMES.get(r[8], "unset"), r[9] or "",
                           json.loads(r[10] or "{}"), json.loads(r[11] or "[]")) for r in rows]

    def lookup(self, ref: str) -> dict[str, list[StoredSpan]]:
        """{trace id: its spans} for every trace `ref` names."""
        return {t: self.spans(t) for t in self.trace_ids(ref)}

    def search(self, *, since_ns: int | None = None, errors: bool = False,
               function: str | None = None, min_duration_ms: float | None = None,
               trace_ids: Sequence[str] | None = None, limit: int = 20) -> list[TraceSummary]:
        """The newest traces matching every filter given (newest first, at most `limit`)."""
        if trace_ids is not None and not trace_ids:
            return []
        where, params = [], []
        if since_ns is not None:
            where.append("t.start_ns >= ?")
            params.append(since_ns)
        if errors:
            where.append("t.error = 1")
        if function is not None:
            where.append("t.trace_id IN (SELECT trace_id FROM spans WHERE function = ?)")
            params.append(function)
        if min_duration_ms is not None:
            where.append("t.end_ns - t.start_ns >= ?")
            params.append(int(min_duration_ms * 1e6))
        if trace_ids is not None:
            where.append(f"t.trace_id IN ({','.join('?' * len(trace_ids))})")
            params += list(trace_ids)
        sql = ("SELECT t.trace_id, t.start_ns, t.end_ns, t.root, t.error FROM traces t"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY t.start_ns DESC LIMIT ?")
        out = []
        for tid, start, end, root, error in self.db.execute(sql, (*params, limit)).fetchall():
            rows = self.db.execute("SELECT service, function FROM spans WHERE trace_id=?",
                                   (tid,)).fetchall()
            out.append(TraceSummary(tid, start, end, root, bool(error), len(rows),
                                    sorted({s for s, _ in rows if s}),
                                    sorted({f for _, f in rows if f})))
        return out

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM spans").fetchone()[0]

    def trace_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM traces").fetchone()[0]


def _kind_number(kind: str) -> int:
    return {v: k for k, v in KIND_NAMES.items()}.get(kind, 0)


def _status_number(status: str) -> int:
    return {v: k for k, v in STATUS_NAMES.items()}.get(status, 0)


def wait_for(path: Path, ref: str, timeout_s: float, *, settle_s: float = 1.5,
             min_spans: int = 1) -> dict[str, list[StoredSpan]]:
    """Look `ref` up, waiting up to `timeout_s` for it to appear and for its traces to stop
    growing (no new span for `settle_s`): spans arrive hop by hop, ~10 ms apart locally."""
    deadline = time.monotonic() + timeout_s
    last_count = -1
    stable_since = time.monotonic()
    found: dict[str, list[StoredSpan]] = {}
    while True:
        if path.exists():
            store = TraceStore(path, readonly=True)
            try:
                found = store.lookup(ref)
            except sqlite3.OperationalError:  # the writer has not created the tables yet
                found = {}
            finally:
                store.close()
        count = sum(len(s) for s in found.values())
        now = time.monotonic()
        if count != last_count:
            last_count, stable_since = count, now
        if count >= min_spans and now - stable_since >= settle_s:
            return found
        if now >= deadline:
            return found
        time.sleep(0.2)


# --------------------------------------------------------------------------- the receiver

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


@dataclass(frozen=True)
class ReceiverSettings:
    """The trace store's OTLP/HTTP endpoint and its limits."""

    host: str = "127.0.0.1"
    port: int = 4319
    max_body_bytes: int = 16 << 20  # after decompression; rotel's batches are ~100 KiB
    max_concurrent: int = 8  # requests parsed at once; more get 503 + Retry-After
    read_timeout_s: float = 30.0


class TraceReceiver:
    """OTLP/HTTP `POST /v1/traces` into a `TraceStore`, with retention in the background.

    The OTLP/HTTP rules it follows: protobuf or JSON by content type, gzip by content
    encoding, 200 with an (empty) `ExportTraceServiceResponse` in the request's encoding,
    400 for a body that is not a trace request (not retried by exporters), 503 with
    `Retry-After` when busy (retried). `GET /healthz` answers 200 once the store is open.
    """

    def __init__(self, store: TraceStore, policy: RetentionPolicy,
                 settings: ReceiverSettings) -> None:
        self.store = store
        self.policy = policy
        self.settings = settings
        self.requests = 0
        self.spans = 0
        self.rejected = 0
        self._slots = threading.BoundedSemaphore(settings.max_concurrent)
        self._server = ThreadingHTTPServer((settings.host, settings.port), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = receiver.settings.read_timeout_s
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:  # one line per batch is noise
                log.debug(fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
                if self.path == "/healthz":
                    self._answer(HTTPStatus.OK, b"ok\n", "text/plain")
                else:
                    self._answer(HTTPStatus.NOT_FOUND, b"not found: GET /healthz or "
                                 b"POST /v1/traces\n", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                status, body, ctype = receiver.handle(self.path, self.headers, self.rfile)
                self._answer(status, body, ctype)

            def _answer(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if status == HTTPStatus.SERVICE_UNAVAILABLE:
                    self.send_header("Retry-After", "1")
                if status >= HTTPStatus.BAD_REQUEST:  # the body may be unread: start afresh
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def handle(self, path: str, headers: Mapping[str, str], rfile: Any
               ) -> tuple[HTTPStatus, bytes, str]:
        """(status, body, content type) for one POST."""
        if path.split("?", 1)[0] != "/v1/traces":
            return HTTPStatus.NOT_FOUND, b"only POST /v1/traces (OTLP traces)\n", "text/plain"
        ctype = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype not in (PROTOBUF, JSON):
            return (HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"content type must be {PROTOBUF} or {JSON}, got {ctype or 'none'}\n"
                    .encode(), "text/plain")
        try:
            length = int(headers.get("Content-Length") or "")
        except ValueError:
            return HTTPStatus.LENGTH_REQUIRED, b"Content-Length required\n", "text/plain"
        limit = self.settings.max_body_bytes
        if length < 0 or length > limit:
            return (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body over {limit} bytes; export smaller batches\n".encode(), "text/plain")
        if not self._slots.acquire(blocking=False):
            return HTTPStatus.SERVICE_UNAVAILABLE, b"busy, retry\n", "text/plain"
        try:
            body = rfile.read(length)
            encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
            try:
                body = _decompress(body, encoding, limit)
                spans = (parse_otlp_protobuf(body) if ctype == PROTOBUF
                         else parse_otlp_json(body))
            except ValueError as exc:
                self.rejected += 1
                return HTTPStatus.BAD_REQUEST, f"{exc}\n".encode(), "text/plain"
            self.spans += self.store.add(spans)
            self.requests += 1
        finally:
            self._slots.release()
        # An empty ExportTraceServiceResponse: zero bytes in protobuf, {} in JSON.
        return HTTPStatus.OK, (b"" if ctype == PROTOBUF else b"{}"), ctype

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; prune every `policy.every_s`."""
        if self.store.compact_if_oversized(self.policy):
            log.info("trace store was over %d bytes: pruned and compacted",
                     self.policy.max_bytes)
        serving = threading.Thread(target=self._server.serve_forever, name="otlp-http",
                                   kwargs={"poll_interval": 0.2}, daemon=True)
        serving.start()
        self.store.set_meta("ready", str(time.time()))
        log.info("receiving OTLP traces on %s/v1/traces into %s (keep %.0f s, %d bytes)",
                 self.url, self.store.path, self.policy.max_age_s, self.policy.max_bytes)
        try:
            while not stop.wait(self.policy.every_s):
                self.prune()
        finally:
            self._server.shutdown()
            self._server.server_close()

    def prune(self) -> PruneResult:
        """One timed retention pass (writes also make room for themselves: `add`)."""
        return self.store.prune(self.policy)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded per its Content-Encoding, refusing more than `limit` bytes out."""
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ValueError(f"content encoding must be gzip, deflate or identity, got {encoding}")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise ValueError(f"body over {limit} bytes once decompressed; export smaller batches")
    return out


# --------------------------------------------------------------------------- rendering


def _tree(spans: list[StoredSpan]) -> list[tuple[int, StoredSpan]]:
    """(depth, span) in waterfall order: children under parents, by start time."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str | None, list[StoredSpan]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in by_id else None
        children.setdefault(parent, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: (s.start_ns, s.end_ns))
    out: list[tuple[int, StoredSpan]] = []
    seen: set[str] = set()

    def walk(parent: str | None, depth: int) -> None:
        for s in children.get(parent, ()):
            if s.span_id in seen:
                continue
            seen.add(s.span_id)
            out.append((depth, s))
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return out


def key_attributes(span: StoredSpan, business_ids: Sequence[str] = ()) -> str:
    """The attributes worth a glance: where the record was, which function, which ids
    (`business_ids`: the topology's declared span attributes, shown by name)."""
    a = span.attributes
    parts: list[str] = []
    topic = a.get("messaging.destination.name")
    if topic is not None:
        where = str(topic)
        # Current semantic conventions first, then the names spans used before.
        partition = a.get("messaging.destination.partition.id",
                          a.get("messaging.kafka.destination.partition"))
        offset = a.get("messaging.kafka.offset", a.get("messaging.kafka.message.offset"))
        if partition is not None:
            where += f"[{partition}]"
        if offset is not None:
            where += f"@{offset}"
        parts.append(where)
    for attr, label in (("sluice.function", "fn"), ("sluice.sink", "sink"),
                        ("messaging.kafka.message.key", "key"),
                        ("cloudevents.event_id", "event"),
                        *((b, b) for b in business_ids),
                        ("sluice.delivery.attempt", "attempt"),
                        ("http.response.status_code", "http")):
        if a.get(attr) is not None and not (label == "fn" and span.name == a.get(attr)):
            parts.append(f"{label}={a[attr]}")
    return " ".join(parts)


BAR_WIDTH = 24


def time_bar(start_ms: float, duration_ms: float, total_ms: float,
             width: int = BAR_WIDTH) -> str:
    """Where a span sits in its trace, as a bar of `width` cells (at least one marked)."""
    if total_ms <= 0:
        return "█" + " " * (width - 1)
    first = min(width - 1, int(start_ms / total_ms * width))
    cells = max(1, round(duration_ms / total_ms * width))
    cells = min(cells, width - first)
    return " " * first + "█" * cells + " " * (width - first - cells)


def render(traces: Mapping[str, list[StoredSpan]], business_ids: Sequence[str] = (), *,
           bars: bool = False) -> str:
    """The human waterfall: one line per span, indented under its parent; with `bars`
    (on a terminal) a time bar shows where each span sits in the trace."""
    lines: list[str] = []
    for trace_id, spans in traces.items():
        if not spans:
            continue
        t0 = min(s.start_ns for s in spans)
        total = (max(s.end_ns for s in spans) - t0) / 1e6
        services = sorted({s.service for s in spans})
        lines.append(f"trace {trace_id}  {len(spans)} spans  {total:.1f} ms  "
                     f"services: {', '.join(services)}")
        lines.append(f"  {'START ms':>9} {'DUR ms':>8}  "
                     + (f"{'TIME':<{BAR_WIDTH}}  " if bars else "")
                     + f"{'STATUS':<6} {'SERVICE':<16} OPERATION")
        ids = {s.span_id for s in spans}
        for depth, s in _tree(spans):
            op = "  " * depth + s.name
            missing = (f"  (parent {s.parent_id} not stored)"
                       if s.parent_id and s.parent_id not in ids else "")
            bar = (time_bar((s.start_ns - t0) / 1e6, s.duration_ms, total) + "  "
                   if bars else "")
            lines.append(f"  {(s.start_ns - t0) / 1e6:>9.2f} {s.duration_ms:>8.2f}  {bar}"
                         f"{s.status if s.status != 'unset' else 'ok':<6} {s.service:<16} "
                         f"{op:<40} {key_attributes(s, business_ids)}{missing}".rstrip())
            for err in s.errors():
                pad = " " * (BAR_WIDTH + 2) if bars else ""
                lines.append(f"  {'':>9} {'':>8}  {pad}{'':<6} {'':<16} {'  ' * depth}  "
                             f"! {err[:300]}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def as_json(traces: Mapping[str, list[StoredSpan]]) -> list[dict[str, Any]]:
    """Machine form: per trace, its spans in waterfall order with depth and offsets."""
    out = []
    for trace_id, spans in traces.items():
        if not spans:
            continue
        t0 = min(s.start_ns for s in spans)
        out.append({"trace_id": trace_id, "spans": [
            {**asdict(s), "depth": depth, "start_offset_ms": round((s.start_ns - t0) / 1e6, 3),
             "duration_ms": round(s.duration_ms, 3), "errors": s.errors()}
            for depth, s in _tree(spans)]})
    return out


def render_list(found: Sequence[TraceSummary]) -> str:
    """One line per trace (newest first): when, how long, how many spans, errors, what."""
    lines = [f"{'START (UTC)':<23} {'DUR ms':>9} {'SPANS':>5}  {'STATUS':<6} {'TRACE ID':<32}  "
             "ROOT / FUNCTIONS"]
    for t in found:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t.start_ns / 1e9))
        start += f".{t.start_ns // 1_000_000 % 1000:03d}"
        what = t.root or "(root not stored)"
        if t.functions:
            what += "  fn: " + ",".join(t.functions)
        lines.append(f"{start:<23} {t.duration_ms:>9.2f} {t.spans:>5}  "
                     f"{'error' if t.error else 'ok':<6} {t.trace_id}  {what}")
    return "\n".join(lines) + "\n"


def summaries_as_json(found: Sequence[TraceSummary]) -> list[dict[str, Any]]:
    return [{**asdict(t), "duration_ms": round(t.duration_ms, 3)} for t in found]
