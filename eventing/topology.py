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


@dataclass(frozen=True)
class Topology:
    path: Path
    routes: dict[str, str]  # gateway: CloudEvent type -> topic
    topics: dict[str, int]  # topic -> partitions
    functions: dict[str, Function]
    max_body_bytes: int = 1_048_576

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
        for t in self.routes.values():
            out.setdefault(t, 4)
        return out


_DELIVERY_KEYS = {
    "ordering": "ordering", "retry": "retry", "backoffPolicy": "backoff_policy",
    "backoffDelay": "backoff_delay", "timeout": "timeout", "deadLetterSink": "dead_letter_sink",
}
_FUNCTION_KEYS = {"source", "target", "topics", "consumerGroup", "outputs", "delivery", "invoke",
                  "maxInFlight", "batchSize", "initialOffset", "scale", "url"}
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
    _check_keys(str(path), raw, {"gateway", "topics", "functions"})
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
    return Topology(path=path, routes=routes, topics=topics, functions=functions,
                    max_body_bytes=int(gateway.get("maxBodyBytes", 1_048_576)))
