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

The entry file and the environment that configures the host (the `ENV_*` variables,
and tracing's standard OpenTelemetry ones) are `eventing.fn.env`'s: the contract that
`eventing.deploy` builds images and Knative Services from, without importing the server.

Status codes, chosen for how Knative (and the dispatcher, which follows it) reacts:

    2xx  processed, every output acknowledged          → offset may be committed
    400  not a CloudEvent                               → not retried, dead letter
    422  the function raised `Reject`                   → not retried, dead letter
    500  the function raised anything else (text body)  → retried with backoff
    503  an output was not queued or not acknowledged   → retried with backoff

Batch mode (`Content-Type: application/cloudevents-batch+json`) is Sluice's own, opt-in
extension (Knative has none): one POST carries many events, runs them in order and
answers 200 with one result per event, so the per-POST cost is paid once per batch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import http as ce_http
from eventing.cloudevent import json as ce_json
from eventing.fn.env import ENTRY_TARGET, HostConfigError, function_from_env, tracing_from_env
from eventing.fn.output import OutputFailed, OutputProducer, failure
from eventing.fn.runtime import FunctionHost, load_target
from eventing.kafka import Acks, KafkaProducer
from eventing.topology import Function

# --------------------------------------------------------------------------- configuration

ORDERING_HEADER = "Sluice-Ordering"  # batch mode: ordered (default) | unordered
ACK_TIMEOUT_S = 30.0  # longest wait for the broker to acknowledge a request's outputs
# The host waits for each request's acks, so lingering only adds latency per POST;
# concurrent requests still share batches while earlier ones are in flight.
PRODUCER_OVERRIDES: dict[str, Any] = {"linger.ms": 0}

_TEXT = {"Content-Type": "text/plain; charset=utf-8"}
_JSON = {"Content-Type": "application/json"}


def handler_from_env(env: Mapping[str, str]) -> Callable[[Any], Any]:
    """`make_handler` configured from an environment mapping (what entry files call)."""
    function, bootstrap, registry_url = function_from_env(env)
    trace_settings = tracing_from_env(env, function.name)
    if trace_settings is not None:
        from eventing.telemetry import tracing

        tracing.configure(trace_settings)
    return make_handler(function, bootstrap, registry_url)


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
        self.output: OutputProducer | None = None

    def ready(self) -> tuple[FunctionHost, OutputProducer | None]:
        if self._pid == os.getpid() and self.host is not None:
            return self.host, self.output
        with self._lock:
            if self._pid != os.getpid() or self.host is None:
                serde = self._serde_factory() if self._serde_factory else self._make_serde()
                self.host = FunctionHost(self.function, serde, user=self.user)
                if self.host.stores and self.bootstrap:
                    # Following, not a one-off restore: a Knative Service may run several
                    # pods (or an old and a new revision during a rollout) for one
                    # partition's events, so each event reads its key's changelog to the
                    # end first (`eventing.fn.state`). Always on: the host cannot know how
                    # many instances the autoscaler runs.
                    for st in self.host.stores:
                        st.follow(self.bootstrap)
                self.producer = self._make_producer() if self.function.outputs else None
                if self.producer is not None:
                    # The poller thread serves delivery reports: request threads only sleep
                    # while they wait for room in a full queue.
                    self.output = OutputProducer(self.producer, poll=False,
                                                 queue_timeout_s=ACK_TIMEOUT_S)
                    threading.Thread(target=self._poll, args=(self.producer,),
                                     name="sluice-host-acks", daemon=True).start()
                self._pid = os.getpid()
        return self.host, self.output

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

    def run(host: FunctionHost, output: OutputProducer | None,
            event: Any) -> tuple[int, str, Acks | None]:
        """Call the function and send its outputs (without waiting for acks)."""
        acks = Acks()
        try:
            records = host.call(event)
            if records:
                if output is None:
                    raise OutputFailed("the function returned outputs but the host has no "
                                       "Kafka producer")
                output.send_acked(records, acks)
        except Exception as exc:  # noqa: BLE001 - Reject, the function's, OutputFailed
            status, error = failure(exc)
            return status, error, None
        acks.seal()
        return 200, "", acks

    def handle_one(headers: Any, body: bytes) -> Any:
        try:
            event = ce_http.from_http(headers, body, max_name_length=None)
        except ce_event.BindingError as exc:
            return f"not a CloudEvent: {exc}", 400, _TEXT
        host, output = worker.ready()
        status, error, acks = run(host, output, event)
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
            items = ce_http.batch_items(body)  # each read when its turn comes: see ordered
        except ce_event.BindingError as exc:
            return f"not a batch: {exc}", 400, _TEXT
        host, output = worker.ready()
        results: list[dict[str, Any]] = [{"status": 0} for _ in items]
        pending: list[tuple[int, Acks]] = []
        for i, item in enumerate(items):
            try:
                event = ce_json.from_object(item, max_name_length=None, index=i)
            except ce_event.BindingError as exc:
                status, error, acks = 400, f"not a CloudEvent: {exc}", None
            else:
                status, error, acks = run(host, output, event)
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
        if ce_http.mode(request.headers) == "batch":
            return handle_batch(request.headers, body)
        return handle_one(request.headers, body)

    handle.__name__ = handle.__qualname__ = ENTRY_TARGET
    return handle


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
