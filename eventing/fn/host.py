"""A function's HTTP host: what runs in its container on Knative, and in a local process.

A Knative KafkaSource POSTs each record as one binary-mode CloudEvent and **drops the
reply**, so a function cannot hand its outputs back to the caller. The host therefore
produces them itself: it runs the user function through `eventing.fn.runtime.FunctionHost`,
produces the returned records, and answers 2xx only after the broker acknowledged every
one of them (acks=all). A 2xx thus means "this input is processed and its outputs are
durable", which is what lets the KafkaSource (or Sluice's dispatcher) commit the offset.

It is an ordinary `functions-framework` HTTP target, so the stock image and server run it:

    functions-framework --source <entry file> --target handle --signature-type http \\
        --port $PORT [--host 127.0.0.1]

`write_entry_file` writes that entry file. It is the only place that reads the
environment (the edge); the variable names are the `ENV_*` constants below, which the
deploy generator uses for a Knative Service's `env` section:

    SLUICE_FUNCTION_NAME      function name (the `source` of events it returns)
    SLUICE_FUNCTION_SOURCE    path of the function's source file (main.py)
    SLUICE_FUNCTION_TARGET    the function's name in that file (default: name, - → _)
    SLUICE_OUTPUTS            JSON: {"topic": ["event type" | "*", ...]} or ["topic", ...]
    KAFKA_BOOTSTRAP_SERVERS   where outputs are produced (needed when there are outputs)
    SCHEMA_REGISTRY_URL       Avro decode/encode (optional: without it, JSON or bytes only)

Tracing (`eventing.telemetry.tracing`) follows the standard OpenTelemetry variables:
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP/HTTP base URL,
e.g. http://otel-collector:4318; unset = no spans), `OTEL_SERVICE_NAME` (default: the
function name), `OTEL_TRACES_SAMPLER_ARG` (root sampling ratio, default 1). Sluice exports
OTLP over HTTP only: with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` tracing stays off (warned).

Status codes, chosen for how Knative (and the dispatcher, which follows it) reacts:

    2xx  processed, every output acknowledged          → offset may be committed
    400  not a CloudEvent                               → not retried, dead letter
    422  the function raised `Reject`                   → not retried, dead letter
    500  the function raised anything else (text body)  → retried with backoff
    503  an output was not acknowledged by the broker   → retried with backoff

Batch mode (`Content-Type: application/cloudevents-batch+json`) is Sluice's own, opt-in
extension (Knative has none): one POST carries many events, runs them in order and
answers 200 with one result per event, so the per-POST cost is paid once per batch.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson

from eventing.cloudevent import binding
from eventing.fn.runtime import FunctionHost, OutputRecord, Reject, load_target
from eventing.topology import Delivery, Function

# --------------------------------------------------------------------------- configuration

ENV_FUNCTION_NAME = "SLUICE_FUNCTION_NAME"
ENV_SOURCE = "SLUICE_FUNCTION_SOURCE"
ENV_TARGET = "SLUICE_FUNCTION_TARGET"
ENV_OUTPUTS = "SLUICE_OUTPUTS"
ENV_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
ENV_REGISTRY = "SCHEMA_REGISTRY_URL"
ENV_NAMES = (ENV_FUNCTION_NAME, ENV_SOURCE, ENV_TARGET, ENV_OUTPUTS, ENV_BOOTSTRAP, ENV_REGISTRY)

ENTRY_TARGET = "handle"  # the functions-framework --target of every entry file
ORDERING_HEADER = "Sluice-Ordering"  # batch mode: ordered (default) | unordered
ACK_TIMEOUT_S = 30.0  # longest wait for the broker to acknowledge a request's outputs
# The host waits for each request's acks, so lingering only adds latency per POST;
# concurrent requests still share batches while earlier ones are in flight.
PRODUCER_OVERRIDES: dict[str, Any] = {"linger.ms": 0}

_TEXT = {"Content-Type": "text/plain; charset=utf-8"}
_JSON = {"Content-Type": "application/json"}


class HostConfigError(ValueError):
    """The host's configuration (environment of the entry file) is incomplete or wrong."""


def function_env(function: Function, bootstrap: str | None,
                 registry_url: str | None) -> dict[str, str]:
    """The environment that configures a host for `function` (Knative `env`, local process)."""
    env = {
        ENV_FUNCTION_NAME: function.name,
        ENV_SOURCE: str(function.source),
        ENV_TARGET: function.target,
        ENV_OUTPUTS: json.dumps({t: list(types) for t, types in function.outputs.items()}),
    }
    if bootstrap:
        env[ENV_BOOTSTRAP] = bootstrap
    if registry_url:
        env[ENV_REGISTRY] = registry_url
    return env


