"""Registry state: a durable log of records and the in-memory index rebuilt from it.

Like Confluent and Karapace, the log is a single-partition Kafka topic (`_schemas`) of
keyed JSON records, so compaction keeps only each key's last state:

- `{"keytype": "SCHEMA", "subject": s, "version": v, "magic": 1}` →
  `{"subject", "version", "id", "schema", "deleted", "references"?}`; a soft delete rewrites
  the record with `deleted: true`, a hard delete writes a tombstone (value null).
- `{"keytype": "CONFIG", "subject": s | null, "magic": 0}` → `{"compatibilityLevel": L}`;
  tombstone on delete.
- `{"keytype": "NOOP", "magic": 0}` → `{"marker": uuid}`: the end-of-log marker (below).

`SchemaStore` holds the index and implements the registry's rules. Every change is first
appended to the log and acknowledged (acks=all, waited for) and only then applied to the
index, so a registration the client saw succeed survives a restart. Changes are serialised
by one lock, which makes check-then-write (compatibility, id allocation) atomic. The store
assumes it is the only writer of its topic; a second registry on the same topic would only
see the other's writes after a restart.

On start, `KafkaLog.replay` reads the topic from the beginning until it meets a NOOP marker
it has just written itself: Tansu's reported high watermark can be wrong, so "end of log" is
proved by reading our own marker, as Confluent does. `MemoryLog` stands in for tests.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import compat, errors
from .schemas import ParsedSchema, SchemaError, parse

log = logging.getLogger(__name__)

Record = tuple[dict[str, Any], dict[str, Any] | None]
MAX_VERSION = 2**31 - 1
SUPPORTED_TYPES = ("AVRO",)
_GUID_NAMESPACE = uuid.UUID("5b1c1a3e-93e1-4e39-a3c5-3f1f2b6e7a10")


@dataclass(frozen=True)
class Reference:
    """A named type imported from another subject's version (Confluent `references`)."""

    name: str
    subject: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "subject": self.subject, "version": self.version}


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one subject."""

    subject: str
    version: int
    id: int
    schema: str
    references: tuple[Reference, ...] = ()
    deleted: bool = False

    @property
    def guid(self) -> str:
        return guid_of(self.id, self.schema)


def guid_of(schema_id: int, schema: str) -> str:
    """Confluent's per-schema GUID, derived from id and text so it needs no storage."""
    return str(uuid.uuid5(_GUID_NAMESPACE, f"{schema_id}:{schema}"))


@dataclass(frozen=True)
class SchemaInfo:
    """A schema by global id (shared by every subject version with the same content)."""

    id: int
    schema: str
    references: tuple[Reference, ...]
    guid: str


class Log(Protocol):
    """Durable, ordered record log. `append` returns only once the records are durable."""

    def append(self, records: Sequence[Record]) -> None: ...

    def replay(self) -> Iterable[Record]: ...

    def close(self) -> None: ...


class MemoryLog:
    """A `Log` kept in a list, for tests; `fail_with` makes the next append fail."""

    def __init__(self, records: Iterable[Record] = ()) -> None:
        self.records: list[Record] = list(records)
        self.fail_with: errors.RegistryError | None = None

    def append(self, records: Sequence[Record]) -> None:
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        self.records.extend((dict(k), None if v is None else dict(v)) for k, v in records)

    def replay(self) -> Iterable[Record]:
        return list(self.records)

    def close(self) -> None:
        pass


