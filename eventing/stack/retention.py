"""Broker retention on `--storage s3`: delete the batch objects every reader is done with.

Why this exists: Tansu 0.6 enforces no topic retention and its DeleteRecords panics the
broker (`todo!()` in tansu-storage/src/dynostore.rs), so nothing trims a topic and every
fetch LISTs all of a partition's batch objects. On s3 storage each produce batch is one
object `clusters/<cluster>/topics/<topic>/partitions/<p:010>/records/<base offset:020>.batch`,
and a fetch only GETs batches whose base offset is at or above the requested offset. So
deleting, from the front of a partition, the objects that no reader will fetch again is
real retention, done from outside the broker through S3 (the memory engine is unreachable
from outside its process; README "Broker retention").

Three policies, chosen per topic from the topology (the one place that knows the readers):

- `keep`: the registry's `_schemas` log. Never trimmed.
- `delete`: every other topic the pipeline touches. A batch goes when all its records lie
  below the committed offset of every consumer group that reads the topic (the functions'
  `consumerGroup`s, the lake sink's `sluice-lake-<table>`), AND it is older than the topic's
  `keep_s`: the real-time table re-reads its retention window from the topic when it
  restarts (it has no group), and the lake sink re-reads its dedupe window before its
  position; `min_age_s` keeps a floor for `tail`/`replay`/`deadletters`. A partition where
  one reader has not committed yet is not trimmed. A topic no group reads (the dead-letter
  topic) is trimmed by age only when `orphan_age_s` is set; by default it is kept.
  Groups the topology does not declare (replay groups, tools) do not hold retention:
  Tansu reports no group state or members (measured: `list_consumer_groups` says UNKNOWN,
  `describe` lists no members), so a finished replay group could not be told from a
  running one and would pin a topic for ever. `replay --since` therefore reaches back at
  most `min_age_s`.
- `compact`: state changelogs (`store(..., topic=...)` in function code) and the
  dead-letter redrive ledgers. Compaction at batch granularity: a batch goes when none of
  its records is the latest record of its key (read through a consumer), so a restore
  from the beginning yields the same state. Tombstones that are the latest of their key
  stay (Kafka drops them after `delete.retention.ms`; here they are few).

The last batch of a partition is never deleted: its last offset is only known from the
next batch's base offset.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from eventing import topology as topo
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

log = logging.getLogger("sluice.retention")

Kind = Literal["keep", "delete", "compact"]
CLUSTER = "tansu_cluster"  # Tansu's default cluster id (the objects' first path element)


@dataclass(frozen=True)
class Batch:
    """One produce batch object of a partition."""

    base: int          # base offset (from the object name)
    mtime: float       # when the broker wrote it (epoch s)
    size: int
    path: str


@dataclass(frozen=True)
class TopicPolicy:
    """What may be trimmed from one topic, and who reads it."""

    topic: str
    kind: Kind
    groups: frozenset[str] = frozenset()
    keep_s: float = 0.0   # batches younger than this stay (delete policy)


@dataclass(frozen=True)
class RetentionSettings:
    """How often and how much: read once at the CLI edge."""

    interval_s: float = 30.0
    min_age_s: float = 300.0
    orphan_age_s: float | None = None   # topics no group reads: None = keep them
    bucket: str = "tansu"
    cluster: str = CLUSTER


@dataclass
class Trimmed:
    """What one pass (or the loop so far) deleted, per topic."""

    objects: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, topic: str, batches: Iterable[Batch]) -> None:
        for b in batches:
            self.objects[topic] = self.objects.get(topic, 0) + 1
            self.bytes[topic] = self.bytes.get(topic, 0) + b.size

    def merge(self, other: Trimmed) -> None:
        for t, n in other.objects.items():
            self.objects[t] = self.objects.get(t, 0) + n
            self.bytes[t] = self.bytes.get(t, 0) + other.bytes.get(t, 0)

    @property
    def total(self) -> int:
        return sum(self.objects.values())


def policies(topology: topo.Topology, settings: RetentionSettings,
             schemas_topic: str = "_schemas") -> dict[str, TopicPolicy]:
    """Each topic the pipeline touches, with its policy and readers (see the module doc)."""
    from eventing.delivery.deadletters import ledger_topic
    from eventing.deploy.strimzi import state_topics
    from eventing.tables.lake import LakeSinkConfig

    out: dict[str, TopicPolicy] = {schemas_topic: TopicPolicy(schemas_topic, "keep")}
    compacted = set(state_topics(topology))
    compacted |= {ledger_topic(fn.delivery.dead_letter_sink)
                  for fn in topology.functions.values()}
    for t in compacted:
        out[t] = TopicPolicy(t, "compact")
    readers: dict[str, set[str]] = {}
    keep: dict[str, float] = {}
    for fn in topology.functions.values():
        for t in fn.topics:
            readers.setdefault(t, set()).add(fn.consumer_group)
    for table in topology.tables.values():
        group = LakeSinkConfig(topic=table.topic, table=table.name).group
        readers.setdefault(table.topic, set()).add(group)
        keep[table.topic] = max(keep.get(table.topic, 0.0), table.retention_s or 0.0,
                                table.dedupe_window_s)
    for t in topology.all_topics():
        if t in out:
            continue
        out[t] = TopicPolicy(t, "delete", frozenset(readers.get(t, ())),
                             max(settings.min_age_s, keep.get(t, 0.0)))
    return out


def trimmable(batches: list[Batch], position: int, older_than: float) -> list[Batch]:
    """The leading batches whose every record is below `position` (the next batch starts
    at or below it) and that were written before `older_than`. Stops at the first batch
    that must stay, so what remains is a contiguous log."""
    out = []
    ordered = sorted(batches, key=lambda b: b.base)
    for b, nxt in zip(ordered, ordered[1:], strict=False):
        if nxt.base > position or b.mtime > older_than:
            break
        out.append(b)
    return out


def superseded(batches: list[Batch], keys: dict[int, bytes | None]) -> list[Batch]:
    """Batches none of whose records is the latest of its key (`keys`: offset -> key of
    every record read). A batch none of whose offsets was read is unknown and stays (a
    consumer skips only control records, which hold no data); the last batch stays.
    Records without a key are never the latest of anything."""
    latest: dict[bytes, int] = {}
    for off in sorted(keys):
        k = keys[off]
        if k is not None:
            latest[k] = off
    latest_offsets = set(latest.values())
    ordered = sorted(batches, key=lambda b: b.base)
    out = []
    for b, nxt in zip(ordered, ordered[1:], strict=False):
        read = [o for o in range(b.base, nxt.base) if o in keys]
        if read and not any(o in latest_offsets for o in read):
            out.append(b)
    return out


class S3:
    """The few S3 calls retention needs (ListObjectsV2, DeleteObject), signed with SigV4.

    Not pyarrow's S3FileSystem, which the lake uses: its `delete_file` re-creates the
    parent "directory" as an empty `records/` marker object, and Tansu's fetch parses
    every key under the prefix as a 20-digit offset and panics on it (measured:
    "end byte index 20 is out of bounds of `records`", dynostore.rs:1069, and every
    fetch of that partition then closes the connection).
    """

    def __init__(self, endpoint: str, access_key: str, secret_key: str,
                 region: str = "us-east-1") -> None:
        import httpx

        self.endpoint = endpoint.rstrip("/")
        self.access_key, self._secret, self.region = access_key, secret_key, region
        self.http = httpx.Client(timeout=30.0)

    def _headers(self, method: str, path: str, query: str) -> dict[str, str]:
        import datetime
        import hashlib
        import hmac
        from urllib.parse import quote, urlsplit

        now = datetime.datetime.now(datetime.UTC)
        amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        empty = hashlib.sha256(b"").hexdigest()
        headers = {"host": urlsplit(self.endpoint).netloc, "x-amz-content-sha256": empty,
                   "x-amz-date": amz}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, quote(path), query,
                               "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                               signed, empty])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self._secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        return headers

    def list(self, bucket: str, prefix: str) -> list[tuple[str, float, int]]:
        """(key, last modified epoch s, size) of every object under `prefix`."""
        import datetime
        import xml.etree.ElementTree as ET
        from urllib.parse import quote

        out: list[tuple[str, float, int]] = []
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": prefix}
            if token:
                params["continuation-token"] = token
            query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                             for k, v in sorted(params.items()))
            path = f"/{bucket}"
            r = self.http.get(f"{self.endpoint}{path}?{query}",
                              headers=self._headers("GET", path, query))
            r.raise_for_status()
            root = ET.fromstring(r.content)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for c in root.iter(f"{ns}Contents"):
                when = datetime.datetime.fromisoformat(
                    (c.findtext(f"{ns}LastModified") or "").replace("Z", "+00:00"))
                out.append((c.findtext(f"{ns}Key") or "", when.timestamp(),
                            int(c.findtext(f"{ns}Size") or 0)))
            token = root.findtext(f"{ns}NextContinuationToken")
            if root.findtext(f"{ns}IsTruncated") != "true" or not token:
                return out

    def delete(self, bucket: str, key: str) -> None:
        path = f"/{bucket}/{key}"
        r = self.http.delete(f"{self.endpoint}{path}", headers=self._headers("DELETE", path, ""))
        if r.status_code not in (200, 204, 404):
            r.raise_for_status()


class ObjectLog:
    """The broker's batch objects of one bucket (list, delete)."""

    def __init__(self, s3: S3, bucket: str, cluster: str = CLUSTER) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.root = f"clusters/{cluster}/topics"

    def partitions(self, topic: str) -> dict[int, list[Batch]]:
        out: dict[int, list[Batch]] = {}
        for key, mtime, size in self.s3.list(self.bucket, f"{self.root}/{topic}/partitions/"):
            if key.endswith("/records/"):
                # A directory marker (another tool's delete left it): Tansu would panic
                # parsing it as an offset, so it goes at once.
                log.warning("deleting the directory marker %s (it breaks Tansu's fetch)", key)
                self.s3.delete(self.bucket, key)
                continue
            parts = key.split("/")
            if not key.endswith(".batch") or len(parts) < 3 or parts[-2] != "records":
                continue
            b = Batch(int(parts[-1][:20]), mtime, size, key)
            out.setdefault(int(parts[-3]), []).append(b)
        for batches in out.values():
            batches.sort(key=lambda b: b.base)
        return out

    def delete(self, batches: Iterable[Batch]) -> None:
        for b in batches:
            self.s3.delete(self.bucket, b.path)


