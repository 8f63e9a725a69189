"""Where spans land locally, and how `sluice trace` shows them.

rotel (the local collector) writes every batch of spans it receives to the Kafka topic
`sluice.traces` as a JSON array of OTLP ResourceSpans. `TraceIngestor` consumes that topic
into `TraceStore`, an SQLite file in the state folder:

- `spans`: one row per span, keyed by (trace id, span id), attributes and events as JSON;
- `refs`: (reference, trace id) for the CloudEvent id and every business id the topology
  declares (`traceIds`, e.g. `order.id`), so "what happened to order X?" is an index lookup;
- `offsets`: the next offset of each partition of the topic, written in the same
  transaction as the spans, so a restart resumes exactly where the store stopped (and a
  replay rewrites the same rows: inserts are idempotent).

Why SQLite in WAL mode: one writer (the `tracestore` part) and any number of readers
(`sluice trace` in other processes) at once, with no server to run; the stdlib has it.
Why direct partition assignment instead of a consumer group: offsets live with the data,
and a Tansu group join would delay the first spans by seconds.

On a cluster the collector sends spans to Tempo instead (see `eventing.deploy`).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("sluice.traces")

REF_ATTRIBUTES = ("cloudevents.event_id",)


def ref_attributes(business_ids: Iterable[str] = ()) -> tuple[str, ...]:
    """What the store indexes: the CloudEvent id plus the topology's business-id span
    attributes (`traceIds` values)."""
    return REF_ATTRIBUTES + tuple(a for a in business_ids if a not in REF_ATTRIBUTES)
KIND_NAMES = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer",
              5: "consumer"}
STATUS_NAMES = {0: "unset", 1: "ok", 2: "error"}
_TRACE_ID = re.compile(r"[0-9a-f]{32}\Z")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_id TEXT, service TEXT,
    name TEXT, kind INTEGER, start_ns INTEGER, end_ns INTEGER, status_code INTEGER,
    status_message TEXT, attributes TEXT, events TEXT,
    PRIMARY KEY (trace_id, span_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs (
    ref TEXT NOT NULL, trace_id TEXT NOT NULL, PRIMARY KEY (ref, trace_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


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
    """Spans from OTLP/JSON ResourceSpans (rotel's Kafka records, or an OTLP request)."""
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


# --------------------------------------------------------------------------- the store


class TraceStore:
    """The SQLite span index. One writer process, many readers (WAL)."""

    def __init__(self, path: Path, *, ref_attributes: Sequence[str] = REF_ATTRIBUTES,
                 readonly: bool = False) -> None:
        self.path = Path(path)
        self.ref_attributes = tuple(ref_attributes)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=10)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            self.db.commit()

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- writing

    def add(self, spans: Iterable[StoredSpan],
            offsets: Mapping[tuple[str, int], int] | None = None) -> int:
        """Insert (or replace) spans and their references, plus consumed offsets, in one
        transaction. Returns the number of spans."""
        rows = []
        refs = set()
        for s in spans:
            rows.append((s.trace_id, s.span_id, s.parent_id, s.service, s.name,
                         _kind_number(s.kind), s.start_ns, s.end_ns, _status_number(s.status),
                         s.status_message, json.dumps(s.attributes), json.dumps(s.events)))
            for name in self.ref_attributes:
                v = s.attributes.get(name)
                if v is not None:
                    refs.add((str(v), s.trace_id))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                                rows)
            self.db.executemany("INSERT OR IGNORE INTO refs VALUES (?,?)", sorted(refs))
            if offsets:
                self.db.executemany(
                    "INSERT OR REPLACE INTO offsets VALUES (?,?,?)",
                    [(t, p, o) for (t, p), o in offsets.items()])
        return len(rows)

    def offsets(self, topic: str) -> dict[int, int]:
        cur = self.db.execute("SELECT partition, next_offset FROM offsets WHERE topic=?",
                              (topic,))
        return dict(cur.fetchall())

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------------- reading

    def trace_ids(self, ref: str) -> list[str]:
        """Trace ids for a trace id, CloudEvent id or business id (oldest trace first)."""
        ids: list[str] = []
        if _TRACE_ID.match(ref.lower()):
            if self.db.execute("SELECT 1 FROM spans WHERE trace_id=? LIMIT 1",
                               (ref.lower(),)).fetchone():
                ids.append(ref.lower())
        rows = self.db.execute(
            "SELECT r.trace_id, MIN(s.start_ns) FROM refs r JOIN spans s "
            "ON s.trace_id = r.trace_id WHERE r.ref=? GROUP BY r.trace_id ORDER BY 2",
            (ref,)).fetchall()
        ids += [t for t, _ in rows if t not in ids]
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

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM spans").fetchone()[0]


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


