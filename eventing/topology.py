"""The topology file: which functions read which topics, where their events go, and how
delivery behaves. Read once, validated, and then the single source for both the local
dispatcher and the KafkaSources written for a cluster.

Delivery fields and defaults are Knative's (KafkaSource `spec.ordering`, `spec.delivery`),
so a value means the same thing locally and on a cluster:

    ordering        ordered (per-partition order, default) | unordered
    retry           10       retries after the first attempt
    backoffPolicy   exponential (delay * 2^n) | linear (delay * n)
    backoffDelay    PT0.3S   ISO-8601 duration
    timeout         PT600S   per delivery attempt (HTTP modes)
    deadLetterSink  a topic; Sluice defaults to `sluice.deadletter` rather than dropping

Beyond the functions, the file declares what the platform keeps and indexes, so nothing
in `eventing/` names an example's topic or field:

    tables      per queryable table: its source topic, lake table name, time field and
                partitioning, the real-time retention, the dedupe key and window
                (`Table`); `sluice up` runs the lake sink and real-time table for each
    traceIds    data field -> span attribute, the business ids `sluice trace` finds
    schemas     the folder of `<topic>.avsc` files (default: `schemas/` beside this file)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Ordering = Literal["ordered", "unordered"]
BackoffPolicy = Literal["exponential", "linear"]
InvokeMode = Literal["inprocess", "http", "http-batch"]

DEFAULT_DEAD_LETTER_TOPIC = "sluice.deadletter"
_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class TopologyError(ValueError):
    """The topology file is wrong; the message names the entry and the fix."""


def parse_duration(text: str, where: str) -> float:
    """ISO-8601 duration (`PT0.3S`, `PT10M`, `P1D`) to seconds."""
    m = _DURATION.match(text or "")
    if not m or text in ("P", "PT"):
        raise TopologyError(f"{where}: {text!r} is not an ISO-8601 duration (e.g. PT0.3S)")
    d, h, mi, s = (float(m.group(k) or 0) for k in "dhms")
    return d * 86400 + h * 3600 + mi * 60 + s


@dataclass(frozen=True)
class Delivery:
    """Knative's delivery spec, with its defaults."""

    ordering: Ordering = "ordered"
    retry: int = 10
    backoff_policy: BackoffPolicy = "exponential"
    backoff_delay: str = "PT0.3S"
    timeout: str = "PT600S"
    dead_letter_sink: str = DEFAULT_DEAD_LETTER_TOPIC

    @property
    def backoff_delay_s(self) -> float:
        return parse_duration(self.backoff_delay, "backoffDelay")

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout, "timeout")

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry `retry_number` (1-based), as Knative computes it."""
        base = self.backoff_delay_s
        if self.backoff_policy == "linear":
            return base * retry_number
        return base * (2 ** retry_number)


@dataclass(frozen=True)
class Scale:
    """Autoscaling hints, used by the cluster manifests (KEDA and Knative Serving)."""

    min: int = 0
    max: int = 10
    target_concurrency: int = 100
    lag_threshold: int = 100


@dataclass(frozen=True)
class Function:
    """One function: where its code is, what it reads, where its events go."""

    name: str
    source: Path
    target: str
    topics: tuple[str, ...]
    consumer_group: str
    outputs: dict[str, tuple[str, ...]]  # topic -> event types routed there ("*" = any)
    delivery: Delivery
    invoke: InvokeMode = "inprocess"
    max_in_flight: int = 64
    batch_size: int = 500
    initial_offset: Literal["earliest", "latest"] = "earliest"
    scale: Scale = field(default_factory=Scale)
    url: str | None = None  # for http modes when the function runs elsewhere

    def route(self, event_type: str) -> str | None:
        """The output topic for an event of `event_type` (first match wins)."""
        for topic, types in self.outputs.items():
            if "*" in types or event_type in types:
                return topic
        return None


PartitionBy = Literal["hour", "day", "month", "year"]
DEFAULT_DEDUPE_KEY: tuple[str, ...] = ("source", "id")
# CloudEvent attribute names (spec: lower-case letters and digits, at most 20 recommended).
_CE_ATTRIBUTE = re.compile(r"^[a-z0-9]{1,64}$")
_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SPAN_ATTRIBUTE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")


@dataclass(frozen=True)
class Table:
    """One declared table: a topic kept in the lake (Iceberg) and, when `retention_s` is
    set, in the real-time table (`<name>_rt` locally, a Pinot REALTIME table on a cluster).

    Both drop a record whose dedupe key (CloudEvent attributes, default source + id) was
    written within `dedupe_window_s` (0 = keep replays): see `eventing.tables.dedupe`.
    """

    name: str                     # lake table name; the real-time one adds `_rt`
    topic: str
    time_field: str = "event_time"
    partition_by: PartitionBy = "day"
    retention_s: float | None = 3600.0  # real-time retention; None = no real-time table
    dedupe_key: tuple[str, ...] = DEFAULT_DEDUPE_KEY
    dedupe_window_s: float = 300.0

    @property
    def realtime(self) -> bool:
        return self.retention_s is not None


@dataclass(frozen=True)
class Topology:
    path: Path
    routes: dict[str, str]  # gateway: CloudEvent type -> topic
    topics: dict[str, int]  # topic -> partitions
    functions: dict[str, Function]
    max_body_bytes: int = 1_048_576
    tables: dict[str, Table] = field(default_factory=dict)  # by lake table name
    trace_ids: dict[str, str] = field(default_factory=dict)  # data field -> span attribute
    schemas_dir: Path | None = None  # default: `schemas/` beside the topology file

    @property
    def schemas(self) -> Path:
        """The folder of this pipeline's `<topic>.avsc` files."""
        return self.schemas_dir or self.path.parent / "schemas"

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            known = ", ".join(sorted(self.tables)) or "none"
            raise TopologyError(f"no table {name!r} in {self.path} (known: {known})") from None

    def realtime_tables(self) -> list[Table]:
        return [t for t in self.tables.values() if t.realtime]

    def function(self, name: str) -> Function:
        try:
            return self.functions[name]
        except KeyError:
            known = ", ".join(sorted(self.functions)) or "none"
            raise TopologyError(f"no function {name!r} in {self.path} (known: {known})") from None

    def all_topics(self) -> dict[str, int]:
        """Every topic the pipeline touches, with its partition count (default 4)."""
        out = dict(self.topics)
        for fn in self.functions.values():
            for t in (*fn.topics, *fn.outputs, fn.delivery.dead_letter_sink):
                out.setdefault(t, 1 if t == fn.delivery.dead_letter_sink else 4)
        for t in (*self.routes.values(), *(tb.topic for tb in self.tables.values())):
            out.setdefault(t, 4)
        return out