class KafkaLog:
    """The log in a single-partition Kafka topic, produced with acks=all."""

    def __init__(self, bootstrap: str, topic: str = "_schemas", timeout: float = 30.0) -> None:
        from confluent_kafka import Producer

        from eventing.kafka import producer_config

        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        _ensure_log_topic(bootstrap, topic, timeout)
        self._producer = Producer(producer_config(
            bootstrap, **{"acks": "all", "linger.ms": 0, "message.timeout.ms": int(timeout * 1000)}
        ))

    def append(self, records: Sequence[Record]) -> None:
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        from eventing.kafka import produce

        deadline = time.monotonic() + self.timeout
        try:
            for key, value in records:
                produce(self._producer, self.topic, None if value is None else _encode(value),
                        _encode(key), partition=0, on_delivery=on_delivery, deadline=deadline)
        except Exception as exc:  # kafka.QueueFull, KafkaException
            raise errors.store_error(str(exc)) from exc
        if self._producer.flush(self.timeout) > 0:
            raise errors.store_timeout(f"no acknowledgement from {self.topic} in {self.timeout}s")
        if failures:
            raise errors.store_error("; ".join(failures))

    def replay(self) -> Iterator[Record]:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

        from eventing.kafka import consumer_config

        marker = uuid.uuid4().hex
        self.append([(_key("NOOP"), {"marker": marker})])
        # assign(), not subscribe(): no group join (slow on Tansu) and nothing committed.
        consumer = Consumer(consumer_config(
            self.bootstrap, f"sluice-registry-replay-{marker}", **{"enable.partition.eof": False}
        ))
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            deadline = time.monotonic() + self.timeout
            while True:
                if time.monotonic() > deadline:
                    raise errors.store_timeout(f"did not read back marker from {self.topic}")
                batch = consumer.consume(500, 0.5)
                if batch:
                    deadline = time.monotonic() + self.timeout  # a long log is progress
                for msg in batch:
                    if msg.error() is not None:
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            continue
                        raise errors.store_error(str(msg.error()))
                    record = _decode_record(msg.key(), msg.value(), msg.offset())
                    if record is None:
                        continue
                    key, value = record
                    if key.get("keytype") == "NOOP":
                        if value and value.get("marker") == marker:
                            return
                        continue
                    yield record
        finally:
            consumer.close()

    def close(self) -> None:
        self._producer.flush(self.timeout)


def _ensure_log_topic(bootstrap: str, topic: str, timeout: float) -> None:
    """Create the topic compacted if the broker accepts that config, plain otherwise."""
    from eventing.kafka import ensure_topics

    try:
        ensure_topics(bootstrap, {topic: 1}, config={topic: {"cleanup.policy": "compact"}},
                      timeout=timeout)
    except RuntimeError as exc:
        log.warning("creating %s compacted failed (%s); creating it without config", topic, exc)
        ensure_topics(bootstrap, {topic: 1}, timeout=timeout)


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _decode_record(key: bytes | None, value: bytes | None, offset: int) -> Record | None:
    try:
        k = json.loads(key) if key else None
        v = json.loads(value) if value is not None else None
    except ValueError:
        log.warning("skipping undecodable registry record at offset %d", offset)
        return None
    if not isinstance(k, dict) or (v is not None and not isinstance(v, dict)):
        log.warning("skipping malformed registry record at offset %d", offset)
        return None
    return k, v


def _key(keytype: str, **fields: Any) -> dict[str, Any]:
    """Record keys with a fixed field order: compaction compares key bytes."""
    magic = 1 if keytype == "SCHEMA" else 0
    return {"keytype": keytype, **fields, "magic": magic}


def _schema_value(sv: SchemaVersion) -> dict[str, Any]:
    value: dict[str, Any] = {
        "subject": sv.subject, "version": sv.version, "id": sv.id, "schema": sv.schema,
        "deleted": sv.deleted,
    }
    if sv.references:
        value["references"] = [r.to_json() for r in sv.references]
    return value