def function_from_env(env: Mapping[str, str]) -> tuple[Function, str | None, str | None]:
    """Parse `function_env`'s variables back into (function, bootstrap, registry_url).

    Only what the host needs is set; subscription fields (topics, delivery) belong to
    whoever delivers events, so they keep their defaults.
    """
    source = env.get(ENV_SOURCE)
    if not source:
        raise HostConfigError(f"{ENV_SOURCE} is not set: the path of the function's main.py")
    path = Path(source)
    main = path / "main.py" if path.is_dir() else path
    name = env.get(ENV_FUNCTION_NAME) or main.parent.name
    raw_outputs = env.get(ENV_OUTPUTS) or "{}"
    try:
        outputs = json.loads(raw_outputs)
    except json.JSONDecodeError as exc:
        raise HostConfigError(f"{ENV_OUTPUTS} is not JSON: {exc}") from None
    if isinstance(outputs, list):
        outputs = {t: ["*"] for t in outputs}
    if not isinstance(outputs, dict) or not all(isinstance(t, str) for t in outputs):
        raise HostConfigError(f'{ENV_OUTPUTS}: use {{"topic": ["type", ...]}} or ["topic", ...]')
    bootstrap = env.get(ENV_BOOTSTRAP) or None
    if outputs and not bootstrap:
        raise HostConfigError(f"{ENV_BOOTSTRAP} is not set but the function has outputs")
    function = Function(
        name=name,
        source=main,
        target=env.get(ENV_TARGET) or name.replace("-", "_"),
        topics=(),
        consumer_group="",
        outputs={t: tuple([types] if isinstance(types, str) else types or ["*"])
                 for t, types in outputs.items()},
        delivery=Delivery(),
        invoke="http",
    )
    return function, bootstrap, env.get(ENV_REGISTRY) or None


def tracing_from_env(env: Mapping[str, str], service_name: str) -> Any:
    """`TracingSettings` from the OpenTelemetry variables, or None (no endpoint, or gRPC)."""
    from eventing.telemetry.tracing import TracingSettings

    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/json").lower()
    if protocol == "grpc":
        import logging

        logging.getLogger("sluice.host").warning(
            "tracing off: OTEL_EXPORTER_OTLP_PROTOCOL=grpc, but Sluice exports OTLP over "
            "HTTP; set it to http/json and point the endpoint at the collector's :4318")
        return None
    try:
        sampling = float(env.get("OTEL_TRACES_SAMPLER_ARG") or 1.0)
    except ValueError:
        raise HostConfigError("OTEL_TRACES_SAMPLER_ARG must be a number in [0, 1]") from None
    return TracingSettings(endpoint=endpoint, sampling=sampling,
                           service_name=env.get("OTEL_SERVICE_NAME") or service_name)


def handler_from_env(env: Mapping[str, str]) -> Callable[[Any], Any]:
    """`make_handler` configured from an environment mapping (what entry files call)."""
    function, bootstrap, registry_url = function_from_env(env)
    trace_settings = tracing_from_env(env, function.name)
    if trace_settings is not None:
        from eventing.telemetry import tracing

        tracing.configure(trace_settings)
    return make_handler(function, bootstrap, registry_url)


_ENTRY_HEADER = '''"""Sluice function host entry, written by eventing.fn.host.write_entry_file.

Run: functions-framework --source {path} --target {target} --signature-type http --port $PORT
"""
'''


def write_entry_file(function: Function | None, path: str | os.PathLike[str],
                     bootstrap: str | None = None, registry_url: str | None = None) -> Path:
    """Write the functions-framework entry file that defines `handle`.

    With `function=None` the file reads its configuration from the process environment
    (the `ENV_*` variables): that is the file a container image carries. With a function,
    the same variables are written into the file, so a local process needs no environment.
    """
    path = Path(path)
    text = _ENTRY_HEADER.format(path=path.name, target=ENTRY_TARGET)
    if function is None:
        text += f"import os\n\nfrom eventing.fn.host import handler_from_env\n\n" \
                f"{ENTRY_TARGET} = handler_from_env(os.environ)\n"
    else:
        env = function_env(function, bootstrap, registry_url)
        text += f"from eventing.fn.host import handler_from_env\n\nENV = {env!r}\n\n" \
                f"{ENTRY_TARGET} = handler_from_env(ENV)\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def serve_command(entry: str | os.PathLike[str], port: int, *, host: str = "127.0.0.1",
                  executable: str = "functions-framework") -> list[str]:
    """The command line that serves an entry file (Knative images pass host 0.0.0.0)."""
    return [executable, "--source", str(entry), "--target", ENTRY_TARGET,
            "--signature-type", "http", "--host", host, "--port", str(port)]


