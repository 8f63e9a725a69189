"""The ingest gateway: CloudEvents over HTTP in, schema-checked Avro records in Kafka out.

One endpoint, `POST /`, takes the three HTTP content modes of the CloudEvents HTTP binding
(parsed by `eventing.cloudevent.http`, the home of `ce-` headers and the batch format):

- binary     `ce-*` headers, the body is the data (must be JSON: `application/json`);
- structured `Content-Type: application/cloudevents+json`, one JSON event;
- batch      `Content-Type: application/cloudevents-batch+json`, a JSON array of events.

Each event's `type` picks a topic from the topology's `gateway.routes`; its JSON data is
checked against and encoded with the latest Avro schema of `<topic>-value`
(`eventing.serde`, Confluent wire format) and written in Kafka BINARY mode
(`content-type: application/avro`, `partitionkey` as the record key, every other
attribute, `traceparent`/`tracestate` included, as `ce_*` headers).

Tracing (`eventing.telemetry.tracing`): each event gets a SERVER span (child of the event's
own valid `traceparent`, else of the request's W3C `traceparent` header by Trace Context
Level 2; see eventing.cloudevent.tracecontext for the precedence) and a PRODUCER `send`
span ended by the broker's acknowledgement (with partition and offset); the record's
`traceparent` is the send span's.
An invalid `traceparent` is dropped with its `tracestate`, traced or not.

**The answer comes after the broker's acknowledgement** (acks=all): 202
`{"accepted": n, "ids": [...]}` means every event of the request is durable in its topic.
confluent-kafka reports deliveries through callbacks served by `poll()`, so one thread
polls and hands finished requests to the event loop with one `call_soon_threadsafe` per
poll round, not one per event.

**Nothing from a rejected request reaches a topic.** Every event of a request is parsed,
routed, validated and encoded before the first `produce`. Batch mode is ALL-OR-NOTHING
on validation: when any event is bad the answer (400, or 422 when every problem is a
schema or routing problem) lists each bad event by index and reason, and none is written.

**Broker failures are the exception to all-or-nothing.** Records get a bounded
`message.timeout.ms` (5 s by default); if the broker does not acknowledge every record of
a request in time the answer is 503 with `Retry-After`, although some records of that
request may already be written. Clients retry the whole request (`eventing.ingest.publish`
does), so a retried batch can leave duplicates: consumers dedupe on the CloudEvent `id`
(unique per source by the spec), which the gateway never changes. While the broker is
known to be down (librdkafka reported all brokers down and a metadata probe failed) the
gateway answers 503 at once instead of queueing records it cannot deliver.

Errors always have a JSON body `{"error": code, "reason": text, ...}` naming the
attribute (`"attribute"`) or schema field (`"field"`) at fault:

    400 malformed body or event, missing/invalid attribute, data nested too deeply
    401 missing/wrong bearer token (when a token is set)
    413 body over maxBodyBytes (binary mode: `ce-*` headers count too), a batch over
        `max_batch_events`, a record over the broker's message size
    415 unsupported content type
    422 schema violation, or an event type with no route
    431 headers over the server's limits (`eventing.serving`)
    503 broker/registry down, or intake paused for a broker rollover (`paused`):
        the only answers worth retrying

Every 4xx is permanent: the same request gets the same answer, so it carries no
`Retry-After`. A batch answer lists at most `max_errors_listed` bad events (and says how
many it left out), so a large bad batch gets a short answer. A client that disconnects
before the answer is counted under code 499 and not logged as an error.

Schema lookups: the serde caches a subject's latest schema for `subject_ttl_s`; a request
that needs a topic whose cached schema is missing or about to go stale is validated on a
worker thread, so a registry round trip (or a registry timeout) never blocks the event
loop. Everything else runs inline: thread hops cost more than the ~10 us of work per event.

**Pause for a broker rollover** (`eventing.stack.rollover`): `POST /admin/pause`
`{"lease_s": N}` makes every later request answer 503 `paused` with `Retry-After` (a
transient answer: publishers retry) and answers once every produce already under way
has been acknowledged or failed (`{"paused": true, "in_flight": 0}`), so the broker then
holds everything the gateway said 202 for. The pause ends by `POST /admin/resume` or
when its lease runs out, so a rollover that dies never leaves intake shut. Both need the
bearer token when one is set, and are served on the loopback listener like the rest.

`GET /healthz` (alive), `GET /readyz` (broker metadata, route topics and registry
reachable; 503 otherwise) and `GET /metrics` (Prometheus) need no token, so probes and
scrapers work unchanged. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from eventing import serving
from eventing.cloudevent import event as ce_event
from eventing.cloudevent import http as ce_http
from eventing.cloudevent import json as ce_json
from eventing.cloudevent import kafka as ce_kafka
from eventing.cloudevent import tracecontext
from eventing.kafka import RoomWait
from eventing.serde import AVRO_CONTENT_TYPE, SchemaNotFound, SchemaViolation, subject_for
from eventing.serving import ServerLimits
from eventing.telemetry import tracing

log = logging.getLogger("sluice.gateway")

ACCEPTED_CONTENT_TYPES = (
    f"{ce_json.STRUCTURED_JSON} (structured), {ce_json.BATCH_JSON} (batch), or "
    "application/json with ce-* headers (binary)"
)
Record = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]
# What librdkafka adds to a record's key, value and headers when it checks the size.
RECORD_OVERHEAD_BYTES = 512


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs, resolved at the CLI edge."""

    bootstrap: str
    registry_url: str
    routes: Mapping[str, str]  # CloudEvent type -> topic
    topics: Mapping[str, int] = field(default_factory=dict)  # route topics -> partitions
    max_body_bytes: int = 1_048_576
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    message_timeout_ms: int = 5000
    retry_after_s: int = 2
    producer_overrides: Mapping[str, Any] = field(default_factory=dict)
    log_level: str = "info"
    # A 1 MB body holds ~350k `{}`: events per batch and errors per answer are capped.
    max_batch_events: int = 10_000
    max_errors_listed: int = 100
    # librdkafka's default `message.max.bytes`; a bigger record can never be written.
    max_record_bytes: int = 1_000_000
    limits: ServerLimits = field(default_factory=ServerLimits)
    # A pause (`POST /admin/pause`) ends by itself after at most this long.
    max_pause_s: float = 300.0

    @classmethod
    def from_topology(cls, topology: Any, **kwargs: Any) -> GatewaySettings:
        """Routes, their topics' partition counts and the body limit from a `Topology`."""
        every = topology.all_topics()
        topics = {t: every.get(t, 4) for t in topology.routes.values()}
        return cls(routes=dict(topology.routes), topics=topics,
                   max_body_bytes=topology.max_body_bytes, **kwargs)