def parse_references(raw: Any) -> tuple[Reference, ...]:
    """Validate a request's `references` list (42201 if malformed)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise errors.invalid_schema("references must be a list")
    refs = []
    for item in raw:
        try:
            name, subject, version = item["name"], item["subject"], item["version"]
        except (TypeError, KeyError) as exc:
            raise errors.invalid_schema(f"reference {item!r} lacks {exc}") from exc
        if not (isinstance(name, str) and isinstance(subject, str)
                and isinstance(version, int) and not isinstance(version, bool)):
            raise errors.invalid_schema(f"malformed reference {item!r}")
        refs.append(Reference(name, subject, version))
    return tuple(refs)


_VERSION = re.compile(r"-?[0-9]{1,10}")


def parse_version(raw: str | int) -> int | None:
    """`latest`/-1 → None (latest); 1..2^31-1 → int; anything else → 42202.

    Strict: ASCII digits only, no spaces, no `+` (Python's `int()` takes " 1" and "١").
    """
    if isinstance(raw, str) and raw.lower() == "latest":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise errors.invalid_version(raw)
    if isinstance(raw, str) and not _VERSION.fullmatch(raw):
        raise errors.invalid_version(raw)
    number = int(raw)
    if number == -1:
        return None
    if not 1 <= number <= MAX_VERSION:
        raise errors.invalid_version(raw)
    return number


class SchemaStore:
    """The registry's rules over the index; all changes go through the `Log` first."""

    def __init__(self, log_: Log, default_level: str = compat.DEFAULT_LEVEL) -> None:
        if default_level.upper() not in compat.LEVELS:
            raise errors.invalid_compatibility(default_level)
        self._log = log_
        self._default_level = default_level.upper()
        self._lock = threading.RLock()
        self._subjects: dict[str, dict[int, SchemaVersion]] = {}
        self._ids: dict[int, SchemaInfo] = {}
        self._id_users: dict[int, set[tuple[str, int]]] = {}
        self._by_content: dict[tuple[str, tuple[Reference, ...]], int] = {}
        self._guids: dict[str, int] = {}
        self._parsed: dict[int, ParsedSchema] = {}
        self._configs: dict[str | None, str] = {}
        self._max_id = 0
        for key, value in log_.replay():
            self._apply(key, value)

    def close(self) -> None:
        self._log.close()

    # ---- index -----------------------------------------------------------------------

    def _apply(self, key: dict[str, Any], value: dict[str, Any] | None) -> None:
        """Apply one log record; records are states per key, so replay is idempotent."""
        keytype = key.get("keytype")
        if keytype == "SCHEMA":
            subject, version = key["subject"], int(key["version"])
            versions = self._subjects.setdefault(subject, {})
            old = versions.pop(version, None)
            if old is not None:
                self._release(old)
            if value is None:
                if not versions:
                    del self._subjects[subject]
                return
            sv = SchemaVersion(
                subject=subject, version=version, id=int(value["id"]), schema=value["schema"],
                references=parse_references(value.get("references")),
                deleted=bool(value.get("deleted", False)),
            )
            versions[version] = sv
            self._max_id = max(self._max_id, sv.id)
            if sv.id not in self._ids:
                guid = sv.guid
                self._ids[sv.id] = SchemaInfo(sv.id, sv.schema, sv.references, guid)
                self._guids[guid] = sv.id
                self._by_content[(sv.schema, sv.references)] = sv.id
            self._id_users.setdefault(sv.id, set()).add((subject, version))
        elif keytype == "CONFIG":
            subject = key.get("subject")
            if value is None:
                self._configs.pop(subject, None)
            else:
                self._configs[subject] = str(value["compatibilityLevel"])
        # NOOP and record types this registry does not write (MODE, DELETE_SUBJECT) are skipped.

    def _release(self, sv: SchemaVersion) -> None:
        users = self._id_users.get(sv.id, set())
        users.discard((sv.subject, sv.version))
        if not users:
            info = self._ids.pop(sv.id, None)
            self._id_users.pop(sv.id, None)
            self._parsed.pop(sv.id, None)
            if info is not None:
                self._guids.pop(info.guid, None)
                if self._by_content.get((info.schema, info.references)) == sv.id:
                    del self._by_content[(info.schema, info.references)]

    def _write(self, records: Sequence[Record]) -> None:
        self._log.append(records)  # durable first ...
        for key, value in records:
            self._apply(key, value)  # ... then visible

    # ---- parsing ---------------------------------------------------------------------

    def _parse(self, text: Any, refs: tuple[Reference, ...]) -> ParsedSchema:
        if not isinstance(text, str):
            raise errors.invalid_schema("'schema' must be a string holding the schema JSON")
        named: dict[str, Any] = {}
        for ref in refs:
            versions = self._subjects.get(ref.subject, {})
            target = versions.get(ref.version)
            if target is None:
                raise errors.invalid_schema(
                    f"reference {ref.name!r} to subject {ref.subject!r} version {ref.version}"
                    " does not exist"
                )
            named.update(self._parsed_id(target.id).named)
        try:
            return parse(text, named)
        except SchemaError as exc:
            raise errors.invalid_schema(str(exc)) from exc

    def _parsed_id(self, schema_id: int) -> ParsedSchema:
        parsed = self._parsed.get(schema_id)
        if parsed is None:
            info = self._ids[schema_id]
            parsed = self._parse(info.schema, info.references)
            self._parsed[schema_id] = parsed
        return parsed

    @staticmethod
    def _check_type(schema_type: Any) -> None:
        if schema_type is None or str(schema_type).upper() in SUPPORTED_TYPES:
            return
        raise errors.invalid_schema(
            f"schemaType {schema_type!r} is not supported: this registry supports only AVRO"
        )

    # ---- reads -----------------------------------------------------------------------

    def _live(self, subject: str) -> list[SchemaVersion]:
        versions = self._subjects.get(subject, {})
        return [sv for _, sv in sorted(versions.items()) if not sv.deleted]

    def _existing(self, subject: str, deleted: bool) -> dict[int, SchemaVersion]:
        """The subject's versions, or 40401 if it has none visible."""
        versions = self._subjects.get(subject)
        if not versions or (not deleted and not any(not v.deleted for v in versions.values())):
            raise errors.subject_not_found(subject)
        return versions

    def subjects(
        self, prefix: str = "", deleted: bool = False, deleted_only: bool = False
    ) -> list[str]:
        with self._lock:
            out = []
            for subject, versions in self._subjects.items():
                if not subject.startswith(prefix):
                    continue
                live = any(not v.deleted for v in versions.values())
                if deleted_only and live:
                    continue
                if not (deleted or deleted_only) and not live:
                    continue
                out.append(subject)
            return sorted(out)

    def versions(
        self, subject: str, deleted: bool = False, deleted_only: bool = False
    ) -> list[int]:
        with self._lock:
            versions = self._existing(subject, deleted or deleted_only)
            return sorted(
                v for v, sv in versions.items()
                if (sv.deleted if deleted_only else (deleted or not sv.deleted))
            )

    def get_version(self, subject: str, version: str | int, deleted: bool = False
                    ) -> SchemaVersion:
        number = parse_version(version)
        with self._lock:
            versions = self._existing(subject, deleted)
            if number is None:
                candidates = [sv for sv in versions.values() if deleted or not sv.deleted]
                if not candidates:
                    raise errors.version_not_found(subject, version)
                return max(candidates, key=lambda sv: sv.version)
            sv = versions.get(number)
            if sv is None or (sv.deleted and not deleted):
                raise errors.version_not_found(subject, number)
            return sv

    def schema_by_id(self, schema_id: int) -> SchemaInfo:
        """By id, also when every version using it is soft-deleted (old data stays readable)."""
        with self._lock:
            info = self._ids.get(schema_id)
            if info is None:
                raise errors.schema_not_found(f"Schema {schema_id} not found")
            return info

    def schema_by_guid(self, guid: str) -> SchemaInfo:
        with self._lock:
            schema_id = self._guids.get(guid.lower())
            if schema_id is None:
                raise errors.schema_not_found(f"Schema {guid} not found")
            return self._ids[schema_id]

    def versions_of_id(self, schema_id: int, deleted: bool = False, subject: str | None = None
                       ) -> list[SchemaVersion]:
        with self._lock:
            self.schema_by_id(schema_id)
            out = []
            for subj, version in self._id_users.get(schema_id, ()):
                sv = self._subjects[subj][version]
                if (deleted or not sv.deleted) and (subject is None or subj == subject):
                    out.append(sv)
            return sorted(out, key=lambda sv: (sv.subject, sv.version))

    def referenced_by(self, subject: str, version: str | int) -> list[int]:
        with self._lock:
            target = self.get_version(subject, version)
            return sorted({sv.id for sv in self._referrers(target) if not sv.deleted})

    def _referrers(self, target: SchemaVersion) -> list[SchemaVersion]:
        return [
            sv for versions in self._subjects.values() for sv in versions.values()
            if any(r.subject == target.subject and r.version == target.version
                   for r in sv.references)
        ]

    def all_schemas(self, prefix: str = "", deleted: bool = False, latest_only: bool = False
                    ) -> list[SchemaVersion]:
        with self._lock:
            out = []
            for subject in sorted(self._subjects):
                if not subject.startswith(prefix):
                    continue
                chosen = [sv for _, sv in sorted(self._subjects[subject].items())
                          if deleted or not sv.deleted]
                out += chosen[-1:] if latest_only else chosen
            return out

    def lookup(
        self, subject: str, text: Any, references: Any = None, schema_type: Any = None,
        normalize: bool = False, deleted: bool = False,
    ) -> SchemaVersion:
        """The version of `subject` holding this schema (40401 / 40403 if none)."""
        self._check_type(schema_type)
        refs = parse_references(references)
        with self._lock:
            versions = self._existing(subject, deleted)
            parsed = self._parse(text, refs)
            candidates = sorted(
                (sv for sv in versions.values() if deleted or not sv.deleted),
                key=lambda sv: (not sv.deleted, sv.version), reverse=True,
            )
            for sv in candidates:
                if self._same(sv, parsed, refs, normalize):
                    return sv
            raise errors.schema_not_found()

    def _same(self, sv: SchemaVersion, parsed: ParsedSchema, refs: tuple[Reference, ...],
              normalize: bool) -> bool:
        if sv.references != refs:
            return False
        if normalize:
            return self._parsed_id(sv.id).normalized == parsed.normalized
        return sv.schema == parsed.canonical

    # ---- config ----------------------------------------------------------------------

    def level(self, subject: str | None) -> str:
        """The compatibility level in force for `subject` (subject, else global, else default)."""
        with self._lock:
            if subject is not None and subject in self._configs:
                return self._configs[subject]
            return self._configs.get(None, self._default_level)

    def get_config(self, subject: str | None = None, default_to_global: bool = False) -> str:
        with self._lock:
            if subject is None:
                return self.level(None)
            if subject in self._configs:
                return self._configs[subject]
            if default_to_global:
                return self.level(None)
            raise errors.subject_config_not_found(subject)

    def set_config(self, subject: str | None, level: Any) -> str:
        if not isinstance(level, str) or level.upper() not in compat.LEVELS:
            raise errors.invalid_compatibility(level)
        level = level.upper()
        with self._lock:
            self._write([(_key("CONFIG", subject=subject), {"compatibilityLevel": level})])
            return level

    def delete_config(self, subject: str | None = None) -> str:
        """Remove the subject's (or global) level; returns the level that was removed."""
        with self._lock:
            if subject is not None and subject not in self._configs:
                if subject not in self._subjects:
                    raise errors.subject_not_found(subject)
                raise errors.subject_config_not_found(subject)
            previous = self.get_config(subject)
            if subject in self._configs:
                self._write([(_key("CONFIG", subject=subject), None)])
            return previous

    # ---- registration and compatibility ----------------------------------------------

    def register(
        self, subject: str, text: Any, references: Any = None, schema_type: Any = None,
        normalize: bool = False,
    ) -> SchemaVersion:
        """Register (or find) this schema under `subject`: same content → same global id;
        already a live version → that version, nothing written; else a compatibility check
        against the subject's live versions, then a new version."""
        self._check_type(schema_type)
        refs = parse_references(references)
        with self._lock:
            parsed = self._parse(text, refs)
            versions = self._subjects.get(subject, {})
            live = self._live(subject)
            for sv in reversed(live):
                if self._same(sv, parsed, refs, normalize):
                    return sv
            level = self.level(subject)
            messages = compat.check_level(
                level, parsed, [(sv.version, self._parsed_id(sv.id)) for sv in live]
            )
            if messages:
                raise errors.incompatible(
                    "Schema being registered is incompatible with an earlier schema for "
                    f'subject "{subject}", details: [{", ".join(messages)}]'
                )
            text_to_store = parsed.normalized if normalize else parsed.canonical
            schema_id = self._by_content.get((text_to_store, refs))
            if schema_id is None:
                schema_id = self._max_id + 1
            version = max(versions, default=0) + 1
            sv = SchemaVersion(subject, version, schema_id, text_to_store, refs)
            self._write([(_key("SCHEMA", subject=subject, version=version), _schema_value(sv))])
            if not normalize:
                self._parsed.setdefault(schema_id, parsed)
            return sv

    def test_compatibility(
        self, subject: str, version: str | int | None, text: Any, references: Any = None,
        schema_type: Any = None,
    ) -> list[str]:
        """Messages why the schema breaks the subject's level ([] = compatible). With a
        version: against that version only; without: against all live versions (the
        level decides whether all or only the latest count)."""
        self._check_type(schema_type)
        refs = parse_references(references)
        with self._lock:
            parsed = self._parse(text, refs)
            level = self.level(subject)
            if version is None:
                previous = self._live(subject)
            elif parse_version(version) is None and not self._live(subject):
                previous = []  # nothing registered yet: anything is compatible
            else:
                previous = [self.get_version(subject, version)]
            return compat.check_level(
                level, parsed, [(sv.version, self._parsed_id(sv.id)) for sv in previous]
            )

    # ---- deletes ---------------------------------------------------------------------

    def delete_subject(self, subject: str, permanent: bool = False) -> list[int]:
        """Soft delete (hide) or, once soft-deleted, permanently delete a subject."""
        with self._lock:
            versions = self._subjects.get(subject)
            if not versions:
                raise errors.subject_not_found(subject)
            live = self._live(subject)
            if not permanent:
                if not live:
                    raise errors.subject_soft_deleted(subject)
                self._refuse_if_referenced(live, live_only=True)
                self._write([
                    (_key("SCHEMA", subject=subject, version=sv.version),
                     _schema_value(replace(sv, deleted=True)))
                    for sv in live
                ])
                return [sv.version for sv in live]
            if live:
                raise errors.subject_not_soft_deleted(subject)
            doomed = [sv for _, sv in sorted(versions.items())]
            self._refuse_if_referenced(doomed, live_only=False)
            records: list[Record] = [
                (_key("SCHEMA", subject=subject, version=sv.version), None) for sv in doomed
            ]
            if subject in self._configs:
                records.append((_key("CONFIG", subject=subject), None))
            self._write(records)
            return [sv.version for sv in doomed]

    def delete_version(self, subject: str, version: str | int, permanent: bool = False) -> int:
        """Soft delete a version or, once soft-deleted, permanently delete it."""
        number = parse_version(version)
        with self._lock:
            versions = self._subjects.get(subject)
            if not versions:
                raise errors.subject_not_found(subject)
            if number is None:
                pool = versions.values() if permanent else [
                    sv for sv in versions.values() if not sv.deleted]
                if not pool:
                    raise errors.version_not_found(subject, version)
                number = max(sv.version for sv in pool)
            sv = versions.get(number)
            if sv is None:
                raise errors.version_not_found(subject, number)
            key = _key("SCHEMA", subject=subject, version=number)
            if not permanent:
                if sv.deleted:
                    raise errors.version_soft_deleted(subject, number)
                self._refuse_if_referenced([sv], live_only=True)
                self._write([(key, _schema_value(replace(sv, deleted=True)))])
            else:
                if not sv.deleted:
                    raise errors.version_not_soft_deleted(subject, number)
                self._refuse_if_referenced([sv], live_only=False)
                self._write([(key, None)])
            return number

    def _refuse_if_referenced(self, targets: Sequence[SchemaVersion], live_only: bool) -> None:
        doomed = {(t.subject, t.version) for t in targets}
        for target in targets:
            for ref in self._referrers(target):
                if (ref.subject, ref.version) in doomed or (live_only and ref.deleted):
                    continue
                raise errors.referenced(target.subject, target.version)