class Positions:
    """Committed offsets of consumer groups, through the Kafka admin API."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient

        from eventing.kafka import admin_config

        self.bootstrap = bootstrap
        self.admin = AdminClient(admin_config(bootstrap))

    def committed(self, group: str, timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
        from confluent_kafka import ConsumerGroupTopicPartitions

        fut = self.admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout_s)[group]
        res = fut.result()
        return {(tp.topic, tp.partition): tp.offset for tp in res.topic_partitions or []
                if tp.error is None and tp.offset >= 0}

    def keys(self, topic: str, ends: dict[int, int], timeout_s: float = 60.0
             ) -> dict[int, dict[int, bytes | None]] | None:
        """Offset -> key of every record of `topic`'s partitions up to the base offset of
        their last batch (`ends`), or None when the end was not reached in time."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from eventing.kafka import client_tuning, consumer_config

        # Retention runs on s3 storage only, where a fetch wait shorter than Tansu's LIST
        # of the partition reads nothing at all (`eventing.kafka`): with the general
        # 10 ms, compaction of a long changelog was skipped pass after pass.
        consumer = Consumer(consumer_config(self.bootstrap,
                                            f"sluice-retention-{uuid.uuid4().hex}",
                                            **{**client_tuning("s3").consumer,
                                               "enable.auto.commit": False}))
        out: dict[int, dict[int, bytes | None]] = {p: {} for p in ends}
        pending = set(ends)
        try:
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
            deadline = time.monotonic() + timeout_s
            while pending and time.monotonic() < deadline:
                for msg in consumer.consume(5000, 0.2):
                    if msg.error():
                        continue
                    p = msg.partition()
                    out[p][msg.offset()] = msg.key()
                    if msg.offset() >= ends[p]:
                        pending.discard(p)
        finally:
            consumer.close()
        return None if pending else out