# --------------------------------------------------------------------------- acks


class KafkaProducer(Protocol):
    """The part of `confluent_kafka.Producer` the host uses (tests pass a fake)."""

    def produce(self, topic: str, value: Any = None, key: Any = None, *, headers: Any = None,
                on_delivery: Any = None) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...


class _Acks:
    """Delivery reports of one event's outputs; `wait` returns once all have arrived.

    Reports arrive on the worker's poller thread, so the count is guarded by a lock; the
    request thread blocks on an Event instead of polling (no added latency).
    """

    __slots__ = ("_lock", "_sent", "_acked", "_sealed", "errors", "_done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = 0
        self._acked = 0
        self._sealed = False
        self.errors: list[str] = []
        self._done = threading.Event()

    def sent(self) -> None:
        with self._lock:
            self._sent += 1

    def __call__(self, err: Any, msg: Any) -> None:
        with self._lock:
            self._acked += 1
            if err is not None:
                self.errors.append(f"{msg.topic()}: {err}")
            if self._sealed and self._acked >= self._sent:
                self._done.set()

    def seal(self) -> None:
        """No more outputs will be produced for this event."""
        with self._lock:
            self._sealed = True
            if self._acked >= self._sent:
                self._done.set()

    def wait(self, deadline: float) -> str | None:
        """None when every output was acknowledged, else why not."""
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                missing = self._sent - self._acked
            return f"{missing} output(s) not acknowledged in time by the broker"
        if self.errors:
            return "output(s) not acknowledged: " + "; ".join(self.errors[:3])
        return None


# --------------------------------------------------------------------------- worker state


class _Worker:
    """What exists once per server process: created on the first request, after the fork.

    functions-framework imports the entry file in gunicorn's master, then forks; a Kafka
    producer (its threads and sockets) or an HTTP pool made before the fork would not
    survive into the worker. The user's code is imported eagerly instead, so a broken
    function fails at start rather than on the first event.
    """

    def __init__(self, function: Function, bootstrap: str | None, registry_url: str | None,
                 user: Callable[[Any], Any], producer_factory: Callable[[], KafkaProducer] | None,
                 serde_factory: Callable[[], Any] | None) -> None:
        self.function = function
        self.bootstrap = bootstrap
        self.registry_url = registry_url
        self.user = user
        self._producer_factory = producer_factory
        self._serde_factory = serde_factory
        self._lock = threading.Lock()
        self._pid: int | None = None
        self.host: FunctionHost | None = None
        self.producer: KafkaProducer | None = None

    def ready(self) -> tuple[FunctionHost, KafkaProducer | None]:
        if self._pid == os.getpid() and self.host is not None:
            return self.host, self.producer
        with self._lock:
            if self._pid != os.getpid() or self.host is None:
                serde = self._serde_factory() if self._serde_factory else self._make_serde()
                self.host = FunctionHost(self.function, serde, user=self.user)
                if self.host.stores and self.bootstrap:
                    self.host.restore_state(self.bootstrap)
                self.producer = self._make_producer() if self.function.outputs else None
                if self.producer is not None:
                    threading.Thread(target=self._poll, args=(self.producer,),
                                     name="sluice-host-acks", daemon=True).start()
                self._pid = os.getpid()
        return self.host, self.producer

    def _make_serde(self) -> Any:
        if not self.registry_url:
            return None
        from eventing.serde import AvroSerde

        return AvroSerde(self.registry_url)

    def _make_producer(self) -> KafkaProducer:
        if self._producer_factory is not None:
            return self._producer_factory()
        from confluent_kafka import Producer

        from eventing.kafka import producer_config

        if not self.bootstrap:
            raise HostConfigError("the function has outputs but no Kafka bootstrap servers")
        return Producer(producer_config(self.bootstrap, **PRODUCER_OVERRIDES))

    @staticmethod
    def _poll(producer: KafkaProducer) -> None:
        """Serve delivery reports for every request thread of this process."""
        while True:
            producer.poll(0.1)


# --------------------------------------------------------------------------- the handler


def make_handler(
    function: Function,
    bootstrap: str | None,
    registry_url: str | None,
    *,
    producer_factory: Callable[[], KafkaProducer] | None = None,
    serde_factory: Callable[[], Any] | None = None,
    ack_timeout_s: float = ACK_TIMEOUT_S,
) -> Callable[[Any], Any]:
    """Return `handle(request)`: a functions-framework HTTP target running `function`.

    `request` is a Flask/Werkzeug request. `producer_factory` and `serde_factory` replace
    the Kafka producer and the Avro serde (tests); both are called in the worker, lazily.
    """
    user = load_target(function.source, function.target)
    _forget_decorator_registration(user)
    worker = _Worker(function, bootstrap, registry_url, user, producer_factory, serde_factory)

    def run(host: FunctionHost, producer: KafkaProducer | None,
            event: Any) -> tuple[int, str, _Acks | None]:
        """Call the function and produce its outputs (without waiting for acks)."""
        try:
            records = host.call(event)
        except Reject as exc:
            return 422, f"Reject: {exc}", None
        except Exception as exc:  # noqa: BLE001 - any failure is the function's: retry it
            return 500, f"{type(exc).__name__}: {exc}", None
        acks = _Acks()
        if records:
            error = _produce(producer, records, acks)
            if error:
                acks.seal()
                return 503, error, None
        acks.seal()
        return 200, "", acks

    def handle_one(headers: Any, body: bytes) -> Any:
        try:
            event = binding.from_http(headers, body, max_name_length=None)
        except binding.BindingError as exc:
            return f"not a CloudEvent: {exc}", 400, _TEXT
        host, producer = worker.ready()
        status, error, acks = run(host, producer, event)
        if status == 200:
            error = acks.wait(time.monotonic() + ack_timeout_s)  # type: ignore[union-attr]
            if error is None:
                return "", 204
            status = 503
        return error, status, _TEXT

    def handle_batch(headers: Any, body: bytes) -> Any:
        ordering = (headers.get(ORDERING_HEADER) or "ordered").strip().lower()
        if ordering not in ("ordered", "unordered"):
            return f"{ORDERING_HEADER}: {ordering!r}; use ordered or unordered", 400, _TEXT
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return f"batch body is not JSON: {exc}", 400, _TEXT
        if type(items) is not list:
            return "a batch must be a JSON array of events", 400, _TEXT
        host, producer = worker.ready()
        results: list[dict[str, Any]] = [{"status": 0} for _ in items]
        pending: list[tuple[int, _Acks]] = []
        for i, item in enumerate(items):
            try:
                event = binding.event_from_json(item, max_name_length=None, index=i)
            except binding.BindingError as exc:
                status, error, acks = 400, f"not a CloudEvent: {exc}", None
            else:
                status, error, acks = run(host, producer, event)
            if acks is not None:
                pending.append((i, acks))
                continue
            results[i] = {"status": status, "error": error}
            if ordering == "ordered":
                break
        deadline = time.monotonic() + ack_timeout_s
        for i, acks in pending:
            error = acks.wait(deadline)
            results[i] = {"status": 200} if error is None else {"status": 503, "error": error}
        return orjson.dumps({"results": results}), 200, _JSON

    def handle(request: Any) -> Any:
        if request.method != "POST":
            return "POST a CloudEvent", 405, {**_TEXT, "Allow": "POST"}
        body = request.get_data()
        if binding.http_mode(request.headers) == "batch":
            return handle_batch(request.headers, body)
        return handle_one(request.headers, body)

    handle.__name__ = handle.__qualname__ = ENTRY_TARGET
    return handle


def _produce(producer: KafkaProducer | None, records: list[OutputRecord],
             acks: _Acks) -> str | None:
    """Queue `records`; returns an error text if one could not even be queued."""
    if producer is None:
        return "the function returned outputs but the host has no Kafka producer"
    deadline = time.monotonic() + ACK_TIMEOUT_S
    for topic, key, value, headers in records:
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=acks)
                acks.sent()
                break
            except BufferError:  # local queue full: the poller thread drains it
                if time.monotonic() > deadline:
                    return f"{topic}: producer queue full for {ACK_TIMEOUT_S:g}s"
                time.sleep(0.01)
            except Exception as exc:  # noqa: BLE001 - KafkaException, unknown topic, ...
                return f"{topic}: {type(exc).__name__}: {exc}"
    return None


def _forget_decorator_registration(user: Callable[[Any], Any]) -> None:
    """Keep `@functions_framework.cloud_event` on a user function named like our target
    from turning `handle` into a CloudEvent target (the registry is keyed by name)."""
    if getattr(user, "__name__", None) != ENTRY_TARGET:
        return
    try:
        from functions_framework import _function_registry
    except ImportError:
        return
    _function_registry.REGISTRY_MAP.pop(ENTRY_TARGET, None)