_DELIVERY_KEYS = {
    "ordering": "ordering", "retry": "retry", "backoffPolicy": "backoff_policy",
    "backoffDelay": "backoff_delay", "timeout": "timeout", "deadLetterSink": "dead_letter_sink",
}
_FUNCTION_KEYS = {"source", "target", "topics", "consumerGroup", "outputs", "delivery", "invoke",
                  "maxInFlight", "batchSize", "initialOffset", "scale", "url"}
_TABLE_KEYS = {"topic", "timeField", "partitionBy", "retention", "dedupe"}
_SCALE_KEYS = {"min": "min", "max": "max", "targetConcurrency": "target_concurrency",
               "lagThreshold": "lag_threshold"}


def _check_keys(where: str, data: dict, allowed: set[str] | dict) -> None:
    unknown = set(data) - set(allowed)
    if unknown:
        raise TopologyError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _topic(where: str, name: Any) -> str:
    if not isinstance(name, str) or not _TOPIC.match(name):
        raise TopologyError(f"{where}: {name!r} is not a valid Kafka topic name")
    return name


def _delivery(where: str, data: dict | None) -> Delivery:
    data = data or {}
    _check_keys(where, data, _DELIVERY_KEYS)
    kwargs = {_DELIVERY_KEYS[k]: v for k, v in data.items()}
    if isinstance(kwargs.get("dead_letter_sink"), dict):  # Knative-style {uri: ...}/{topic: ...}
        sink = kwargs["dead_letter_sink"]
        kwargs["dead_letter_sink"] = sink.get("topic") or sink.get("uri", "").rsplit("/", 1)[-1]
    d = Delivery(**kwargs)
    if d.ordering not in ("ordered", "unordered"):
        raise TopologyError(f"{where}.ordering: {d.ordering!r}; use ordered or unordered")
    if d.backoff_policy not in ("exponential", "linear"):
        raise TopologyError(f"{where}.backoffPolicy: {d.backoff_policy!r}; "
                            "use exponential or linear")
    if not isinstance(d.retry, int) or d.retry < 0:
        raise TopologyError(f"{where}.retry: {d.retry!r}; use a whole number >= 0")
    parse_duration(d.backoff_delay, f"{where}.backoffDelay")
    parse_duration(d.timeout, f"{where}.timeout")
    _topic(f"{where}.deadLetterSink", d.dead_letter_sink)
    return d