class Retention:
    """One pass over every topic (`run_once`), or a loop until `stop` is set (`run`)."""

    def __init__(self, log_store: ObjectLog, positions: Positions,
                 policy: dict[str, TopicPolicy], settings: RetentionSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = log_store
        self.positions = positions
        self.policy = policy
        self.settings = settings
        self.clock = clock
        self.trimmed = Trimmed()
        self.passes = 0

    def run_once(self) -> Trimmed:
        now = self.clock()
        done = Trimmed()
        committed: dict[str, dict[tuple[str, int], int]] = {}
        for group in sorted({g for p in self.policy.values() for g in p.groups}):
            try:
                committed[group] = self.positions.committed(group)
            except Exception as exc:  # noqa: BLE001 - an unknown position trims nothing
                log.warning("cannot read offsets of group %s: %s", group, exc)
        for pol in self.policy.values():
            if pol.kind == "keep":
                continue
            try:
                parts = self.store.partitions(pol.topic)
                if pol.kind == "compact":
                    gone = self._compact(pol, parts)
                else:
                    gone = self._delete(pol, parts, committed, now)
            except Exception as exc:  # noqa: BLE001 - one topic must not stop the others
                log.warning("retention of %s failed this pass: %s", pol.topic, exc)
                continue
            if gone:
                self.store.delete(gone)
                done.add(pol.topic, gone)
        self.passes += 1
        self.trimmed.merge(done)
        if done.total:
            log.info("trimmed %s", ", ".join(f"{t}: {n} objects ({done.bytes[t]} B)"
                                              for t, n in sorted(done.objects.items())))
        return done

    def _delete(self, pol: TopicPolicy, parts: dict[int, list[Batch]],
                committed: dict[str, dict[tuple[str, int], int]], now: float) -> list[Batch]:
        if not pol.groups:
            if self.settings.orphan_age_s is None:
                return []
            return [b for batches in parts.values()
                    for b in trimmable(batches, 1 << 62, now - self.settings.orphan_age_s)]
        gone = []
        for p, batches in parts.items():
            marks = [committed.get(g, {}).get((pol.topic, p)) for g in pol.groups]
            if any(m is None for m in marks):
                continue  # a reader without a known position: trim nothing
            gone += trimmable(batches, min(m for m in marks if m is not None), now - pol.keep_s)
        return gone

    def _compact(self, pol: TopicPolicy, parts: dict[int, list[Batch]]) -> list[Batch]:
        candidates = {p: b for p, b in parts.items() if len(b) > 1}
        if not candidates:
            return []
        keys = self.positions.keys(pol.topic, {p: b[-1].base for p, b in candidates.items()})
        if keys is None:
            log.warning("compaction of %s skipped: could not read it to the end", pol.topic)
            return []
        return [b for p, batches in candidates.items() for b in superseded(batches, keys[p])]

    def run(self, stop: Any) -> None:
        """Pass after pass until `stop` (a threading.Event) is set."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep the loop; the next pass retries
                log.exception("retention pass failed")
            stop.wait(self.settings.interval_s)


NAME = "retention"


def spec(stack: StackSettings) -> PartSpec:
    """The part `sluice up` runs with a pipeline: `sluice retention` on the stack's
    topology, trimming an s3 broker or rolling a memory one over above its RSS cap
    (`eventing.stack.rollover`). Its health is being alive (it serves nothing); the
    supervisor restarts it. The gateway token reaches it through the environment."""
    from eventing.stack.pipeline import _python_part, token_env

    args = ["--state-dir", str(stack.state_dir), "retention",
            "--topology", str(stack.topology_path)]
    if stack.broker_storage == "s3":
        what = ("broker retention: trims consumed batches and superseded changelog "
                "batches in s3://" + stack.broker_bucket)
    else:
        from eventing.stack.rollover import RolloverSettings

        if stack.broker_max_rss is not None:
            args += ["--max-broker-rss", str(stack.broker_max_rss)]
        if stack.gateway_token_file:
            args += ["--token-file", str(stack.gateway_token_file)]
        what = ("broker rollover: drained restart of the memory broker above "
                f"{(stack.broker_max_rss or RolloverSettings().max_rss) >> 20} MiB RSS")
    return _python_part(stack, NAME, args, what, lambda: True, [], env=token_env(stack))


def build(stack: StackSettings, topology: topo.Topology, settings: RetentionSettings) -> Retention:
    """A `Retention` for the local stack `stack`."""
    creds = stack.credentials
    s3 = S3(stack.s3_endpoint, creds.access_key, creds.secret_key, stack.region)
    return Retention(ObjectLog(s3, settings.bucket, settings.cluster), Positions(stack.bootstrap),
                     policies(topology, settings, stack.schemas_topic), settings)