# --------------------------------------------------------------------------- ingest


class TraceIngestor:
    """Consumes the traces topic into a `TraceStore` until stopped."""

    def __init__(self, store: TraceStore, bootstrap: str, topic: str) -> None:
        self.store = store
        self.bootstrap = bootstrap
        self.topic = topic
        self.records = 0
        self.spans = 0
        self.bad_records = 0

    def run(self, stop: threading.Event, *, batch: int = 500) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from eventing.kafka import consumer_config

        consumer = Consumer(consumer_config(self.bootstrap, "sluice-tracestore"))
        try:
            meta = None
            while meta is None and not stop.is_set():
                try:
                    md = consumer.list_topics(self.topic, timeout=5)
                    meta = md.topics.get(self.topic)
                    if meta is None or meta.error is not None or not meta.partitions:
                        meta = None
                        stop.wait(1.0)
                except Exception as exc:  # noqa: BLE001 - the broker may still be starting
                    log.warning("waiting for topic %s: %s", self.topic, exc)
                    stop.wait(1.0)
            if meta is None:
                return
            known = self.store.offsets(self.topic)
            consumer.assign([TopicPartition(self.topic, p, known.get(p, OFFSET_BEGINNING))
                             for p in sorted(meta.partitions)])
            self.store.set_meta("ready", str(time.time()))
            log.info("indexing %s (%d partitions) into %s", self.topic, len(meta.partitions),
                     self.store.path)
            while not stop.is_set():
                msgs = consumer.consume(batch, 0.2)
                if msgs:
                    self._index(msgs)
        finally:
            consumer.close()

    def _index(self, msgs: list[Any]) -> None:
        spans: list[StoredSpan] = []
        offsets: dict[tuple[str, int], int] = {}
        for msg in msgs:
            if msg.error() is not None:
                log.warning("consumer error: %s", msg.error())
                continue
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            self.records += 1
            try:
                value = json.loads(msg.value() or b"[]")
                if isinstance(value, dict):  # an ExportTraceServiceRequest
                    value = value.get("resourceSpans", [])
                spans += parse_resource_spans(value)
            except (ValueError, KeyError, TypeError) as exc:
                self.bad_records += 1
                log.warning("skipping a record that is not OTLP JSON (%s[%d]@%d): %s",
                            msg.topic(), msg.partition(), msg.offset(), exc)
        self.spans += self.store.add(spans, offsets)


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
        if a.get("messaging.kafka.destination.partition") is not None:
            where += f"[{a['messaging.kafka.destination.partition']}]"
        if a.get("messaging.kafka.message.offset") is not None:
            where += f"@{a['messaging.kafka.message.offset']}"
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


def render(traces: Mapping[str, list[StoredSpan]], business_ids: Sequence[str] = ()) -> str:
    """The human waterfall: one line per span, indented under its parent."""
    lines: list[str] = []
    for trace_id, spans in traces.items():
        if not spans:
            continue
        t0 = min(s.start_ns for s in spans)
        total = (max(s.end_ns for s in spans) - t0) / 1e6
        services = sorted({s.service for s in spans})
        lines.append(f"trace {trace_id}  {len(spans)} spans  {total:.1f} ms  "
                     f"services: {', '.join(services)}")
        lines.append(f"  {'START ms':>9} {'DUR ms':>8}  {'STATUS':<6} {'SERVICE':<16} "
                     "OPERATION")
        ids = {s.span_id for s in spans}
        for depth, s in _tree(spans):
            op = "  " * depth + s.name
            missing = (f"  (parent {s.parent_id} not stored)"
                       if s.parent_id and s.parent_id not in ids else "")
            lines.append(f"  {(s.start_ns - t0) / 1e6:>9.2f} {s.duration_ms:>8.2f}  "
                         f"{s.status if s.status != 'unset' else 'ok':<6} {s.service:<16} "
                         f"{op:<40} {key_attributes(s, business_ids)}{missing}".rstrip())
            for err in s.errors():
                lines.append(f"  {'':>9} {'':>8}  {'':<6} {'':<16} {'  ' * depth}  "
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