# --------------------------------------------------------------------------- errors


class Rejection(Exception):
    """A request the gateway answers with an error; `body()` is the JSON it sends."""

    def __init__(self, status: int, error: str, reason: str, *, attribute: str | None = None,
                 field: str | None = None, headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.attribute = attribute
        self.field = field
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "reason": self.reason}
        if self.attribute is not None:
            out["attribute"] = self.attribute
        if self.field is not None:
            out["field"] = self.field
        out.update(self.extra)
        return out

    def response(self) -> Response:
        return json_response(self.body(), self.status, self.headers)


def json_response(body: Any, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=dict(headers or {}),
                    media_type="application/json")


def _binding_rejection(exc: ce_event.BindingError) -> Rejection:
    error = "invalid_attribute" if exc.attribute not in (None, "data", "data_base64") else (
        "invalid_data" if exc.attribute else "malformed_event")
    reason = exc.reason if exc.attribute is None else f"attribute {exc.attribute!r}: {exc.reason}"
    return Rejection(400, error, reason, attribute=exc.attribute)


class Unavailable(Exception):
    """The broker did not acknowledge every record (or is known to be down)."""

    def __init__(self, reason: str, acknowledged: int = 0, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.acknowledged = acknowledged
        self.permanent = permanent  # a retry would fail the same way (record too large)


# --------------------------------------------------------------------------- serde protocol


class Serde(Protocol):
    """What the gateway needs from `eventing.serde.AvroSerde`."""

    def encode(self, topic: str, record: Any) -> bytes: ...


# --------------------------------------------------------------------------- producer bridge


class _Pending:
    """The records of one request; counted down by delivery callbacks on the poll thread."""

    __slots__ = ("future", "left", "error", "acknowledged", "bridge")

    def __init__(self, future: asyncio.Future[None], count: int,
                 bridge: DeliveryBridge) -> None:
        self.future = future
        self.left = count
        self.error: Any = None
        self.acknowledged = 0
        self.bridge = bridge  # not its `_done` list: the poll thread swaps that list

    def on_delivery(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.acknowledged += 1
        elif self.error is None:
            self.error = err
        self.left -= 1
        if self.left == 0:
            self.bridge._done.append(self)


def _traced_delivery(callback: Callable[[Any, Any], None],
                     span: Any) -> Callable[[Any, Any], None]:
    """A delivery callback that also ends the record's `send` span (partition, offset)."""
    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            span.delivered(msg)
        else:
            span.fail(str(err), "kafka")
        span.finish()
        callback(err, msg)
    return on_delivery


def _resolve(done: list[_Pending]) -> None:
    for pending in done:
        if not pending.future.done():
            pending.future.set_result(None)


class DeliveryBridge:
    """Turns confluent-kafka delivery callbacks into awaitable results.

    `send(records)` produces every record in one loop and awaits one future that the poll
    thread resolves when the last delivery report of the request arrives. Callbacks run
    only inside `poll()` (on the poll thread), so their counters need no lock.

    Broker state for fail-fast 503s: librdkafka's "all brokers down" makes the state
    *suspect* and starts a metadata probe; only a failed probe makes it *down* (answer
    503 without producing), so an idle-connection close that librdkafka also reports as
    "all brokers down" never turns a request away. A successful probe or delivery makes
    it *up* again.
    """

    def __init__(self, producer: Any, loop: asyncio.AbstractEventLoop, *,
                 poll_timeout: float = 0.05, probe_interval: float = 1.0) -> None:
        self.producer = producer
        self.loop = loop
        self.poll_timeout = poll_timeout
        self.probe_interval = probe_interval
        self.state = "up"
        self.last_error: str | None = None
        self.last_ack = 0.0  # monotonic time of the last acknowledged request (readiness)
        self._done: list[_Pending] = []
        self._stop = threading.Event()
        self._probing = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gateway-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self.producer.flush(timeout)

    def on_error(self, err: Any) -> None:
        """confluent-kafka `error_cb` (called from `poll`, on the poll thread)."""
        self.last_error = str(err)
        if _is_all_brokers_down(err) and self.state == "up":
            self.state = "suspect"
            threading.Thread(target=self._probe_until_up, name="gateway-probe",
                             daemon=True).start()

    def _probe_until_up(self) -> None:
        if not self._probing.acquire(blocking=False):
            return
        try:
            while not self._stop.is_set() and self.state != "up":
                try:
                    self.producer.list_topics(timeout=self.probe_interval)
                except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
                    self.state = "down"
                    self.last_error = str(exc)
                    self._stop.wait(self.probe_interval)
                else:
                    self.state = "up"
        finally:
            self._probing.release()

    def _run(self) -> None:
        poll = self.producer.poll
        while not self._stop.is_set():
            poll(self.poll_timeout)
            if self._done:
                done, self._done = self._done, []
                if any(p.acknowledged for p in done):
                    self.state = "up"
                    self.last_ack = time.monotonic()
                try:
                    self.loop.call_soon_threadsafe(_resolve, done)
                except RuntimeError:  # loop closed during shutdown
                    return

    async def send(self, records: list[Record], timeout_s: float,
                   spans: list[Any] | None = None) -> None:
        """Produce `records` and return once the broker acknowledged all of them.

        Raises `Unavailable` when the broker is known to be down (nothing is produced) or
        when any record fails or times out (others of the request may be written).
        `spans` (aligned with `records`, None where untraced) holds each record's `send`
        span, ended by its delivery report.
        """
        if not records:
            return
        if self.state == "down":
            raise Unavailable(f"the Kafka broker is unreachable ({self.last_error})")
        future: asyncio.Future[None] = self.loop.create_future()
        pending = _Pending(future, len(records), self)
        callback = pending.on_delivery
        produce = self.producer.produce
        deadline = time.monotonic() + timeout_s
        wait: RoomWait | None = None
        try:
            for i, (topic, key, value, headers) in enumerate(records):
                on_delivery = callback
                if spans is not None and spans[i] is not None:
                    on_delivery = _traced_delivery(callback, spans[i][1])
                while True:
                    try:
                        produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                        break
                    except BufferError:  # local queue full: let the poll thread drain it
                        if wait is None:
                            wait = RoomWait(deadline, pause_s=0.005)
                        await asyncio.sleep(wait.pause(topic))  # kafka.QueueFull at the end
        except (BufferError, KafkaException) as exc:
            if _too_large_for_kafka(exc):
                raise Unavailable(f"a record is too large for the broker: {exc}",
                                  pending.acknowledged, permanent=True) from None
            # Records already queued may still be written: the 503 tells the client to
            # retry, and consumers dedupe on the CloudEvent id.
            raise Unavailable(f"could not queue records for the broker: {exc}",
                              pending.acknowledged) from None
        # librdkafka fails each record after message.timeout.ms; the extra second is a
        # guard against a lost callback, not the normal path.
        try:
            await asyncio.wait_for(future, timeout_s + 1.0)
        except TimeoutError:
            raise Unavailable("no delivery report from the broker in time",
                              pending.acknowledged) from None
        if pending.error is not None:
            raise Unavailable(f"the broker did not acknowledge the events: {pending.error}",
                              pending.acknowledged,
                              permanent=_too_large_for_kafka(pending.error))


def _too_large_for_kafka(err: Any) -> bool:
    """Whether `err` (a KafkaError or KafkaException) says a record is over the size
    limit: the same request would fail again, so it is not worth a retry."""
    if isinstance(err, KafkaException) and err.args:
        err = err.args[0]
    code = err.code() if hasattr(err, "code") else None
    return code == KafkaError.MSG_SIZE_TOO_LARGE


def _is_all_brokers_down(err: Any) -> bool:
    code = err.code() if hasattr(err, "code") else None
    return code == KafkaError._ALL_BROKERS_DOWN


# --------------------------------------------------------------------------- metrics


class GatewayMetrics:
    """The gateway's instruments, on their own registry (one gateway per registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "sluice_gateway_events", "CloudEvents by topic and outcome "
            "(accepted, rejected: failed validation, failed: broker did not acknowledge)",
            ["topic", "outcome"], registry=self.registry)
        self.duration = Histogram(
            "sluice_gateway_request_duration_seconds",
            "POST / latency, from request to answer (after the broker ack when accepted)",
            ["mode", "code"], registry=self.registry,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram(
            "sluice_gateway_batch_size", "Events per POST / request",
            registry=self.registry,
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self._children: dict[tuple[str, Any], Any] = {}

    def observe(self, mode: str, status: int, seconds: float,
                exemplar: dict[str, str] | None = None) -> None:
        """One request's latency; `exemplar` (the trace of one of its events, when sampled)
        is shown to OpenMetrics scrapers, so a slow bucket leads to a trace."""
        child = self._children.get((mode, status))
        if child is None:
            child = self._children[(mode, status)] = self.duration.labels(mode, str(status))
        child.observe(seconds, exemplar)

    def count(self, topic: str, outcome: str, n: int = 1) -> None:
        child = self._children.get((topic, outcome))
        if child is None:
            child = self._children[(topic, outcome)] = self.events.labels(topic, outcome)
        child.inc(n)

    def count_records(self, records: Iterable[Record], outcome: str) -> None:
        per_topic: dict[str, int] = {}
        for record in records:
            per_topic[record[0]] = per_topic.get(record[0], 0) + 1
        for topic, n in per_topic.items():
            self.count(topic, outcome, n)


# --------------------------------------------------------------------------- the gateway


class Gateway:
    """Request handling; `app` is the Starlette application serving it."""

    def __init__(self, settings: GatewaySettings, *,
                 producer_factory: Callable[[Callable[[Any], None]], Any] | None = None,
                 serde: Serde | None = None,
                 registry_probe: Callable[[], Any] | None = None,
                 tracer: tracing.Tracer | None = None) -> None:
        self.settings = settings
        self.tracer = tracer or tracing.get_tracer()
        self.routes = dict(settings.routes)
        self.known_types = sorted(self.routes)
        self.metrics = GatewayMetrics()
        self._producer_factory = producer_factory or self._kafka_producer
        self._serde: Serde | None = serde
        self._registry_probe = registry_probe
        self.bridge: DeliveryBridge | None = None
        self._token = settings.token.encode() if settings.token else None
        # topic -> monotonic time until which its cached schema may be used inline.
        self._fresh_until: dict[str, float] = {}
        self._topics_ready = threading.Event()
        self._stopping = threading.Event()
        # Intake pause (a broker rollover): refused until this monotonic time; requests
        # between the pause check and their broker ack are counted in `_in_flight`. Both
        # are touched only on the event loop, so no lock.
        self._paused_until = 0.0
        self._in_flight = 0
        self.app = Starlette(
            routes=[
                Route("/", self.ingest, methods=["POST"]),
                Route("/admin/pause", self.pause, methods=["POST"]),
                Route("/admin/resume", self.resume, methods=["POST"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    # ---------------------------------------------------------------- lifecycle

    def _kafka_producer(self, error_cb: Callable[[Any], None]) -> Any:
        from confluent_kafka import Producer

        from eventing.kafka import producer_config

        conf = producer_config(
            self.settings.bootstrap,
            **{"message.timeout.ms": self.settings.message_timeout_ms,
               "error_cb": error_cb, **self.settings.producer_overrides},
        )
        return Producer(conf)

    @property
    def serde(self) -> Serde:
        if self._serde is None:
            from eventing.serde import AvroSerde

            self._serde = AvroSerde(self.settings.registry_url)
        return self._serde

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        holder: list[DeliveryBridge] = []
        producer = self._producer_factory(lambda err: holder[0].on_error(err) if holder else None)
        self.bridge = DeliveryBridge(producer, loop)
        holder.append(self.bridge)
        self.bridge.start()
        self._stopping.clear()
        threading.Thread(target=self._ensure_topics, name="gateway-topics", daemon=True).start()
        log.info("gateway on http://%s:%s routes=%s token=%s", self.settings.host,
                 self.settings.port, self.routes, "set" if self._token else "none")
        try:
            yield
        finally:
            self._stopping.set()
            await asyncio.to_thread(self.bridge.close, self.settings.message_timeout_ms / 1000)

    def _ensure_topics(self) -> None:
        """Create the route topics (retrying while the broker is unreachable)."""
        if not self.settings.topics:
            self._topics_ready.set()
            return
        from eventing.kafka import ensure_topics

        while not self._stopping.is_set():
            try:
                ensure_topics(self.settings.bootstrap, dict(self.settings.topics), timeout=3.0)
            except Exception as exc:  # noqa: BLE001 - retried; /readyz reports it
                log.warning("could not ensure topics %s: %s", list(self.settings.topics), exc)
                self._stopping.wait(2.0)
            else:
                self._topics_ready.set()
                return

    # ---------------------------------------------------------------- probes

    async def healthz(self, _request: Request) -> Response:
        return json_response({"status": "ok"}, 200)

    async def readyz(self, _request: Request) -> Response:
        # Readiness says whether events are accepted now. A broker that acknowledged a
        # request in the last 10 s and every route's schema in the cache are that
        # evidence; probing anyway made a busy gateway answer 503 (metadata or registry
        # slower than the probe's timeout) while it accepted every event.
        checks: dict[str, str] = {}
        broker_ok = await self._broker_ready(checks)
        registry_ok = await self._registry_ready(checks)
        ready = broker_ok and registry_ok
        headers = {} if ready else {"Retry-After": str(self.settings.retry_after_s)}
        return json_response({"ready": ready, "checks": checks}, 200 if ready else 503, headers)

    async def _broker_ready(self, checks: dict[str, str]) -> bool:
        bridge = self.bridge
        if bridge is not None and bridge.state == "up" and time.monotonic() - bridge.last_ack < 10:
            checks["broker"] = "ok (acknowledged records in the last 10 s)"
            return True
        try:
            assert bridge is not None
            producer = bridge.producer
            md = await asyncio.to_thread(lambda: producer.list_topics(timeout=5.0))
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            checks["broker"] = f"unreachable: {exc}"
            return False
        missing = sorted(set(self.routes.values()) - set(md.topics))
        if missing:
            checks["broker"] = f"reachable, but route topics missing: {', '.join(missing)}"
            return False
        checks["broker"] = "ok"
        return True

    async def _registry_ready(self, checks: dict[str, str]) -> bool:
        now = time.monotonic()
        if all(self._fresh_until.get(t, 0.0) > now for t in set(self.routes.values())):
            checks["registry"] = "ok (every route's schema is cached)"
            return True
        try:
            if self._registry_probe is not None:
                await asyncio.to_thread(self._registry_probe)
            else:
                async with httpx.AsyncClient(timeout=5.0) as client:
                    r = await client.get(self.settings.registry_url.rstrip("/") + "/subjects")
                    r.raise_for_status()
        except Exception as exc:  # noqa: BLE001
            checks["registry"] = f"unreachable: {exc}"
            return False
        checks["registry"] = "ok"
        return True

    async def metrics_endpoint(self, request: Request) -> Response:
        # OpenMetrics when the scraper asks for it (Prometheus with exemplar storage):
        # only that format carries the latency histogram's trace-id exemplars.
        encoder, content_type = choose_encoder(request.headers.get("accept"))
        return Response(encoder(self.metrics.registry), 200, media_type=content_type)

    # ---------------------------------------------------------------- ingest

    async def ingest(self, request: Request) -> Response:
        started = time.perf_counter()
        started_ns = time.time_ns()
        mode = "unknown"
        status = 500
        spans: list[Any] = []
        try:
            self._authorize(request)
            self._refuse_if_paused()  # early too: no parsing work for a refused request
            mode = ce_http.mode(request.headers)
            self._check_content_type(mode, request)
            body = await self._read_body(request, _ce_header_bytes(request)
                                         if mode == "binary" else 0)
            records, ids = await self._validate(mode, request, body, started_ns, spans,
                                                _http_trace_context(request))
            self.metrics.batch_size.observe(len(records))
            assert self.bridge is not None
            # No await between this check and the count: a pause that starts later
            # waits for this request's ack (see `pause`).
            self._refuse_if_paused()
            self._in_flight += 1
            try:
                await self.bridge.send(records, self.settings.message_timeout_ms / 1000,
                                       spans if any(spans) else None)
            except Unavailable as exc:
                self.metrics.count_records(records, "failed")
                if exc.permanent:
                    raise Rejection(
                        413, "record_too_large",
                        f"{exc.reason}; {exc.acknowledged} of {len(records)} events were "
                        "acknowledged. Send less data per event; retrying will not help.",
                    ) from None
                raise Rejection(
                    503, "broker_unavailable",
                    f"{exc.reason}; {exc.acknowledged} of {len(records)} events were "
                    "acknowledged. Retry the whole request later; consumers dedupe "
                    "retried events on their CloudEvent id.",
                    headers={"Retry-After": str(self.settings.retry_after_s)},
                ) from None
            finally:
                self._in_flight -= 1
            self.metrics.count_records(records, "accepted")
            status = 202
            return json_response({"accepted": len(ids), "ids": ids}, 202)
        except Rejection as rej:
            status = rej.status
            return rej.response()
        except ClientDisconnect:
            status = 499  # the client left mid-request: nothing to answer, nothing to log
            return Response(status_code=499)
        except RecursionError:
            status = 400
            return _too_deep().response()
        except Exception:
            log.exception("unexpected error handling a request")
            return json_response({"error": "internal", "reason": "internal error; see the "
                                  "gateway log"}, 500)
        finally:
            self.metrics.observe(mode, status, time.perf_counter() - started,
                                 _exemplar(spans))
            if any(spans):
                _finish_server_spans(spans, status)

    # ---------------------------------------------------------------- pause (rollover)

    def paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def _refuse_if_paused(self) -> None:
        if self.paused():
            raise Rejection(503, "paused", "intake is paused while the broker rolls over; "
                            "retry after Retry-After (nothing of this request was written)",
                            headers={"Retry-After": "1"})

    async def pause(self, request: Request) -> Response:
        """Refuse new events for `lease_s` (capped by `max_pause_s`), then answer once no
        produce is in flight: every 202 given so far is durable in the broker."""
        try:
            self._authorize(request)
        except Rejection as rej:
            return rej.response()
        try:
            body = orjson.loads(await request.body() or b"{}")
            lease = float(body.get("lease_s", 60.0))
        except (ValueError, TypeError, AttributeError):
            return json_response({"error": "bad_request",
                                  "reason": 'body must be {"lease_s": seconds}'}, 400)
        lease = min(max(lease, 0.0), self.settings.max_pause_s)
        self._paused_until = time.monotonic() + lease
        log.warning("intake paused for at most %.0fs (broker rollover)", lease)
        # In-flight requests end within message.timeout.ms (acked or 503): bounded.
        deadline = time.monotonic() + self.settings.message_timeout_ms / 1000 + 2.0
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return json_response({"paused": self.paused(), "in_flight": self._in_flight,
                              "lease_s": lease}, 200 if self._in_flight == 0 else 503)

    async def resume(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except Rejection as rej:
            return rej.response()
        was = self.paused()
        self._paused_until = 0.0
        if was:
            log.warning("intake resumed")
        return json_response({"paused": False, "was_paused": was}, 200)

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise Rejection(401, "unauthorized", "missing bearer token: send "
                            "'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": 'Bearer realm="sluice"'})
        scheme, _, credentials = header.partition(" ")
        given = credentials.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
            raise Rejection(401, "unauthorized", "invalid bearer token",
                            headers={"WWW-Authenticate":
                                     'Bearer realm="sluice", error="invalid_token"'})

    def _check_content_type(self, mode: str, request: Request) -> None:
        content_type = request.headers.get("content-type")
        media = content_type.split(";", 1)[0].strip().lower() if content_type else None
        if mode == "batch":
            ok = media == ce_json.BATCH_JSON
        elif mode == "structured":
            ok = media == ce_json.STRUCTURED_JSON
        else:
            ok = ce_event.is_json_content_type(content_type)
        if not ok:
            raise Rejection(
                415, "unsupported_content_type",
                f"unsupported content type {content_type!r}; accepted: "
                f"{ACCEPTED_CONTENT_TYPES}",
                extra={"accepted": [ce_json.STRUCTURED_JSON, ce_json.BATCH_JSON,
                                    "application/json"]},
            )

    async def _read_body(self, request: Request, header_bytes: int = 0) -> bytes:
        """The body, refused (413) once it and `header_bytes` (the `ce-*` headers of a
        binary event, which become Kafka headers) pass maxBodyBytes."""
        limit = self.settings.max_body_bytes - header_bytes
        if limit < 0:
            raise self._too_large(f"{header_bytes} bytes of ce-* headers")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise Rejection(400, "malformed_request",
                                f"invalid Content-Length {declared!r}") from None
            if length > limit:
                raise self._too_large(f"Content-Length {length}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise self._too_large(f"more than {limit} bytes received")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, what: str) -> Rejection:
        limit = self.settings.max_body_bytes
        return Rejection(413, "body_too_large",
                         f"request body too large ({what}); the limit is {limit} bytes "
                         "(maxBodyBytes), ce-* headers included: split the batch",
                         extra={"limit": limit})

    # ---------------------------------------------------------------- validation

    async def _validate(self, mode: str, request: Request, body: bytes, started_ns: int = 0,
                        spans: list[Any] | None = None, http_parent: Any = None,
                        ) -> tuple[list[Record], list[str]]:
        """Parse, route, check and encode every event; raise `Rejection` if any is bad.

        `spans` receives, aligned with the records, each event's (server, send) spans or
        None (not traced).
        """
        errors: list[tuple[int, Rejection]] = []
        if mode == "batch":
            events, positions, errors, total = self._parse_batch(body)
        else:
            try:
                events = [ce_http.from_http(request.headers, body)]
            except ce_event.BindingError as exc:
                self.metrics.count("", "rejected")
                raise _binding_rejection(exc) from None
            positions, total = [0], 1
        topics = {self.routes.get(e._get_attributes()["type"]) for e in events} - {None}
        now = time.monotonic()
        if any(self._fresh_until.get(t, 0.0) <= now for t in topics):  # type: ignore[arg-type]
            # A schema must be fetched: do it off the event loop.
            records, bad = await asyncio.to_thread(self._encode_all, events, positions,
                                                   started_ns, spans, http_parent)
            self._mark_fresh(topics)
        else:
            records, bad = self._encode_all(events, positions, started_ns, spans, http_parent)
        if bad or errors:
            for event in events:
                self.metrics.count(self.routes.get(event._get_attributes()["type"], ""),
                                   "rejected")
            self.metrics.count("", "rejected", total - len(events))
            if mode != "batch":
                raise bad[0][1]
            raise _batch_rejection(sorted(errors + bad, key=lambda e: e[0]), total,
                                   self.settings.max_errors_listed)
        return records, [e._get_attributes()["id"] for e in events]

    def _parse_batch(
        self, body: bytes
    ) -> tuple[list[Any], list[int], list[tuple[int, Rejection]], int]:
        """(events, their indexes in the batch, errors by index, batch length)."""
        try:
            items = ce_http.batch_items(body)
        except ce_event.BindingError as exc:
            raise Rejection(400, "malformed_batch", exc.reason) from None
        cap = self.settings.max_batch_events
        if len(items) > cap:
            self.metrics.count("", "rejected", len(items))
            raise Rejection(413, "too_many_events",
                            f"the batch holds {len(items)} events; the limit is {cap} per "
                            "request: split the batch", extra={"limit": cap})
        events: list[Any] = []
        positions: list[int] = []
        errors: list[tuple[int, Rejection]] = []
        from_object = ce_json.from_object
        for i, item in enumerate(items):
            try:
                # JSON data stays parsed: the schema check needs the value, so it is not
                # re-encoded to bytes here and parsed again in `_encode`.
                events.append(from_object(item, keep_json=True))
            except ce_event.BindingError as exc:
                errors.append((i, _binding_rejection(exc)))
            except RecursionError:
                errors.append((i, _too_deep()))
            else:
                positions.append(i)
        return events, positions, errors, len(items)

    def _encode_all(self, events: list[Any], positions: list[int], started_ns: int = 0,
                    spans: list[Any] | None = None, http_parent: Any = None,
                    ) -> tuple[list[Record], list[tuple[int, Rejection]]]:
        """Encode every event; collect 4xx problems by index, raise 5xx ones at once."""
        records: list[Record] = []
        errors: list[tuple[int, Rejection]] = []
        encode = self._encode
        if spans is None:
            spans = []
        for position, event in zip(positions, events, strict=True):
            try:
                record, traced = encode(event, started_ns, http_parent)
                records.append(record)
                spans.append(traced)
            except Rejection as rej:
                if rej.status >= 500:
                    raise  # the gateway's problem, not the event's: the whole request fails
                errors.append((position, rej))
        return records, errors

    def _encode(self, event: Any, started_ns: int = 0,
                http_parent: Any = None) -> tuple[Record, Any]:
        """(record, its (server, send) spans or None); `http_parent` is the request's W3C
        trace context, used when the event has no valid `traceparent` of its own."""
        attrs = event._get_attributes()
        event_type = attrs["type"]
        topic = self.routes.get(event_type)
        if topic is None:
            raise Rejection(
                422, "unknown_type",
                f"no route for event type {event_type!r}; known types: "
                f"{', '.join(self.known_types) or 'none'}",
                attribute="type", extra={"known_types": self.known_types})
        content_type = attrs.get("datacontenttype")
        if not ce_event.is_json_content_type(content_type):
            raise Rejection(
                415, "unsupported_content_type",
                f"data must be JSON to be checked against the Avro schema of topic {topic!r};"
                f" got datacontenttype {content_type!r}", attribute="datacontenttype",
                extra={"accepted": ["application/json"]})
        try:
            data = ce_event.json_data(event)  # a batch's JSON data is already parsed
        except ce_event.BindingError as exc:
            raise _binding_rejection(exc) from None
        try:
            value = self.serde.encode(topic, data)
        except SchemaViolation as exc:
            raise Rejection(422, "schema_violation",
                            f"data does not match the schema of topic {topic!r}: {exc}",
                            field=exc.path or None,
                            extra={"problem": exc.problem, "subject": subject_for(topic)}) from None
        except RecursionError:
            raise _too_deep() from None
        except SchemaNotFound:
            raise Rejection(500, "no_schema",
                            f"topic {topic!r} has no schema registered (subject "
                            f"{subject_for(topic)!r}); register it with `sluice schemas`") from None
        except Exception as exc:  # registry unreachable, timeouts
            raise Rejection(503, "registry_unavailable",
                            f"the schema registry could not be reached: {exc}",
                            headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        traced = self.tracer.ingest(attrs, data, topic, started_ns or None, http_parent)
        attrs["datacontenttype"] = AVRO_CONTENT_TYPE
        event.data = value
        key, value, headers = ce_kafka.to_binary(event, validate=False)
        size = (len(key or b"") + len(value or b"")
                + sum(len(k) + len(v) for k, v in headers) + RECORD_OVERHEAD_BYTES)
        if size > self.settings.max_record_bytes:
            _finish_server_spans([traced], 413)
            raise Rejection(413, "record_too_large",
                            f"the event's Kafka record would be {size} bytes (data, key and "
                            f"ce-* headers); the broker takes at most "
                            f"{self.settings.max_record_bytes}: send less data or fewer "
                            "extension attributes", extra={"limit": self.settings.max_record_bytes})
        return (topic, key, value, headers), traced

    def _mark_fresh(self, topics: Iterable[str | None]) -> None:
        """Remember until when each topic's cached schema can be used without a fetch."""
        writer_for = getattr(self.serde, "writer_for", None)
        ttl = getattr(self.serde, "subject_ttl_s", None)
        for topic in topics:
            if topic is None:
                continue
            if writer_for is None or ttl is None:
                self._fresh_until[topic] = float("inf")
                continue
            try:
                fetched_at = writer_for(topic).fetched_at  # cached: no fetch here
            except Exception:  # noqa: BLE001 - unknown: keep validating on a thread
                continue
            self._fresh_until[topic] = fetched_at + ttl * 0.9



def _http_trace_context(request: Request) -> tuple[Any, str | None] | None:
    """The request's W3C `traceparent`/`tracestate` headers, by Trace Context Level 2
    (every field of a repeated header is looked at; see eventing.cloudevent.tracecontext)."""
    values = request.headers.getlist(tracecontext.HTTP_TRACEPARENT)
    if not values:
        return None
    parent = tracecontext.traceparent_from_headers(values)
    if parent is None:
        return None
    return parent, tracecontext.parse_tracestate(
        request.headers.getlist(tracecontext.HTTP_TRACESTATE))


def _exemplar(spans: list[Any]) -> dict[str, str] | None:
    """The trace of the request's first traced event, as histogram exemplar labels."""
    for traced in spans:
        if traced is not None:
            return tracing.exemplar(traced[0])
    return None


def _finish_server_spans(spans: list[Any], status: int) -> None:
    """End each event's SERVER span with the request's outcome (unsent `send` spans of a
    rejected request are dropped: those records never reached a topic)."""
    for traced in spans:
        if traced is None:
            continue
        server = traced[0]
        server.set("http.response.status_code", status)
        if status >= 400:
            server.fail(f"request answered {status}", str(status))
        server.finish()


def _batch_rejection(errors: list[tuple[int, Rejection]], total: int,
                     max_listed: int = 100) -> Rejection:
    """One answer listing the bad events of a batch (the first `max_listed`, so the
    answer stays short): 422 if all are schema/route problems, 413 if all are too large."""
    statuses = {rej.status for _, rej in errors}
    status = statuses.pop() if len(statuses) == 1 and statuses <= {413, 422} else 400
    first_index, first = errors[0]
    listed = errors[:max_listed]
    extra: dict[str, Any] = {"events": [{"index": i, **rej.body()} for i, rej in listed]}
    if len(errors) > len(listed):
        extra["events_not_listed"] = len(errors) - len(listed)
    return Rejection(
        status, "invalid_batch",
        f"{len(errors)} of {total} events are invalid; none was written (batches are "
        f"all-or-nothing). First: event[{first_index}]: {first.reason}",
        extra=extra,
    )


def _too_deep() -> Rejection:
    return Rejection(400, "invalid_data", "the event's data is nested too deeply to decode; "
                     "flatten it", attribute="data")


def _ce_header_bytes(request: Request) -> int:
    """Bytes of the request's `ce-*` headers (each becomes a Kafka header)."""
    return sum(len(k) + len(v) for k, v in request.headers.raw if k[:3].lower() == b"ce-")


# --------------------------------------------------------------------------- entry points


def create_app(settings: GatewaySettings, **kwargs: Any) -> Starlette:
    """The gateway's ASGI app (`kwargs` go to `Gateway`: fakes for tests)."""
    return Gateway(settings, **kwargs).app


def serve(settings: GatewaySettings) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM (`eventing.serving`)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serving.serve(create_app(settings), host=settings.host, port=settings.port,
                  limits=settings.limits, log_level=settings.log_level)