def _outputs(where: str, data: Any) -> dict[str, tuple[str, ...]]:
    if data is None:
        return {}
    if isinstance(data, str):
        data = [data]
    if isinstance(data, list):
        return {_topic(where, t): ("*",) for t in data}
    if isinstance(data, dict):
        out = {}
        for topic, types in data.items():
            types = [types] if isinstance(types, str) else list(types or ["*"])
            out[_topic(where, topic)] = tuple(types)
        return out
    raise TopologyError(f"{where}: a topic, a list of topics, or topic: [event types]")


def load(path: str | Path) -> Topology:
    """Read and validate a topology file; relative sources resolve against its folder."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise TopologyError(f"topology file {path} not found") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from None
    _check_keys(str(path), raw, {"gateway", "topics", "functions", "tables", "traceIds",
                                 "schemas"})
    base = path.parent

    gateway = raw.get("gateway") or {}
    _check_keys("gateway", gateway, {"routes", "maxBodyBytes"})
    routes = {str(t): _topic(f"gateway.routes[{t}]", topic)
              for t, topic in (gateway.get("routes") or {}).items()}

    topics: dict[str, int] = {}
    for name, spec in (raw.get("topics") or {}).items():
        spec = spec or {}
        _check_keys(f"topics.{name}", spec, {"partitions"})
        parts = spec.get("partitions", 4)
        if not isinstance(parts, int) or parts < 1:
            raise TopologyError(f"topics.{name}.partitions: {parts!r}; use a whole number >= 1")
        topics[_topic("topics", name)] = parts

    functions: dict[str, Function] = {}
    for name, spec in (raw.get("functions") or {}).items():
        where = f"functions.{name}"
        if not re.match(r"^[a-z][a-z0-9-]{0,62}$", name):
            raise TopologyError(f"{where}: names are lower-case DNS labels (a-z, 0-9, -), "
                                "because they become Knative Service names")
        _check_keys(where, spec, _FUNCTION_KEYS)
        source = (base / spec.get("source", f"{name}")).resolve()
        main = source / "main.py" if source.is_dir() else source
        if not main.exists():
            raise TopologyError(f"{where}.source: {main} does not exist")
        src_topics = spec.get("topics")
        if isinstance(src_topics, str):
            src_topics = [src_topics]
        if not src_topics:
            raise TopologyError(f"{where}.topics: list the topic(s) the function reads")
        invoke = spec.get("invoke", "inprocess")
        if invoke not in ("inprocess", "http", "http-batch"):
            raise TopologyError(f"{where}.invoke: {invoke!r}; use inprocess, http or http-batch")
        scale = spec.get("scale") or {}
        _check_keys(f"{where}.scale", scale, _SCALE_KEYS)
        initial = spec.get("initialOffset", "earliest")
        if initial not in ("earliest", "latest"):
            raise TopologyError(f"{where}.initialOffset: {initial!r}; use earliest or latest")
        functions[name] = Function(
            name=name,
            source=main,
            target=spec.get("target", name.replace("-", "_")),
            topics=tuple(_topic(f"{where}.topics", t) for t in src_topics),
            consumer_group=spec.get("consumerGroup", f"sluice-{name}"),
            outputs=_outputs(f"{where}.outputs", spec.get("outputs")),
            delivery=_delivery(f"{where}.delivery", spec.get("delivery")),
            invoke=invoke,
            max_in_flight=int(spec.get("maxInFlight", 64)),
            batch_size=int(spec.get("batchSize", 500)),
            initial_offset=initial,
            scale=Scale(**{_SCALE_KEYS[k]: int(v) for k, v in scale.items()}),
            url=spec.get("url"),
        )
    schemas = raw.get("schemas")
    if schemas is not None and not isinstance(schemas, str):
        raise TopologyError("schemas: a folder path, relative to the topology file")
    schemas_dir = (base / schemas).resolve() if schemas else None
    return Topology(path=path, routes=routes, topics=topics, functions=functions,
                    max_body_bytes=int(gateway.get("maxBodyBytes", 1_048_576)),
                    tables=_tables(raw.get("tables")), trace_ids=_trace_ids(raw.get("traceIds")),
                    schemas_dir=schemas_dir)


def _tables(data: Any) -> dict[str, Table]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TopologyError("tables: a mapping of table name -> {topic: ..., ...}")
    tables: dict[str, Table] = {}
    topics_seen: dict[str, str] = {}
    for name, spec in data.items():
        where = f"tables.{name}"
        if not isinstance(name, str) or not _TABLE.match(name) or name.endswith("_rt"):
            raise TopologyError(f"{where}: table names are lower-case SQL identifiers "
                                "(a-z, 0-9, _) not ending in _rt (the real-time suffix)")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise TopologyError(f"{where}: a mapping with at least `topic`")
        _check_keys(where, spec, _TABLE_KEYS)
        if "topic" not in spec:
            raise TopologyError(f"{where}.topic: name the topic the table is fed from")
        topic = _topic(f"{where}.topic", spec["topic"])
        if topic in topics_seen:
            raise TopologyError(f"{where}.topic: {topic} already feeds table "
                                f"{topics_seen[topic]}; one table per topic")
        topics_seen[topic] = name
        time_field = spec.get("timeField", "event_time")
        if not isinstance(time_field, str) or not time_field:
            raise TopologyError(f"{where}.timeField: the name of an epoch-ms or timestamp field")
        partition_by = spec.get("partitionBy", "day")
        if partition_by not in ("hour", "day", "month", "year"):
            raise TopologyError(f"{where}.partitionBy: {partition_by!r}; use hour, day, month "
                                f"or year (of {time_field})")
        retention = spec.get("retention", "PT1H")
        retention_s = (None if retention in (None, False, "none")
                       else parse_duration(str(retention), f"{where}.retention"))
        dedupe = spec.get("dedupe") or {}
        if not isinstance(dedupe, dict):
            raise TopologyError(f"{where}.dedupe: {{key: [source, id], window: PT5M}}")
        _check_keys(f"{where}.dedupe", dedupe, {"key", "window"})
        key = dedupe.get("key", list(DEFAULT_DEDUPE_KEY))
        key = [key] if isinstance(key, str) else key
        if not isinstance(key, list) or not key or not all(
                isinstance(k, str) and _CE_ATTRIBUTE.match(k) for k in key):
            raise TopologyError(f"{where}.dedupe.key: {key!r}; list CloudEvent attribute "
                                "names (lower-case), e.g. [source, id]")
        window = dedupe.get("window", "PT5M")
        window_s = 0.0 if window in (0, False, "none") else parse_duration(
            str(window), f"{where}.dedupe.window")
        tables[name] = Table(name=name, topic=topic, time_field=time_field,
                             partition_by=partition_by, retention_s=retention_s,
                             dedupe_key=tuple(key), dedupe_window_s=window_s)
    return tables


def _trace_ids(data: Any) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TopologyError("traceIds: a mapping of data field -> span attribute "
                            "(e.g. payment_id: payment.id)")
    out = {}
    for fieldname, attr in data.items():
        if not isinstance(attr, str) or not _SPAN_ATTRIBUTE.match(attr):
            raise TopologyError(f"traceIds.{fieldname}: {attr!r} is not a span attribute "
                                "name (letters, digits, _ and .)")
        if attr.startswith(("cloudevents.", "messaging.", "sluice.")):
            raise TopologyError(f"traceIds.{fieldname}: {attr!r} is a reserved namespace; "
                                "name business ids after your domain (e.g. order.id)")
        out[str(fieldname)] = attr
    return out
